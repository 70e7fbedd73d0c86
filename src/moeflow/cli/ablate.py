"""`moeflow ablate --task translate`: train MoE variants (moe_every, capacity, groups, random routing) and the
dense baseline with the same budget, and print one table.

    moeflow ablate --task translate --steps 400                       # one factor at a time around gshard
    moeflow ablate --task translate --axis capacity_factor=0.5,2 --axis num_groups=1,4 --grid
"""

from __future__ import annotations

import argparse
import sys

from moeflow.config import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `ablate` subcommand."""
    p = sub.add_parser("ablate", help="ablation table over MoE settings on an embedded task")
    p.add_argument("--task", default="translate", choices=["translate"], help="the task (translate)")
    p.add_argument("--preset", default="gshard", help="base translate preset (an MoE one: gshard, switch, tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the base config, e.g. steps=300 (repeatable)")
    p.add_argument("--steps", type=int, default=None, help="training steps per variant (default: the preset's)")
    p.add_argument("--axis", action="append", default=[], metavar="NAME=V1,V2",
                   help="axis to vary (moe_every, capacity_factor, num_groups, random_routing); repeatable; "
                        "default: all four with moe_every=1,2 capacity_factor=0.5,1,2 num_groups=1,4 "
                        "random_routing=on,off")
    p.add_argument("--grid", action="store_true", help="full grid instead of one factor at a time")
    p.add_argument("--no-dense", action="store_true", help="skip the dense baseline of equal active parameters")
    p.add_argument("--out", default="runs/ablate-translate", help="folder for the variants' runs and the table")
    p.add_argument("--verbose", action="store_true", help="print every variant's training log")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the variants, train them in turn, print the table."""
    from moeflow.tasks.ablation import DEFAULT_AXES, ablation_variants, format_table, parse_axis, run_ablation
    from moeflow.tasks.translate import apply_overrides, translate_preset

    try:
        overrides = list(args.overrides) + ([f"steps={args.steps}"] if args.steps else [])
        base = apply_overrides(translate_preset(args.preset), overrides)
        axes = dict(parse_axis(a) for a in args.axis) if args.axis else dict(DEFAULT_AXES)
        variants = ablation_variants(base, axes, grid=args.grid, dense=not args.no_dense)
    except ConfigError as e:
        print(f"moeflow ablate: {e}", file=sys.stderr)
        return 2
    print(f"ablation: {len(variants)} variants x {base.steps} steps -> {args.out}")
    rows = run_ablation(variants, args.out, verbose=args.verbose)
    print()
    print(format_table(rows))
    return 0
