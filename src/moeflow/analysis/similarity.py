"""Expert similarity per MoE layer and balanced clustering of experts on it (seed003-systems.md §3.1).

    S^w[i, j] = cos(vec W_i, vec W_j)       W_e: expert e's projections, flattened and concatenated
    S^f[i, j] = cos(mu_i, mu_j)             mu_e: mean router-logit vector l(x) in R^E of the tokens routed to e
    S         = alpha * S^w + (1 - alpha) * S^f

S^f is measured over a calibration set from the Routing records of `record_routing()` (never from module state).
An expert that received no token has no centroid: its S^f row is 0 off the diagonal (1 on it).

Clustering cuts the E experts of a layer into G groups of at most ceil(E / G) members, deterministically for a
seed: balanced k-medoids (`kmedoids`), balanced average-linkage agglomeration (`agglomerative`), or seeded
random groups (`random`, the control).

Shape legend: E = experts, F = input-projection width, D = model dim, H = expert hidden dim, T = tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from moeflow.routing.base import Routing

CLUSTER_METHODS = ("kmedoids", "agglomerative", "random")


def cosine_matrix(v_EX: Tensor) -> Tensor:
    """Pairwise cosine similarity of the rows of v [E, X] in fp64; a zero row is similar only to itself."""
    v = v_EX.detach().double()
    norm = v.norm(dim=1, keepdim=True)
    unit = torch.where(norm > 0, v / norm.clamp_min(1e-300), torch.zeros_like(v))
    s = unit @ unit.t()
    s.fill_diagonal_(1.0)
    return s


def structural_similarity(w_in_EFD: Tensor, w_out_EDH: Tensor) -> Tensor:
    """S^w [E, E]: cosine of each expert's flattened, concatenated projection weights."""
    e = w_in_EFD.shape[0]
    return cosine_matrix(torch.cat([w_in_EFD.reshape(e, -1), w_out_EDH.reshape(e, -1)], dim=1))


@dataclass
class LogitCentroids:
    """Running sums of router-logit vectors per expert (over kept assignments), for S^f."""

    sum_EE: Tensor
    count_E: Tensor

    @classmethod
    def empty(cls, num_experts: int) -> LogitCentroids:
        """No tokens seen yet."""
        return cls(torch.zeros(num_experts, num_experts, dtype=torch.float64),
                   torch.zeros(num_experts, dtype=torch.float64))

    def add(self, routing: Routing) -> None:
        """Add one forward's kept assignments: mu_e accumulates l(x_t) for every kept (t, e)."""
        kept = routing.kept_N
        experts = routing.expert_ids_N[kept].cpu()
        logits = routing.logits_TE.detach().double().cpu()[routing.token_ids_N[kept].cpu()]
        self.sum_EE.index_add_(0, experts, logits)
        self.count_E += torch.bincount(experts, minlength=self.count_E.numel()).double()

    def centroids(self) -> Tensor:
        """mu [E, E] (row e: the mean logit vector of e's tokens; zeros for an expert without tokens)."""
        return self.sum_EE / self.count_E.clamp_min(1).unsqueeze(1)


def functional_similarity(routings: Iterable[Routing], num_experts: int) -> tuple[Tensor, Tensor]:
    """(S^f [E, E], tokens per expert [E]) over the Routing records of one layer's calibration forwards."""
    acc = LogitCentroids.empty(num_experts)
    for r in routings:
        acc.add(r)
    return cosine_matrix(acc.centroids()), acc.count_E


def fused_similarity(s_w: Tensor, s_f: Tensor, alpha: float = 0.5) -> Tensor:
    """S = alpha * S^w + (1 - alpha) * S^f."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return alpha * s_w + (1.0 - alpha) * s_f


def _check_groups(num_experts: int, num_groups: int) -> int:
    if not 1 <= num_groups <= num_experts:
        raise ValueError(f"cannot cut {num_experts} experts into {num_groups} groups: use 1..{num_experts} groups")
    return math.ceil(num_experts / num_groups)


def _capacity_assign(s_EE: Tensor, medoids: Sequence[int], cap: int) -> list[int]:
    """Each expert to a medoid, most similar pairs first, at most `cap` per group (medoids to themselves first)."""
    e = s_EE.shape[0]
    group = [-1] * e
    size = [0] * len(medoids)
    for g, m in enumerate(medoids):
        group[m], size[g] = g, 1
    pairs = sorted(((float(s_EE[i, m]), -i, -g) for i in range(e) for g, m in enumerate(medoids)), reverse=True)
    for _, ni, ng in pairs:
        i, g = -ni, -ng
        if group[i] < 0 and size[g] < cap:
            group[i], size[g] = g, size[g] + 1
    return group


def within_similarity(s_EE: Tensor, group_E: Sequence[int]) -> float:
    """Mean similarity over the pairs of distinct experts that share a group (the clustering objective)."""
    total, pairs = 0.0, 0
    for i in range(len(group_E)):
        for j in range(i + 1, len(group_E)):
            if group_E[i] == group_E[j] and group_E[i] >= 0:
                total, pairs = total + float(s_EE[i, j]), pairs + 1
    return total / pairs if pairs else 1.0


def cluster_kmedoids(s_EE: Tensor, num_groups: int, seed: int = 0, restarts: int = 8, iters: int = 20) -> list[int]:
    """Balanced k-medoids on S: capacity-limited assignment, medoid = the member most similar to the rest."""
    e = s_EE.shape[0]
    cap = _check_groups(e, num_groups)
    gen = torch.Generator().manual_seed(seed)
    best, best_score = None, -math.inf
    for r in range(restarts):
        # restart 0: farthest-point init from the most central expert (deterministic); then seeded random inits
        if r == 0:
            medoids = [int(s_EE.sum(1).argmax())]
            while len(medoids) < num_groups:
                medoids.append(int(s_EE[:, medoids].max(1).values.argmin()))
        else:
            medoids = torch.randperm(e, generator=gen)[:num_groups].tolist()
        group = _capacity_assign(s_EE, medoids, cap)
        for _ in range(iters):
            new = []
            for g in range(num_groups):
                members = [i for i in range(e) if group[i] == g]
                within = s_EE[members][:, members].sum(1)
                new.append(members[int(within.argmax())])
            if new == medoids:
                break
            medoids = new
            group = _capacity_assign(s_EE, medoids, cap)
        score = within_similarity(s_EE, group)
        if score > best_score + 1e-12:
            best, best_score = group, score
    assert best is not None
    return canonical_groups(best)


def cluster_agglomerative(s_EE: Tensor, num_groups: int) -> list[int]:
    """Balanced average-linkage agglomeration on S: merge the most similar pair whose union fits ceil(E/G).

    When no pair fits and more than G clusters remain, the smallest is dissolved into the most similar clusters
    with room (there always is room: (count - 1) * cap >= E).
    """
    e = s_EE.shape[0]
    cap = _check_groups(e, num_groups)
    clusters: list[list[int]] = [[i] for i in range(e)]

    def link(a: list[int], b: list[int]) -> float:
        return float(s_EE[a][:, b].mean())

    while len(clusters) > num_groups:
        pairs = [(link(clusters[a], clusters[b]), -a, -b) for a in range(len(clusters))
                 for b in range(a + 1, len(clusters)) if len(clusters[a]) + len(clusters[b]) <= cap]
        if pairs:
            _, na, nb = max(pairs)
            a, b = -na, -nb
            clusters[a] = sorted(clusters[a] + clusters[b])
            del clusters[b]
            continue
        small = min(range(len(clusters)), key=lambda c: (len(clusters[c]), c))
        members = clusters.pop(small)
        for i in members:
            room = [c for c in range(len(clusters)) if len(clusters[c]) < cap]
            c = max(room, key=lambda c: (link([i], clusters[c]), -c))
            clusters[c] = sorted(clusters[c] + [i])
    group = [0] * e
    for g, members in enumerate(clusters):
        for i in members:
            group[i] = g
    return canonical_groups(group)


def cluster_random(num_experts: int, num_groups: int, seed: int = 0) -> list[int]:
    """Seeded random balanced groups (the control): a random permutation dealt round-robin."""
    _check_groups(num_experts, num_groups)
    perm = torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed)).tolist()
    group = [0] * num_experts
    for pos, i in enumerate(perm):
        group[i] = pos % num_groups
    return canonical_groups(group)


def cluster_experts(s_EE: Tensor, num_groups: int, method: str = "agglomerative", seed: int = 0) -> list[int]:
    """Group of each expert by the named method (see CLUSTER_METHODS)."""
    if method == "kmedoids":
        return cluster_kmedoids(s_EE, num_groups, seed)
    if method == "agglomerative":
        return cluster_agglomerative(s_EE, num_groups)
    if method == "random":
        return cluster_random(s_EE.shape[0], num_groups, seed)
    raise ValueError(f"unknown clustering method {method!r}; choose one of {', '.join(CLUSTER_METHODS)}")


def canonical_groups(group_E: Sequence[int]) -> list[int]:
    """Relabel groups in order of their smallest member, so equal partitions compare equal."""
    names: dict[int, int] = {}
    for g in group_E:
        if g >= 0 and g not in names:
            names[g] = len(names)
    return [names[g] if g >= 0 else -1 for g in group_E]


__all__ = ["CLUSTER_METHODS", "LogitCentroids", "cosine_matrix", "structural_similarity", "functional_similarity",
           "fused_similarity", "cluster_experts", "cluster_kmedoids", "cluster_agglomerative", "cluster_random",
           "within_similarity", "canonical_groups"]
