"""`moeflow train`: train a model on the embedded corpus (or --data) into a run folder, then write its report."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
import time
import typing
from pathlib import Path
from typing import TextIO

from moeflow.cli.args import NON_NEGATIVE, POSITIVE
from moeflow.cli.runs import require_run, run_kind
from moeflow.config import ConfigError, dataclass_in
from moeflow.ops.threads import cpu_threads
from moeflow.train.checkpoint import CHECKPOINT_NAME, CheckpointError, checkpoint_step, clean_stale_temps
from moeflow.train.config import (RUN_PRESETS, RunConfig, apply_overrides, get_preset,
                                  load_config_file, parse_set)
from moeflow.train.data import DataError
from moeflow.tasks.translate import TRANSLATE_PRESETS
from moeflow.train.lm import lm_trainer
from moeflow.train.trainer import TrainingDiverged, TrainResult

DEFAULT_PRESET = "tiny"
USER_ERRORS = (ConfigError, DataError, CheckpointError)


def add_config_args(p: argparse.ArgumentParser, with_task: bool = False) -> None:
    """Flags that define a run's config (shared by train and compare; only train has --task translate)."""
    if with_task:
        p.add_argument("--preset", choices=sorted(set(RUN_PRESETS) | set(TRANSLATE_PRESETS)), default=None,
                       help=f"named model + training preset: for the language model {', '.join(RUN_PRESETS)} "
                            f"(default {DEFAULT_PRESET}); with --task translate {', '.join(TRANSLATE_PRESETS)} "
                            "(default gshard)")
    else:
        p.add_argument("--preset", choices=list(RUN_PRESETS), default=None,
                       help=f"named model + training preset (default {DEFAULT_PRESET})")
    p.add_argument("--config", metavar="FILE", help="JSON (or YAML, with pyyaml) file of overrides, nested like "
                   "config.json: {\"train\": {\"lr\": 1e-3}}")
    p.add_argument("--data", metavar="PATH", help="a text file, a folder of text files, or a pre-tokenised .bin/.npy "
                   "(default: the embedded Python stdlib corpus)")
    p.add_argument("--max-steps", type=POSITIVE, metavar="N", help="total training steps (= --set train.steps=N)")
    p.add_argument("--seed", type=NON_NEGATIVE,
                   help="seed for init, data order and router noise (= --set train.seed=N)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps (= --set train.device=...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field by its dotted path, e.g. --set model.moe.num_experts=16 "
                        "--set train.lr=1e-3 (repeatable; values are Python literals)")


def resolve_config(args: argparse.Namespace) -> tuple[RunConfig, str]:
    """Preset, then config file, then the shorthand flags, then --set (last wins); returns (config, preset)."""
    preset = args.preset or DEFAULT_PRESET
    if preset not in RUN_PRESETS:
        raise ConfigError(f"--preset {preset} is a translation preset: add --task translate, or pick a language-"
                          f"model preset ({', '.join(RUN_PRESETS)})")
    cfg = get_preset(preset)
    overrides: dict[str, object] = {}
    if args.config:
        overrides.update(load_config_file(args.config))
    if args.data is not None:
        overrides["data.path"] = args.data
    if args.max_steps is not None:
        overrides["train.steps"] = args.max_steps
    if args.seed is not None:
        overrides["train.seed"] = args.seed
    if args.device is not None:
        overrides["train.device"] = args.device
    overrides.update(parse_set(args.overrides))
    return (apply_overrides(cfg, overrides) if overrides else cfg), preset


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `train` subcommand."""
    p = sub.add_parser("train", help="train a model into a run folder (default: the tiny MoE on the stdlib corpus)",
                       description="Train an MoE (or dense) language model. With no arguments: the 'tiny' preset "
                                   "on the Python standard library sources, a few minutes on 2 CPU cores.")
    add_config_args(p, with_task=True)
    p.add_argument("--out", default="runs", help="folder that holds run folders (default runs/)")
    p.add_argument("--name", help="run folder name (default <preset>-<date>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint "
                   "(its config.json is used; --max-steps may extend it)")
    p.add_argument("--stop-at", type=POSITIVE, metavar="STEP", help="stop at this step with a checkpoint, without "
                   "changing the schedule (continue later with --resume)")
    p.add_argument("--ep", type=POSITIVE, default=None, metavar="N",
                   help="expert-parallel size under torchrun: experts of every MoE layer are split over N ranks, "
                        "the rest is data-parallel (world = N x DP); e.g. torchrun --nproc-per-node 4 -m moeflow "
                        "train --ep 2")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--show-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--list-keys", action="store_true", help="print every key --set accepts and exit")
    p.add_argument("--report-only", metavar="RUN_DIR", help="re-render RUN_DIR's report.md and exit")
    p.add_argument("--task", choices=["lm", "translate"], default="lm", help="lm: language model (default); "
                   "translate: the embedded multilingual translation task (--set takes its keys, e.g. steps=500)")
    p.set_defaults(func=run)


def _resume_config(args: argparse.Namespace) -> tuple[RunConfig, str | None, Path]:
    run_dir = require_run(args.resume, "lm", "moeflow train --resume")
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{run_dir}: not a run folder (no config.json); pass the folder `moeflow train` made")
    if args.preset or args.config or args.data or args.overrides or args.seed is not None:
        raise ConfigError("--resume continues a run with its own config.json; drop --preset/--config/--data/--set/"
                          "--seed (only --max-steps, --stop-at and --device may change)")
    saved = json.loads(cfg_path.read_text())
    preset = saved.pop("preset", None)
    cfg = RunConfig.from_dict(saved)
    extra: dict[str, object] = {}
    if args.max_steps is not None:
        extra["train.steps"] = args.max_steps
    if args.device is not None:
        extra["train.device"] = args.device
    return (apply_overrides(cfg, extra) if extra else cfg), preset, run_dir


def _nothing_to_do(args: argparse.Namespace, cfg: RunConfig, run_dir: Path) -> bool:
    """Before a resume touches anything: True (and a note) if the run already reached its end; an error if the
    requested end lies before the saved step (a run cannot be shortened)."""
    step = checkpoint_step(run_dir / CHECKPOINT_NAME)
    if args.max_steps is not None and args.max_steps < step:
        raise ConfigError(f"--max-steps {args.max_steps} is below the checkpoint's step {step}: a run cannot be "
                          f"shortened; pass --max-steps > {step} to extend it")
    if args.stop_at is not None and args.stop_at <= step:
        raise ConfigError(f"--stop-at {args.stop_at} is not after the checkpoint's step {step}; pass a later step")
    if step >= cfg.train.steps:
        print(f"nothing to do: {run_dir} already finished its {cfg.train.steps} steps (left unchanged); extend it "
              f"with --resume {run_dir} --max-steps N, N > {step}")
        return True
    return False


def _field_notes(cls: type) -> dict[str, str]:
    """Each field's trailing `# comment` in its class's source (where this codebase documents fields)."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):  # no source (e.g. a frozen install): keys without notes
        return {}
    notes = {}
    for line in lines:
        m = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
        if m:
            notes[m.group(1)] = m.group(2).strip()
    return notes


def describe_keys(preset: str = DEFAULT_PRESET) -> list[str]:
    """`--list-keys`: every dotted key (the first word of each line), its value in `preset` and its note."""
    out: list[str] = []

    def walk(klass: type, prefix: str, obj: object | None) -> None:
        notes = _field_notes(klass)
        for name, hint in typing.get_type_hints(klass).items():
            if name not in {f.name for f in dataclasses.fields(klass)}:
                continue
            key, value = f"{prefix}{name}", getattr(obj, name, None)
            sub = dataclass_in(hint)
            shown = "" if sub is not None or obj is None else f"  ({preset}: {value!r})"
            out.append(f"{key}{shown}{'  ' + notes[name] if name in notes else ''}")
            if sub is not None:
                walk(sub, key + ".", value)

    walk(RunConfig, "", get_preset(preset))
    return out


def print_summary(result: TrainResult, report: Path, stream: TextIO | None = None) -> None:
    """The final lines: losses, speed, and where everything is."""
    stream = stream or sys.stdout
    m, s = divmod(int(result.elapsed_s), 60)
    print(f"done: {result.step} steps in {m}:{s:02d} (median {result.tokens_per_s:,.0f} tokens/s, "
          f"{result.tokens_per_cpu_s:,.0f} tokens per CPU-second)", file=stream)
    print(f"  train loss {result.train_loss:.4f} | validation loss {result.val_loss:.4f} nats/byte = "
          f"{result.val_bpb:.4f} bits/byte", file=stream)
    print(f"  run folder: {result.run_dir}", file=stream)
    print(f"  report:     {report}", file=stream)
    print(f"  try:        moeflow generate --run {result.run_dir} --prompt 'def '", file=stream)


def run(args: argparse.Namespace) -> int:
    """Resolve the config, train (or resume), write the report, print the summary."""
    from moeflow.analysis.report import write_report

    if args.task == "translate":
        from moeflow.cli.translate import run_from_train_command

        return run_from_train_command(args)
    if args.list_keys:
        print("\n".join(describe_keys()))
        return 0
    if args.report_only:
        run_dir = require_run(args.report_only, "lm", "moeflow train --report-only")
        if run_kind(run_dir) is None and not (run_dir / "metrics.jsonl").exists():
            raise CheckpointError(f"{run_dir}: not a run folder (no config.json or metrics.jsonl); pass the folder "
                                  "`moeflow train` made")
        print(write_report(run_dir))
        return 0
    t_total = time.perf_counter()
    hooks, dims = _parallel_hooks(args)
    try:
        return _run_training(args, hooks, t_total)
    finally:
        if dims is not None:
            from moeflow.parallel import shutdown

            shutdown(dims)


def _parallel_hooks(args: argparse.Namespace, mode: str = "auto") -> tuple[object | None, object | None]:
    """DistributedHooks when launched by torchrun (WORLD_SIZE > 1) or with --ep; (None, None) otherwise.

    `mode` is the expert-parallel dispatcher mode (see moeflow.parallel.parallelize)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.ep is None and world == 1:
        return None, None
    from moeflow.parallel import DistributedHooks, init_distributed

    dims = init_distributed(ep=args.ep or 1)
    return DistributedHooks(dims, mode), dims


def _run_training(args: argparse.Namespace, hooks: object | None, t_total: float) -> int:
    """The single- or multi-process training run; only rank 0 prints and writes the report."""
    try:
        if args.resume:
            cfg, preset, run_dir = _resume_config(args)
        else:
            cfg, preset = resolve_config(args)
            # under torchrun every rank must derive the same default name: agree on one timestamp first
            stamp = hooks.mean(time.time()) if hooks is not None else time.time()
            name = args.name or f"{preset}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(stamp))}"
            run_dir = Path(args.out) / name
        if args.show_config:
            print(json.dumps({"preset": preset, **cfg.to_dict()}, indent=2))
            return 0
        if args.resume and _nothing_to_do(args, cfg, run_dir):
            return 0
        if not args.resume and (run_dir / CHECKPOINT_NAME).exists():
            raise ConfigError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick "
                              "another --name")
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with cpu_threads(cfg.train.threads or None):  # the one place the LM run's thread count is set
        return _train_and_report(args, cfg, preset, run_dir, hooks, t_total)


def _train_and_report(args: argparse.Namespace, cfg: RunConfig, preset: str | None, run_dir: Path,
                      hooks: object | None, t_total: float) -> int:
    """Build the trainer, run it, then (rank 0) write summary.json and report.md and print the summary."""
    from moeflow.analysis.report import write_report

    main = hooks is None or hooks.rank == 0  # type: ignore[attr-defined]
    say = print if main else (lambda *a, **k: None)
    try:
        if main:
            for tmp in clean_stale_temps(run_dir / CHECKPOINT_NAME):
                say(f"removed {tmp.name}, left by a save that was killed")
        say(f"run folder {run_dir}  (preset {preset}, {cfg.model.num_params():,} parameters, "
            f"{cfg.model.num_active_params():,} active per token)")
        t0 = time.perf_counter()
        trainer = lm_trainer(cfg, run_dir, resume=bool(args.resume), progress=not args.quiet,
                             hooks=hooks)  # type: ignore[arg-type]
        corpus = trainer.task.corpus  # type: ignore[attr-defined]
        say(f"data: {corpus.source}: {len(corpus.train):,} training / {len(corpus.val):,} "
            f"validation bytes ({time.perf_counter() - t0:.1f} s to set up data, model and optimizer)")
        if args.resume:
            say(f"resuming at step {trainer.step} of {cfg.train.steps}")
        else:
            trainer.write_config(preset)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = trainer.run(stop_at=args.stop_at)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        if main:
            print(f"partial report: {write_report(run_dir)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if trainer.last_ckpt_step is not None:
            print(f"\ninterrupted; the checkpoint at step {trainer.last_ckpt_step} is intact: "
                  f"moeflow train --resume {run_dir}", file=sys.stderr)
        raise
    if not main:
        return 0
    summary = trainer.task.report(trainer.model, result, run_dir)
    print_summary(result, Path(summary["report"]))
    print(f"  total time including data and report: {time.perf_counter() - t_total:.0f} s")
    return 0
