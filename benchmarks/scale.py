"""Scale-out on FSDP2 + EP: per-rank memory, checkpoint save cost and throughput at world 1, 2 and 4 (gloo, CPU).

For every layout (dp, ep) it spawns dp*ep local ranks, builds the preset's model through the real Trainer with
DistributedHooks (FSDP2 over the ("dp", "ep") mesh), trains a few steps and prints, per rank:
- params / grads / optim: bytes of the LOCAL shards (DTensor.to_local()), split into dense and expert tensors,
  and their ratio to world 1 (ideal: dense 1/world, since dense parameters are sharded over every rank, experts
  1/(dp*ep));
- peak RSS of the rank's process (kernel high-water mark, includes torch's own ~300 MB);
- tok/s/rank: median tokens per second per rank over the timed steps (weak scaling: each rank trains on
  `--rows` sequences of `--seq-len` tokens per step, so ideal is flat);
- save s and rank-0 save MB: wall time of one sharded checkpoint (DCP, every rank writes its shards, atomic
  commit) and how much rank 0's RSS rose during it (sampled every 2 ms): rank 0 never gathers the model, so this
  must not grow with the world size.
The load average is printed before and after: the 2 cores of this machine are shared, and world 4 runs four
single-threaded ranks on two cores, so tokens/s at world 4 are at least halved by oversubscription alone.

    python benchmarks/scale.py                     # small preset, worlds 1/2/4, 4 timed steps
    python benchmarks/scale.py --quick             # tiny preset, 2 steps (smoke test)
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moeflow.parallel import DistributedHooks, init_distributed, spawn_local  # noqa: E402
from moeflow.train import apply_overrides, get_preset  # noqa: E402
from moeflow.train.lm import lm_trainer  # noqa: E402

LAYOUTS = [(1, 1), (2, 1), (1, 2), (4, 1), (2, 2), (1, 4)]


def _rss_mb() -> float:
    """Current resident set size of this process in MB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank stores for a (possibly DTensor) tensor."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _memory(trainer) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """MB of local parameter, gradient and optimizer-state shards, dense vs expert."""
    out = {f"{kind}_{part}": 0.0 for kind in ("params", "grads", "optim") for part in ("dense", "expert")}
    for name, p in trainer.model.named_parameters():
        part = "expert" if ".experts." in name else "dense"
        out[f"params_{part}"] += _local_bytes(p) / 2**20
        if p.grad is not None:
            out[f"grads_{part}"] += _local_bytes(p.grad) / 2**20
        for v in trainer.optimizer.state.get(p, {}).values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                out[f"optim_{part}"] += _local_bytes(v) / 2**20
    return out


def worker(rank: int, world: int, ep: int, preset: str, rows: int, seq_len: int, steps: int, root: str) -> dict:
    """Build, train `steps` (+1 warmup) steps, save once; return this rank's measurements."""
    hooks = DistributedHooks(init_distributed(ep=ep, timeout_s=600))
    cfg = apply_overrides(get_preset(preset), {
        "train.batch_size": rows * world, "train.seq_len": seq_len, "train.steps": steps + 1, "train.warmup": 1,
        "train.threads": 1, "train.eval_every": 0, "train.ckpt_every": 0})
    trainer = lm_trainer(cfg, f"{root}/w{world}-ep{ep}", hooks=hooks, progress=False)
    rates = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        trainer.train_step()
        if i:  # the first step allocates optimizer state and warms the allocator
            rates.append(rows * seq_len / (time.perf_counter() - t0))
    mem = _memory(trainer)
    peak, stop = [_rss_mb()], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak.append(_rss_mb())
            time.sleep(0.002)
    base = _rss_mb()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    trainer.save(0.0)
    stop.set()
    sampler.join()
    return {**mem, "tok_s": statistics.median(rates), "save_s": trainer.last_save_s,
            "save_rise_mb": max(peak) - base, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    """Parse flags, run every layout, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--rows", type=int, default=2, help="sequences per rank per step")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after one warmup step)")
    ap.add_argument("--layouts", default=",".join(f"{d}x{e}" for d, e in LAYOUTS), help="dp x ep list")
    ap.add_argument("--quick", action="store_true", help="tiny preset, 2 steps, worlds 1 and 2")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.steps, args.rows, args.seq_len, args.layouts = "tiny", 2, 2, 32, "1x1,2x1,1x2"
    layouts = [tuple(int(v) for v in item.split("x")) for item in args.layouts.split(",")]
    print(f"preset {args.preset}: {args.rows} x {args.seq_len} tokens per rank per step, {args.steps} timed steps; "
          f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="moeflow-scale-") as root:
        for dp, ep in layouts:
            world = dp * ep
            per_rank = spawn_local(worker, world, (ep, args.preset, args.rows, args.seq_len, args.steps, root),
                                   timeout_s=1800, pg_timeout_s=600)
            results[(dp, ep)] = per_rank
    base = results.get((1, 1), [None])[0]
    head = (f"{'dp x ep':>7} {'rank':>4} {'dense MB':>9} {'expert MB':>9} {'dense/w1':>8} {'expert/w1':>9} "
            f"{'ideal d/e':>11} {'peak RSS':>8} {'tok/s/rank':>10} {'save s':>7} {'save MB':>7}")
    print(head)
    for (dp, ep), per_rank in results.items():
        for rank, r in enumerate(per_rank):
            dense = r["params_dense"] + r["grads_dense"] + r["optim_dense"]
            expert = r["params_expert"] + r["grads_expert"] + r["optim_expert"]
            if base is not None:
                b_dense = base["params_dense"] + base["grads_dense"] + base["optim_dense"]
                b_expert = base["params_expert"] + base["grads_expert"] + base["optim_expert"]
                ratios = f"{dense / b_dense:8.3f} {expert / b_expert:9.3f}"
            else:
                ratios = f"{'-':>8} {'-':>9}"
            ideal = f"{1 / (dp * ep):.3f}/{1 / (dp * ep):.3f}"
            save_mb = f"{r['save_rise_mb']:7.1f}" if rank == 0 else f"{'':>7}"
            print(f"{f'{dp} x {ep}':>7} {rank:>4} {dense:9.1f} {expert:9.1f} {ratios} {ideal:>11} "
                  f"{r['peak_rss_mb']:8.0f} {r['tok_s']:10.0f} {r['save_s']:7.2f} {save_mb}")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
