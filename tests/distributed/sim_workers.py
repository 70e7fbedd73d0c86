"""Spawned workers for tests/distributed/test_sim_exact.py: real EP layers whose a2a sizes the simulator predicts."""

from __future__ import annotations

import torch

from moeflow import MoEConfig, MoELayer
from moeflow.parallel import init_distributed, parallelize

# (label, MoEConfig overrides, dispatcher mode): every mode, and hierarchical routing (clusters on ranks)
CASES = [
    ("topk", dict(router="topk", top_k=2), "variable"),
    ("topk", dict(router="topk", top_k=2), "dedup"),
    ("topk-cf", dict(router="topk", top_k=2, capacity_factor=1.25), "padded"),
    ("switch", dict(router="switch", top_k=1, capacity_factor=1.0), "padded"),
    ("hier", dict(router="hierarchical", top_k=2, num_clusters=4), "variable"),
    ("hier", dict(router="hierarchical", top_k=2, num_clusters=4), "dedup"),
]


def comm_worker(rank: int, world: int, tokens: int) -> list[dict]:
    """Forward + backward of each case; this rank's kept assignments and its dispatcher's CommStats."""
    dims = init_distributed(ep=world, timeout_s=60)
    out = []
    for label, over, mode in CASES:
        torch.manual_seed(0)
        layer = parallelize(MoELayer(MoEConfig(d_model=16, d_hidden=16, num_experts=8, **over)), dims, mode=mode)
        x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(10 + rank))
        layer(x).square().mean().backward()
        r, comm = layer.last_routing, layer.dispatcher.last_comm
        kept = r.kept_N
        out.append({"label": label, "mode": mode, "eids": r.expert_ids_N[kept].tolist(),
                    "tids": r.token_ids_N[kept].tolist(), "send_rows": list(comm.send_rows),
                    "extra": list(comm.extra_bytes), "remote": comm.remote_bytes_sent, "row_bytes": comm.row_bytes,
                    "capacity": r.capacity, "groups": layer.cfg.num_groups, "top_k": layer.cfg.top_k,
                    "cf": layer.cfg.capacity_factor})
    return out
