"""Run independent per-expert work items on a pool of single-threaded workers (the CPU path of the expert loop).

Why: an MoE layer's experts are many small GEMMs plus elementwise ops. Split over OpenMP threads inside each op,
every op pays a fork/join, and with `OMP_WAIT_POLICY=PASSIVE` (which a shared machine needs) a wake-up from
sleep too. Measured on 2 cores, 64 GEMMs of [128, 512] x [512, 512]: 31 ms as a loop with 2 OpenMP threads per
GEMM, 21 ms with each GEMM on one thread and the experts spread over 2 Python threads (ATen releases the GIL), vs
18 ms for one [8192, 512] GEMM. Results do not depend on the schedule: each item writes only its own outputs.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

_state = threading.local()
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _init_worker(barrier: threading.Barrier) -> None:
    """Make this worker single-threaded for ATen, OpenMP and MKL, then wait for its siblings."""
    torch.get_num_threads()  # NOTE: runs ATen's per-thread lazy init now, so it cannot later undo the line below
    torch.set_num_threads(1)
    _state.in_worker = True
    barrier.wait()


def _get_pool(size: int) -> ThreadPoolExecutor:
    """The shared pool with `size` workers, created (or resized) on first use."""
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != size:
            if _pool is not None:
                _pool.shutdown(wait=False)
            barrier = threading.Barrier(size + 1)
            pool = ThreadPoolExecutor(size, thread_name_prefix="moeflow-expert", initializer=_init_worker,
                                      initargs=(barrier,))
            for _ in range(size):  # each blocks in the initializer until all exist: forces `size` threads now
                pool.submit(int)
            barrier.wait()
            # NOTE: set_num_threads(1) in a worker also changed ATen's process-wide default that new threads
            # start from; restore it (this thread keeps `size`, the workers keep 1)
            torch.set_num_threads(size)
            _pool, _pool_size = pool, size
        return _pool


def _forget_pool_in_child() -> None:
    """After fork, the pool's threads do not exist in the child: start a fresh one there on first use."""
    global _pool, _pool_size, _lock
    _pool, _pool_size, _lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def parallel_items(work: Callable[[int], None], costs: Sequence[int], min_cost: int = 0, cpu: bool = True) -> None:
    """Call work(i) for every item i with costs[i] > 0; spread over torch.get_num_threads() workers on CPU.

    Items are taken largest first from a shared queue (dynamic balance). Grad mode and inference mode follow the
    caller. Runs inline when the work is not on the CPU (`cpu=False`: kernel launches are asynchronous anyway, and
    a worker thread would not see the caller's current CUDA stream), when one thread is set, when there are fewer
    than two items, when the total cost is under `min_cost`, or when already inside a worker. The first exception
    raised by an item is re-raised here.
    """
    items = sorted((i for i, c in enumerate(costs) if c > 0), key=lambda i: -costs[i])
    threads = torch.get_num_threads()
    if not cpu or threads <= 1 or len(items) < 2 or sum(costs[i] for i in items) < min_cost \
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

    futures = [_get_pool(threads).submit(drain) for _ in range(min(threads, len(items)))]
    errors = [f.exception() for f in futures]
    for err in errors:
        if err is not None:
            raise err


# Elements per independently seeded piece of `uniform_like`: fixed, so the values do not depend on the thread count.
_RNG_PIECE = 1 << 18


def uniform_like(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """U(low, high) noise shaped like x; on CPU generated in parallel pieces, each from its own seeded generator.

    Why: CPU `uniform_` runs one Mersenne Twister on one thread (Switch's input jitter over [8192, 256] took 11 ms
    of a 150 ms layer step). The piece seeds are drawn from torch's default generator, so `torch.manual_seed`
    still fixes the result, for any number of threads.
    """
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    n = out.numel()
    if x.device.type != "cpu" or n <= _RNG_PIECE:
        return out.uniform_(low, high)
    flat = out.view(-1)
    pieces = (n + _RNG_PIECE - 1) // _RNG_PIECE
    seeds = torch.randint(0, 1 << 62, (pieces,), dtype=torch.int64).tolist()

    def fill(i: int) -> None:
        """Piece i from its own generator."""
        gen = torch.Generator().manual_seed(seeds[i])
        flat[i * _RNG_PIECE:(i + 1) * _RNG_PIECE].uniform_(low, high, generator=gen)

    parallel_items(fill, [min(_RNG_PIECE, n - i * _RNG_PIECE) for i in range(pieces)])
    return out


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` torch CPU threads (None: leave them), restoring the previous count afterwards."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
