"""Expert-parallel MoE layer on 1, 2 and 4 local CPU ranks (gloo): all-to-all bytes and step time.

For every world size W (one spawn each, EP = W, `tokens` tokens per rank: weak scaling, so ideal step time is
flat) and every config it runs warmup + timed fwd+bwd steps (FSDP2 reduce-scatter included) of one MoELayer:
- step ms: median over steps of the slowest rank (ranks start each step together after a barrier);
- KiB/a2a: bytes each rank sends to OTHER ranks in one token all-to-all (mean over ranks and steps), measured
  from the dispatcher's actual split sizes (metadata included for dedup). A step makes 4 such exchanges per MoE
  layer (dispatch and combine, forward and backward). `check` says whether every measurement equalled what
  the routing implies (kept assignments whose expert lives on another rank, x D x bytes; capacity-padded:
  (W-1) x E/W experts x slots rows; dedup: unique (token, remote rank) pairs plus 12 bytes per remote row);
- ranks/tok: mean number of distinct ranks a token's kept assignments go to (self included);
- remote rows/tok: rows of D values a token sends to other ranks in one exchange.
Hierarchical routing (num_clusters = 4, so each cluster lives on one rank for W = 4 and two clusters per rank
for W = 2) is compared with flat top-k at the same k: it sends every token to one rank; its bytes only drop
when that rank receives the token once (mode dedup), which the last column of the summary shows.

    python benchmarks/ep.py                    # T=2048/rank, D=256, H=512, E=8, k=2, 10 steps, worlds 1,2,4
    python benchmarks/ep.py --quick            # tiny sizes (smoke test)
Only 2 cores here: W = 4 runs 4 single-threaded ranks on 2 cores, so its step time is inflated by at least 2x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moeflow import MoEConfig, MoELayer  # noqa: E402
from moeflow.parallel import init_distributed, parallelize, shard_model, spawn_local  # noqa: E402

# (label, MoEConfig overrides, dispatcher mode)
CONFIGS = [
    ("topk k=2", dict(router="topk", top_k=2), "variable"),
    ("topk k=2", dict(router="topk", top_k=2), "dedup"),
    ("switch cf=1.25", dict(router="switch", top_k=1, capacity_factor=1.25), "padded"),
    ("switch cf=1.25", dict(router="switch", top_k=1, capacity_factor=1.25), "variable"),
    ("hierarchical k=2 G=4", dict(router="hierarchical", top_k=2, num_clusters=4), "variable"),
    ("hierarchical k=2 G=4", dict(router="hierarchical", top_k=2, num_clusters=4), "dedup"),
]


def implied_remote_bytes(layer: MoELayer, mode: str, rank: int, world: int, row_bytes: int) -> tuple[int, float,
                                                                                                       float]:
    """(bytes the routing implies this rank sends to other ranks, ranks per token, remote rows per token)."""
    r = layer.last_routing
    n_local = r.num_experts // world
    kept = r.kept_N
    dest_N = r.expert_ids_N // n_local
    remote_N = kept & (dest_N != rank)
    pairs = torch.unique(r.token_ids_N[kept] * world + dest_N[kept])
    ranks_per_token = pairs.numel() / max(r.num_tokens, 1)
    remote_pairs = int((pairs % world != rank).sum())
    if mode == "padded":
        slots = r.capacity * layer.cfg.num_groups
        return (world - 1) * n_local * slots * row_bytes, ranks_per_token, (world - 1) * n_local * slots / r.num_tokens
    if mode == "dedup":
        meta = int(remote_N.sum()) * (8 + r.weights_N.element_size())  # int64 index + weight per remote row
        return remote_pairs * row_bytes + meta, ranks_per_token, remote_pairs / r.num_tokens
    return int(remote_N.sum()) * row_bytes, ranks_per_token, int(remote_N.sum()) / r.num_tokens


def bench_worker(rank: int, world: int, args: argparse.Namespace) -> list[dict]:
    """Every config on this rank: per-step times, measured and implied bytes."""
    dims = init_distributed(ep=world, timeout_s=120)
    out = []
    for label, over, mode in CONFIGS:
        torch.manual_seed(0)
        cfg = MoEConfig(d_model=args.d_model, d_hidden=args.d_hidden, num_experts=args.experts, **over)
        layer = shard_model(parallelize(MoELayer(cfg), dims, mode=mode), dims)  # FSDP2 reduces in backward
        x = torch.randn(args.tokens, args.d_model, generator=torch.Generator().manual_seed(100 + rank))
        times, measured, implied, ranks, rows = [], [], [], [], []
        for step in range(args.warmup + args.steps):
            if dims.distributed:
                dist.barrier()
            t0 = time.perf_counter()
            y = layer(x)
            (y.square().mean() + layer.aux_loss).backward()
            elapsed = time.perf_counter() - t0
            layer.zero_grad(set_to_none=True)
            if step < args.warmup:
                continue
            times.append(elapsed)
            row_bytes = args.d_model * x.element_size()
            imp, rpt, rows_pt = implied_remote_bytes(layer, mode, dims.ep_rank, world, row_bytes)
            comm = getattr(layer.dispatcher, "last_comm", None)
            measured.append(comm.remote_bytes_sent if comm is not None else 0)
            implied.append(imp if world > 1 else 0)
            ranks.append(rpt)
            rows.append(rows_pt if world > 1 else 0.0)
        out.append({"label": label, "mode": mode if world > 1 else "local", "times": times, "measured": measured,
                    "implied": implied, "ranks": statistics.mean(ranks), "rows": statistics.mean(rows)})
    return out


def summarize(world: int, per_rank: list[list[dict]]) -> list[dict]:
    """Combine ranks: slowest rank per step, mean bytes, all checks."""
    rows = []
    for i in range(len(CONFIGS)):
        recs = [r[i] for r in per_rank]
        step_ms = statistics.median(max(ts) for ts in zip(*(r["times"] for r in recs))) * 1e3
        rows.append({"world": world, "label": recs[0]["label"], "mode": recs[0]["mode"], "step_ms": step_ms,
                     "kib": statistics.mean(b for r in recs for b in r["measured"]) / 1024,
                     "check": all(r["measured"] == r["implied"] for r in recs),
                     "ranks": statistics.mean(r["ranks"] for r in recs),
                     "rows": statistics.mean(r["rows"] for r in recs)})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run every world size and print the tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", default="1,2,4", help="comma-separated world sizes (EP = world)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 steps (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.d_model, args.d_hidden, args.steps, args.warmup = 64, 16, 32, 2, 1
    worlds = [int(w) for w in args.worlds.split(",")]
    print(f"T={args.tokens} tokens/rank, D={args.d_model}, H={args.d_hidden}, E={args.experts}, fp32, "
          f"1 thread/rank, {torch.get_num_threads()} cores visible; {args.steps} timed steps after {args.warmup}")
    print(f"{'W':>2} {'config':<22}{'mode':<9}{'step ms':>9}{'KiB/a2a':>10}{'check':>7}{'ranks/tok':>10}"
          f"{'remote rows/tok':>16}")
    rows = []
    for w in worlds:
        for r in summarize(w, spawn_local(bench_worker, w, (args,), timeout_s=1200, pg_timeout_s=120)):
            if w == 1 and any(q["world"] == 1 and q["label"] == r["label"] for q in rows):
                continue  # one process: every mode is the local dispatcher
            rows.append(r)
            print(f"{r['world']:>2} {r['label']:<22}{r['mode']:<9}{r['step_ms']:>9.1f}{r['kib']:>10.1f}"
                  f"{'ok' if r['check'] else 'FAIL':>7}{r['ranks']:>10.2f}{r['rows']:>16.2f}")
    print("\nhierarchical vs flat top-k at k=2 (bytes each rank sends to other ranks per a2a):")
    for w in [w for w in worlds if w > 1]:
        get = {(r["label"].split()[0], r["mode"]): r for r in rows if r["world"] == w}
        flat, hier, hier_d = get[("topk", "variable")], get[("hierarchical", "variable")], get[("hierarchical",
                                                                                                   "dedup")]
        print(f"  W={w}: flat {flat['kib']:.1f} KiB, {flat['ranks']:.2f} ranks/token | hierarchical "
              f"{hier['kib']:.1f} KiB ({hier['kib'] / flat['kib']:.2f}x), {hier['ranks']:.2f} ranks/token | "
              f"hierarchical+dedup {hier_d['kib']:.1f} KiB ({hier_d['kib'] / flat['kib']:.2f}x)")
    failed = [r for r in rows if not r["check"]]
    if failed:
        print(f"MEASURED BYTES DIFFER FROM THE ROUTING'S IMPLIED BYTES in {len(failed)} rows", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
