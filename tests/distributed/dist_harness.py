"""Shared helpers for the multi-process tests: `run_world` and the reference comparisons the workers use.

`run_world(fn, world_size, *args)` spawns `world_size` fresh processes joined by a gloo group over a FileStore
(no ports), runs `fn(rank, world, *args)` in each with a wall-clock cap, and returns the per-rank results;
a rank that raises fails the test with its traceback. Worker functions must be module-level (picklable).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from moeflow.parallel import spawn_local


def run_world(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 90.0,
              pg_timeout_s: float = 30.0, may_die: Iterable[int] = ()) -> list[Any]:
    """Run fn(rank, world, *args) on `world_size` gloo ranks; per-test timeout `timeout_s`."""
    return spawn_local(fn, world_size, args, timeout_s=timeout_s, pg_timeout_s=pg_timeout_s, may_die=may_die)


def assert_close(actual: Tensor, expected: Tensor, what: str, atol: float = 1e-10, rtol: float = 1e-8) -> float:
    """torch.testing.assert_close with a message naming the quantity; returns the max abs difference."""
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
    return float((actual - expected).abs().max()) if actual.numel() else 0.0


def world_mean(t: Tensor) -> Tensor:
    """Mean of a scalar over all ranks (detached)."""
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()
