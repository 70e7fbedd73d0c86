"""moeflow.parallel in one process: layout math, clear errors, world-1 identities, watchdog, spawn error reports."""

from __future__ import annotations

import time

import pytest
import torch

from moeflow import MoEConfig, MoELayer
from moeflow.parallel import (AllToAllDispatcher, ParallelConfigError, ParallelDims, WorkerError, allreduce_gradients,
                              clip_grad_norm_, expert_parameters, gather_full_state_dict, hang_watchdog,
                              init_distributed, is_main, load_full_state_dict, parallelize, spawn_local)


def test_groups_layout() -> None:
    """world 4, ep 2: EP groups are consecutive ranks, EDP groups strided (DeepSpeed E+D)."""
    dims = ParallelDims(world=4, ep=2, rank=3)
    assert (dims.ep_rank, dims.edp_rank, dims.edp, dims.dp) == (1, 1, 2, 4)
    assert dims.ep_ranks() == [2, 3] and dims.edp_ranks() == [1, 3]
    assert dims.local_experts(8) == range(4, 8)
    assert not is_main(dims) and is_main(ParallelDims(world=4, ep=2, rank=0))


@pytest.mark.parametrize("kw,msg", [(dict(world=4, ep=3), "must divide the world size 4"),
                                    (dict(world=2, ep=0), "positive integer"),
                                    (dict(world=2, ep=2, rank=2), "outside the world")])
def test_bad_layouts_are_explained(kw: dict, msg: str) -> None:
    """Impossible layouts fail at construction with the fix in the message."""
    with pytest.raises(ParallelConfigError, match=msg):
        ParallelDims(**kw)


def test_experts_must_divide_over_ep() -> None:
    """6 experts cannot be split over 4 ranks: the error names the layer and the divisors."""
    with pytest.raises(ParallelConfigError, match="num_experts=6 is not divisible by ep=4"):
        ParallelDims(world=4, ep=4).local_experts(6, "layers.0.ffn")


def test_init_distributed_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without torchrun: world 1 works; asking for ep > 1 tells how to launch."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    dims = init_distributed(ep=1)
    assert (dims.world, dims.rank, dims.distributed) == (1, 0, False)
    with pytest.raises(ParallelConfigError, match="torchrun --nproc-per-node 2"):
        init_distributed(ep=2)


def test_world1_is_the_identity() -> None:
    """parallelize / allreduce / clip / gather / load with one process leave the model as a plain model."""
    dims = ParallelDims(world=1, ep=1)
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=8, d_hidden=6, num_experts=4, top_k=2)).double()
    x = torch.randn(10, 8, dtype=torch.float64)
    before = layer(x)
    parallelize(layer, dims)
    assert expert_parameters(layer) == {} and not isinstance(layer.dispatcher, AllToAllDispatcher)
    y = layer(x)
    torch.testing.assert_close(y, before, rtol=0, atol=0)
    y.square().sum().backward()
    allreduce_gradients(layer, dims)
    grads = [p.grad.clone() for p in layer.parameters()]
    expected = torch.nn.utils.get_total_norm(grads)
    norm = clip_grad_norm_(layer, dims, max_norm=float(expected) / 2)
    torch.testing.assert_close(norm, expected.float())
    clipped = torch.nn.utils.get_total_norm([p.grad for p in layer.parameters()])
    assert float(clipped) == pytest.approx(float(expected) / 2, rel=1e-5)
    state = gather_full_state_dict(layer, dims)
    assert state is not None and set(state) == set(layer.state_dict())
    load_full_state_dict(layer, state, dims)


def test_load_rejects_a_checkpoint_of_another_shape() -> None:
    """A checkpoint with a different expert count fails with both shapes in the message."""
    dims = ParallelDims(world=1, ep=1)
    layer = MoELayer(MoEConfig(d_model=8, d_hidden=6, num_experts=4, top_k=2))
    state = MoELayer(MoEConfig(d_model=8, d_hidden=6, num_experts=8, top_k=2)).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_full_state_dict(layer, state, dims)


def test_dispatcher_rejects_unknown_mode() -> None:
    """A typo in the dispatcher mode is caught when building it."""
    from moeflow.dispatch import LocalDispatcher
    with pytest.raises(ValueError, match="choose one of auto, variable, padded, dedup"):
        AllToAllDispatcher(ParallelDims(world=1, ep=1), 4, mode="fast")


def test_hang_watchdog_dumps_stacks(capfd: pytest.CaptureFixture[str]) -> None:
    """A step that overruns its budget prints every thread's stack (and nothing when it finishes in time)."""
    with hang_watchdog(5.0):
        pass
    with hang_watchdog(0.2):
        time.sleep(0.6)
    err = capfd.readouterr().err
    assert "Timeout (0:00:00.200000)!" in err and "test_hang_watchdog_dumps_stacks" in err


def _raising_worker(rank: int, world: int) -> None:
    """Fails on purpose, so the parent must report the rank and the exception."""
    raise ValueError(f"boom from rank {rank}")


@pytest.mark.distributed
def test_spawn_local_reports_worker_exceptions() -> None:
    """A rank's exception reaches the caller as WorkerError with the rank and the traceback."""
    with pytest.raises(WorkerError, match=r"(?s)rank 0 raised.*ValueError: boom from rank 0"):
        spawn_local(_raising_worker, 1, timeout_s=60)
