"""Validate the `moeflow plan` cost model against real gloo expert-parallel runs on this machine.

1. Calibrate (as `moeflow plan --calibrate` does): gloo all-to-all alpha/beta and the expert GEMM rate for each
   world size, with all ranks running at once.
2. Run one MoELayer with EP = world (benchmarks/ep.py's setup: fwd + bwd + gradient all-reduce, fp32, one thread
   per rank) for three model widths (message sizes), two skews (the router's own near-uniform loads, and a
   skewed router) and the modes variable / dedup / padded, recording each rank's routing and CommStats.
3. Predict with moeflow.sim from the MEASURED per-expert loads (what metrics.jsonl records) and compare:
   - bytes: exact (from each rank's kept assignments) must equal CommStats; expected (from loads only) error;
   - step time (slowest rank, median over steps) and token all-to-all time (per exchange: the critical path,
     from the last rank entering each exchange to the last leaving it, summed), error in %.

    python benchmarks/plan_validate.py            # worlds 2,4; ~3 min on 2 idle cores
    python benchmarks/plan_validate.py --quick    # tiny sizes, one skew (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import moeflow.parallel.collectives as coll  # noqa: E402
from moeflow import MoEConfig, MoELayer  # noqa: E402
from moeflow.cli.plan import calibrate  # noqa: E402
from moeflow.parallel import init_distributed, parallelize, shard_model, spawn_local  # noqa: E402
from moeflow.sim.cost import geometry, layer_cost, moe_layer_step  # noqa: E402
from moeflow.sim.spec import Cluster, Layout, ModelShape  # noqa: E402
from moeflow.sim.traffic import META_BYTES, contiguous, exact_rows, padded_slots  # noqa: E402

E, K, CF = 8, 2, 1.25


def _timed_exchange(orig):  # noqa: ANN001, ANN202
    """Wrap collectives._exchange (every row-carrying all-to-all, forward and backward) to log (start, end).

    perf_counter is CLOCK_MONOTONIC, one clock for every process of this machine, so the ranks' stamps compare:
    an exchange costs the step (last start -> last end), not what one rank waited for slower peers."""
    def wrapped(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        t0 = time.perf_counter()
        out = orig(*a, **kw)
        wrapped.stamps.append((t0, time.perf_counter()))
        return out
    wrapped.stamps = []
    return wrapped


def skew_router(layer: MoELayer, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Tilt the router towards low expert ids along a direction v; returns v (add it to the inputs)."""
    d = layer.cfg.d_model
    v = torch.randn(d, generator=gen)
    v = v / v.norm()
    bias = torch.linspace(strength, -strength, layer.cfg.num_experts)
    with torch.no_grad():
        layer.router.weight.add_(bias[:, None] * v[None, :])
    return v


def worker(rank: int, world: int, cases: list[dict], tokens: int, steps: int, warmup: int) -> list[dict]:
    """Every case on this rank: step times, timed a2a seconds, CommStats bytes and the kept assignments."""
    dims = init_distributed(ep=world, timeout_s=120)
    timer = _timed_exchange(coll._exchange)
    coll._exchange = timer
    out = []
    for case in cases:
        torch.manual_seed(0)
        over = dict(router="topk", top_k=K) if case["mode"] != "padded" else dict(router="topk", top_k=K,
                                                                                   capacity_factor=CF)
        cfg = MoEConfig(d_model=case["d"], d_hidden=case["h"], num_experts=E, **over)
        layer = MoELayer(cfg)
        gen = torch.Generator().manual_seed(7)
        v = skew_router(layer, case["skew"], gen) if case["skew"] else None
        layer = shard_model(parallelize(layer, dims, mode=case["mode"]), dims)  # FSDP2 reduces in backward
        x = torch.randn(tokens, case["d"], generator=torch.Generator().manual_seed(100 + rank))
        if v is not None:
            x = x + 2.0 * v
        times, a2a, measured, counts = [], [], [], []
        eids = tids = None
        for step in range(warmup + steps):
            dist.barrier()
            timer.stamps = []
            t0 = time.perf_counter()
            y = layer(x)
            (y.square().mean() + layer.aux_loss).backward()
            elapsed = time.perf_counter() - t0
            layer.zero_grad(set_to_none=True)
            if step < warmup:
                continue
            r = layer.last_routing
            kept = r.kept_N
            times.append(elapsed)
            a2a.append(list(timer.stamps))
            measured.append(layer.dispatcher.last_comm.remote_bytes_sent)
            counts.append(np.bincount(r.expert_ids_N[kept].numpy(), minlength=E).tolist())
            eids, tids = r.expert_ids_N[kept].numpy().tolist(), r.token_ids_N[kept].numpy().tolist()
        out.append({**case, "times": times, "a2a": a2a, "measured": measured, "counts": counts,
                    "eids": eids, "tids": tids, "capacity": layer.last_routing.capacity})
    return out


def cases_for(quick: bool) -> list[dict]:
    """(width, skew, mode) grid: widths set the message size, skews the load imbalance."""
    dims = [(32, 32)] if quick else [(64, 64), (256, 256), (1024, 512)]
    skews = [0.0] if quick else [0.0, 3.0]
    out = []
    for d, h in dims:
        for s in skews:
            for mode in ("variable", "dedup", "padded"):
                if mode == "padded" and s:
                    continue  # capacity clips the skew: one padded case per width is enough
                out.append({"d": d, "h": h, "skew": s, "mode": mode})
    return out


def predict(res: list[dict], world: int, cluster: Cluster, tokens: int) -> dict:
    """Predicted bytes and times for one case from its measured loads."""
    c0 = res[0]
    model = ModelShape(name="layer", d_model=c0["d"], n_layers=1, moe_layers=1, num_experts=E, top_k=K,
                       d_expert=c0["h"], gated=True, capacity_factor=CF if c0["mode"] == "padded" else None)
    layout = Layout(ep=world, mode=c0["mode"])
    load = np.sum([r["counts"][-1] for r in res], axis=0).astype(np.float64)
    pred = moe_layer_step(model, cluster, layout, load / load.sum(), tokens)
    slots = padded_slots(model, tokens) if c0["mode"] == "padded" else 0
    ex = exact_rows([np.array(r["eids"]) for r in res], [np.array(r["tids"]) for r in res], E, c0["mode"], slots)
    exact = ex.remote_bytes(c0["d"] * 4)
    step_meas = statistics.median(max(ts) for ts in zip(*(r["times"] for r in res)))
    per_step = []
    for step in zip(*(r["a2a"] for r in res)):  # per step: each rank's (start, end) of every exchange
        per_step.append(sum(max(st[i][1] for st in step) - max(st[i][0] for st in step) for i in range(len(step[0]))))
    a2a_meas = statistics.median(per_step)
    # expected bytes from the loads alone (most any rank sends to the others in one dispatch)
    share = contiguous(E, world).rank_share(load / load.sum())
    lc = layer_cost(model, cluster, layout, geometry(cluster, layout, world), load / load.sum(), tokens, 4, 4)
    meta = META_BYTES * tokens * K * (1 - share.min()) if c0["mode"] == "dedup" else 0.0
    exp_bytes = lc.dispatch.max_rows_out * c0["d"] * 4 + meta
    return {"world": world, "d": c0["d"], "h": c0["h"], "skew": c0["skew"], "mode": c0["mode"],
            "imbalance": float(load.max() / load.mean()),
            "exact_ok": all(int(exact[i]) == r["measured"][-1] for i, r in enumerate(res)),
            "bytes_meas": float(max(r["measured"][-1] for r in res)), "bytes_exp": exp_bytes,
            "step_meas": step_meas, "step_pred": pred["step"], "a2a_meas": a2a_meas, "a2a_pred": pred["token_a2a"]}


def main(argv: list[str] | None = None) -> int:
    """Calibrate, run, predict, print the error table (and --json rows)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", default="2,4")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--calib-dir", type=Path, default=None,
                   help="reuse (or write) cluster-local-w<W>-d<D>.json calibration files here")
    p.add_argument("--budget-s", type=float, default=40.0, help="calibration time per world")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.steps, args.warmup, args.budget_s = 128, 2, 1, 15.0
    print(f"load average before: {os.getloadavg()[0]:.2f} (2 cores shared); T={args.tokens}/rank, E={E}, k={K}")
    rows = []
    for w in [int(v) for v in args.worlds.split(",")]:
        cases = cases_for(args.quick)
        clusters: dict[int, Cluster] = {}
        net = None
        for d, h in sorted({(c["d"], c["h"]) for c in cases}):
            # the GEMM rate depends on the GEMM shape: calibrate each width (a local layer, no EP involved)
            path = args.calib_dir / f"cluster-local-w{w}-d{d}.json" if args.calib_dir else None
            if path is not None and path.is_file():
                clusters[d] = Cluster.from_dict(json.loads(path.read_text()))
            else:
                # the network once per world (more repetitions), the compute per width
                clusters[d] = calibrate(w, args.budget_s, d=d, h=h, rows=args.tokens, reps=10 if net is None else 5,
                                        log=lambda s: print(s, flush=True), network=net)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(clusters[d].to_dict(), indent=2))
            net = net or clusters[d].node
        res = spawn_local(worker, w, (cases, args.tokens, args.steps, args.warmup), timeout_s=1800, pg_timeout_s=120)
        for i in range(len(cases)):
            rows.append(predict([r[i] for r in res], w, clusters[cases[i]["d"]], args.tokens))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"\n{'W':>2} {'D':>5} {'H':>5} {'skew':>5} {'mode':<9}{'imb':>5} {'exact':>6}{'KiB meas':>10}"
          f"{'KiB exp':>9}{'err':>7} {'step meas':>10}{'pred':>9}{'err':>7} {'a2a meas':>9}{'pred':>9}{'err':>7}")
    for r in rows:
        def err(a: float, b: float) -> str:
            return f"{100 * (b - a) / a:+.0f}%" if a else "-"
        print(f"{r['world']:>2} {r['d']:>5} {r['h']:>5} {r['skew']:>5.1f} {r['mode']:<9}{r['imbalance']:>5.2f} "
              f"{'ok' if r['exact_ok'] else 'FAIL':>6}{r['bytes_meas'] / 1024:>10.1f}{r['bytes_exp'] / 1024:>9.1f}"
              f"{err(r['bytes_meas'], r['bytes_exp']):>7} {r['step_meas'] * 1e3:>8.1f}ms{r['step_pred'] * 1e3:>7.1f}ms"
              f"{err(r['step_meas'], r['step_pred']):>7} {r['a2a_meas'] * 1e3:>7.1f}ms{r['a2a_pred'] * 1e3:>7.1f}ms"
              f"{err(r['a2a_meas'], r['a2a_pred']):>7}")
    for key in ("step", "a2a"):
        e = [abs(r[f"{key}_pred"] - r[f"{key}_meas"]) / r[f"{key}_meas"] for r in rows if r[f"{key}_meas"]]
        print(f"{key}: median |error| {100 * statistics.median(e):.0f}%, max {100 * max(e):.0f}%, "
              f"within 25%: {sum(x <= 0.25 for x in e)}/{len(e)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if not r["exact_ok"]]
    if bad:
        print(f"EXACT BYTES DIFFER FROM CommStats in {len(bad)} cases", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
