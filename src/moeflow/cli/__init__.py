"""The `moeflow` command line: one module per subcommand, each with `register(subparsers)`.

Every failure a user can cause (a bad value, a missing or damaged file, a full disk, a dead peer, a diverged run)
ends as one short `error: ...` paragraph on stderr and a non-zero exit status, never a traceback: the library
raises typed errors and `main` maps them here, in one place.
"""

from __future__ import annotations

import os
import sys

# OpenMP reads its wait policy once, when torch loads it: set the default before anything imports torch. Spinning
# waits (OpenMP's default) stall every parallel op on a shared or small machine; PASSIVE is what ./dev always set,
# now also for .venv/bin/moeflow and torchrun -m moeflow. An explicit OMP_WAIT_POLICY is kept.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import errno  # noqa: E402
import importlib  # noqa: E402

# each entry is a module under moeflow.cli exposing register(subparsers) -> None
SUBCOMMANDS = ["demo", "train", "generate", "eval", "compare", "translate", "ablate", "convert", "plan", "compress"]

USAGE_ERROR, RUN_FAILED = 2, 1  # bad input (nothing was changed) / the work itself failed


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="moeflow", description="Mixture-of-Experts training and analysis")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"moeflow.cli.{name}").register(sub)
    return parser


def error_message(exc: BaseException) -> tuple[int, str] | None:
    """(exit status, message) for an error a user can cause or meet; None for a bug (keep its traceback)."""
    from moeflow.config import ConfigError
    from moeflow.train.checkpoint import CheckpointError
    from moeflow.train.data import DataError
    from moeflow.train.trainer import TrainingDiverged

    # imported only if a parallel run imported them: a plain run never pays for torch.distributed
    parallel = sys.modules.get("moeflow.parallel.groups"), sys.modules.get("moeflow.parallel.watchdog")
    config_errors: tuple[type[BaseException], ...] = (ConfigError, DataError, CheckpointError)
    if parallel[0] is not None:
        config_errors += (parallel[0].ParallelConfigError,)
    if isinstance(exc, config_errors):
        return USAGE_ERROR, str(exc)
    if isinstance(exc, TrainingDiverged) or (parallel[1] is not None and isinstance(exc, parallel[1].PeerFailureError)):
        return RUN_FAILED, str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" writing {exc.filename}" if exc.filename else ""
        return RUN_FAILED, (f"no space left on device{where}. Files already saved (the previous checkpoint "
                            "included) are intact; free some space and run the command again (a training run "
                            "continues with --resume).")
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return USAGE_ERROR, f"{where}{exc.strerror.lower()}"
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)):
        return RUN_FAILED, ("out of memory; use smaller sizes (batch, sequence length, model, tokens) or free "
                            f"memory ({str(exc).strip().splitlines()[0][:200] if str(exc).strip() else 'MemoryError'})")
    return None


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the chosen subcommand; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`moeflow train --list-keys | head`): stop quietly, as other CLI tools do, and keep
        # the interpreter's final flush from failing on the closed pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:  # noqa: BLE001 - mapped to a message below, or re-raised as the bug it is
        mapped = error_message(exc)
        if mapped is None:
            raise
        code, message = mapped
        print(f"error: {message}", file=sys.stderr)
        return code
