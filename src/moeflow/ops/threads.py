"""A pool of single-threaded CPU workers for independent per-expert work items (the CPU path of the expert loop).

Why: an MoE layer's experts are many small GEMMs plus elementwise ops. Split over OpenMP threads inside each op,
every op pays a fork/join, and with `OMP_WAIT_POLICY=PASSIVE` (which a shared machine needs) a wake-up from
sleep too. Measured on 2 cores, 64 GEMMs of [128, 512] x [512, 512]: 31 ms as a loop with 2 OpenMP threads per
GEMM, 21 ms with each GEMM on one thread and the experts spread over 2 Python threads (ATen releases the GIL), vs
18 ms for one [8192, 512] GEMM. Results do not depend on the schedule: each item writes only its own outputs.

The pool is an object owned by the module that uses it (`GroupedExperts.pool`), sized by `MoEConfig.cpu_workers`
(None: as many workers as torch has intra-op threads when the work runs, so `torch.set_num_threads(1)` makes the
experts run inline). It never changes the caller's thread count.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

_state = threading.local()  # `in_worker`: a work item that runs items itself must not wait on its own pool


def _init_worker(barrier: threading.Barrier) -> None:
    """Make this worker single-threaded for ATen, OpenMP and MKL, then wait for its siblings."""
    torch.get_num_threads()  # NOTE: runs ATen's per-thread lazy init now, so it cannot later undo the line below
    torch.set_num_threads(1)
    _state.in_worker = True
    barrier.wait()


class WorkerPool:
    """Runs work items on `workers` single-threaded threads, largest first, from a shared queue.

    Threads start on first use and are re-created after a fork (they do not exist in a child process). Copies and
    pickles start without threads.
    """

    def __init__(self, workers: int | None = None) -> None:
        """`workers`: threads to use (1: always inline); None follows torch.get_num_threads() at each call."""
        if workers is not None and workers < 1:
            raise ValueError(f"WorkerPool: workers={workers} must be >= 1 (or None to follow torch's threads)")
        self.workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._size, self._pid = 0, 0
        self._lock = threading.Lock()

    def size(self) -> int:
        """How many workers a call would use now."""
        return self.workers if self.workers is not None else torch.get_num_threads()

    def _get(self, size: int) -> ThreadPoolExecutor:
        """The executor with `size` single-threaded workers, created (or resized, or re-made after fork) on use."""
        with self._lock:
            if self._executor is None or self._size != size or self._pid != os.getpid():
                if self._executor is not None and self._pid == os.getpid():
                    self._executor.shutdown(wait=False)
                before = torch.get_num_threads()
                barrier = threading.Barrier(size + 1)
                pool = ThreadPoolExecutor(size, thread_name_prefix="moeflow-expert", initializer=_init_worker,
                                          initargs=(barrier,))
                for _ in range(size):  # each blocks in the initializer until all exist: forces `size` threads now
                    pool.submit(int)
                barrier.wait()
                # NOTE: set_num_threads(1) in a worker also changes ATen's process-wide default that new threads
                # start from: put the caller's back (the workers keep 1)
                torch.set_num_threads(before)
                self._executor, self._size, self._pid = pool, size, os.getpid()
            return self._executor

    def run(self, work: Callable[[int], None], costs: Sequence[int], min_cost: int = 0, cpu: bool = True) -> None:
        """Call work(i) for every item i with costs[i] > 0, spread over the workers.

        Grad mode and inference mode follow the caller. Runs inline when the work is not on the CPU (`cpu=False`:
        kernel launches are asynchronous anyway, and a worker would not see the caller's CUDA stream), with one
        worker, fewer than two items, a total cost under `min_cost`, or inside a worker. The first exception raised
        by an item is re-raised here, after the other items ran.
        """
        items = sorted((i for i, c in enumerate(costs) if c > 0), key=lambda i: -costs[i])
        size = self.size()
        if not cpu or size <= 1 or len(items) < 2 or sum(costs[i] for i in items) < min_cost \
                or getattr(_state, "in_worker", False):
            for i in items:
                work(i)
            return
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in items:
            todo.put(i)
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def drain() -> None:
            """Take items until none is left."""
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                while True:
                    try:
                        i = todo.get_nowait()
                    except queue.Empty:
                        return
                    work(i)

        executor = self._get(size)
        futures = [executor.submit(drain) for _ in range(min(size, len(items)))]
        errors = [f.exception() for f in futures]
        for err in errors:
            if err is not None:
                raise err

    def close(self) -> None:
        """Stop the worker threads (a later call starts new ones)."""
        with self._lock:
            if self._executor is not None and self._pid == os.getpid():
                self._executor.shutdown(wait=False)
            self._executor, self._size = None, 0

    def __getstate__(self) -> dict:
        """Copies and pickles keep the size only: threads and locks are process resources."""
        return {"workers": self.workers}

    def __setstate__(self, state: dict) -> None:
        """Rebuild an idle pool."""
        self.__init__(state["workers"])  # type: ignore[misc]

    def __repr__(self) -> str:
        """WorkerPool(workers=...)."""
        return f"WorkerPool(workers={self.workers})"


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` torch CPU threads (None: leave them), restoring the previous count afterwards.

    For the command line and benchmarks: library code does not change the process's thread count.
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


__all__ = ["WorkerPool", "cpu_threads"]
