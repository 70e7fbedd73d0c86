"""`moeflow compare`: dense vs MoE models with equal active parameters, same data, seed, batches and steps.

The dense baseline replaces every MoE layer by one FFN as wide as the experts a token uses
(ffn_hidden = top_k * d_hidden), so per-token compute matches; MoE variants differ only in how many experts
they hold. All runs share one loaded corpus and the same seed, hence the same stream of batches. The runs are
sequential, so wall-clock tokens/s depend on what else the machine did meanwhile; tokens per CPU-second of the
process (the same as wall-clock speed on an idle machine with train.threads=1) compare fairly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from moeflow.cli.train import USER_ERRORS, add_config_args, resolve_config
from moeflow.config import ConfigError
from moeflow.ops.threads import cpu_threads
from moeflow.train.config import RunConfig, dense_counterpart
from moeflow.train.data import load_corpus
from moeflow.train.lm import lm_trainer
from moeflow.train.trainer import TrainingDiverged


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `compare` subcommand."""
    p = sub.add_parser("compare", help="train dense and MoE models of equal active parameters and compare them")
    add_config_args(p)
    p.add_argument("--experts", default=None, metavar="E1,E2",
                   help="expert counts of the MoE variants (default: the preset's E and 2E), e.g. 4,8,16")
    p.add_argument("--out", default="runs", help="folder that holds run folders (default runs/)")
    p.add_argument("--name", help="comparison folder name (default compare-<preset>-<date>-<time>)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def variants(base: RunConfig, experts: list[int]) -> list[tuple[str, RunConfig]]:
    """(label, config) for the dense baseline and one MoE model per expert count, all else equal."""
    moe = base.model.moe
    if moe is None:
        raise ConfigError("compare needs an MoE preset to derive the dense baseline from (e.g. --preset tiny)")
    out = [("dense", dataclasses.replace(base, model=dense_counterpart(base.model)))]
    for e in experts:
        if e < moe.top_k:
            raise ConfigError(f"--experts {e}: fewer experts than top_k={moe.top_k}")
        model = dataclasses.replace(base.model, moe=moe.replace(num_experts=e))
        out.append((f"moe-{e}x{moe.top_k}", dataclasses.replace(base, model=model)))
    return out


def _parse_experts(text: str) -> list[int]:
    """'4,8,16' -> [4, 8, 16]; anything else is a ConfigError naming the expected form."""
    try:
        experts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--experts {text!r} must be comma-separated integers, e.g. 4,8,16") from None
    if not experts or any(e < 1 for e in experts):
        raise ConfigError(f"--experts {text!r} must list one or more positive expert counts, e.g. 4,8,16")
    if len(set(experts)) != len(experts):  # one folder per count: a repeat would overwrite the first run
        raise ConfigError(f"--experts {text!r} lists a count twice; give distinct counts, e.g. 4,8,16")
    return experts


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the comparison."""
    head = ("| model | experts (top-k) | total params | active params | val loss | bits/byte | tokens/s | "
            "tokens/CPU-s | train time |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['label']} | {r['experts']} | {r['params']:,} | {r['active_params']:,} | "
                     f"{r['val_loss']:.4f} | {r['val_bpb']:.4f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_cpu_s']:,.0f} | {r['elapsed_s']:.0f} s |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Train each variant in turn, print and save the table."""
    try:
        base, preset = resolve_config(args)
        e = base.model.moe.num_experts if base.model.moe else 0
        experts = _parse_experts(args.experts) if args.experts else [e, 2 * e]
        runs = variants(base, experts)
        corpus = load_corpus(base.data)
    except ValueError as e:  # ConfigError, DataError, and a malformed --experts list
        print(f"error: {e}", file=sys.stderr)
        return 2
    root = Path(args.out) / (args.name or f"compare-{preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root} already exists and is not empty; pick another --name (a comparison never "
                          "overwrites earlier runs)")
    print(f"comparing {', '.join(label for label, _ in runs)} for {base.train.steps} steps each on "
          f"{corpus.source}; folders under {root}")
    rows = []
    with cpu_threads(base.train.threads or None):  # every variant shares the base's thread count
        for label, cfg in runs:
            print(f"\n== {label}: {cfg.model.num_params():,} parameters, {cfg.model.num_active_params():,} active")
            try:
                trainer = lm_trainer(cfg, root / label, corpus=corpus, progress=not args.quiet)
                trainer.write_config(preset)
                res = trainer.run()
            except USER_ERRORS as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            except TrainingDiverged as e:
                print(f"error ({label}): {e}", file=sys.stderr)
                return 1
            moe = cfg.model.moe
            rows.append({"label": label, "experts": f"{moe.num_experts} ({moe.top_k})" if moe else "-",
                         "params": cfg.model.num_params(), "active_params": cfg.model.num_active_params(),
                         "val_loss": res.val_loss, "val_bpb": res.val_bpb, "tokens_per_s": res.tokens_per_s,
                         "tokens_per_cpu_s": res.tokens_per_cpu_s,
                         "elapsed_s": res.elapsed_s, "train_loss": res.train_loss})
    table = format_table(rows)
    dense = rows[0]
    verdicts = [f"{r['label']} vs dense: validation loss {r['val_loss'] - dense['val_loss']:+.4f} nats/byte "
                f"({'lower' if r['val_loss'] < dense['val_loss'] else 'NOT lower'}), speed per CPU-second "
                f"{r['tokens_per_cpu_s'] / dense['tokens_per_cpu_s']:.2f}x" for r in rows[1:]]
    print(f"\n{table}\n" + "\n".join(verdicts))
    root.mkdir(parents=True, exist_ok=True)
    (root / "compare.json").write_text(json.dumps({"preset": preset, "steps": base.train.steps, "rows": rows},
                                                  indent=2) + "\n")
    (root / "compare.md").write_text(f"# compare ({preset}, {base.train.steps} steps, seed {base.train.seed})\n\n"
                                     f"{table}\n\n" + "\n".join(f"- {v}" for v in verdicts) + "\n")
    print(f"saved {root / 'compare.md'}")
    return 0
