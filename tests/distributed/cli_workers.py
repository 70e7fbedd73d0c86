"""Worker for test_cli_distributed.py: run `moeflow.cli.main` on one gloo rank and capture what it prints."""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any


def cli_worker(rank: int, world: int, runs: list[list[str]],
               die: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """Run each argv in turn (the process group survives between them); with `die=(rank, step)` that rank is
    killed (os._exit) when it starts that step, as kill -9 would. Returns {code, out, err} per argv."""
    import moeflow.parallel
    from moeflow.cli import main
    from moeflow.train.trainer import Trainer

    if die is not None and die[0] == rank:
        real_step = Trainer.train_step

        def dying_step(self: Trainer) -> dict[str, Any]:
            if self.step + 1 == die[1]:
                os._exit(1)
            return real_step(self)

        Trainer.train_step = dying_step  # type: ignore[method-assign]
    if len(runs) > 1:
        moeflow.parallel.shutdown = lambda dims: None  # keep the harness's group for the next argv
    results = []
    for argv in runs:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        results.append({"code": code, "out": out.getvalue(), "err": err.getvalue()})
    return results
