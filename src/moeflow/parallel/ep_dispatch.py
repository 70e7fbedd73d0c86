"""The expert-parallel dispatcher: a local dispatcher plus all-to-alls over the EP group.

Shape legend: T = local tokens, D = model dim, E = global experts, L = experts on this rank (E // P),
P = EP group size, S = rows this rank sends (its kept assignments, sorted by global expert, hence by
destination rank), R = rows this rank's experts process (received, expert-major), U = unique (token,
destination rank) pairs (dedup mode).

Rank p holds experts [p*L, (p+1)*L), so rows sorted by global expert are already grouped by destination.
Forward of one MoE layer:
    local dispatch (sort by expert) -> exchange counts -> all-to-all rows -> re-order expert-major
    -> local experts -> re-order back -> reverse all-to-all -> local combine (weights applied at the sender)
Every all-to-all is an autograd Function whose backward is the reverse exchange. Modes:
- "variable" (dropless default): send exactly the kept rows (K per token); a count exchange and one host sync.
- "padded" (capacity default): every expert gets a fixed block of `capacity * groups` slots from every rank,
  so splits are static and equal (DeepSpeed/Tutel/GShard layout). Empty slots are zero rows: they cost bytes
  and compute (the capacity factor's price) but no gradient, and their outputs are discarded.
- "dedup": like variable, but a token goes ONCE to each rank that hosts any of its experts (DeepSeek-V3's
  "send once per node"); the receiver copies it to each local expert, applies the routing weights (sent along,
  differentiable) and sums the token's local expert outputs, so the combine also returns one row per
  (token, rank). Costs two small extra exchanges (per-row indices and weights). With hierarchical routing
  every token has exactly one destination rank, so its K rows become one row.
Routing groups: each rank routes its own tokens, so the single-process equivalent of an EP layer over P ranks
with `num_groups = g` is the same layer with `num_groups = P * g` on the concatenated batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moeflow.dispatch import DispatchPlan, plan_dispatch
from moeflow.ops.rows import ExpertRows
from moeflow.parallel.collectives import all_to_all, exchange_counts
from moeflow.parallel.groups import ParallelDims
from moeflow.routing.base import Routing, non_finite_flag, non_finite_message

MODES = ("auto", "variable", "padded", "dedup")


@dataclass
class EPDispatchPlan:
    """What combine needs to undo an expert-parallel dispatch; `counts_E`/`splits` describe the LOCAL experts."""

    mode: str
    counts_E: Tensor  # rows per local expert [L]
    splits: list[int]  # counts_E as Python ints
    inner: DispatchPlan  # this rank's plan over global experts (its tokens' rows, sorted by expert)
    send_splits: list[int]  # rows (dedup: unique rows) sent to each EP peer
    recv_splits: list[int]  # rows (dedup: unique rows) received from each EP peer
    order_R: Tensor | None = None  # variable/dedup: received row (rank-major) of each expert-major row
    slot_S: Tensor | None = None  # padded: flat slot [E * slots] of each sent row
    slots: int = 0  # padded: slots per expert from one rank
    gather_R: Tensor | None = None  # dedup: received unique row of each received (rank-major) row
    weights_R: Tensor | None = None  # dedup: routing weight of each received (rank-major) row
    token_U: Tensor | None = None  # dedup: local token of each sent unique row

    @property
    def rows(self) -> ExpertRows:
        """The received rows, expert-major, as they are: weights are applied on the tokens' own ranks."""
        return ExpertRows(self.splits, self.counts_E)


@dataclass
class CommStats:
    """Sizes of the last forward's token all-to-all (the combine all-to-all mirrors it; backward repeats both)."""

    mode: str
    send_rows: list[int]  # rows of D values per EP peer, self included
    recv_rows: list[int]
    row_bytes: int
    self_index: int
    extra_bytes: list[int]  # per peer: metadata sent with the rows (dedup: indices + weights), 0 otherwise

    @property
    def remote_bytes_sent(self) -> int:
        """Bytes this rank sent to other ranks in the dispatch all-to-all(s), metadata included."""
        return sum(n * self.row_bytes + x for j, (n, x) in enumerate(zip(self.send_rows, self.extra_bytes))
                   if j != self.self_index)


class AllToAllDispatcher:
    """Moves rows to the ranks that hold their experts and back (the `Dispatcher` contract of moeflow.dispatch).

    Build it with `parallelize(model, dims)`, which also slices the experts. `last_comm` holds the split sizes of
    the last forward (for benchmarks and tests).
    """

    def __init__(self, dims: ParallelDims, num_experts: int, num_groups: int = 1, mode: str = "auto",
                 name: str = "moe") -> None:
        """`num_groups`: routing groups per rank (the layer's cfg.num_groups), for the padded block size."""
        if mode not in MODES:
            raise ValueError(f"AllToAllDispatcher mode={mode!r} is unknown; choose one of {', '.join(MODES)}")
        self.local = dims.local_experts(num_experts, name)
        self.dims, self.num_experts = dims, num_experts
        self.num_groups, self.mode, self.name = num_groups, mode, name
        self.last_comm: CommStats | None = None

    def _mode(self, routing: Routing) -> str:
        """The mode for this routing; config-driven, so every rank picks the same one."""
        if self.mode == "auto":
            return "variable" if routing.capacity is None else "padded"
        if self.mode == "padded" and routing.capacity is None:
            raise ValueError(f"{self.name}: mode='padded' needs a capacity; set capacity_factor or use "
                             "mode='variable'")
        return self.mode

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, EPDispatchPlan]:
        """Rows for this rank's experts, expert-major: ([R, D], plan)."""
        if routing.num_experts != self.num_experts:
            raise ValueError(f"{self.name}: routing has {routing.num_experts} experts, dispatcher expects "
                             f"{self.num_experts}")
        mode = self._mode(routing)
        # every rank learns whether any peer's logits are NaN/inf before the rows move, and all of them raise
        # together: a rank that raised alone would leave its peers waiting in the next all-to-all until timeout
        bad = non_finite_flag(routing.logits_TE)
        if mode == "dedup":
            return self._dispatch_dedup(x_TD, routing, bad)
        inner = plan_dispatch(routing)
        x_SD = inner.gather(x_TD)
        if mode == "variable":
            return self._dispatch_variable(x_SD, inner, bad, x_TD, routing)
        p = self.dims.ep
        flags = exchange_counts(bad.expand(p, 1), self.dims.ep_group, self.dims, f"{self.name}: all_to_all(health)")
        self._raise_if_unhealthy(flags.view(-1).tolist(), x_TD, routing)
        return self._dispatch_padded(x_SD, inner, routing.capacity * self.num_groups, routing.capacity)

    def _raise_if_unhealthy(self, flags: list[int], x_TD: Tensor, routing: Routing) -> None:
        """Raise FloatingPointError on every rank if any EP peer (flags[j] != 0) has non-finite router logits."""
        bad = [j for j, f in enumerate(flags) if f]
        if not bad:
            return
        ranks = [self.dims.ep_ranks()[j] for j in bad]
        where = f"{self.name} (rank {self.dims.rank})"
        if flags[self.dims.ep_rank]:
            raise FloatingPointError(f"{where}: {non_finite_message(x_TD, routing)}; all {len(flags)} ranks of the "
                                     f"EP group stop here (ranks with non-finite logits: {ranks})")
        raise FloatingPointError(f"{where}: EP peer rank(s) {ranks} have non-finite router logits (their error says "
                                 "why); this rank stops too, so that no rank waits for the others")

    def _dispatch_variable(self, x_SD: Tensor, inner: DispatchPlan, bad: Tensor, x_TD: Tensor,
                           routing: Routing) -> tuple[Tensor, EPDispatchPlan]:
        """Exact rows, variable splits."""
        p, n_local, d = self.dims.ep, len(self.local), x_SD.shape[1]
        send = [sum(inner.splits[j * n_local:(j + 1) * n_local]) for j in range(p)]
        # the health flag rides along with the counts as one more column: no extra collective
        both = exchange_counts(torch.cat([inner.counts_E.view(p, n_local), bad.expand(p, 1)], 1),
                               self.dims.ep_group, self.dims, f"{self.name}: all_to_all(counts)")
        both_rows = both.tolist()
        self._raise_if_unhealthy([r[n_local] for r in both_rows], x_TD, routing)
        recv_PL, recv_rows = both[:, :n_local], [r[:n_local] for r in both_rows]
        recv = [sum(r) for r in recv_rows]
        x_recv = all_to_all(x_SD, recv, send, self.dims.ep_group, self.dims, f"{self.name}: all_to_all(dispatch)")
        order_R, counts_L, splits = self._expert_major(recv_PL, recv_rows, x_SD.device)
        self.last_comm = CommStats("variable", send, recv, d * x_SD.element_size(), self.dims.ep_rank, [0] * p)
        return x_recv.index_select(0, order_R), EPDispatchPlan("variable", counts_L, splits, inner, send, recv,
                                                               order_R=order_R)

    def _expert_major(self, recv_PL: Tensor, recv_rows: list[list[int]],
                      device: torch.device) -> tuple[Tensor, Tensor, list[int]]:
        """Permutation from received (rank-major) rows to expert-major rows, and the local expert counts."""
        p, n_local = recv_PL.shape
        expert_R = torch.repeat_interleave(torch.arange(n_local, device=device).repeat(p),
                                           recv_PL.reshape(-1).to(device))
        order_R = torch.argsort(expert_R, stable=True)
        splits = [sum(recv_rows[j][e] for j in range(p)) for e in range(n_local)]
        return order_R, recv_PL.sum(0), splits

    def _dispatch_padded(self, x_SD: Tensor, inner: DispatchPlan, slots: int,
                         capacity: int) -> tuple[Tensor, EPDispatchPlan]:
        """Fixed capacity blocks, equal splits: no count exchange, no host sync."""
        p, n_local, d = self.dims.ep, len(self.local), x_SD.shape[1]
        if max(inner.splits, default=0) > slots:
            raise RuntimeError(f"{self.name}: an expert got {max(inner.splits)} rows but the padded layout has "
                               f"{slots} slots (capacity {capacity} x {self.num_groups} groups); the layer's "
                               "num_groups must match the dispatcher's")
        expert_S = torch.repeat_interleave(torch.arange(self.num_experts, device=x_SD.device), inner.counts_E)
        start_E = torch.cumsum(inner.counts_E, 0) - inner.counts_E
        slot_S = expert_S * slots + torch.arange(x_SD.shape[0], device=x_SD.device) - start_E[expert_S]
        x_pad = x_SD.new_zeros(self.num_experts * slots, d).index_copy(0, slot_S, x_SD)
        block = [n_local * slots] * p
        x_recv = all_to_all(x_pad, block, block, self.dims.ep_group, self.dims,
                            f"{self.name}: all_to_all(dispatch, padded)")
        x_RD = x_recv.view(p, n_local, slots, d).transpose(0, 1).reshape(n_local * p * slots, d)
        counts_L = torch.full((n_local,), p * slots, dtype=torch.int64, device=inner.counts_E.device)
        self.last_comm = CommStats("padded", block, block, d * x_SD.element_size(), self.dims.ep_rank, [0] * p)
        return x_RD, EPDispatchPlan("padded", counts_L, [p * slots] * n_local, inner, block, block,
                                    slot_S=slot_S, slots=slots)

    def _dispatch_dedup(self, x_TD: Tensor, routing: Routing, bad: Tensor) -> tuple[Tensor, EPDispatchPlan]:
        """One row per (token, destination rank); per-row local indices and weights travel alongside."""
        p, n_local, d = self.dims.ep, len(self.local), x_TD.shape[1]
        group, dims, dev = self.dims.ep_group, self.dims, x_TD.device
        inner = plan_dispatch(routing)  # the ordering only: unique rows are gathered below
        t = max(routing.num_tokens, 1)
        dest_S = torch.repeat_interleave(torch.arange(p, device=dev), inner.counts_E.view(p, n_local).sum(1))
        key_U, inv_S = torch.unique(dest_S * t + inner.token_ids_R, sorted=True, return_inverse=True)
        send_u_P = torch.bincount(key_U // t, minlength=p)
        local_idx_S = inv_S - (torch.cumsum(send_u_P, 0) - send_u_P)[dest_S]  # index within its rank's block
        both = exchange_counts(torch.cat([inner.counts_E.view(p, n_local), send_u_P.unsqueeze(1), bad.expand(p, 1)],
                                         1), group, dims, f"{self.name}: all_to_all(counts)").tolist()
        self._raise_if_unhealthy([r[n_local + 1] for r in both], x_TD, routing)
        recv_rows = [r[:n_local] for r in both]
        recv_u, send_u = [r[n_local] for r in both], send_u_P.tolist()
        send = [sum(inner.splits[j * n_local:(j + 1) * n_local]) for j in range(p)]
        recv = [sum(r) for r in recv_rows]
        token_U = key_U % t
        x_recv_U = all_to_all(x_TD.index_select(0, token_U), recv_u, send_u, group, dims,
                              f"{self.name}: all_to_all(dispatch, dedup)")
        idx_R = all_to_all(local_idx_S.unsqueeze(1), recv, send, group, dims, f"{self.name}: all_to_all(indices)")
        w_R = all_to_all(inner.weights_R.unsqueeze(1), recv, send, group, dims, f"{self.name}: all_to_all(weights)")
        src_R = torch.repeat_interleave(torch.arange(p, device=dev), torch.tensor(recv, device=dev))
        u_start = torch.tensor([sum(recv_u[:j]) for j in range(p)], device=dev, dtype=torch.int64)
        gather_R = u_start[src_R] + idx_R.squeeze(1)
        recv_PL = torch.tensor(recv_rows, dtype=torch.int64, device=inner.counts_E.device).view(p, n_local)
        order_R, counts_L, splits = self._expert_major(recv_PL, recv_rows, dev)
        meta = [n * (local_idx_S.element_size() + inner.weights_R.element_size()) for n in send]
        self.last_comm = CommStats("dedup", send_u, recv_u, d * x_TD.element_size(), dims.ep_rank, meta)
        plan = EPDispatchPlan("dedup", counts_L, splits, inner, send_u, recv_u, order_R=order_R, gather_R=gather_R,
                              weights_R=w_R, token_U=token_U)
        return x_recv_U.index_select(0, gather_R.index_select(0, order_R)), plan

    def combine(self, y_RD: Tensor, plan: EPDispatchPlan) -> Tensor:
        """Send expert outputs back to their tokens' ranks and combine there: [T, D]."""
        p, n_local, d = self.dims.ep, len(self.local), y_RD.shape[1]
        group, dims = self.dims.ep_group, self.dims
        if plan.mode == "padded":
            y_recv = y_RD.view(n_local, p, plan.slots, d).transpose(0, 1).reshape(-1, d)
            y_pad = all_to_all(y_recv, plan.send_splits, plan.recv_splits, group, dims,
                               f"{self.name}: all_to_all(combine, padded)")
            return plan.inner.scatter_sum(y_pad.index_select(0, plan.slot_S), plan.inner.weights_R)
        # rank-major order again (inverse of the expert-major permutation)
        y_recv = y_RD.new_empty(y_RD.shape).index_copy(0, plan.order_R, y_RD)
        if plan.mode == "variable":
            y_SD = all_to_all(y_recv, plan.send_splits, plan.recv_splits, group, dims,
                              f"{self.name}: all_to_all(combine)")
            return plan.inner.scatter_sum(y_SD, plan.inner.weights_R)
        yw_R = y_recv * plan.weights_R.to(y_recv.dtype)
        y_recv_U = yw_R.new_zeros(sum(plan.recv_splits), d).index_add(0, plan.gather_R, yw_R)
        y_U = all_to_all(y_recv_U, plan.send_splits, plan.recv_splits, group, dims,
                         f"{self.name}: all_to_all(combine, dedup)")
        return y_U.new_zeros(plan.inner.num_tokens, d).index_add(0, plan.token_U, y_U)
