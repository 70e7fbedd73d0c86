"""The dispatch contract: a dispatcher's plan tells the experts which rows to run, where each row comes from and
who applies the combine weights; the experts take (x, rows) and return the layout the plan names.

    x_in, plan = dispatcher.dispatch(x_TD, routing)     # LocalDispatcher: x_in is x_TD itself
    y = experts(x_in, plan.rows)                        # [T, D] if rows.tokens is set, else [R, D]
    y_TD = dispatcher.combine(y, plan)                  # LocalDispatcher: y already is [T, D]

Locally the experts gather their rows from the token-major input themselves and sum their weighted outputs back
per token (on CPU, inside each expert's chunk: no [R, D] copy of the input or of the output gradient). An
expert-parallel dispatcher hands them received rows instead (`rows.tokens` None) and applies the weights on the
tokens' own ranks. A replica-aware dispatcher only has to produce another `ExpertRows` (rows per physical slot).

Shape legend: T = tokens, D = model dim, E = experts, K = experts per token, N = assignments,
R = dispatched rows (kept assignments, sorted by expert).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from moeflow.ops.rows import ExpertRows, TokenRows
from moeflow.routing.base import Routing, logits_finite, non_finite_message


@dataclass
class DispatchPlan:
    """The permutation of a Routing's kept assignments into expert-contiguous rows."""

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

    @property
    def rows(self) -> ExpertRows:
        """Local experts gather and weight their own rows and sum them per token."""
        return ExpertRows(self.splits, self.counts_E, self.token_rows(), self.weights_R)

    def gather(self, x_TD: Tensor) -> Tensor:
        """The rows themselves, [R, D] (differentiable): for dispatchers that move rows elsewhere."""
        return self.token_rows().gather(x_TD)

    def scatter_sum(self, y_RD: Tensor, weights_R: Tensor | None = None) -> Tensor:
        """out[t] = sum over token t's rows of (w_r *) y_r: [T, D], zero where nothing was kept (differentiable)."""
        return self.token_rows().combine(y_RD, None if weights_R is None else weights_R.to(y_RD.dtype))


def plan_dispatch(routing: Routing) -> DispatchPlan:
    """Sort kept assignments by expert (stable, so each expert sees its tokens in order).

    Dropped assignments get the key E and sort last; the first R = (number kept) entries are the rows. One sort
    and no branch on the routing's contents, dropless or not.
    """
    e = routing.num_experts
    key_N = torch.where(routing.kept_N, routing.expert_ids_N, e)
    order_N = torch.argsort(key_N, stable=True)
    counts_E = torch.bincount(key_N, minlength=e + 1)[:e]
    splits = counts_E.tolist()
    assignment_R = order_N[:sum(splits)]
    return DispatchPlan(assignment_R=assignment_R, token_ids_R=routing.token_ids_N[assignment_R],
                        weights_R=routing.weights_N[assignment_R], counts_E=counts_E, splits=splits,
                        num_tokens=routing.num_tokens, top_k=routing.top_k, num_assignments=key_N.numel())


class Dispatcher(Protocol):
    """Moves tokens to experts and back; knows nothing of gating math."""

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Any]:
        """(what the experts read, a plan whose `.rows` is their ExpertRows)."""
        ...

    def combine(self, y: Tensor, plan: Any) -> Tensor:
        """The experts' output back to one [T, D] row per token."""
        ...


class LocalDispatcher:
    """All experts on this process: the experts gather, weight and sum their rows themselves (see ExpertRows).

    Dropped assignments never become rows, so they contribute exactly zero; a token with none kept gets a zero
    output row. NaN/inf router logits raise here, before they could route arbitrarily and steal capacity.
    """

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, DispatchPlan]:
        """(x_TD unchanged, the plan)."""
        plan = plan_dispatch(routing)
        # after the plan's host sync, which already waited for the logits: the check adds no stall. Compiled
        # graphs skip it (one more graph break); the trainer's finite-loss check remains.
        if not torch.compiler.is_compiling() and not logits_finite(routing.logits_TE):
            raise FloatingPointError(f"MoELayer: {non_finite_message(x_TD, routing)}")
        return x_TD, plan

    def combine(self, y_TD: Tensor, plan: DispatchPlan) -> Tensor:
        """The experts already summed each token's weighted rows: y_TD as it is."""
        return y_TD
