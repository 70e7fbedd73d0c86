"""Online re-clustering of compressed experts during training (seed003-systems.md §3.1 / §3.3.3).

Every T steps: measure S = alpha*S^w + (1-alpha)*S^f from the current effective weights and an EMA of the router-logit
centroids of the training forwards, re-group, and when the groups change *project* the old weights onto the new
groups: the new base is the members' mean effective weight and each residual comes from the truncated SVD of the
member's difference to it. Learned bases are never re-initialised; at full rank the projection is exact.

Shape legend: E = experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moeflow.analysis.similarity import (LogitCentroids, cluster_experts, cosine_matrix, fused_similarity,
                                         structural_similarity)
from moeflow.compress.experts import CompressedExperts, Layout
from moeflow.compress.fit import fit_experts
from moeflow.layers import moe_layers
from moeflow.routing.log import RoutingLog


def project_to_groups(experts: CompressedExperts, group_E: Sequence[int]) -> CompressedExperts:
    """The same experts re-parameterised on new groups (same rank): base = members' mean, residual = SVD of the rest.

    No hidden-unit alignment: the projection must keep every expert's parameters where training put them.
    """
    lay = experts.layout
    if any(g < 0 for g in lay.group_E):
        raise ValueError("re-clustering applies to base + low-rank experts, not pruned layouts")
    w_in, w_out = experts.dense_weights()
    new = fit_experts(w_in, w_out, experts.activation, Layout(tuple(group_E), lay.rank, lay.base, lay.shared_v),
                      align=False, impl=experts.impl)
    return new.to(w_in.device)


@dataclass
class Reclusterer:
    """Re-groups every compressed layer of a model every `every` steps; keeps the history for the log and plots."""

    every: int
    alpha: float = 0.5
    decay: float = 0.9  # EMA of the router-logit centroids per step
    method: str = "kmedoids"
    seed: int = 0
    centroids: dict[str, LogitCentroids] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def observe(self, model: nn.Module, log: RoutingLog) -> None:
        """Fold one training step's routing into the EMA centroids (and keep its per-expert loads)."""
        for name, layer in moe_layers(model):
            acc = self.centroids.setdefault(name, LogitCentroids.empty(layer.cfg.num_experts))
            acc.sum_EE *= self.decay
            acc.count_E *= self.decay
            for r in log.routings(layer):
                acc.add(r)

    def step(self, model: nn.Module, step: int, log: RoutingLog) -> bool:
        """Observe, and at every `every`-th step re-group; True when some layer's groups changed."""
        self.observe(model, log)
        if self.every <= 0 or step % self.every:
            return False
        changed = False
        entry: dict[str, Any] = {"step": step, "layers": {}}
        for name, layer in moe_layers(model):
            ex = layer.experts
            if not isinstance(ex, CompressedExperts) or not (ex.layout.base and ex.layout.rank):
                continue
            w_in, w_out = ex.dense_weights()
            s = fused_similarity(structural_similarity(w_in, w_out), cosine_matrix(self.centroids[name].centroids()),
                                 self.alpha)
            group = cluster_experts(s, ex.layout.num_groups, self.method, self.seed)
            loads = torch.stack([r.tokens_per_expert.double() for r in log.routings(layer)]).sum(0)
            entry["layers"][name] = {"groups": group, "changed": tuple(group) != ex.layout.group_E,
                                     "load_cv2": float(loads.var(unbiased=False) / loads.mean().square())}
            if tuple(group) != ex.layout.group_E:
                layer.experts = project_to_groups(ex, group)
                changed = True
        self.history.append(entry)
        return changed


__all__ = ["project_to_groups", "Reclusterer"]
