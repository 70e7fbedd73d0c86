"""Run a function on N local processes joined by a gloo group: for tests, benchmarks and CPU experiments.

`spawn_local(fn, world)` starts `world` fresh interpreters (multiprocessing "spawn"), rendezvous through a
FileStore in a temporary directory (no ports to race for), calls `fn(rank, world, *args)` in each and returns
the per-rank results. It never waits forever: past `timeout_s` it kills the workers it started and raises,
naming the ranks that were still running. For real jobs use torchrun and `init_distributed`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class WorkerError(RuntimeError):
    """One or more spawned ranks failed or timed out; the message holds their tracebacks."""


def _worker(fn: Callable[..., Any], rank: int, world: int, store_path: str, pg_timeout_s: float, out_dir: str,
            threads: int, args: tuple) -> None:
    """Join the group, run fn, write its result or traceback, and leave without a teardown that could block."""
    torch.set_num_threads(threads)
    code = 0
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=pg_timeout_s))
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"result{rank}.pt"))
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit from the test body
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        code = 1
    # os._exit: a normal exit would run gloo/atexit teardown, which can block when a peer is already gone
    os._exit(code)


def spawn_local(fn: Callable[..., Any], world: int, args: Iterable[Any] = (), timeout_s: float = 120.0,
                pg_timeout_s: float = 60.0, threads: int = 1, may_die: Iterable[int] = ()) -> list[Any]:
    """Run `fn(rank, world, *args)` on `world` local gloo ranks; returns their results (None for `may_die` ranks
    that exited without one).

    `fn` must be importable by name (a module-level function). `pg_timeout_s` bounds every collective;
    `timeout_s` bounds the whole run. Raises WorkerError with each failing rank's traceback.
    """
    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="moeflow-spawn-")
    may_die = set(may_die)
    procs = []
    try:
        for rank in range(world):
            p = ctx.Process(target=_worker, args=(fn, rank, world, os.path.join(tmp, "store"), pg_timeout_s, tmp,
                                                  threads, tuple(args)), daemon=True)
            p.start()
            procs.append(p)
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join(5)
        errors, results = [], []
        for rank, p in enumerate(procs):
            err = os.path.join(tmp, f"error{rank}.txt")
            res = os.path.join(tmp, f"result{rank}.pt")
            if os.path.exists(err):
                with open(err) as f:
                    errors.append(f"--- rank {rank} raised:\n{f.read()}")
            elif rank in hung:
                errors.append(f"--- rank {rank} still running after {timeout_s:.0f}s: killed")
            elif not os.path.exists(res) and rank not in may_die:
                errors.append(f"--- rank {rank} exited with code {p.exitcode} and no result")
            results.append(torch.load(res, weights_only=False) if os.path.exists(res) else None)
        if errors:
            raise WorkerError(f"{len(errors)} of {world} ranks failed running {fn.__name__}:\n" + "\n".join(errors))
        return results
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
