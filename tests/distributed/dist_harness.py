"""Shared helpers for the multi-process tests: `run_world` and `world_mean`.

`run_world(fn, world_size, *args)` spawns `world_size` fresh processes joined by a gloo group over a FileStore
(no ports), runs `fn(rank, world, *args)` in each with a wall-clock cap, and returns the per-rank results;
a rank that raises fails the test with its traceback. Worker functions must be module-level (picklable).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch.distributed as dist
from torch import Tensor

from moeflow.parallel import spawn_local


def run_world(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 240.0,
              pg_timeout_s: float = 60.0, may_die: Iterable[int] = ()) -> list[Any]:
    """Run fn(rank, world, *args) on `world_size` gloo ranks; per-test timeout `timeout_s`.

    The cap is generous because the CPU is shared (a 4-rank spawn takes ~15 s idle, ~40 s on a loaded box);
    its job is to turn a hang into a failure, not to measure speed.
    """
    return spawn_local(fn, world_size, args, timeout_s=timeout_s, pg_timeout_s=pg_timeout_s, may_die=may_die)


def world_mean(t: Tensor) -> Tensor:
    """Mean of a scalar over all ranks (detached)."""
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()
