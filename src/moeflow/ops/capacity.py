"""Expert capacity: which assignments fit in their expert's slots, written once for every router.

Shape legend: N = assignments, G = routing groups, E = experts.
"""

from __future__ import annotations

import torch
from torch import Tensor


def capacity_keep(expert_ids_N: Tensor, group_ids_N: Tensor, priority_N: Tensor, active_N: Tensor,
                  num_experts: int, num_groups: int, capacity: int) -> Tensor:
    """Keep mask [N]: an active assignment is kept iff fewer than `capacity` active assignments of the same
    (group, expert) come before it in ascending `priority` order (ties broken by assignment index).

    Sorting keys instead of a cumulative sum over a [T, E] one-hot keeps memory O(N) (no [T, E, C] tensor).
    """
    n = expert_ids_N.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=expert_ids_N.device)
    num_buckets = num_groups * num_experts
    # inactive assignments go to a sentinel bucket past the end so they never take a slot
    bucket_N = torch.where(active_N, group_ids_N * num_experts + expert_ids_N,
                           torch.full_like(expert_ids_N, num_buckets))
    order1 = torch.argsort(priority_N, stable=True)
    order2 = torch.argsort(bucket_N[order1], stable=True)
    perm_N = order1[order2]  # lexicographic (bucket, priority, index)
    counts = torch.bincount(bucket_N, minlength=num_buckets + 1)
    starts = torch.cumsum(counts, 0) - counts
    sorted_bucket = bucket_N[perm_N]
    pos_sorted = torch.arange(n, device=expert_ids_N.device) - starts[sorted_bucket]
    pos_N = torch.empty_like(pos_sorted)
    pos_N[perm_N] = pos_sorted
    return active_N & (pos_N < capacity)
