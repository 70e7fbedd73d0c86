"""Local dispatcher: permute kept assignments into expert-contiguous rows, and combine them back.

Shape legend: T = tokens, D = model dim, E = experts, K = experts per token, N = assignments,
R = dispatched rows (kept assignments, sorted by expert).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from moeflow.ops.rows import TokenRows
from moeflow.routing.base import Routing


@dataclass
class DispatchPlan:
    """How rows were permuted, so that combine can undo it."""

    assignment_R: Tensor  # index n into the Routing's assignments of each row
    token_ids_R: Tensor  # token of each row
    weights_R: Tensor  # combine weight of each row
    counts_E: Tensor  # rows per expert (int64, on device)
    splits: list[int]  # counts_E as Python ints (the one host sync of the layer)
    num_tokens: int
    top_k: int
    num_assignments: int
    _rows: TokenRows | None = field(default=None, repr=False)

    def token_rows(self) -> TokenRows:
        """The map between tokens and rows (computed once per plan, on first use)."""
        if self._rows is None:
            r, k, t = self.assignment_R.numel(), self.top_k, self.num_tokens
            if k and r == self.num_assignments == k * t:
                self._rows = TokenRows.from_slot_major(self.token_ids_R, self.assignment_R, k, t)
            else:
                self._rows = TokenRows.from_token_ids(self.token_ids_R, t)
        return self._rows


class LocalDispatcher:
    """Sort kept assignments by expert (stable, so each expert sees its tokens in order) and gather rows.

    Dropped assignments never become rows, so they contribute exactly zero; a token with none kept gets a zero
    output row. Knows nothing of gating math or devices.
    """

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, DispatchPlan]:
        """Gather the rows each expert must process, grouped by expert: ([R, D], plan)."""
        plan = self.plan(routing)
        if x_TD.device.type == "cpu":
            return plan.token_rows().gather(x_TD), plan
        return x_TD.index_select(0, plan.token_ids_R), plan

    def plan(self, routing: Routing) -> DispatchPlan:
        """The row order alone, for experts that gather their rows themselves (`DispatchPlan.token_rows`)."""
        expert_N = routing.expert_ids_N
        n = expert_N.numel()
        if routing.capacity is None and routing.routed_N.all():
            assignment_R = torch.argsort(expert_N, stable=True)
        else:
            kept = torch.nonzero(routing.kept_N).squeeze(1)
            assignment_R = kept[torch.argsort(expert_N[kept], stable=True)]
        counts_E = torch.bincount(expert_N[assignment_R], minlength=routing.num_experts)
        token_ids_R = routing.token_ids_N[assignment_R]
        plan = DispatchPlan(assignment_R=assignment_R, token_ids_R=token_ids_R,
                            weights_R=routing.weights_N[assignment_R], counts_E=counts_E,
                            splits=counts_E.tolist(), num_tokens=routing.num_tokens, top_k=routing.top_k,
                            num_assignments=n)
        return plan

    def row_weights(self, plan: DispatchPlan) -> Tensor:
        """The combine weight of each dispatched row, for experts that scale their outputs themselves."""
        return plan.weights_R

    def combine(self, y_RD: Tensor, plan: DispatchPlan, weighted: bool = False) -> Tensor:
        """Weighted sum of each token's expert outputs: [T, D] (zero where nothing was kept).

        weighted: the rows already carry their combine weights (the experts applied `row_weights`).
        """
        w_R = None if weighted else plan.weights_R.to(y_RD.dtype)
        if y_RD.device.type == "cpu" or plan.top_k == 0:
            return plan.token_rows().combine(y_RD, w_R)
        # token-choice off CPU: put rows back in slot-major order and sum the K slots (CUDA's index_add uses
        # atomics, this does not: deterministic)
        yw_RD = y_RD if w_R is None else y_RD * w_R.unsqueeze(1)
        out_ND = yw_RD.new_zeros(plan.num_assignments, y_RD.shape[1]).index_copy(0, plan.assignment_R, yw_RD)
        return out_ND.view(plan.top_k, plan.num_tokens, y_RD.shape[1]).sum(0)
