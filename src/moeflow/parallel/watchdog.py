"""Turning a dead or stuck peer into a clear, bounded-time error.

Three layers, cheapest first:
1. Every process group has an explicit timeout (`init_distributed(timeout_s=...)`); gloo and NCCL honour it,
   so a collective waiting on a peer that never comes raises after at most `timeout_s`, and one whose peer died
   raises as soon as the connection drops.
2. `collective_guard` wraps each of our collectives and converts the backend's low-level exception into a
   `PeerFailureError` that names the collective, the step and the rank, and says what to check.
3. `barrier_with_timeout` waits on the store and names the ranks that did not arrive;
   `hang_watchdog` dumps every thread's stack if a step exceeds a wall-clock budget (for hangs outside
   collectives, e.g. a deadlocked data loader).
"""

from __future__ import annotations

import faulthandler
import itertools
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist

from moeflow.parallel.groups import ParallelDims

# NOTE: barrier keys live in the process group's store, which is per process, so the counter is too; every rank
# calls barrier_with_timeout the same number of times in the same order, hence the same key for the same barrier.
_BARRIER_IDS = itertools.count(1)


class PeerFailureError(RuntimeError):
    """A collective failed because another rank died, hung or diverged; the message says which and what to check."""

    def __init__(self, collective: str, dims: ParallelDims, elapsed_s: float, cause: BaseException,
                 timeout_s: float | None = None) -> None:
        """Build the message from the failing collective, the layout and the backend's error."""
        step = "?" if dims.step is None else str(dims.step)
        timeout_s = dims.timeout_s if timeout_s is None else timeout_s
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        super().__init__(
            f"rank {dims.rank}/{dims.world}: {collective} failed at step {step} after {elapsed_s:.1f}s "
            f"(timeout {timeout_s:g}s): {first}\n"
            "  A peer process probably died or is stuck. Check the other ranks' output for the first error "
            "(exception, out of memory, NaN check, killed by the OS); check that every rank runs the same model, "
            "the same number of steps and of MoE layers (a rank that skips a collective hangs the others); "
            "raise init_distributed(timeout_s=...) only if a step legitimately takes longer.")
        self.collective = collective
        self.rank = dims.rank
        self.step = dims.step
        self.elapsed_s = elapsed_s


@contextmanager
def collective_guard(collective: str, dims: ParallelDims, timeout_s: float | None = None) -> Iterator[None]:
    """Run one collective; convert a backend failure (dead peer, timeout, closed pair) into PeerFailureError."""
    t0 = time.monotonic()
    try:
        yield
    except PeerFailureError:
        raise
    except (RuntimeError, dist.DistError) as exc:  # DistBackendError, DistNetworkError, gloo's RuntimeError
        raise PeerFailureError(collective, dims, time.monotonic() - t0, exc, timeout_s) from exc


# what a backend's failure looks like from outside our own calls (FSDP2 issues its collectives itself)
_BACKEND_MARKERS = ("gloo", "nccl", "connection closed", "timed out", "timeout", "processgroup", "c10d",
                    "connection reset", "broken pipe")


@contextmanager
def step_guard(what: str, dims: ParallelDims) -> Iterator[None]:
    """Like `collective_guard` around code that issues collectives we do not call ourselves (FSDP2's all-gathers
    and reduce-scatters inside forward/backward): only backend failures become PeerFailureError, so a bug in
    the model still raises as itself."""
    t0 = time.monotonic()
    try:
        yield
    except PeerFailureError:
        raise
    except dist.DistError as exc:
        raise PeerFailureError(what, dims, time.monotonic() - t0, exc) from exc
    except RuntimeError as exc:
        if dims.distributed and any(m in str(exc).lower() for m in _BACKEND_MARKERS):
            raise PeerFailureError(what, dims, time.monotonic() - t0, exc) from exc
        raise


def barrier_with_timeout(dims: ParallelDims, name: str = "barrier", timeout_s: float | None = None,
                         poll_s: float = 0.02) -> None:
    """Wait for every rank, at most `timeout_s` (default: the group timeout); the error names the missing ranks.

    Built on the process group's key-value store rather than on a collective: each rank publishes one key and
    polls for the others', so the survivors always learn WHICH ranks never arrived, whether those died (a
    collective would fail first with an anonymous closed connection) or hang, on any backend.
    """
    if not dims.distributed:
        return
    timeout_s = timeout_s if timeout_s is not None else dims.timeout_s
    prefix = f"moeflow/barrier/{next(_BARRIER_IDS)}/{name}"
    keys = [f"{prefix}/{r}" for r in range(dims.world)]
    t0 = time.monotonic()
    with collective_guard(name, dims, timeout_s):
        store = dist.distributed_c10d._get_default_store()
        store.set(keys[dims.rank], "1")
        while not store.check(keys):
            if time.monotonic() - t0 > timeout_s:
                missing = [r for r, k in enumerate(keys) if not store.check([k])]
                raise RuntimeError(f"ranks {missing} did not reach {name!r} within {timeout_s:g}s")
            time.sleep(poll_s)


@contextmanager
def hang_watchdog(timeout_s: float, exit_on_hang: bool = False) -> Iterator[None]:
    """If the body runs longer than `timeout_s`, print every thread's stack to stderr (and exit if asked).

    A last line of defence for hangs that no process-group timeout covers; re-armed on every entry, so wrap
    one training step with it.
    """
    faulthandler.dump_traceback_later(timeout_s, repeat=False, file=sys.stderr, exit=exit_on_hang)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
