"""`moeflow translate`: decode with a trained translation run; `moeflow translate-train`: train one.

    moeflow train --task translate --preset gshard --name tr-gshard     # or: moeflow translate-train --out DIR
    moeflow translate --run runs/tr-gshard --to cip,rev --text "the return value must be a string"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from moeflow.config import ConfigError


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Options of `translate-train` (`moeflow train --task translate` takes the same through train's flags)."""
    p.add_argument("--preset", default="gshard", help="gshard (default), switch, dense (gshard's equal-active "
                                                      "dense baseline) or tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. steps=500, model.moe.capacity_factor=2.0 (repeatable)")
    p.add_argument("--out", default=None, help="run folder (default runs/translate-<preset>)")
    p.add_argument("--cpu-limit", type=float, default=None, metavar="SECONDS",
                   help="stop once training has used this much CPU time (= --set cpu_limit_s=SECONDS)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `translate` and `translate-train` subcommands."""
    p = sub.add_parser("translate", help="translate English text with a trained translation run")
    p.add_argument("--run", required=True, help="run folder written by `moeflow train --task translate`")
    p.add_argument("--to", required=True, help="target language code(s), comma-separated (e.g. cip,rev)")
    p.add_argument("--text", action="append", required=True, help="English text (repeatable)")
    p.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    p.set_defaults(func=run_translate)
    t = sub.add_parser("translate-train", help="train the embedded multilingual translation task")
    add_train_args(t)
    t.set_defaults(func=run_train)


def run_translate(args: argparse.Namespace) -> int:
    """Print each text's translation next to the language's exact mapping."""
    from moeflow.tasks.languages import LANGUAGES, check_text
    from moeflow.tasks.translate import translate
    from moeflow.tasks.translate_train import load_run

    try:
        model, cfg, vocab = load_run(args.run)
        codes = [c.strip() for c in args.to.split(",") if c.strip()]
        for code in codes:
            if code not in cfg.languages:
                raise ValueError(f"language {code!r} was not trained in {args.run}; "
                                 f"it knows {', '.join(cfg.languages)}")
        for text in args.text:
            if len(check_text(text)) > cfg.max_chars:
                print(f"note: {text!r} has {len(check_text(text))} characters, more than the {cfg.max_chars} of "
                      "every training sentence; expect errors past that length", file=sys.stderr)
        for code in codes:
            outs = translate(model, vocab, args.text, code, beam_size=args.beam)
            for text, out in zip(args.text, outs):
                ref = LANGUAGES[code].encode(check_text(text))
                mark = "ok" if out == ref else f"expected {ref!r}"
                print(f"<2{code}> {check_text(text)!r} -> {out!r}  ({mark})")
    except (FileNotFoundError, ValueError) as e:
        print(f"moeflow translate: {e}", file=sys.stderr)
        return 2
    return 0


def run_train(args: argparse.Namespace) -> int:
    """`moeflow translate-train`."""
    extra = [] if args.cpu_limit is None else [f"cpu_limit_s={args.cpu_limit}"]
    return train_task(args.preset, list(args.overrides) + extra, Path(args.out or f"runs/translate-{args.preset}"),
                      args.quiet)


def run_from_train_command(args: argparse.Namespace) -> int:
    """`moeflow train --task translate`: map train's flags onto the translation run (unsupported ones refused)."""
    unsupported = [flag for flag, value in (("--config", args.config), ("--data", args.data),
                                            ("--resume", args.resume), ("--stop-at", args.stop_at),
                                            ("--report-only", args.report_only), ("--list-keys", args.list_keys))
                   if value]
    if args.device not in (None, "cpu", "auto"):
        unsupported.append("--device")
    if unsupported:
        print(f"moeflow train --task translate: {', '.join(unsupported)} not supported for this task (the corpus is "
              "embedded; see `moeflow translate-train -h`)", file=sys.stderr)
        return 2
    preset = args.preset or "gshard"
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"steps={args.max_steps}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.show_config:
        from moeflow.tasks.translate import apply_overrides, translate_preset

        try:
            print(json.dumps({"preset": preset, **apply_overrides(translate_preset(preset), overrides).to_dict()},
                             indent=2))
        except ConfigError as e:
            print(f"moeflow: bad translate config: {e}", file=sys.stderr)
            return 2
        return 0
    name = args.name or f"translate-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return train_task(preset, overrides, Path(args.out) / name, args.quiet)


def train_task(preset: str, overrides: list[str], out: Path, quiet: bool = False) -> int:
    """Train from a preset plus overrides into `out`; print the per-language table at the end."""
    from moeflow.tasks.translate import apply_overrides, translate_preset
    from moeflow.tasks.translate_train import train_translate

    try:
        cfg = apply_overrides(translate_preset(preset), overrides)
    except (ConfigError, ValueError) as e:
        print(f"moeflow: bad translate config: {e}", file=sys.stderr)
        return 2
    if (out / "checkpoint.pt").exists():
        print(f"moeflow: {out} already holds a translation run; pick another folder (--out/--name) or delete it",
              file=sys.stderr)
        return 2
    summary = train_translate(cfg, out, log=(lambda _: None) if quiet else print)
    print(f"\n{'language':<10}{'exact':>8}{'CER':>9}")
    for code, v in summary["eval"].items():
        print(f"{code:<10}{v['exact']:>8.3f}{v['cer']:>9.4f}")
    mis = {name: round(r["mi_bits"], 3) for name, r in summary["routing"].items()}
    print(f"mean      {summary['mean_exact']:>8.3f}{summary['mean_cer']:>9.4f}")
    print(f"I(language; expert) bits per MoE layer: {json.dumps(mis)}")
    print(f"run folder: {out} (report.md, metrics.jsonl, checkpoint.pt)")
    return 0
