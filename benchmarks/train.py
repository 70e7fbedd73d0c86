"""Benchmark training and generation speed: an MoE model vs the dense model of equal active parameters.

Training: full optimizer steps (forward, loss + aux loss, backward, clip, AdamW, routing statistics), exactly as
`moeflow train` runs them, on batches of the embedded corpus; the MoE and dense steps are interleaved in the same
process so that CPU noise hits both alike, and the median is reported with the MoE/dense ratio (target >= 0.8).
Generation: tokens/s of the MoE model continuing a prompt with and without the KV cache.

    python benchmarks/train.py                       # the 'tiny' preset, 2 threads, wall clock
    python benchmarks/train.py --threads 1 --clock cpu   # on a shared machine: CPU time of this process
    python benchmarks/train.py --preset small --steps 5
    python benchmarks/train.py --quick               # tiny sizes (smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from moeflow.models import generate
from moeflow.train import apply_overrides, dense_counterpart, get_preset, lm_trainer, load_corpus
from moeflow.train.config import RunConfig

QUICK = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.n_kv_heads": 1,
         "model.max_seq_len": 64, "model.ffn_hidden": 64, "model.moe.d_hidden": 32, "model.moe.num_experts": 4,
         "train.batch_size": 4, "train.seq_len": 32, "data.max_bytes": 300_000}


def clock(kind: str) -> Callable[[], float]:
    """wall: perf_counter; cpu: this process's CPU time (robust when others share the cores)."""
    return time.perf_counter if kind == "wall" else time.process_time


def bench_training(cfgs: dict[str, RunConfig], steps: int, warmup: int, tick: Callable[[], float]) -> dict[str, float]:
    """Median tokens/s per config over `steps` optimizer steps, interleaved across configs."""
    corpus = load_corpus(next(iter(cfgs.values())).data)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {k: lm_trainer(c, f"{tmp}/{k}", corpus=corpus, progress=False) for k, c in cfgs.items()}
        times: dict[str, list[float]] = {k: [] for k in cfgs}
        for i in range(warmup + steps):
            for k, t in trainers.items():
                t0 = tick()
                rec = t.train_step()
                if i >= warmup:
                    times[k].append(tick() - t0)
        return {k: rec["tokens"] / statistics.median(v) for k, v in times.items()}


def bench_generation(cfg: RunConfig, prompt_len: int, new_tokens: int, repeats: int,
                     tick: Callable[[], float]) -> dict[str, float]:
    """New tokens/s of a freshly initialised model, with and without the KV cache (greedy, batch 1)."""
    from moeflow.models import MoETransformer

    torch.manual_seed(0)
    model = MoETransformer(cfg.model).eval()
    prompt = torch.randint(0, cfg.model.vocab_size, (1, prompt_len))
    out: dict[str, float] = {}
    for label, cache in (("with KV cache", True), ("without KV cache", False)):
        runs = []
        for _ in range(repeats):
            t0 = tick()
            generate(model, prompt, new_tokens, temperature=0.0, use_cache=cache)
            runs.append(tick() - t0)
        out[label] = new_tokens / statistics.median(runs)
    return out


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run both benchmarks, print the tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="an MoE run preset (default tiny)")
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps per model (default 12)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per timing (default 64)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt length for generation (default 64)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tick = clock(args.clock)
    base = get_preset(args.preset)
    if args.quick:
        base = apply_overrides(base, QUICK)
        args.steps, args.warmup, args.new_tokens, args.prompt_len = 3, 1, 8, 8
    if base.model.moe is None:
        print(f"error: preset {args.preset!r} is dense; pick an MoE preset", file=sys.stderr)
        return 2
    dense = RunConfig(model=dense_counterpart(base.model), train=base.train, data=base.data)
    cfgs = {"moe": base, "dense": dense}
    m = base.model.moe
    print(f"preset {args.preset}: batch {base.train.batch_size} x seq {base.train.seq_len}, {args.threads} threads, "
          f"{args.clock} clock, torch {torch.__version__}")
    print(f"  moe:   {m.num_experts} experts top-{m.top_k}, {base.model.num_params():,} params, "
          f"{base.model.num_active_params():,} active")
    print(f"  dense: ffn_hidden {dense.model.ffn_hidden}, {dense.model.num_params():,} params\n")
    rates = bench_training(cfgs, args.steps, args.warmup, tick)
    print("| training (median of %d steps) | tokens/s |\n|---|---|" % args.steps)
    for k, v in rates.items():
        print(f"| {k} | {v:,.0f} |")
    print(f"| moe / dense | {rates['moe'] / rates['dense']:.2f}x |\n")
    gen = bench_generation(base, args.prompt_len, args.new_tokens, 3, tick)
    print(f"| generation, MoE, prompt {args.prompt_len}, {args.new_tokens} new tokens | tokens/s |\n|---|---|")
    for k, v in gen.items():
        print(f"| {k} | {v:,.0f} |")
    print(f"| cache speed-up | {gen['with KV cache'] / gen['without KV cache']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
