"""Cluster-aware expert placement for expert parallelism: put each cluster of similar experts on one rank.

The expert-parallel code (moeflow.parallel) gives rank i the contiguous block of experts [i*E/ep, (i+1)*E/ep).
`cluster_placement` orders the experts so that each cluster fills consecutive slots of one rank where it fits
(clusters packed largest first onto the rank with most free slots; one that fits nowhere is split, and counted),
and `relabel_experts` applies that order to a layer: router rows and expert weights move together, so the model's
function is unchanged (logical expert ids are relabelled; the math never sees them) while tokens of one cluster
travel to one rank, as hierarchical routing intends.

Shape legend: E = experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moeflow.experts import GroupedExperts
from moeflow.layers import MoELayer


@dataclass
class Placement:
    """order[new_id] = old expert id; rank_E[new_id] = the EP rank that holds it; split = clusters cut across ranks."""

    order: list[int]
    rank_E: list[int]
    split: int


def cluster_placement(group_E: Sequence[int], ep: int) -> Placement:
    """Expert order for `ep` ranks that keeps each cluster on one rank where it fits (see the module docstring)."""
    e = len(group_E)
    if ep < 1 or e % ep:
        raise ValueError(f"{e} experts cannot be split evenly over ep={ep} ranks: choose ep from the divisors of {e}")
    per = e // ep
    clusters: dict[int, list[int]] = {}
    for x, g in enumerate(group_E):
        clusters.setdefault(g, []).append(x)
    free = [per] * ep
    slots: list[list[int]] = [[] for _ in range(ep)]
    split = 0
    for g in sorted(clusters, key=lambda g: (-len(clusters[g]), g)):
        members = clusters[g]
        fits = [r for r in range(ep) if free[r] >= len(members)]
        if fits:
            r = max(fits, key=lambda r: (free[r], -r))
            slots[r] += members
            free[r] -= len(members)
            continue
        split += 1
        for x in members:  # cut it: fill one rank completely (the one with most room) before the next
            r = max(range(ep), key=lambda r: (0 < free[r] < per, free[r], -r))
            slots[r].append(x)
            free[r] -= 1
    order = [x for r in range(ep) for x in slots[r]]
    return Placement(order, [r for r in range(ep) for _ in slots[r]], split)


def relabel_experts(layer: MoELayer, order: Sequence[int]) -> None:
    """New expert i = old expert order[i]: permute the router's per-expert tensors and the expert weights in place."""
    e = layer.cfg.num_experts
    if sorted(order) != list(range(e)):
        raise ValueError(f"order must be a permutation of 0..{e - 1}")
    if not isinstance(layer.experts, GroupedExperts):
        raise ValueError("relabel the experts before compressing them (GroupedExperts expected)")
    idx = torch.tensor(list(order), dtype=torch.long)
    with torch.no_grad():
        for t in [*layer.router.parameters(recurse=False), *layer.router.buffers(recurse=False),
                  layer.experts.w_in, layer.experts.w_out]:
            if t.dim() and t.shape[0] == e:
                t.copy_(t.index_select(0, idx.to(t.device)))


__all__ = ["Placement", "cluster_placement", "relabel_experts"]
