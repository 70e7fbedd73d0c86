"""Compressed experts: a shared base per group plus a low-rank residual per expert, for every projection.

    W_e^p = B_{g(e)}^p + U_e^p V_e^p       p in (gate, up, down) for gated activations, else (in, down)

A `Layout` says which group each logical expert joins (-1: pruned, its rows output zero), the residual rank r
(0: base only, i.e. merged experts), whether there is a base at all (no base: plain truncated SVD), and whether V is
shared by the group (`shared_v`: one input basis per group, MoE-SVD / Sub-MoE style). The router is untouched:
it still routes to E logical experts, so merging needs no remap table beyond `group_E`.

Speed: rows arrive sorted by logical expert. They are permuted once into group-major order (skipped when that is
already the order), so the base GEMM runs once per group over all of the group's rows and the rank-r factors run
per expert, all through `grouped_linear`; the output is permuted back and finished by `weight_and_sum`.
Parameters are stored per slot: the kept experts in group-major order.

Shape legend: R = rows, G = groups, S = slots (kept experts, group-major), O/I = a projection's out/in features,
r = residual rank, D = model dim, H = expert hidden dim, E = logical experts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from moeflow.config import GATED
from moeflow.experts import weight_and_sum
from moeflow.ops.grouped import grouped_linear
from moeflow.ops.grouped_mlp import activate
from moeflow.ops.rows import ExpertRows


@dataclass(frozen=True)
class Layout:
    """The structure of one layer's compressed experts (saved in the checkpoint; weights go in the state dict)."""

    group_E: tuple[int, ...]  # group of each logical expert, -1 = pruned
    rank: int  # residual rank r per projection (0: no residual)
    base: bool = True  # a shared base per group (False: the experts are U V alone)
    shared_v: bool = False  # V shared by the members of a group

    def __post_init__(self) -> None:
        """Check the structure is one the module can run."""
        kept = [g for g in self.group_E if g >= 0]
        if not kept:
            raise ValueError("a compressed layer needs at least one kept expert (every group id is -1)")
        if sorted(set(kept)) != list(range(max(kept) + 1)):
            raise ValueError(f"group ids must be 0..G-1 with none missing, got {sorted(set(kept))}")
        if self.rank < 0 or (self.rank == 0 and not self.base):
            raise ValueError(f"rank must be >= 1 without a base (got {self.rank}), and never negative")

    @property
    def num_groups(self) -> int:
        """G."""
        return max(self.group_E) + 1

    @property
    def slots(self) -> list[int]:
        """The kept logical experts in group-major order (ascending ids within a group)."""
        return sorted((e for e, g in enumerate(self.group_E) if g >= 0), key=lambda e: (self.group_E[e], e))

    def to_dict(self) -> dict:
        """Plain types, for the checkpoint and config.json."""
        d = asdict(self)
        d["group_E"] = list(self.group_E)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Layout:
        """Inverse of to_dict."""
        return cls(tuple(int(g) for g in d["group_E"]), int(d["rank"]), bool(d["base"]), bool(d["shared_v"]))


def projection_shapes(d_model: int, d_hidden: int, activation: str) -> dict[str, tuple[int, int]]:
    """(out, in) of each expert projection, in the order the forward applies them."""
    if activation in GATED:
        return {"gate": (d_hidden, d_model), "up": (d_hidden, d_model), "down": (d_model, d_hidden)}
    return {"in": (d_hidden, d_model), "down": (d_model, d_hidden)}


class CompressedExperts(nn.Module):
    """Drop-in for `GroupedExperts` under the same `experts(x, rows)` contract (see moeflow.ops.rows.ExpertRows).

    Parameters per projection p: `{p}_base` [G, O, I] (if layout.base), `{p}_v` [S or G, r, I] and `{p}_u`
    [S, O, r] (if r > 0). Build empty with the layout, then fill from trained weights (moeflow.compress.fit) or
    from a state dict.
    """

    def __init__(self, layout: Layout, d_model: int, d_hidden: int, activation: str = "swiglu",
                 impl: str = "auto") -> None:
        """Allocate (zeroed) parameters for `layout`."""
        super().__init__()
        self.layout, self.activation, self.impl = layout, activation, impl
        self.num_experts, self.d_model, self.d_hidden = len(layout.group_E), d_model, d_hidden
        self.shapes = projection_shapes(d_model, d_hidden, activation)
        slots = layout.slots
        g, s, r = layout.num_groups, len(slots), layout.rank
        for p, (o, i) in self.shapes.items():
            if layout.base:
                self.register_parameter(f"{p}_base", nn.Parameter(torch.zeros(g, o, i)))
            if r:
                self.register_parameter(f"{p}_v", nn.Parameter(torch.zeros(g if layout.shared_v else s, r, i)))
                self.register_parameter(f"{p}_u", nn.Parameter(torch.zeros(s, o, r)))
        self.slots = slots
        self.group_sizes = [sum(1 for e in slots if layout.group_E[e] == q) for q in range(g)]
        # identity: every expert kept and already in group-major order, so no row permutation is needed
        self.identity_order = slots == list(range(self.num_experts))

    def _row_order(self, splits: list[int], device: torch.device) -> Tensor:
        """Row indices (into the expert-sorted rows) of the kept experts' rows, in group-major order."""
        starts = [0] * len(splits)
        for e in range(1, len(splits)):
            starts[e] = starts[e - 1] + splits[e - 1]
        parts = [torch.arange(starts[e], starts[e] + splits[e], device=device) for e in self.slots if splits[e]]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long, device=device)

    def project(self, p: str, x_RI: Tensor, group_splits: list[int], slot_splits: list[int]) -> Tensor:
        """Projection p on group-major rows: the base once per group, the rank-r factors per expert."""
        y = None
        if self.layout.base:
            w = getattr(self, f"{p}_base")
            y = grouped_linear(x_RI, w, _counts(group_splits, x_RI), group_splits, self.impl)
        if self.layout.rank:
            v, u = getattr(self, f"{p}_v"), getattr(self, f"{p}_u")
            v_splits = group_splits if self.layout.shared_v else slot_splits
            t_Rr = grouped_linear(x_RI, v, _counts(v_splits, x_RI), v_splits, self.impl)
            low = grouped_linear(t_Rr, u, _counts(slot_splits, x_RI), slot_splits, self.impl)
            y = low if y is None else y + low
        assert y is not None
        return y

    def forward(self, x: Tensor, rows: ExpertRows) -> Tensor:
        """Expert e on its `rows.splits[e]` rows: [T, D] token sums if `rows.tokens`, else [R, D] rows."""
        splits = list(rows.splits)
        if len(splits) != self.num_experts:
            raise ValueError(f"CompressedExperts holds {self.num_experts} logical experts but the plan has "
                             f"{len(splits)} splits")
        slot_splits = [splits[e] for e in self.slots]
        group_splits = [0] * self.layout.num_groups
        for e, n in zip(self.slots, slot_splits):
            group_splits[self.layout.group_E[e]] += n
        order = None if self.identity_order else self._row_order(splits, x.device)
        if rows.tokens is not None:
            ids = rows.tokens.token_ids_R
            x_RD = rows.tokens.gather(x) if order is None else x.index_select(0, ids.index_select(0, order))
        else:
            x_RD = x if order is None else x.index_select(0, order)
        if self.activation in GATED:
            h = torch.cat([self.project("gate", x_RD, group_splits, slot_splits),
                           self.project("up", x_RD, group_splits, slot_splits)], dim=1)
        else:
            h = self.project("in", x_RD, group_splits, slot_splits)
        y_RD = self.project("down", activate(h, self.activation), group_splits, slot_splits)
        if order is not None:
            # pruned experts' rows stay zero: the expert is gone, only the residual stream carries those tokens
            y_RD = y_RD.new_zeros(rows.num_rows, y_RD.shape[1]).index_copy(0, order, y_RD)
        return weight_and_sum(y_RD, rows)

    def expert_weight(self, p: str, e: int) -> Tensor:
        """Logical expert e's effective [O, I] weight of projection p (zeros for a pruned expert)."""
        o, i = self.shapes[p]
        g = self.layout.group_E[e]
        if g < 0:
            return torch.zeros(o, i, dtype=self._dtype())
        s = self.slots.index(e)
        dt = self._dtype()
        w = getattr(self, f"{p}_base")[g].detach().clone() if self.layout.base else torch.zeros(o, i, dtype=dt)
        if self.layout.rank:
            v = getattr(self, f"{p}_v")[g if self.layout.shared_v else s]
            w = w + getattr(self, f"{p}_u")[s].detach() @ v.detach()
        return w

    def dense_weights(self) -> tuple[Tensor, Tensor]:
        """(w_in [E, F, D], w_out [E, D, H]) as GroupedExperts stores them: the effective per-expert weights."""
        e = self.num_experts
        if self.activation in GATED:
            w_in = torch.stack([torch.cat([self.expert_weight("gate", i), self.expert_weight("up", i)])
                                for i in range(e)])
        else:
            w_in = torch.stack([self.expert_weight("in", i) for i in range(e)])
        return w_in, torch.stack([self.expert_weight("down", i) for i in range(e)])

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def extra_repr(self) -> str:
        """Sizes for print(model)."""
        lay = self.layout
        return (f"experts={self.num_experts}, groups={lay.num_groups}, kept={len(self.slots)}, rank={lay.rank}, "
                f"base={lay.base}, shared_v={lay.shared_v}, d_model={self.d_model}, d_hidden={self.d_hidden}")


def _counts(splits: list[int], like: Tensor) -> Tensor:
    return torch.tensor(splits, dtype=torch.long, device=like.device)


__all__ = ["Layout", "CompressedExperts", "projection_shapes"]
