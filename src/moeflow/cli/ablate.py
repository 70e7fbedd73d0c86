"""`moeflow ablate --task translate`: train MoE variants (moe_every, capacity, groups, random routing) and the
dense baseline with the same budget, and print one table.

    moeflow ablate --task translate --steps 400                       # one factor at a time around gshard
    moeflow ablate --task translate --axis capacity_factor=0.5,2 --axis num_groups=1,4 --grid
    moeflow ablate --task translate --axis none --seeds 0,1,2,3 --jobs 2         # MoE vs dense over 4 seeds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moeflow.cli.args import POSITIVE
from moeflow.config import ConfigError
from moeflow.ops.threads import cpu_threads


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `ablate` subcommand."""
    p = sub.add_parser("ablate", help="ablation table over MoE settings on an embedded task")
    p.add_argument("--task", default="translate", choices=["translate"], help="the task (translate)")
    p.add_argument("--preset", default="gshard", help="base translate preset (an MoE one: gshard, switch, tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the base config, e.g. steps=300 (repeatable)")
    p.add_argument("--steps", type=POSITIVE, default=None, help="training steps per variant (default: the preset's)")
    p.add_argument("--axis", action="append", default=[], metavar="NAME=V1,V2",
                   help="axis to vary (moe_every, capacity_factor, num_groups, random_routing); repeatable; "
                        "default: all four with moe_every=1,2 capacity_factor=0.5,1,2 num_groups=1,4 "
                        "random_routing=on,off; 'none': only the base model (and dense)")
    p.add_argument("--grid", action="store_true", help="full grid instead of one factor at a time")
    p.add_argument("--seeds", default=None, metavar="S1,S2,...",
                   help="train every variant once per seed and report means, ranges and CER wins vs dense "
                        "(default: the preset's seed)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, in worker processes (default 1)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense baseline of equal active parameters")
    p.add_argument("--out", default="runs/ablate-translate", help="folder for the variants' runs and the table")
    p.add_argument("--verbose", action="store_true", help="print every variant's training log")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the variants, train them in turn, print the table."""
    from moeflow.tasks.ablation import DEFAULT_AXES, ablation_variants, format_languages, format_table, parse_axis, \
        run_ablation
    from moeflow.tasks.translate import translate_overrides, translate_preset
    from moeflow.train.config import parse_set

    try:
        overrides = parse_set(list(args.overrides))
        if args.steps:
            overrides["steps"] = args.steps
        base = translate_overrides(translate_preset(args.preset), overrides)
        if base.model.moe is None:
            raise ConfigError(f"--preset {args.preset} has no MoE layers to vary; use an MoE preset (gshard, "
                              "switch, tiny): the dense baseline of equal active parameters is added to the table")
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"--out {out} already exists and is not empty; pick another folder (an ablation "
                              "never overwrites earlier runs)")
        if args.axis == ["none"]:
            axes = {}
        else:
            axes = dict(parse_axis(a) for a in args.axis) if args.axis else dict(DEFAULT_AXES)
        variants = ablation_variants(base, axes, grid=args.grid, dense=not args.no_dense)
        seeds = _parse_seeds(args.seeds) if args.seeds else None
        if args.jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    except ConfigError as e:
        print(f"moeflow ablate: {e}", file=sys.stderr)
        return 2
    print(f"ablation: {len(variants)} variants x {base.steps} steps -> {args.out}")
    with cpu_threads(base.threads or None):  # the runs trained in this process share the base's thread count
        rows = run_ablation(variants, args.out, verbose=args.verbose, seeds=seeds, jobs=args.jobs)
    print()
    print(format_table(rows))
    print()
    print(format_languages(rows))
    return 0


def _parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2], distinct non-negative integers."""
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} must be comma-separated integers, e.g. 0,1,2") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r} must list distinct non-negative integers")
    return seeds
