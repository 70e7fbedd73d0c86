"""`moeflow plan`: predicted step time of expert-parallel layouts on a cluster, ranked, with the breakdown.

    moeflow plan --model switch-c-2048 --cluster dgx-h100 --ranks 2048 --workload uniform --tokens 4096
    moeflow plan --model config.json --cluster my-cluster.json --workload my-workload.json --ranks 512 --json
    moeflow plan --calibrate --ranks 2,4 --out calib/        # measure gloo alpha/beta and GEMM rate here

--model: a simulator preset (switch-c-2048, gshard-600b, deepseek-v3, mixtral-8x7b-shape), a moeflow preset
(tiny, small, mixtral-8x7b), or a JSON file: the simulator's own model format, a moeflow run's config.json, a
moeflow.json, or a Hugging Face config.json (Mixtral, Qwen2-MoE, OLMoE, DeepSeek-V3, Switch).
--cluster: a preset (dgx-h100, hgx-h800, dgx-a100, pcie-l40s) or a cluster JSON file (see docs/plan.md).
--workload: uniform, zipf or lognormal (with --tokens), or a workload JSON file (its traffic may point at a
moeflow run's metrics.jsonl). Examples of every file ship in moeflow/sim/examples/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from moeflow.config import ConfigError, MoEConfig
from moeflow.sim.planner import Search, breakdown_table, fmt_time, in_moeflow, loads_summary, payback, plan
from moeflow.sim.spec import (CLUSTER_PRESETS, MODEL_SHAPES, MODES, SCHEDULES, Cluster, ModelShape, SimError, Tier,
                              example_path, is_shape_dict, load_cluster, load_workload, model_shape_from_dict,
                              multi_dc, read_json)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `plan` subcommand."""
    p = sub.add_parser("plan", help="rank expert-parallel layouts by predicted step time (cluster simulator)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model preset or JSON file (see above)")
    p.add_argument("--cluster", default=None, help="cluster preset or JSON file")
    p.add_argument("--workload", default="uniform", help="uniform | zipf | lognormal | workload JSON file")
    p.add_argument("--ranks", default=None, help="total ranks (GPUs); with --calibrate: world sizes, e.g. 2,4")
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank per step (overrides the workload's)")
    p.add_argument("--domains", type=int, default=None,
                   help="split the ranks into this many domains (datacenters) joined by --wan-gbit links")
    p.add_argument("--wan-gbit", type=float, default=100.0, help="inter-domain link per domain, Gb/s")
    p.add_argument("--ep", default=None, help="EP sizes to try, comma-separated (default: every valid one)")
    p.add_argument("--modes", default=",".join(MODES), help="dispatcher modes to try")
    p.add_argument("--pp", default="1", help="pipeline stages to try")
    p.add_argument("--microbatches", default="1", help="microbatches per step to try")
    p.add_argument("--schedule", default="1f1b", help=f"pipeline schedules to try ({', '.join(SCHEDULES)})")
    p.add_argument("--replicas", default="0", help="extra expert slots per rank to try (EPLB), e.g. 0,1,2")
    p.add_argument("--overlap", default="1", help="a2a/expert overlap degrees to try, e.g. 1,2,4")
    p.add_argument("--hierarchical", action="store_true", help="also try one-cluster-per-rank routing")
    p.add_argument("--migrate", action="store_true", help="also try HybridEP-style expert migration")
    p.add_argument("--migrate-every", type=int, default=1, help="steps between syncs of a migrated copy")
    p.add_argument("--tier-overlap", action="store_true", help="also try overlapped two-tier a2a (DeepEP)")
    p.add_argument("--zero", default="0", help="ZeRO stages to try, e.g. 0,1")
    p.add_argument("--recompute", action="store_true", help="also try activation recomputation")
    p.add_argument("--no-memory-check", action="store_true", help="rank layouts that do not fit too")
    p.add_argument("--top", type=int, default=10, help="rows of the table")
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON (for scripts)")
    p.add_argument("--plot", type=Path, default=None, help="write the time breakdown per layout as a PNG")
    p.add_argument("--calibrate", action="store_true",
                   help="measure gloo all-to-all alpha/beta and GEMM FLOP/s on this machine; write cluster files")
    p.add_argument("--out", type=Path, default=Path("."), help="--calibrate: folder for cluster-local-w<W>.json")
    p.add_argument("--budget-s", type=float, default=60.0, help="--calibrate: time limit per world size")
    p.add_argument("--calib-d", type=int, default=256, help="--calibrate: model width of the timed MoE layer")
    p.add_argument("--calib-h", type=int, default=512, help="--calibrate: expert hidden size of the timed layer")
    p.add_argument("--calib-tokens", type=int, default=1024, help="--calibrate: tokens of the smaller timed run")
    p.add_argument("--list-presets", action="store_true", help="print the model and cluster presets and exit")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------- models
def shape_from_config(cfg: Any, name: str) -> ModelShape:
    """A ModelShape from a moeflow ModelConfig, DeepSeekConfig or SwitchConfig."""
    from moeflow.models.config import ModelConfig
    from moeflow.models.deepseek import DeepSeekConfig
    from moeflow.models.switch_t5 import SwitchConfig

    if isinstance(cfg, SwitchConfig):
        moe: MoEConfig = cfg.moe_config()
        step = cfg.encoder_sparse_step
        layers = cfg.n_encoder_layers + cfg.n_decoder_layers
        sparse = sum(1 for i in range(cfg.n_encoder_layers) if step and (i % step == 1 or step == 1)) + sum(
            1 for i in range(cfg.n_decoder_layers)
            if cfg.decoder_sparse_step and (i % cfg.decoder_sparse_step == 1 or cfg.decoder_sparse_step == 1))
        inner = cfg.n_heads * cfg.d_kv
        return ModelShape(name=name, d_model=cfg.d_model, n_layers=layers, moe_layers=max(sparse, 1),
                          num_experts=moe.num_experts, top_k=1, d_expert=cfg.d_ff, gated=False,
                          ffn_hidden=cfg.d_ff, attn_params=4 * cfg.d_model * inner, n_heads=cfg.n_heads,
                          vocab_size=cfg.vocab_size)
    if cfg.moe is None:
        raise SimError(f"model {name!r} is dense (no MoE layers): there is no expert parallelism to plan")
    m = cfg.moe
    if isinstance(cfg, DeepSeekConfig):
        q = cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        wq = cfg.d_model * q if cfg.q_lora_rank is None else cfg.d_model * cfg.q_lora_rank + cfg.q_lora_rank * q
        attn = (wq + cfg.d_model * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
                + cfg.kv_lora_rank * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
                + cfg.n_heads * cfg.v_head_dim * cfg.d_model)
        moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    else:
        assert isinstance(cfg, ModelConfig)
        hd = cfg.head_dim or cfg.d_model // cfg.n_heads
        attn = 2 * cfg.d_model * cfg.n_heads * hd + 2 * cfg.d_model * cfg.n_kv_heads * hd
        moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    groups, per_tok = (m.n_group, m.topk_group) if m.router == "deepseek" else \
        (m.num_clusters, 1) if m.router == "hierarchical" else (1, 1)
    return ModelShape(name=name, d_model=cfg.d_model, n_layers=cfg.n_layers, moe_layers=moe_layers,
                      num_experts=m.num_experts, top_k=m.top_k, d_expert=m.d_hidden,
                      gated=m.activation in ("swiglu", "geglu"), shared_d_hidden=m.shared_d_hidden,
                      ffn_hidden=cfg.ffn_hidden, attn_params=attn, n_heads=cfg.n_heads, vocab_size=cfg.vocab_size,
                      route_groups=groups, route_groups_per_token=per_tok, capacity_factor=m.capacity_factor)


def load_model(spec: str) -> ModelShape:
    """A ModelShape from a preset name or a model file (simulator format, moeflow config, HF config.json)."""
    if spec in MODEL_SHAPES:
        return MODEL_SHAPES[spec]()
    path = Path(spec)
    if not spec.endswith(".json") and not path.exists():
        from moeflow.models.config import MODEL_PRESETS

        if spec in MODEL_PRESETS:
            return shape_from_config(MODEL_PRESETS[spec](), spec)
        from moeflow.config import closest

        names = [*MODEL_SHAPES, *MODEL_PRESETS]
        close = closest(spec, names)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SimError(f"unknown model preset {spec!r}{hint}; presets: {', '.join(names)}, or give a JSON file")
    d = read_json(path, "model")
    if is_shape_dict(d):
        return model_shape_from_dict(d)
    if "model_type" in d:
        from moeflow.interop.hf_config import config_from_hf

        try:
            _, cfg = config_from_hf(d)
        except KeyError as e:
            raise SimError(f"HF config {spec!r} lacks the field {e}; is it a complete config.json?") from None
        return shape_from_config(cfg, d.get("_name_or_path") or path.stem)
    if d.get("format") == "moeflow" and "config" in d:
        from moeflow.interop.hf_config import config_from_dict

        return shape_from_config(config_from_dict(d["arch"], d["config"]), path.parent.name or path.stem)
    from moeflow.models.config import ModelConfig

    sub = d.get("model") if isinstance(d.get("model"), dict) else d
    if "d_model" not in sub:
        raise SimError(f"model file {spec!r} is none of the known formats: the simulator's (d_model, d_expert, "
                       "moe_layers, ...), a moeflow config (a 'model' section), moeflow.json, or an HF config.json "
                       "(with model_type)")
    return shape_from_config(ModelConfig.from_dict(sub, "model"), str(d.get("preset") or path.stem))


# ------------------------------------------------------------------------------------------- calibration
def _calibrate_worker(rank: int, world: int, sizes: list[int], reps: int, d: int, h: int, rows: int,
                      budget_s: float) -> dict[str, Any]:
    """On every rank at once: timed all-to-alls of each per-peer size, then timed expert GEMMs (fwd + bwd)."""
    import torch

    from moeflow.parallel import all_to_all, exchange_counts, init_distributed

    dims = init_distributed(ep=world, timeout_s=60)
    sync = torch.zeros(world, 1, dtype=torch.int64)

    def barrier() -> None:
        # a tiny all-to-all: every rank leaves it within one latency of the others (the store-based
        # barrier_with_timeout polls every 20 ms, which would swamp the latency being measured)
        exchange_counts(sync, dims.ep_group, dims, "calibrate(sync)")

    t_end = time.monotonic() + budget_s
    a2a: dict[int, list[float]] = {}
    for m in sizes:
        n = max(m // 4, 1)  # fp32 values per peer
        x = torch.randn(n * world)
        all_to_all(x, [n] * world, [n] * world, dims.ep_group, dims, "calibrate")  # warm-up
        a2a[m] = []
        for _ in range(3):
            barrier()
            t0 = time.perf_counter()
            for _ in range(reps):
                all_to_all(x, [n] * world, [n] * world, dims.ep_group, dims, "calibrate")
            a2a[m].append((time.perf_counter() - t0) / reps)
        if time.monotonic() > t_end:
            break
    # the expert path as moeflow runs it: a local MoELayer (no EP), fwd + bwd, at `rows` and 4x `rows` tokens;
    # the slope is the expert GEMM rate, the intercept the per-layer host overhead. First all ranks at once (an
    # oversubscribed CPU shares its cores), then rank 0 alone (what a hot rank gets while the others wait).
    from moeflow.config import MoEConfig
    from moeflow.layers import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=d, d_hidden=h, num_experts=8, top_k=2, router="topk"))

    def layer_time(tokens: int, alone: bool) -> float:
        xin = torch.randn(tokens, d)
        times = []
        barrier()
        if not alone or rank == 0:  # alone: the others wait in the next barrier, leaving the cores to rank 0
            for i in range(4):
                t0 = time.perf_counter()
                (layer(xin).square().mean() + layer.aux_loss).backward()
                layer.zero_grad(set_to_none=True)
                if i:
                    times.append(time.perf_counter() - t0)
        barrier()
        return min(times) if times else 0.0  # the least disturbed run: the box is shared

    per_token = 3 * 2 * 2 * 3 * d * h  # fwd + bwd (2x) of 2 rows per token through 3 D x H weight blocks
    small, big = layer_time(rows, False), layer_time(4 * rows, False)
    rate = 3 * rows * per_token / max(big - small, 1e-9)
    alone = 0.0
    small1, big1 = layer_time(rows, True), layer_time(4 * rows, True)
    if rank == 0:
        alone = 3 * rows * per_token / max(big1 - small1, 1e-9)
    return {"a2a": a2a, "rate": rate, "rate_alone": alone,
            "overhead_s": max(small - rows * per_token / rate, 0.0)}


def fit_alpha_beta(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares t = alpha + bytes / beta over (bytes, seconds) points: (alpha s, beta bytes/s)."""
    n = len(points)
    if n < 2:
        raise SimError("calibration needs at least two message sizes; raise --budget-s")
    mx = sum(b for b, _ in points) / n
    my = sum(t for _, t in points) / n
    sxx = sum((b - mx) ** 2 for b, _ in points)
    slope = sum((b - mx) * (t - my) for b, t in points) / sxx if sxx else 0.0
    if slope <= 0:
        raise SimError(f"calibration measured no growth of time with message size ({points}); the machine is too "
                       "noisy: retry with a larger --budget-s")
    return max(my - slope * mx, 0.0), 1.0 / slope


def calibrate(world: int, budget_s: float = 60.0, d: int = 256, h: int = 512, rows: int = 1024,
              sizes: tuple[int, ...] = (4096, 65536, 262144, 1048576, 4194304), reps: int = 5,
              log: Any = None, network: Tier | None = None) -> Cluster:
    """A one-node cluster describing `world` gloo ranks on this machine, from measured a2a and GEMM times.

    `network`: reuse a measured node tier and time only the compute (another model width, same machine).
    """
    from moeflow.parallel import spawn_local

    if world < 2:
        raise SimError(f"--calibrate needs at least 2 ranks to time an all-to-all, got {world}")
    log = log or (lambda s: None)
    log(f"calibrating {world} gloo ranks: {len(sizes)} message sizes x 3 x {reps} reps, then a local MoE layer "
        f"(D={d}, H={h}, {rows} and {4 * rows} tokens, 8 experts top-2); at most {budget_s:.0f} s")
    t0 = time.monotonic()
    res = spawn_local(_calibrate_worker, world, ([] if network else list(sizes), reps, d, h, rows, budget_s * 0.7),
                      timeout_s=budget_s + 60, pg_timeout_s=60)
    points = []
    for m in res[0]["a2a"]:
        per_rep = [max(r["a2a"][m][i] for r in res) for i in range(len(res[0]["a2a"][m]))]  # slowest rank
        t = min(per_rep)  # the least disturbed repetition: other jobs share the cores
        points.append(((world - 1) * m, t))  # bytes each rank sends to the others
        log(f"  a2a {m:>9} B/peer: {t * 1e3:8.3f} ms")
    if network is not None:
        alpha, beta = network.latency_us * 1e-6, network.bandwidth_GBps * 1e9 / world
    else:
        alpha, beta = fit_alpha_beta(points)
    rate = statistics.median(r["rate"] for r in res)  # per rank, all ranks busy
    alone = res[0]["rate_alone"]  # one rank with the machine to itself
    overhead = statistics.median(r["overhead_s"] for r in res)
    # ranks' worth of compute when all are busy: 2 cores under 4 ranks -> ~2; none missing -> no sharing model
    shared = min(world * rate / alone, float(world)) if alone > 0 else float(world)
    share_model = shared < 0.9 * world
    log(f"  alpha {alpha * 1e6:.0f} us, beta {beta / 1e9:.3f} GB/s per rank ({world * beta / 1e9:.3f} in all), "
        f"expert GEMMs {rate / 1e9:.2f} GFLOP/s per rank with all busy, {alone / 1e9:.2f} alone "
        f"({shared:.2f} ranks' worth of compute), layer overhead {overhead * 1e3:.2f} ms "
        f"({time.monotonic() - t0:.1f} s)")
    # loopback is one shared resource (memory copies on the same cores): bandwidth for the whole node
    return Cluster(name=f"local-gloo-w{world}", ranks_per_node=world, memory_GiB=8.0,
                   gemm_tflops=(alone if share_model else rate) / 1e12, layer_overhead_us=overhead * 1e6,
                   node_compute_ranks=shared if share_model else 0.0,
                   node=Tier(bandwidth_GBps=world * beta / 1e9, latency_us=alpha * 1e6, shared_by="node"))


# ------------------------------------------------------------------------------------------- run
def _ints(text: str, what: str) -> list[int]:
    """Comma-separated non-negative integers, or a SimError naming the flag."""
    try:
        out = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise SimError(f"--{what} must be comma-separated integers, got {text!r}") from None
    if not out or any(v < 0 for v in out):
        raise SimError(f"--{what} must list non-negative integers, got {text!r}")
    return out


def _search(args: argparse.Namespace) -> Search:
    """The planner's search space from the command-line flags."""
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SimError(f"--modes {bad} unknown; choose from {', '.join(MODES)}")
    sched = [s for s in args.schedule.split(",") if s]
    if [s for s in sched if s not in SCHEDULES]:
        raise SimError(f"--schedule must be from {', '.join(SCHEDULES)}, got {args.schedule!r}")
    return Search(ep=_ints(args.ep, "ep") if args.ep else None, pp=_ints(args.pp, "pp"),
                  microbatches=_ints(args.microbatches, "microbatches"), schedule=sched, modes=modes,
                  hierarchical=[False, True] if args.hierarchical else [False],
                  replicas=_ints(args.replicas, "replicas"), overlap=_ints(args.overlap, "overlap"),
                  migrate=[False, True] if args.migrate else [False], migrate_every=args.migrate_every,
                  tier_overlap=[False, True] if args.tier_overlap else [False], zero=_ints(args.zero, "zero"),
                  recompute=[False, True] if args.recompute else [False])


def _presets() -> str:
    """The --list-presets text."""
    from moeflow.models.config import MODEL_PRESETS

    lines = ["model presets (simulator shapes): " + ", ".join(MODEL_SHAPES),
             "model presets (moeflow): " + ", ".join(p for p in MODEL_PRESETS if "dense" not in p),
             "cluster presets:"]
    for name, make in CLUSTER_PRESETS.items():
        c = make()
        lines.append(f"  {name:<10} {c.ranks_per_node}/node, node {c.node.bandwidth_GBps:g} GB/s, between nodes "
                     f"{c.tier('domain').bandwidth_GBps:g} GB/s, {c.gemm_tflops:g} TFLOP/s, {c.memory_GiB:g} GiB")
    lines.append(f"example files: {example_path('')}")
    return "\n".join(lines)


def run_plan(args: argparse.Namespace) -> int:
    """Load the inputs, plan, print the table (or JSON) and write the plot."""
    if args.model is None or args.cluster is None or args.ranks is None:
        raise SimError("moeflow plan needs --model, --cluster and --ranks (or --calibrate, or --list-presets)")
    world = _ints(args.ranks, "ranks")
    if len(world) != 1 or world[0] < 1:
        raise SimError(f"--ranks must be one positive number of ranks, got {args.ranks!r}")
    if args.tokens is not None and args.tokens < 1:
        raise SimError(f"--tokens must be a positive number of tokens per rank, got {args.tokens}")
    model, cluster = load_model(args.model), load_cluster(args.cluster)
    work = load_workload(args.workload, args.tokens)
    if args.domains:
        nodes = world[0] // cluster.ranks_per_node
        if args.domains < 1 or nodes % args.domains:
            raise SimError(f"--domains {args.domains} must divide the {nodes} nodes of {world[0]} ranks")
        if args.wan_gbit <= 0:
            raise SimError(f"--wan-gbit must be > 0, got {args.wan_gbit}")
        cluster = multi_dc(cluster, nodes // args.domains, args.wan_gbit)
    t0 = time.perf_counter()
    result = plan(model, cluster, work, world[0], _search(args), check_memory=not args.no_memory_check)
    elapsed = time.perf_counter() - t0
    if not result.ranked:
        raise SimError("no layout could be simulated: " + "; ".join(f"{lay.label()}: {why}"
                                                                    for lay, why in result.rejected[:3]))
    best = result.ranked[0]
    base = next((p for p in result.ranked if in_moeflow(p.layout)), None)
    pay = payback(base, best, model, cluster, work) if base is not None and base is not best else None
    if args.json:
        out = {"model": model.to_dict(), "cluster": cluster.to_dict(), "workload": work.to_dict(),
               "world": world[0], "plan_seconds": elapsed, "explain": result.explain(),
               "ranked": [p.to_dict() for p in result.ranked],
               "rejected": [{"label": lay.label(), "why": why} for lay, why in result.rejected],
               "payback": pay}
        print(json.dumps(out, indent=1, default=float))
    else:
        print(f"{model.name}: {model.num_params() / 1e9:.1f}B parameters, {model.num_experts} experts top-"
              f"{model.top_k}, {model.moe_layers} MoE layers | {cluster.name}: {world[0]} ranks, "
              f"{cluster.ranks_per_node}/node | {work.tokens_per_rank} tokens/rank; {loads_summary(work, model)}")
        print(f"{len(result.ranked)} layouts fit, {len(result.rejected)} rejected; simulated in {elapsed:.2f} s")
        print("\n".join(breakdown_table(result.ranked, args.top)))
        print("\n".join(result.explain()))
        if pay is not None and pay["migrate_s"] > 0 and pay["payback_steps"] is not None:
            print(f"  moving from {base.layout.label()} to the winner: {fmt_time(pay['migrate_s'])} over the "
                  f"{pay['tier']} tier, repaid after {pay['payback_steps']:.1f} steps")
        for lay, why in result.rejected[:3]:
            print(f"  rejected {lay.label()}: {why}")
    if args.plot is not None:
        from moeflow.analysis.plots_plan import plot_breakdown

        top = result.ranked[:args.top]
        terms = ["expert", "dense", "a2a", "small_a2a", "grad_sync", "bubble", "p2p", "migrate_sync"]
        plot_breakdown([p.layout.label() for p in top],
                       {t: [p.breakdown[t] for p in top] for t in terms},
                       [p.step for p in top], args.plot, f"{model.name} on {world[0]} x {cluster.name}")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    """Measure each world size and write cluster-local-w<W>.json files."""
    worlds = _ints(args.ranks or "2", "ranks")
    if args.budget_s <= 0:
        raise SimError(f"--budget-s must be > 0, got {args.budget_s}")
    if min(args.calib_d, args.calib_h, args.calib_tokens) < 1:
        raise SimError("--calib-d, --calib-h and --calib-tokens must be positive")
    args.out.mkdir(parents=True, exist_ok=True)
    for w in worlds:
        c = calibrate(w, args.budget_s, d=args.calib_d, h=args.calib_h, rows=args.calib_tokens,
                      log=lambda s: print(s, file=sys.stderr, flush=True))
        path = args.out / f"cluster-local-w{w}.json"
        path.write_text(json.dumps(c.to_dict(), indent=2) + "\n")
        print(f"wrote {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point: errors in the inputs become one line on stderr and exit code 2."""
    try:
        if args.list_presets:
            print(_presets())
            return 0
        return run_calibrate(args) if args.calibrate else run_plan(args)
    except (SimError, ConfigError) as e:
        print(f"moeflow plan: error: {e}", file=sys.stderr)
        return 2


__all__ = ["register", "run", "load_model", "shape_from_config", "calibrate", "fit_alpha_beta"]
