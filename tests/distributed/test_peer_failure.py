"""A peer that dies or hangs mid-step makes the others raise PeerFailureError within a bounded time.

Both workers run an EP=2 MoE layer for three steps; at step 1 rank 1 misbehaves from inside its experts:
- killed: `os._exit` in the experts' BACKWARD (between the two backward all-to-alls) -> rank 0's backward
  dispatch all-to-all sees the closed connection, and the error crosses autograd with its type intact;
- hung: it blocks in the experts' FORWARD (between dispatch and combine) -> rank 0's combine all-to-all hits
  the group timeout (3 s): no connection drops, so only the timeout can end the wait.
Rank 0 then calls `barrier_with_timeout` (2 s), whose error must name the missing rank.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from dist_harness import run_world

from moeflow import MoEConfig, MoELayer
from moeflow.parallel import PeerFailureError, barrier_with_timeout, init_distributed, parallelize

pytestmark = pytest.mark.distributed

GROUP_TIMEOUT_S = 3.0


def _failure_worker(rank: int, world: int, how: str, release: str) -> dict | None:
    """Train three steps; rank 1 dies or hangs at step 1; rank 0 reports what it caught and how fast."""
    dims = init_distributed(ep=2, timeout_s=GROUP_TIMEOUT_S)
    torch.manual_seed(0)
    layer = parallelize(MoELayer(MoEConfig(d_model=8, d_hidden=6, num_experts=4, top_k=2)), dims)
    if rank == 1:
        def die(module: torch.nn.Module, grad_output: tuple) -> None:
            if dims.step == 1:
                os._exit(17)

        def hang(module: torch.nn.Module, args: tuple) -> None:
            if dims.step != 1:
                return
            deadline = time.monotonic() + 60  # hung until rank 0 has seen the error (or a minute)
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.05)
            os._exit(0)
        if how == "killed":
            layer.experts.register_full_backward_pre_hook(die)
        else:
            layer.experts.register_forward_pre_hook(hang)
    x = torch.randn(6, 8, requires_grad=True)  # as inside a model: the dispatch a2a then has a backward
    for step in range(3):
        dims.step = step
        t0 = time.monotonic()
        try:
            layer(x).square().mean().backward()
        except PeerFailureError as exc:
            out = {"step": step, "elapsed": time.monotonic() - t0, "message": str(exc),
                   "collective": exc.collective}
            t1 = time.monotonic()
            try:
                barrier_with_timeout(dims, "post-failure barrier", timeout_s=2.0)
                out["barrier"] = None
            except PeerFailureError as bexc:
                out["barrier"], out["barrier_elapsed"] = str(bexc), time.monotonic() - t1
            Path(release).touch()
            return out
    return {"step": None}


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_peer_failure_raises_within_timeout(how: str, tmp_path: Path) -> None:
    """The survivor raises PeerFailureError naming the step and collective, fast; the barrier names rank 1."""
    t0 = time.monotonic()
    results = run_world(_failure_worker, 2, how, str(tmp_path / "release"), timeout_s=90, may_die=[1])
    wall = time.monotonic() - t0
    got = results[0]
    assert got["step"] == 1, f"rank 0 should fail at step 1, got {got}"
    expected = "all_to_all(dispatch) (backward)" if how == "killed" else "all_to_all(combine)"
    assert expected in got["collective"] and "step 1" in got["message"], got["message"]
    assert "A peer process probably died or is stuck" in got["message"]
    assert got["elapsed"] < 30, f"took {got['elapsed']:.1f}s to notice the {how} peer"
    if how == "hung":  # no connection drop to notice: only the group timeout can end the wait
        assert got["elapsed"] >= GROUP_TIMEOUT_S * 0.8, got
    assert got["barrier"] is not None and "ranks [1] did not reach 'post-failure barrier'" in got["barrier"], got
    assert 1.5 < got["barrier_elapsed"] < 10, got
    assert wall < 90


def _nan_worker(rank: int, world: int, mode: str) -> dict:
    """EP=2: at step 1 rank 1's input holds a NaN. Every rank must raise FloatingPointError at once (no rank left
    waiting in an all-to-all), and a clean step afterwards must still work on the same process group."""
    dims = init_distributed(ep=2, timeout_s=GROUP_TIMEOUT_S)
    torch.manual_seed(0)
    cf = 2.0 if mode == "padded" else None
    layer = parallelize(MoELayer(MoEConfig(d_model=8, d_hidden=6, num_experts=4, top_k=2, capacity_factor=cf)),
                        dims, mode=mode)
    out: dict = {}
    for step in range(3):
        x = torch.randn(6, 8, requires_grad=True)
        if step == 1 and rank == 1:
            x.data[2, 3] = float("nan")
        t0 = time.monotonic()
        try:
            layer(x).square().mean().backward()
            out.setdefault("clean_steps", []).append(step)
        except FloatingPointError as exc:
            out["error"], out["error_step"], out["elapsed"] = str(exc), step, time.monotonic() - t0
    return out


@pytest.mark.parametrize("mode", ["variable", "padded", "dedup"])
def test_nan_on_one_ep_rank_stops_every_rank_together(mode: str) -> None:
    """Both ranks raise at step 1, fast (not after the 3 s group timeout); the bad rank explains its cause, the
    other names the bad rank; step 2 runs cleanly on both."""
    results = run_world(_nan_worker, 2, mode, timeout_s=90, pg_timeout_s=GROUP_TIMEOUT_S)
    for rank, got in enumerate(results):
        assert got.get("error_step") == 1 and got["clean_steps"] == [0, 2], f"rank {rank}: {got}"
        assert got["elapsed"] < GROUP_TIMEOUT_S / 2, f"rank {rank} waited {got['elapsed']:.1f} s"
    assert "EP peer rank(s) [1] have non-finite router logits" in results[0]["error"]
    assert "1 of 6 tokens have non-finite router logits; 1 input tokens contain NaN" in results[1]["error"]
    assert "all 2 ranks of the EP group stop here" in results[1]["error"]
