"""Manual GPU check (not collected by pytest): every EP layer case with CUDA tensors on 2 gloo ranks, one GPU.

NCCL cannot put two ranks on one GPU, so this exercises the device handling of moeflow.parallel (indices,
counts and buffers on the GPU; gloo stages through host memory), not NCCL itself.

    PYTHONPATH=src:tests/distributed python tests/distributed/gpu_check_ep.py
"""
import os
import sys

import torch

from moeflow.parallel import spawn_local

sys.path.insert(0, os.path.dirname(__file__))
from ep_workers import parity_worker  # noqa: E402


def _worker(rank: int, world: int) -> dict:
    """Parity on CUDA, EP=2 and EP=1."""
    torch.cuda.set_device(0)
    return parity_worker(rank, world, [2, 1], device="cuda")


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(0))
    res = spawn_local(_worker, 2, timeout_s=400, pg_timeout_s=120)
    worst = 0.0
    for rank, r in enumerate(res):
        for key, diffs in r.items():
            bad = {k: v for k, v in diffs.items() if k not in ("dropped_ref", "min_split", "sent_rows") and v > 1e-10}
            worst = max([worst] + [v for k, v in diffs.items() if k not in ("dropped_ref", "min_split", "sent_rows")])
            print(rank, key, "OK" if not bad else f"BAD {bad}")
    print("worst difference", worst)
