"""Differentiable all-to-all with variable splits, and the per-expert count exchange that sizes it.

`all_to_all_single` splits along dim 0: rank r sends rows `input_splits[j]` to rank j and receives
`output_splits[j]` rows from rank j. Its backward is the same exchange with the splits swapped (Megatron
`_AllToAll`, Tutel `PrimAllToAll`). gloo runs it on CPU with uneven and zero splits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from moeflow.parallel.groups import ParallelDims
from moeflow.parallel.watchdog import collective_guard


def _exchange(x: Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup,
              dims: ParallelDims, name: str) -> Tensor:
    """One all_to_all_single, guarded; checks the send buffer matches the splits (a mismatch would hang peers)."""
    if x.shape[0] != sum(input_splits):
        raise ValueError(f"{name}: send buffer has {x.shape[0]} rows but input_splits sum to {sum(input_splits)}")
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    with collective_guard(name, dims):
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows to peers in forward; their gradients back to the senders in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, output_splits: list[int], input_splits: list[int],  # type: ignore[override]
                group: dist.ProcessGroup, dims: ParallelDims, name: str) -> Tensor:
        """Send x's row blocks to the ranks of `group`; returns the received rows."""
        ctx.splits, ctx.group, ctx.dims, ctx.name = (output_splits, input_splits), group, dims, name
        return _exchange(x, output_splits, input_splits, group, dims, name)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None, None, None, None]:  # type: ignore[override]
        """The reverse exchange: received-row gradients go back to where the rows came from."""
        output_splits, input_splits = ctx.splits
        gx = _exchange(g, input_splits, output_splits, ctx.group, ctx.dims, ctx.name + " (backward)")
        return gx, None, None, None, None, None


def all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup,
               dims: ParallelDims, name: str = "all_to_all") -> Tensor:
    """Differentiable `all_to_all_single` along dim 0 with per-peer row counts; errors become PeerFailureError."""
    return _AllToAll.apply(x, output_splits, input_splits, group, dims, name)


def exchange_counts(send_counts_PE: Tensor, group: dist.ProcessGroup, dims: ParallelDims,
                    name: str = "all_to_all(counts)") -> Tensor:
    """Swap per-(peer, local expert) row counts: in [P, E_local] rows this rank sends to peer p's expert e,
    out [P, E_local] rows peer p sends to this rank's expert e (int64, same device)."""
    p, e_local = send_counts_PE.shape
    flat = send_counts_PE.to(torch.int64).reshape(-1).contiguous()
    out = torch.empty_like(flat)
    with collective_guard(name, dims):
        dist.all_to_all_single(out, flat, [e_local] * p, [e_local] * p, group=group)
    return out.view(p, e_local)
