"""The experts' worker pool (WorkerPool): same results as one thread, caller's modes and threads, errors, fork.

The autouse `one_thread` fixture sets one intra-op thread, which makes every kernel run inline; tests here that
mean to exercise the pool set two threads themselves (and lower the work threshold where a kernel has one).
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import pickle
import threading

import pytest
import torch

from moeflow import MoEConfig, MoELayer
from reference import activation as activate
from moeflow.ops.grouped_mlp import grouped_mlp
from moeflow.ops.noise import PIECE, uniform_like
from moeflow.ops.threads import WorkerPool
from moeflow.ops.tuning import cpu_tuning

POOL = WorkerPool()  # follows torch's thread count


def parallel_items(work, costs, min_cost: int = 0, cpu: bool = True) -> None:
    """The shared test pool's run."""
    POOL.run(work, costs, min_cost, cpu)


@pytest.fixture
def two_threads():
    """Two intra-op threads and no minimum work, so the pool is used even for tiny tensors."""
    torch.set_num_threads(2)
    with cpu_tuning(pool_min_macs=0):
        yield
    torch.set_num_threads(1)


def test_every_item_runs_once_on_single_threaded_workers(two_threads) -> None:
    """Items with positive cost run exactly once, off the calling thread, each with one ATen thread; the caller
    keeps its own thread count."""
    seen: list[tuple[int, str, int]] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        with lock:
            seen.append((i, threading.current_thread().name, torch.get_num_threads()))

    parallel_items(work, [3, 0, 5, 1, 2, 0])
    assert sorted(i for i, _, _ in seen) == [0, 2, 3, 4]
    assert all(name.startswith("moeflow-expert") and n == 1 for _, name, n in seen)
    assert torch.get_num_threads() == 2
    # a thread started now still gets the process default, not the workers' 1
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert got == [2]


def test_inline_when_one_thread_largest_first() -> None:
    """With one thread the items run on the caller, largest cost first."""
    order: list[int] = []
    parallel_items(lambda i: order.append(i), [1, 7, 0, 3])
    assert order == [1, 3, 0]


def test_work_off_the_cpu_runs_inline(two_threads) -> None:
    """cpu=False (CUDA tensors) keeps every item on the calling thread, which owns the current stream."""
    names: list[str] = []
    parallel_items(lambda i: names.append(threading.current_thread().name), [1, 1, 1], cpu=False)
    assert names == [threading.current_thread().name] * 3


def test_worker_errors_reach_the_caller(two_threads) -> None:
    """An exception in an item is raised by parallel_items, after the other items ran."""
    done: list[int] = []

    def work(i: int) -> None:
        if i == 1:
            raise RuntimeError("expert 1 failed")
        done.append(i)

    with pytest.raises(RuntimeError, match="expert 1 failed"):
        parallel_items(work, [1, 1, 1, 1])
    assert sorted(done) == [0, 2, 3]


def test_workers_follow_grad_and_inference_mode(two_threads) -> None:
    """Grad mode and inference mode are thread-local in torch; the workers take the caller's."""
    modes: list[tuple[bool, bool]] = []

    def work(i: int) -> None:
        modes.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))

    with torch.no_grad():
        parallel_items(work, [1, 1])
    with torch.inference_mode():
        parallel_items(work, [1, 1])
    parallel_items(work, [1, 1])
    assert modes == [(False, False)] * 2 + [(False, True)] * 2 + [(True, False)] * 2


def test_nested_calls_run_inline(two_threads) -> None:
    """A worker that calls parallel_items again runs the inner items itself (no deadlock on a full pool)."""
    inner: list[str] = []

    def outer(i: int) -> None:
        parallel_items(lambda j: inner.append(threading.current_thread().name), [1, 1])

    parallel_items(outer, [1, 1])
    assert len(inner) == 4 and all(n.startswith("moeflow-expert") for n in inner)


SPLITS = [5, 0, 7, 2, 9, 0, 3]


def _leaf(*shape: int) -> torch.Tensor:
    """A float64 leaf that requires grad."""
    return torch.randn(*shape, dtype=torch.float64).requires_grad_(True)


@pytest.mark.parametrize("weighted", [False, True])
def test_grouped_mlp_on_the_pool_equals_inline_bitwise(weighted, two_threads, monkeypatch) -> None:
    """Spreading experts over workers changes nothing: forward and every gradient are bit-identical to one thread
    (each expert's GEMMs run single-threaded either way), with chunked blocks and empty experts."""
    x, w_in, w_out, w = _leaf(26, 4), _leaf(7, 6, 4), _leaf(7, 4, 3), _leaf(26)
    g = torch.randn(26, 4, dtype=torch.float64)
    inputs = [x, w_in, w_out] + ([w] if weighted else [])

    def run() -> tuple[torch.Tensor, ...]:
        with cpu_tuning(chunk_elems=24):
            y = grouped_mlp(x, w_in, w_out, SPLITS, "swiglu", row_weights=w if weighted else None, pool=POOL)
            return (y.detach(), *torch.autograd.grad(y, inputs, g))

    pooled = run()
    torch.set_num_threads(1)
    inline = run()
    for a, b in zip(pooled, inline):
        assert torch.equal(a, b)


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_row_weights_scale_rows_and_get_their_gradient(activation) -> None:
    """grouped_mlp(..., row_weights=w) == w[:, None] * per-expert FFNs, forward and all four gradients (float64)."""
    f = 6 if activation == "swiglu" else 3
    x, w_in, w_out, w = _leaf(26, 4), _leaf(7, f, 4), _leaf(7, 4, 3), _leaf(26)
    with cpu_tuning(chunk_elems=24):
        y = grouped_mlp(x, w_in, w_out, SPLITS, activation, row_weights=w)
    starts = [sum(SPLITS[:e]) for e in range(len(SPLITS))]
    ref = torch.cat([activate(x[s:s + n] @ w_in[e].t(), activation) @ w_out[e].t()
                     for e, (s, n) in enumerate(zip(starts, SPLITS))]) * w[:, None]
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    with cpu_tuning(chunk_elems=24):
        got = torch.autograd.grad(y, [x, w_in, w_out, w], g)
    for a, b in zip(got, torch.autograd.grad(ref, [x, w_in, w_out, w], g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_row_weights_pass_gradcheck_and_bad_shape_is_named() -> None:
    """Finite differences agree with the fused backward through the row weights; a wrong-length w is refused."""
    splits = [2, 0, 3]
    x, w_in, w_out, w = _leaf(5, 3), _leaf(3, 4, 3), _leaf(3, 3, 2), _leaf(5)
    with cpu_tuning(chunk_elems=12):
        assert torch.autograd.gradcheck(lambda a, b, c, d: grouped_mlp(a, b, c, splits, "swiglu", row_weights=d),
                                        (x, w_in, w_out, w))
    with pytest.raises(ValueError, match=r"row_weights must be \[R=5\]"):
        grouped_mlp(x, w_in, w_out, splits, row_weights=w[:4])


def test_pool_size_is_explicit_and_never_changes_the_callers_threads() -> None:
    """workers=2 uses two workers even at one torch thread; None follows torch; the caller keeps its count."""
    names: set[str] = set()
    lock = threading.Lock()

    def work(i: int) -> None:
        with lock:
            names.add(threading.current_thread().name)

    torch.set_num_threads(1)
    WorkerPool(None).run(work, [1, 1, 1, 1])
    assert names == {threading.current_thread().name}
    names.clear()
    pool = WorkerPool(2)
    for _ in range(20):  # two workers share a queue: over 20 rounds both take items
        pool.run(lambda i: (work(i), __import__("time").sleep(0.001)), [1, 1, 1, 1])
    assert len(names) == 2 and all(n.startswith("moeflow-expert") for n in names)
    assert torch.get_num_threads() == 1
    pool.close()
    with pytest.raises(ValueError, match="workers=0 must be >= 1"):
        WorkerPool(0)


def test_layers_own_their_pool_sized_by_config_and_copies_start_idle() -> None:
    """MoEConfig.cpu_workers reaches the experts' pool; deepcopy and pickle keep the size, not the threads."""
    layer = MoELayer(MoEConfig(d_model=8, d_hidden=8, num_experts=4, top_k=2, cpu_workers=2))
    assert layer.experts.pool.workers == 2 and layer.experts.pool.size() == 2
    with cpu_tuning(pool_min_macs=0):
        y = layer(torch.randn(16, 8))
    clone = copy.deepcopy(layer)
    again = pickle.loads(pickle.dumps(layer))
    assert clone.experts.pool is not layer.experts.pool and clone.experts.pool.workers == 2
    assert again.experts.pool.workers == 2 and again.experts.pool._executor is None
    with cpu_tuning(pool_min_macs=0):
        torch.testing.assert_close(clone(torch.zeros(2, 8)), layer(torch.zeros(2, 8)))
    assert y.shape == (16, 8)
    with pytest.raises(Exception, match="cpu_workers"):
        MoEConfig(d_model=8, d_hidden=8, num_experts=4, top_k=2, cpu_workers=0)


def test_uniform_like_is_seeded_and_independent_of_the_pool() -> None:
    """Parallel pieces: in range, fixed by torch.manual_seed, the same with no pool and with 2 workers, and no
    two pieces equal."""
    x = torch.empty(3, PIECE + 5)

    def draw(pool: WorkerPool | None) -> torch.Tensor:
        torch.manual_seed(7)
        return uniform_like(x, 0.9, 1.1, pool)

    a, b, c = draw(WorkerPool(2)), draw(WorkerPool(2)), draw(None)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert a.min() >= 0.9 and a.max() <= 1.1 and abs(a.mean().item() - 1.0) < 1e-3
    flat = a.view(-1)
    assert not torch.equal(flat[:PIECE], flat[PIECE:2 * PIECE])


def _child(q) -> None:
    """Use the pool in a forked child."""
    torch.set_num_threads(2)
    out: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        with lock:
            out.append(i)

    parallel_items(work, [1, 1, 1])
    q.put(sorted(out))


def test_pool_works_after_fork(two_threads) -> None:
    """A process forked after the pool started builds its own pool instead of waiting on threads it lacks."""
    parallel_items(lambda i: None, [1, 1])
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    p.join(timeout=60)
    assert p.exitcode == 0, "forked child hung or failed using the expert pool"
    assert q.get(timeout=5) == [0, 1, 2]
