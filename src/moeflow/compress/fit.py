"""Fit compressed experts to trained ones, and the parameter arithmetic of each layout.

Fitting is weight-space and training-free:
- members of a group are first aligned to the group's most-used member by permuting their hidden units (an
  expert's function does not change when its hidden units are permuted; experts initialised independently are
  unaligned, so averaging them unaligned mostly cancels). Matching is greedy on the cosine of each hidden unit's
  (gate row, up row, down column): exact assignment would need scipy, which moeflow does not depend on;
- base B_g = the (optionally usage-weighted) mean of the aligned members;
- residual U_e V_e = the rank-r truncated SVD of W_e - B_g (the best rank-r fit in Frobenius norm), the singular
  values split as sqrt(S) into both factors so fine-tuning sees balanced scales;
- shared V (no base): V_g = the top-r right singular vectors of the members' stacked weights, U_e = W_e V_g^T.

Shape legend: E = experts, F = input-projection width, D = model dim, H = expert hidden dim, O/I = out/in
features of one projection, r = rank, K = group size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from moeflow.compress.experts import CompressedExperts, Layout, projection_shapes
from moeflow.config import GATED


def split_projections(w_in_EFD: Tensor, w_out_EDH: Tensor, activation: str) -> dict[str, Tensor]:
    """GroupedExperts' stacked weights as {projection: [E, O, I]} (gate rows first, then up rows)."""
    if activation in GATED:
        h = w_out_EDH.shape[2]
        return {"gate": w_in_EFD[:, :h], "up": w_in_EFD[:, h:], "down": w_out_EDH}
    return {"in": w_in_EFD, "down": w_out_EDH}


def hidden_features(projs: dict[str, Tensor], e: int) -> Tensor:
    """[H, X]: each hidden unit's incoming rows and outgoing column, concatenated (what a permutation moves)."""
    parts = [w[e] for p, w in projs.items() if p != "down"] + [projs["down"][e].t()]
    return torch.cat(parts, dim=1)


def match_hidden_units(ref_HX: Tensor, other_HX: Tensor) -> Tensor:
    """perm [H]: unit j of the aligned expert is unit perm[j] of `other`, greedily maximising cosine to `ref`."""
    a = ref_HX / ref_HX.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = other_HX / other_HX.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = (a @ b.t()).flatten()
    h = ref_HX.shape[0]
    perm = [-1] * h
    used = [False] * h
    left = h
    for flat in torch.argsort(sim, descending=True, stable=True).tolist():
        i, j = divmod(flat, h)
        if perm[i] < 0 and not used[j]:
            perm[i], used[j], left = j, True, left - 1
            if not left:
                break
    return torch.tensor(perm, dtype=torch.long)


def permute_expert(projs: dict[str, Tensor], e: int, perm_H: Tensor) -> dict[str, Tensor]:
    """Expert e's projections with its hidden units reordered by perm (same function)."""
    return {p: (w[e][:, perm_H] if p == "down" else w[e][perm_H]) for p, w in projs.items()}


def layout_params(layout: Layout, shapes: dict[str, tuple[int, int]]) -> int:
    """Parameters of a compressed layer with this layout (shapes: projection -> (out, in))."""
    g, s, r = layout.num_groups, len(layout.slots), layout.rank
    total = 0
    for o, i in shapes.values():
        total += g * o * i if layout.base else 0
        total += ((g if layout.shared_v else s) * r * i + s * o * r) if r else 0
    return total


def layout_bytes(layout: Layout, shapes: dict[str, tuple[int, int]], base_bytes: float = 2.0,
                 residual_bytes: float = 0.5) -> float:
    """Storage with the seed's formats: bases in FP16 (2 bytes), residual factors in INT4 (0.5 bytes)."""
    base = layout_params(Layout(layout.group_E, 0, True, False), shapes) if layout.base else 0
    return base * base_bytes + (layout_params(layout, shapes) - base) * residual_bytes


def seed_ratio(group_size: float, rank: int, shapes: dict[str, tuple[int, int]]) -> float:
    """The seed's per-group compression factor, generalised to O x I matrices: K sum OI / sum (OI + K r (O+I)).

    For one d x d matrix this is K / (1 + 2Kr/d) (7.53x at d=4096, K=8, r=16).
    """
    before = group_size * sum(o * i for o, i in shapes.values())
    after = sum(o * i + group_size * rank * (o + i) for o, i in shapes.values())
    return before / after


def rank_limit(shapes: dict[str, tuple[int, int]], shared_rows: int = 1) -> int:
    """The largest useful residual rank: every projection's smaller side (a shared V sees `shared_rows` x O rows)."""
    return min(min(shared_rows * o, i) for o, i in shapes.values())


def check_rank(rank: int, shapes: dict[str, tuple[int, int]], shared_rows: int = 1) -> None:
    """A residual rank must not exceed any projection's smaller side."""
    limit = rank_limit(shapes, shared_rows)
    if rank > limit:
        raise ValueError(f"rank {rank} is larger than the expert matrices allow (min side {limit}); "
                         f"use --rank {limit} or less")


def fit_experts(w_in_EFD: Tensor, w_out_EDH: Tensor, activation: str, layout: Layout,
                usage_E: Tensor | None = None, align: bool = True, impl: str = "auto") -> CompressedExperts:
    """A CompressedExperts with `layout` fitted to the given trained expert weights (see the module docstring)."""
    e, _, d = w_in_EFD.shape
    h = w_out_EDH.shape[2]
    if len(layout.group_E) != e:
        raise ValueError(f"layout has {len(layout.group_E)} experts, the weights {e}")
    shapes = projection_shapes(d, h, activation)
    biggest = max(sum(1 for g in layout.group_E if g == q) for q in range(layout.num_groups))
    check_rank(layout.rank, shapes, biggest if layout.shared_v else 1)
    dt = w_in_EFD.dtype
    module = CompressedExperts(layout, d, h, activation, impl).to(dt)
    projs = {p: w.detach() for p, w in split_projections(w_in_EFD, w_out_EDH, activation).items()}
    usage = torch.ones(e, dtype=torch.float64) if usage_E is None else usage_E.double().clamp_min(0)
    r = layout.rank
    with torch.no_grad():
        for g in range(layout.num_groups):
            members = [x for x in layout.slots if layout.group_E[x] == g]
            core = max(members, key=lambda x: (float(usage[x]), -x))
            ref = hidden_features(projs, core)
            aligned = {}
            for m in members:
                perm = match_hidden_units(ref, hidden_features(projs, m)) if (align and m != core) else None
                aligned[m] = permute_expert(projs, m, perm) if perm is not None else {p: w[m] for p, w in projs.items()}
            wts = usage[members]
            wts = wts / wts.sum() if float(wts.sum()) > 0 else torch.full_like(wts, 1.0 / len(members))
            for p in shapes:
                stack = torch.stack([aligned[m][p] for m in members]).double()  # [K, O, I]
                base = (wts.view(-1, 1, 1) * stack).sum(0) if layout.base else torch.zeros_like(stack[0])
                if layout.base:
                    getattr(module, f"{p}_base")[g] = base.to(dt)
                if not r:
                    continue
                resid = stack - base
                if layout.shared_v:
                    _, _, vh = torch.linalg.svd(resid.reshape(-1, resid.shape[2]), full_matrices=False)
                    v = vh[:r]
                    getattr(module, f"{p}_v")[g] = v.to(dt)
                    for k, m in enumerate(members):
                        getattr(module, f"{p}_u")[module.slots.index(m)] = (resid[k] @ v.t()).to(dt)
                    continue
                for k, m in enumerate(members):
                    u_, s_, vh = torch.linalg.svd(resid[k], full_matrices=False)
                    root = s_[:r].sqrt()
                    slot = module.slots.index(m)
                    getattr(module, f"{p}_u")[slot] = (u_[:, :r] * root).to(dt)
                    getattr(module, f"{p}_v")[slot] = (root.unsqueeze(1) * vh[:r]).to(dt)
    return module


def rank_for_budget(budget: float, group_E: Sequence[int], shapes: dict[str, tuple[int, int]], base: bool,
                    shared_v: bool) -> int:
    """The largest residual rank whose layout fits `budget` parameters (0 if even rank 1 does not fit)."""
    lay0 = Layout(tuple(group_E), 0, True, shared_v) if base else None
    fixed = layout_params(lay0, shapes) if lay0 is not None else 0
    lay1 = Layout(tuple(group_E), 1, base, shared_v)
    per_rank = layout_params(lay1, shapes) - fixed
    biggest = max(sum(1 for g in group_E if g == q) for q in set(group_E) if q >= 0)
    limit = rank_limit(shapes, biggest if shared_v else 1)
    return max(0, min(limit, int(math.floor((budget - fixed) / per_rank + 1e-9))))


__all__ = ["split_projections", "fit_experts", "layout_params", "layout_bytes", "seed_ratio", "check_rank",
           "rank_for_budget", "match_hidden_units", "permute_expert", "hidden_features"]
