"""moeflow.parallel in one process: layout math, clear errors, world-1 identities, watchdog, spawn error reports."""

from __future__ import annotations

import time

import pytest
import torch

from moeflow import MoEConfig, MoELayer
from moeflow.parallel import (AllToAllDispatcher, ParallelConfigError, ParallelDims, WorkerError, check_layout,
                              clip_grad_norm_, expert_parameters, hang_watchdog, init_distributed, is_main,
                              parallelize, shard_model, shutdown, spawn_local)


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


@pytest.mark.parametrize("kw,msg", [
    (dict(world=4, ep=2, dp=3), "dp=3 x ep=2 = 6, but 4 processes were launched; use dp=2"),
    (dict(world=4, ep=3), "ep=3 must divide the world size 4"),
    (dict(world=4, ep=4, num_experts=6), "num_experts=6 is not divisible by ep=4"),
    (dict(world=4, ep=2, dp=0), "dp must be a positive integer")])
def test_mesh_layout_errors_name_the_numbers(kw: dict, msg: str) -> None:
    """check_layout (run by init_distributed before any rendezvous) names every number and the fix."""
    with pytest.raises(ParallelConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        check_layout(**kw)


def test_init_distributed_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without torchrun: the world-1 ("dp", "ep") mesh on a private one-rank group; ep > 1 tells how to launch."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ParallelConfigError, match="torchrun --nproc-per-node 2"):
        init_distributed(ep=2)
    assert not torch.distributed.is_initialized()  # refused before creating anything
    dims = init_distributed(ep=1)
    try:
        assert (dims.world, dims.rank, dims.distributed) == (1, 0, False)
        assert dims.mesh.mesh_dim_names == ("dp", "ep") and tuple(dims.mesh.shape) == (1, 1)
        assert dims.world_mesh.size() == 1
    finally:
        shutdown(dims)
    assert not torch.distributed.is_initialized()


def test_world1_mesh_runs_the_fsdp_path_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP2 on the world-1 mesh: same outputs, same gradients, clip_grad_norm_ = torch's on the plain model."""
    from moeflow.models import MoETransformer
    from moeflow.models.config import ModelConfig
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = ModelConfig(vocab_size=16, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=6, ffn_hidden=8,
                      moe=MoEConfig(d_model=8, d_hidden=6, num_experts=4, top_k=2))
    torch.manual_seed(0)
    plain = MoETransformer(cfg).double()
    sharded = MoETransformer(cfg).double()
    sharded.load_state_dict(plain.state_dict())
    dims = init_distributed(ep=1)
    try:
        shard_model(parallelize(sharded, dims), dims)
        assert expert_parameters(sharded) == {}
        ids = torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(1))
        for m in (plain, sharded):
            m(ids).square().mean().backward()
        expected = torch.nn.utils.get_total_norm([p.grad for p in plain.parameters()])
        norm = clip_grad_norm_(list(sharded.parameters()), dims, max_norm=float(expected) / 2)
        torch.testing.assert_close(norm, expected.float())
        scale = (float(expected) / 2) / (float(expected) + 1e-6)  # clip_grad_norm_'s factor, as torch's
        for (name, p), q in zip(sharded.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad * scale, rtol=1e-9, atol=1e-15, msg=name)
        with pytest.raises(ParallelConfigError, match="already sharded"):
            shard_model(sharded, dims)
    finally:
        shutdown(dims)


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
