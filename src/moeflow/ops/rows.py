"""Token <-> row maps: gather a token-major tensor into expert-sorted rows, and sum rows back into their tokens.

Shape legend: T = tokens, D = model dim, K = rows per token (when fixed), R = rows (kept assignments, sorted by
expert).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from moeflow.ops.tuning import tuning


@dataclass
class TokenRows:
    """Row r reads token `token_ids_R[r]`; `bag_rows` lists each token's rows in ascending order.

    `bag_rows` is [T, K] when every token has K rows (`bag_offsets` None), else a flat list cut by `bag_offsets`
    [T], as `F.embedding_bag` takes them. Ascending row order is expert order, so a sum over a bag adds in the
    order a serial scatter-add over rows would: in fp32, fp64 and fp16 `sum` is bit-identical to `index_add` (and
    to a per-expert loop), but parallel over tokens and with no zero-filled output. In bf16, CPU embedding_bag
    rounds exact ties differently from index_add's round-to-nearest-even: sums may differ by one bf16 ulp.
    """

    token_ids_R: Tensor
    bag_rows: Tensor
    bag_offsets: Tensor | None
    num_tokens: int

    @classmethod
    def from_token_ids(cls, token_ids_R: Tensor, num_tokens: int) -> TokenRows:
        """The general map: any number of rows per token (capacity drops, expert choice)."""
        order_R = torch.argsort(token_ids_R, stable=True)  # stable: each token's rows stay ascending
        counts_T = torch.bincount(token_ids_R, minlength=num_tokens)
        return cls(token_ids_R, order_R, torch.cumsum(counts_T, 0) - counts_T, num_tokens)

    @classmethod
    def from_slot_major(cls, token_ids_R: Tensor, assignment_R: Tensor, top_k: int, num_tokens: int) -> TokenRows:
        """Every token has exactly K rows, row r holding assignment n = s*T + t (token-choice routing, no drops)."""
        r = assignment_R.numel()
        row_N = torch.empty_like(assignment_R)
        row_N[assignment_R] = torch.arange(r, device=row_N.device)  # invert the sort: each assignment's row
        rows_TK = row_N.view(top_k, num_tokens).t()
        # for K <= 2 the sum's order does not matter (a + b == b + a), so skip the sort
        return cls(token_ids_R, rows_TK.contiguous() if top_k <= 2 else rows_TK.sort(dim=1).values, None,
                   num_tokens)

    def gather(self, x_TD: Tensor) -> Tensor:
        """x[token_ids_R]: [R, D], differentiable (the gradient is summed back per token with `sum`)."""
        if torch.is_grad_enabled() and x_TD.requires_grad:
            return _GatherRows.apply(x_TD, self)
        return x_TD.index_select(0, self.token_ids_R)

    def combine(self, y_RD: Tensor, w_R: Tensor | None = None) -> Tensor:
        """out[t] = sum of w_r * y_r (or of y_r) over token t's rows: [T, D], differentiable in y and w."""
        return _CombineRows.apply(y_RD, w_R, self)

    def sum(self, y_RD: Tensor) -> Tensor:
        """out[t] = sum of y_r over token t's rows: [T, D] (zero for a token without rows); not differentiable."""
        if y_RD.shape[0] == 0 or y_RD.shape[1] == 0:
            return y_RD.new_zeros(self.num_tokens, y_RD.shape[1])
        # NOTE: CPU index_add is serial over rows (2.3 ms for [8192, 512] -> [4096, 512] on 2 cores) and needs a
        # zero-filled output; embedding_bag's sum is parallel over bags and writes each output row once (0.8 ms).
        # Below tuning().bag_min_elems embedding_bag's fixed cost (about 45 us) dominates (decode steps: a few
        # rows); both add each token's rows in ascending row order, so the two give the same bits. Off the CPU
        # always embedding_bag: CUDA's index_add uses atomics (summation order, hence bits, vary for K > 2).
        if y_RD.is_cpu and y_RD.numel() < tuning().bag_min_elems:
            return y_RD.new_zeros(self.num_tokens, y_RD.shape[1]).index_add_(0, self.token_ids_R, y_RD)
        return F.embedding_bag(self.bag_rows, y_RD, self.bag_offsets, mode="sum")


class _GatherRows(torch.autograd.Function):
    """x[token_ids_R], whose backward sums each token's row gradients with `TokenRows.sum`.

    Autograd's own backward of `index_select` is a serial index_add into a zero-filled [T, D] tensor on CPU.
    """

    @staticmethod
    def forward(ctx, x_TD: Tensor, rows: TokenRows) -> Tensor:  # type: ignore[override]
        """Gather the rows."""
        ctx.rows = rows
        return x_TD.index_select(0, rows.token_ids_R)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_RD: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        """d/dx_t = sum of the gradients of token t's rows."""
        return ctx.rows.sum(g_RD.contiguous()), None


class _CombineRows(torch.autograd.Function):
    """out[t] = sum of w_r * y_r over the rows r of token t, with a hand-written backward.

    Autograd through `y * w` then a scatter would keep an extra [R, D] product and build its gradients from
    an expanded copy; here the backward is one gather of the output gradient, reused in place. With w = None the
    rows arrive already weighted (the experts applied the weights) and nothing is saved but the token ids.
    """

    @staticmethod
    def forward(ctx, y_RD: Tensor, w_R: Tensor | None, rows: TokenRows) -> Tensor:  # type: ignore[override]
        """Weighted sum of each token's rows (a gather-sum over the token's bag of rows: deterministic)."""
        ctx.weighted = w_R is not None
        token_ids_R = rows.token_ids_R
        ctx.save_for_backward(*((y_RD, w_R, token_ids_R) if ctx.weighted else (token_ids_R,)))
        yw_RD = y_RD * w_R.unsqueeze(1) if ctx.weighted else y_RD
        return rows.sum(yw_RD)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_TD: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        """d/dy_r = w_r * g[t_r]; d/dw_r = <g[t_r], y_r>."""
        if not ctx.weighted:
            (token_ids_R,) = ctx.saved_tensors
            return g_TD.index_select(0, token_ids_R), None, None
        y_RD, w_R, token_ids_R = ctx.saved_tensors
        g_RD = g_TD.index_select(0, token_ids_R)
        # row dot products as mul + sum: 30% faster than linalg.vecdot on CPU (3.1 vs 4.5 ms at [8192, 512])
        gw_R = (g_RD * y_RD).sum(1) if ctx.needs_input_grad[1] else None
        gy_RD = g_RD.mul_(w_R.unsqueeze(1)) if ctx.needs_input_grad[0] else None
        return gy_RD, gw_R, None


@dataclass
class ExpertRows:
    """What the experts run: `splits[e]` rows for (local) expert e, in expert order.

    tokens: given, the experts read row r from the token-major input at `tokens.token_ids_R[r]` and return each
        token's sum of its rows, [T, D]; None, the input is the rows themselves, [R, D], and so is the output.
    weights_R: given, each output row is scaled by it (differentiable) before any sum; None, the dispatcher's
        combine applies the weights.
    """

    splits: list[int]
    counts_E: Tensor
    tokens: TokenRows | None = None
    weights_R: Tensor | None = None

    @property
    def num_rows(self) -> int:
        """R, the rows the experts run."""
        return sum(self.splits)
