"""`moeflow translate`: decode with a trained translation run; `moeflow translate-train`: train one.

    moeflow train --task translate --preset gshard --name tr-gshard     # or: moeflow translate-train --out DIR
    moeflow train --task translate --resume runs/tr-gshard --max-steps 1200
    torchrun --nproc-per-node 2 -m moeflow train --task translate --ep 2
    moeflow translate --run runs/tr-gshard --to cip,rev --text "the return value must be a string"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from moeflow.cli.args import int_at_least
from moeflow.cli.runs import require_run
from moeflow.config import ConfigError
from moeflow.ops.threads import cpu_threads
from moeflow.tasks.translate import TranslateConfig, translate_overrides, translate_preset
from moeflow.train.checkpoint import CheckpointError
from moeflow.train.config import config_keys, load_config_file, parse_set


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
    p.add_argument("--beam", type=int_at_least(1, ", 1 = greedy"), default=1, help="beam size (1: greedy)")
    p.set_defaults(func=run_translate)
    t = sub.add_parser("translate-train", help="train the embedded multilingual translation task")
    add_train_args(t)
    t.set_defaults(func=run_train)


def run_translate(args: argparse.Namespace) -> int:
    """Print each text's translation next to the language's exact mapping."""
    from moeflow.tasks.languages import LANGUAGES, check_text
    from moeflow.tasks.translate import translate
    from moeflow.tasks.translate_train import load_run

    require_run(args.run, "translate", "moeflow translate")
    try:
        model, cfg, vocab = load_run(args.run)
        codes = [c.strip() for c in args.to.split(",") if c.strip()]
        if not codes:
            raise ValueError(f"--to {args.to!r} names no language; give one or more codes separated by commas, "
                             f"e.g. --to {','.join(cfg.languages[:2])} (this run knows {', '.join(cfg.languages)})")
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
    """`moeflow translate-train`: a fresh run into --out."""
    overrides = parse_set(list(args.overrides))
    if args.cpu_limit is not None:
        overrides["cpu_limit_s"] = args.cpu_limit
    try:
        cfg = translate_overrides(translate_preset(args.preset), overrides)
    except (ConfigError, ValueError) as e:
        print(f"moeflow: bad translate config: {e}", file=sys.stderr)
        return 2
    run_dir = Path(args.out or f"runs/translate-{args.preset}")
    return _train(cfg, args.preset, run_dir, None, quiet=args.quiet)


def run_from_train_command(args: argparse.Namespace) -> int:
    """`moeflow train --task translate`: train's flags on the translation task (resume, stop-at, torchrun --ep)."""
    unsupported = [flag for flag, value in (("--data", args.data), ("--report-only", args.report_only)) if value]
    if args.device not in (None, "cpu", "auto"):
        unsupported.append("--device")
    if unsupported:
        print(f"moeflow train --task translate: {', '.join(unsupported)} not supported for this task (the corpus is "
              "embedded and it trains on the CPU; see `moeflow translate-train -h`)", file=sys.stderr)
        return 2
    if args.list_keys:
        print("\n".join(config_keys(TranslateConfig)))
        return 0
    from moeflow.cli.train import _parallel_hooks

    # each rank routes only its own rows' non-padding tokens, so capacities differ between ranks: variable splits
    hooks, dims = _parallel_hooks(args, mode="variable")
    try:
        try:
            cfg, preset, run_dir = _resume_config(args) if args.resume else _new_config(args, hooks)
        except (ConfigError, CheckpointError, ValueError) as e:
            print(f"moeflow: bad translate config: {e}", file=sys.stderr)
            return 2
        if args.show_config:
            print(json.dumps({"preset": preset, **cfg.to_dict()}, indent=2))
            return 0
        return _train(cfg, preset, run_dir, hooks, quiet=args.quiet, resume=bool(args.resume), stop_at=args.stop_at)
    finally:
        if dims is not None:
            from moeflow.parallel import shutdown

            shutdown(dims)


def _new_config(args: argparse.Namespace, hooks: object | None) -> tuple[TranslateConfig, str, Path]:
    """Preset, then config file, then the shorthand flags, then --set (last wins); and the run folder."""
    preset = args.preset or "gshard"
    overrides: dict[str, object] = load_config_file(args.config) if args.config else {}
    if args.max_steps is not None:
        overrides["steps"] = args.max_steps
    if args.seed is not None:
        overrides["seed"] = args.seed
    overrides.update(parse_set(args.overrides))
    cfg = translate_overrides(translate_preset(preset), overrides)
    # under torchrun every rank must derive the same default name: agree on one timestamp first
    stamp = hooks.mean(time.time()) if hooks is not None else time.time()  # type: ignore[attr-defined]
    name = args.name or f"translate-{preset}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(stamp))}"
    return cfg, preset, Path(args.out) / name


def _resume_config(args: argparse.Namespace) -> tuple[TranslateConfig, str | None, Path]:
    """The run folder's own config.json (only --max-steps may extend it)."""
    run_dir = require_run(args.resume, "translate", "moeflow train --task translate --resume")
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{run_dir}: not a run folder (no config.json); pass the folder `moeflow train "
                              "--task translate` made")
    if args.preset or args.config or args.overrides or args.seed is not None:
        raise ConfigError("--resume continues a run with its own config.json; drop --preset/--config/--set/--seed "
                          "(only --max-steps and --stop-at may change)")
    saved = json.loads(cfg_path.read_text())
    preset = saved.pop("preset", None)
    cfg = TranslateConfig.from_dict(saved)
    if args.max_steps is not None:
        cfg = translate_overrides(cfg, {"steps": args.max_steps})
    return cfg, preset, run_dir


def _train(cfg: TranslateConfig, preset: str | None, run_dir: Path, hooks: object | None, *, quiet: bool,
           resume: bool = False, stop_at: int | None = None) -> int:
    """Train (or resume) with cfg.threads CPU threads; rank 0 then writes the report and prints the table."""
    from moeflow.tasks.translate_train import load_run, translate_trainer
    from moeflow.train.trainer import TrainingDiverged

    main = hooks is None or hooks.rank == 0  # type: ignore[attr-defined]
    if not resume and ((run_dir / "checkpoint.pt").exists() or (run_dir / "checkpoint.dcp").exists()):
        print(f"moeflow: {run_dir} already holds a translation run; continue it with --resume {run_dir}, pick "
              "another folder (--out/--name) or delete it", file=sys.stderr)
        return 2
    with cpu_threads(cfg.threads or None):  # the one place a translation run's thread count is set
        try:
            trainer = translate_trainer(cfg, run_dir, hooks=hooks, resume=resume,  # type: ignore[arg-type]
                                        progress=not quiet)
            if not resume:
                trainer.write_config(preset)
            elif main:
                print(f"resuming {run_dir} at step {trainer.step} of {cfg.steps}")
            result = trainer.run(stop_at=stop_at, cpu_limit_s=cfg.cpu_limit_s)
        except (ConfigError, CheckpointError) as e:
            print(f"moeflow: {e}", file=sys.stderr)
            return 2
        except TrainingDiverged as e:
            print(f"moeflow: {e}", file=sys.stderr)
            return 1
        if not main:
            return 0
        # the report decodes with the logical model: under expert parallelism rank 0 holds only its experts
        world = 1 if hooks is None else hooks.world  # type: ignore[attr-defined]
        model = trainer.model if world == 1 else load_run(run_dir)[0]
        summary = trainer.task.report(model, result, run_dir)
    _print_summary(summary, run_dir)
    return 0


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    """The per-language table, I(language; expert) per layer, and where the run folder is."""
    print(f"\n{'language':<10}{'exact':>8}{'CER':>9}")
    for code, v in summary["eval"].items():
        print(f"{code:<10}{v['exact']:>8.3f}{v['cer']:>9.4f}")
    mis = {name: round(r["mi_bits"], 3) for name, r in summary["routing"].items()}
    print(f"mean      {summary['mean_exact']:>8.3f}{summary['mean_cer']:>9.4f}")
    print(f"I(language; expert) bits per MoE layer: {json.dumps(mis)}")
    stopped = "" if summary["steps"] == summary["planned_steps"] else \
        f"; stopped at step {summary['steps']} of {summary['planned_steps']}: continue with --resume {run_dir}"
    print(f"run folder: {run_dir} (report.md, metrics.jsonl, checkpoint.pt){stopped}")
