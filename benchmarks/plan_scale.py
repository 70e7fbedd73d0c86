"""Cluster-scale predictions of `moeflow plan` (no measurement: the cost model on the seeds' shapes).

1. Switch C-2048 and DeepSeek-V3 on 256-4,096 GPUs (8 per node, one datacenter): the best layout of each family
   (plain EP; hierarchical routing; EPLB replicas) with predicted step time and all-to-all share.
2. Across 2-8 datacenters at 10-400 Gb/s per datacenter link: plain EP vs HybridEP-style migration, the gain,
   and whether it grows as bandwidth falls.
3. The crossover: tokens per step at which migration starts to pay, against the note's break-even
   n > (J-1)/J * P_e / D tokens per (domain, expert) (J = 2: P_e / (2D) = 1.5 H for SwiGLU experts).
4. How long a full plan over 4,096 ranks takes.

    python benchmarks/plan_scale.py            # ~1 min
    python benchmarks/plan_scale.py --quick    # fewer points
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moeflow.sim import CLUSTER_PRESETS, MODEL_SHAPES, Search, SimError, Traffic, Workload, plan, simulate  # noqa: E402
from moeflow.sim.planner import fmt_time  # noqa: E402
from moeflow.sim.spec import Layout, multi_dc  # noqa: E402

FIT = dict(zero=[1], recompute=[False, True])  # memory helpers every family may use
FAMILIES = {
    "plain EP": Search(**FIT),
    "hierarchical": Search(hierarchical=[True], modes=["dedup"], **FIT),
    "replicas": Search(replicas=[1, 2], **FIT),
    "pipeline": Search(pp=[4, 8], microbatches=[8, 16], schedule=["1f1b", "dualpipe"], **FIT),
}


def best(model, cluster, work, world, search):  # noqa: ANN001, ANN201
    """The fastest layout of a family that fits, or None."""
    try:
        res = plan(model, cluster, work, world, search)
    except SimError:
        return None
    return res.ranked[0] if res.ranked else None


def single_dc(worlds: list[int]) -> None:
    """Table 1."""
    print("## 1. One datacenter, 8 GPUs per node (H100 for Switch-C, H200 for DeepSeek-V3), 4,096 tokens/GPU\n")
    print("| model | traffic | GPUs | family | best layout | step | a2a share | imbalance | dropped |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, preset in (("switch-c-2048", "dgx-h100"), ("deepseek-v3", "hgx-h200")):
        m, c = MODEL_SHAPES[name](), CLUSTER_PRESETS[preset]()
        for traffic in (Traffic(kind="uniform"), Traffic(kind="lognormal", sigma=0.5)):
            w = Workload(tokens_per_rank=4096, traffic=traffic)
            tname = "uniform" if traffic.kind == "uniform" else "lognormal 0.5"
            for world in worlds:
                for fam, search in FAMILIES.items():
                    p = best(m, c, w, world, search)
                    if p is None:
                        print(f"| {name} | {tname} | {world} | {fam} | does not fit / no valid layout | | | | |")
                        continue
                    print(f"| {name} | {tname} | {world} | {fam} | {p.layout.label()} | {fmt_time(p.step)} | "
                          f"{100 * p.a2a_share:.0f}% | {p.imbalance:.2f} | {100 * p.dropped:.1f}% |")


def multi(domains: list[int], gbits: list[float]) -> None:
    """Table 2: one layout whose EP group spans the datacenters, with and without migration, as links slow."""
    print("\n## 2. Across datacenters: EP spanning the DCs, plain vs HybridEP-style migration (one link per DC)\n")
    print("| model | GPUs | DCs | tokens/GPU | n (per DC, expert) | n* | Gb/s | plain step | a2a share | "
          "+ migration | a2a share | migrated/layer | gain | GiB/GPU (fits?) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    cases = (("switch-c-2048", "dgx-h100", 2048, 2048, 16384), ("deepseek-v3", "hgx-h200", 256, 256, 4096))
    for name, preset, world, ep, tokens in cases:
        m, base = MODEL_SHAPES[name](), CLUSTER_PRESETS[preset]()
        w = Workload(tokens_per_rank=tokens)
        lay = Layout(ep=ep, zero=1, recompute=True)
        for j in domains:
            gains = []
            for gb in gbits:
                c = multi_dc(base, world // 8 // j, gb)
                plain = simulate(m, c, w, lay, world)
                hyb = simulate(m, c, w, lay.replace(migrate=True), world)
                gains.append(plain.step / hyb.step)
                n = tokens * (world // j) * m.top_k / m.num_experts
                n_star = (j - 1) / j * m.expert_params / m.d_model
                print(f"| {name} | {world} | {j} | {tokens} | {n:.0f} | {n_star:.0f} | {gb:g} | "
                      f"{fmt_time(plain.step)} | {100 * plain.a2a_share:.0f}% | {fmt_time(hyb.step)} | "
                      f"{100 * hyb.a2a_share:.0f}% | {hyb.migrated} | {plain.step / hyb.step:.2f}x | "
                      f"{hyb.memory_total / 2**30:.0f} ({'yes' if hyb.fits else 'no'}) |")
            trend = " -> ".join(f"{g:.2f}x" for g in gains)
            grows = all(b >= a - 1e-9 for a, b in zip(gains, gains[1:])) and gains[-1] > gains[0]
            print(f"| {name} | {world} | {j} | | | | {' -> '.join(f'{g:g}' for g in gbits)} | gain {trend}: "
                  f"{'grows as bandwidth falls' if grows else 'does not grow'} | | | | | | |")


def crossover(tokens: list[int]) -> None:
    """Table 3: migration decision vs the break-even, on fixed layouts (ep spanning the datacenters)."""
    print("\n## 3. Crossover: when moving experts beats moving tokens (fixed layout, 100 Gb/s links)\n")
    print("| model | GPUs | DCs | tokens/GPU | tokens per (DC, expert) n | break-even n* | migrated/layer | "
          "plain | migrate | gain |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, preset, world, j, ep in (("deepseek-v3", "hgx-h200", 256, 2, 256), ("switch-c-2048", "dgx-h100",
                                                                                   2048, 2, 2048)):
        m, base = MODEL_SHAPES[name](), CLUSTER_PRESETS[preset]()
        c = multi_dc(base, world // 8 // j, 100)
        per_domain = world // j
        n_star = (j - 1) / j * m.expert_params / m.d_model
        for t in tokens:
            w = Workload(tokens_per_rank=t)
            lay = Layout(ep=ep, zero=1, recompute=True)
            plain = simulate(m, c, w, lay, world)
            hyb = simulate(m, c, w, lay.replace(migrate=True), world)
            n = t * per_domain * m.top_k / m.num_experts
            print(f"| {name} | {world} | {j} | {t} | {n:.0f} | {n_star:.0f} | {hyb.migrated} | "
                  f"{fmt_time(plain.step)} | {fmt_time(hyb.step)} | {plain.step / hyb.step:.2f}x |")


def runtime() -> None:
    """Table 4."""
    m, c = MODEL_SHAPES["switch-c-2048"](), CLUSTER_PRESETS["dgx-h100"]()
    w = Workload(tokens_per_rank=4096, traffic=Traffic(kind="zipf"))
    search = Search(replicas=[0, 1, 2], overlap=[1, 2], hierarchical=[False, True], zero=[0, 1])
    t0 = time.perf_counter()
    res = plan(m, c, w, 4096, search)
    dt = time.perf_counter() - t0
    n = len(res.ranked) + len(res.rejected)
    print(f"\n## 4. Runtime\n\nfull search, switch-c-2048 on 4,096 ranks: {n} layouts simulated in {dt:.2f} s "
          f"({1e3 * dt / n:.1f} ms per layout); winner {res.ranked[0].layout.label()} {fmt_time(res.ranked[0].step)}")


def main(argv: list[str] | None = None) -> int:
    """Print the four tables (markdown)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    single_dc([512, 4096] if args.quick else [256, 512, 1024, 2048, 4096])
    multi([2] if args.quick else [2, 4, 8], [400, 10] if args.quick else [400, 100, 50, 10])
    crossover([256, 4096] if args.quick else [128, 256, 512, 768, 1024, 2048, 4096, 8192, 16384])
    runtime()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
