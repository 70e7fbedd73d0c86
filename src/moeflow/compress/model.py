"""Whole-model compression: calibrate (routing records), measure similarity, pick layouts per method, swap experts.

Methods (each at a target ratio of expert parameters, compressed / original):
- `base-lowrank`: the seed's method. Experts are grouped on the fused similarity S (balanced k-medoids), each
  group gets a base (members' mean) and each expert a rank-r residual; r is the largest that fits the budget.
- `random`: the same with seeded random balanced groups (the control for the similarity).
- `merge`: MC-SMoE-style. The round(ratio*E) most-used experts are group cores, every other expert joins the
  core it is most similar to on S, and the group becomes one expert, the usage-weighted mean of its aligned members;
  the router still picks logical experts, which now share weights (the router remap).
- `svd-shared`: one V per layer shared by all experts (MoE-SVD / Sub-MoE style), U per expert.
- `svd`: per-expert truncated SVD, no base.
- `prune`: keep the round(ratio*E) experts with the largest router-weighted usage on the calibration set; the
  router's bias hides the others (logit -1e9), so tokens choose their top-k among the kept experts.

Shape legend: E = experts, T = tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moeflow.analysis.similarity import (LogitCentroids, cluster_experts, cosine_matrix, fused_similarity,
                                         structural_similarity)
from moeflow.compress.experts import CompressedExperts, Layout, projection_shapes
from moeflow.compress.fit import fit_experts, layout_bytes, layout_params, rank_for_budget, rank_limit, seed_ratio
from moeflow.config import ConfigError
from moeflow.experts import GroupedExperts
from moeflow.layers import MoELayer, moe_layers
from moeflow.routing.log import record_routing

METHODS = ("base-lowrank", "merge", "svd-shared", "svd", "prune", "random")
PRUNED_LOGIT = -1e9  # finite: softmax gives exactly 0 in fp32 and the router's finite-logit check still passes


class CompressError(ConfigError):
    """Bad compression input (method, ratio, rank, run), with the fix in the message."""


@dataclass
class LayerSimilarity:
    """One MoE layer's similarities and calibration statistics."""

    name: str
    s_w: Tensor  # [E, E] structural
    s_f: Tensor  # [E, E] functional (router-logit centroids)
    s: Tensor  # [E, E] fused
    tokens_E: Tensor  # kept assignments per expert on the calibration set
    usage_E: Tensor  # summed combine weights per expert (router-weighted usage)


@dataclass
class Calibration:
    """Per-layer logit centroids and usage over the calibration forwards."""

    centroids: dict[str, LogitCentroids] = field(default_factory=dict)
    usage: dict[str, Tensor] = field(default_factory=dict)
    tokens: int = 0


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any]) -> Calibration:
    """Run `forward(model, batch)` on each batch inside record_routing() and accumulate each layer's statistics."""
    layers = moe_layers(model)
    if not layers:
        raise CompressError("the model has no MoE layer: a dense run has no experts to compress")
    cal = Calibration({n: LogitCentroids.empty(m.cfg.num_experts) for n, m in layers},
                      {n: torch.zeros(m.cfg.num_experts, dtype=torch.float64) for n, m in layers})
    was = model.training
    model.eval()
    for batch in batches:
        with record_routing() as log:
            forward(model, batch)
        for name, layer in layers:
            for r in log.routings(layer):
                cal.centroids[name].add(r)
                kept = r.kept_N
                cal.usage[name].index_add_(0, r.expert_ids_N[kept].cpu(), r.weights_N[kept].detach().double().cpu())
                cal.tokens += r.num_tokens if name == layers[0][0] else 0
    model.train(was)
    return cal


def _dense_experts(layer: MoELayer) -> tuple[Tensor, Tensor]:
    """(w_in, w_out) of a layer's experts, plain or already compressed."""
    ex = layer.experts
    if isinstance(ex, GroupedExperts):
        return ex.w_in.detach(), ex.w_out.detach()
    if isinstance(ex, CompressedExperts):
        return ex.dense_weights()
    raise CompressError(f"experts of type {type(ex).__name__} cannot be compressed (GroupedExperts expected)")


def layer_similarities(model: nn.Module, cal: Calibration, alpha: float = 0.5) -> list[LayerSimilarity]:
    """S^w, S^f and S for every MoE layer, in layer order."""
    out = []
    for name, layer in moe_layers(model):
        w_in, w_out = _dense_experts(layer)
        s_w = structural_similarity(w_in, w_out)
        s_f = cosine_matrix(cal.centroids[name].centroids())
        out.append(LayerSimilarity(name, s_w, s_f, fused_similarity(s_w, s_f, alpha),
                                   cal.centroids[name].count_E.clone(), cal.usage[name].clone()))
    return out


def _cores_assign(s_EE: Tensor, usage_E: Tensor, num_groups: int) -> list[int]:
    """MC-SMoE grouping: the most-used experts are cores; every other expert joins its most similar core."""
    order = sorted(range(len(usage_E)), key=lambda e: (-float(usage_E[e]), e))
    cores = order[:num_groups]
    group = [-1] * len(usage_E)
    for g, c in enumerate(sorted(cores)):
        group[c] = g
    for e in range(len(usage_E)):
        if group[e] < 0:
            best = max(sorted(cores), key=lambda c: (float(s_EE[e, c]), -c))
            group[e] = group[best]
    return group


def default_groups(num_experts: int, ratio: float) -> int:
    """Groups for base-lowrank: about half the budget on bases (G = floor(ratio*E/2), at least 1)."""
    return max(1, int(ratio * num_experts / 2))


def choose_layout(method: str, ratio: float, sim: LayerSimilarity, shapes: dict[str, tuple[int, int]],
                  groups: int | None = None, rank: int | None = None, cluster: str = "kmedoids",
                  seed: int = 0) -> Layout:
    """The layout of one layer for a method at a target ratio (or an explicit --groups / --rank)."""
    if method not in METHODS:
        raise CompressError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not 0.0 < ratio < 1.0:
        raise CompressError(f"--ratio must lie strictly between 0 and 1 (the kept share of expert parameters), "
                            f"got {ratio}")
    e = sim.s.shape[0]
    budget = ratio * e * sum(o * i for o, i in shapes.values())
    keep = max(1, round(ratio * e))
    if method == "prune":
        order = sorted(range(e), key=lambda x: (-float(sim.usage_E[x]), x))
        kept = sorted(order[:keep])
        return Layout(tuple(kept.index(x) if x in kept else -1 for x in range(e)), 0, True, False)
    if method == "merge":
        return Layout(tuple(_cores_assign(sim.s, sim.usage_E, keep)), 0, True, False)
    if method in ("svd", "svd-shared"):
        group_E = (0,) * e if method == "svd-shared" else tuple(range(e))
        r = rank if rank is not None else rank_for_budget(budget, group_E, shapes, False, method == "svd-shared")
        if r < 1:
            raise CompressError(f"--ratio {ratio} is too small for {method}: even rank 1 exceeds the budget")
        return _checked(Layout(group_E, r, False, method == "svd-shared"), shapes)
    g = groups if groups is not None else default_groups(e, ratio)
    if not 1 <= g <= e:
        raise CompressError(f"--groups {g} must lie in 1..{e} (the layer has {e} experts)")
    group_E = cluster_experts(sim.s, g, "random" if method == "random" else cluster, seed)
    r = rank if rank is not None else rank_for_budget(budget, group_E, shapes, True, False)
    if r < 1 and rank is None:
        raise CompressError(f"--ratio {ratio} with {g} groups leaves no room for a residual: the bases alone use "
                            f"{g}/{e} of the experts; pass fewer --groups or use merge")
    return _checked(Layout(tuple(group_E), r, True, False), shapes)


def _checked(layout: Layout, shapes: dict[str, tuple[int, int]]) -> Layout:
    biggest = max(layout.group_E.count(q) for q in range(layout.num_groups))
    limit = rank_limit(shapes, biggest if layout.shared_v else 1)
    if layout.rank > limit:
        raise CompressError(f"rank {layout.rank} is larger than the expert matrices allow (their smaller side is "
                            f"{limit}); pass --rank {limit} or less")
    return layout


@dataclass
class CompressionInfo:
    """What compress did to each layer and what it costs."""

    layouts: dict[str, Layout]
    params_before: int  # expert parameters, all layers
    params_after: int
    bytes_after_fp16_int4: float
    seed_formula: float | None  # the seed's per-group factor at this K and r (base-lowrank / random only)
    per_group_factor: float | None  # the same factor computed from the actual parameters of the groups

    @property
    def ratio(self) -> float:
        """Compressed / original expert parameters."""
        return self.params_after / self.params_before

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for compression.json."""
        return {"layouts": {n: lay.to_dict() for n, lay in self.layouts.items()}, "params_before": self.params_before,
                "params_after": self.params_after, "ratio": self.ratio,
                "bytes_after_fp16_int4": self.bytes_after_fp16_int4, "seed_formula": self.seed_formula,
                "per_group_factor": self.per_group_factor}


def compress_model(model: nn.Module, sims: list[LayerSimilarity], method: str, ratio: float,
                   groups: int | None = None, rank: int | None = None, cluster: str = "kmedoids",
                   seed: int = 0, align: bool = True) -> CompressionInfo:
    """Replace every MoE layer's experts by fitted CompressedExperts, in place; returns the accounting."""
    layers = dict(moe_layers(model))
    layouts: dict[str, Layout] = {}
    before = after = 0
    nbytes = 0.0
    factors: list[tuple[float, float]] = []
    for sim in sims:
        layer = layers[sim.name]
        w_in, w_out = _dense_experts(layer)
        cfg = layer.cfg
        shapes = projection_shapes(cfg.d_model, cfg.d_hidden, cfg.activation)
        layout = choose_layout(method, ratio, sim, shapes, groups, rank, cluster, seed)
        usage = sim.usage_E if method in ("merge", "prune") else None
        new = fit_experts(w_in, w_out, cfg.activation, layout, usage, align=align, impl=cfg.expert_impl)
        layer.experts = new.to(w_in.device)
        if method == "prune":
            mask_router(layer, layout)
        layouts[sim.name] = layout
        before += cfg.num_experts * sum(o * i for o, i in shapes.values())
        after += layout_params(layout, shapes)
        nbytes += layout_bytes(layout, shapes)
        if layout.base and layout.rank:
            k = cfg.num_experts / layout.num_groups
            factors.append((seed_ratio(k, layout.rank, shapes),
                            cfg.num_experts * sum(o * i for o, i in shapes.values()) / layout_params(layout, shapes)))
    seed_f = sum(f for f, _ in factors) / len(factors) if factors else None
    actual = sum(a for _, a in factors) / len(factors) if factors else None
    return CompressionInfo(layouts, before, after, nbytes, seed_f, actual)


def mask_router(layer: MoELayer, layout: Layout) -> None:
    """Hide pruned experts from the router: their logit bias becomes PRUNED_LOGIT (a zero bias is added if the
    router had none; the saved config then says model.moe.router_bias=True so the run loads)."""
    if layer.router.bias is None:
        layer.router.bias = nn.Parameter(torch.zeros(layer.cfg.num_experts, device=layer.router.weight.device))
    bias = layer.router.bias
    with torch.no_grad():
        for e, g in enumerate(layout.group_E):
            if g < 0:
                bias[e] = PRUNED_LOGIT


def apply_layouts(model: nn.Module, layouts: dict[str, dict[str, Any]]) -> None:
    """Give a freshly built model the compressed experts a checkpoint's weights belong to (before load_state_dict)."""
    layers = dict(moe_layers(model))
    for name, d in layouts.items():
        if name not in layers:
            raise CompressError(f"the checkpoint compresses MoE layer {name!r}, which this model does not have")
        cfg = layers[name].cfg
        layers[name].experts = CompressedExperts(Layout.from_dict(d), cfg.d_model, cfg.d_hidden, cfg.activation,
                                                 cfg.expert_impl)


def expert_parameter_count(model: nn.Module) -> int:
    """Parameters held by the experts of every MoE layer."""
    return sum(p.numel() for _, m in moe_layers(model) for p in m.experts.parameters())


__all__ = ["METHODS", "CompressError", "LayerSimilarity", "Calibration", "CompressionInfo", "calibrate",
           "layer_similarities", "choose_layout", "compress_model", "apply_layouts", "mask_router",
           "expert_parameter_count", "default_groups"]
