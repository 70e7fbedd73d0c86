"""The Trainer on FSDP2 + EP + DCP: layout-independent training, resume across layouts, safe saves, failures.

Each fixture is one spawn (fsdp_workers.py); this process runs the references with the plain single-process
Trainer (LocalHooks) on the same fixed batches:
- parity: 3 AdamW steps (clipping engaged) in fp64 under 1 process on the FSDP2 path, (dp=2, ep=1), (dp=1, ep=2)
  and (dp=2, ep=2), each with and without gradient accumulation (2 micro-batches) + activation checkpointing;
  the reference takes one batch of all the step's rows. Logged losses, gradient norms and the final weights must
  agree to 1e-6 relative (fp64, but RMSNorm computes in fp32 and reduction orders differ between layouts).
- resume: fp32, saved under (2, 2) by the Trainer (DCP, every rank its shards), resumed under (1, 4), (4, 1), one
  process on the FSDP2 path and one plain process: model and optimizer state bitwise equal to the saved state.
- a kill -9 during a save (after the shards, before LATEST moves; or in the middle of a rank's shard file) leaves
  the previous checkpoint loadable, and the run resumes from it.
- a peer that dies in backward or hangs in forward (FSDP2's collectives pending) gives PeerFailureError within
  the timeout; a NaN on one rank stops both on the same step; bf16 computes in bf16 with fp32 routers.
"""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from dist_harness import run_world
from fsdp_workers import (FixedTask, Schedule, _bitwise, async_save_worker, failure_worker, full_state, kill_during_save_worker,
                          make_model, metrics, nan_and_bf16_worker, parity_worker, save_then_resume_worker)

from moeflow.train.checkpoint import load_checkpoint
from moeflow.train.sharded_checkpoint import DCP_NAME, latest_folder, read_meta
from moeflow.train.trainer import Trainer

pytestmark = pytest.mark.distributed

CASES = [(1, False), (2, True)]  # (gradient accumulation micro-batches, activation checkpointing)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where every spawned run of this module writes."""
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def fsdp_world4(root: Path) -> list[dict]:
    """(2, 2) parity runs, then the fp32 save under (2, 2) and its resumes under (1, 4) and (4, 1)."""
    parity = run_world(parity_worker, 4, str(root), [(2, a, ac) for a, ac in CASES], timeout_s=300)
    resume = run_world(save_then_resume_worker, 4, str(root), [4, 1], timeout_s=300)
    return [{"parity": p, "resume": r} for p, r in zip(parity, resume)]


@pytest.fixture(scope="module")
def fsdp_world2(root: Path) -> list[dict]:
    """(2, 1) and (1, 2) parity runs."""
    parity = run_world(parity_worker, 2, str(root), [(ep, a, ac) for ep in (1, 2) for a, ac in CASES],
                       timeout_s=300)
    return [{"parity": p} for p in parity]


@pytest.fixture(scope="module")
def fsdp_world1(root: Path, fsdp_world4: list[dict]) -> list[dict]:
    """One process on the FSDP2 path (world-1 mesh): parity runs and the resume of the (2, 2) checkpoint."""
    parity = run_world(parity_worker, 1, str(root), [(1, a, ac) for a, ac in CASES], timeout_s=200)
    resume = run_world(_resume_only, 1, str(root), timeout_s=200)
    return [{"parity": parity[0], "resume": resume[0]}]


def _resume_only(rank: int, world: int, root: str) -> dict:
    """Resume the (2, 2) run on this world-1 mesh; bitwise equal to the saved state?"""
    from moeflow.parallel import DistributedHooks, init_distributed
    hooks = DistributedHooks(init_distributed(ep=1, timeout_s=60))
    t = Trainer(make_model(torch.float32), FixedTask(Schedule(steps=4, ckpt_every=2)), f"{root}/resume",
                resume=True, hooks=hooks, progress=False)
    return {"step": t.step, "equal": _bitwise(full_state(t), torch.load(f"{root}/saved_state.pt"))}


@lru_cache(maxsize=None)
def _reference(accum: int, ac: bool, run_dir: str) -> tuple[list[dict], dict]:
    """The plain single-process Trainer on all of each step's rows at once."""
    sched = Schedule(batch_size=4 * accum, activation_checkpointing=ac)
    task = FixedTask(sched)
    task.data = FixedTask(Schedule(grad_accum=accum)).data  # same rows: [steps, accum * 4, S + 1]
    trainer = Trainer(make_model(), task, run_dir, progress=False)
    trainer.run()
    return metrics(run_dir), {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _check_parity(got: dict, accum: int, ac: bool, root: Path, what: str) -> None:
    """Losses, grad norms and final weights of a layout's run equal the reference's."""
    ref_records, ref_model = _reference(accum, ac, str(root / f"ref-a{accum}-ac{int(ac)}"))
    for key in ("loss", "grad_norm"):
        a = torch.tensor([r[key] for r in got["records"]], dtype=torch.float64)
        b = torch.tensor([r[key] for r in ref_records], dtype=torch.float64)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=lambda m: f"{what} {key}: {m}")
    assert ref_records[0]["grad_norm"] > Schedule.grad_clip, "clipping never engaged: lower grad_clip"
    assert got["model"].keys() == ref_model.keys()
    for name, ref in ref_model.items():
        torch.testing.assert_close(got["model"][name], ref, rtol=1e-6, atol=1e-9,
                                   msg=lambda m: f"{what} weight {name}: {m}")


@pytest.mark.parametrize("accum,ac", CASES)
@pytest.mark.parametrize("layout", ["1 process", "dp=2 ep=1", "dp=1 ep=2", "dp=2 ep=2"])
def test_losses_and_weights_do_not_depend_on_the_layout(layout: str, accum: int, ac: bool, root: Path,
                                                         request: pytest.FixtureRequest) -> None:
    """Same fixed batches, any (dp, ep), with or without accumulation + activation checkpointing: same run."""
    world, ep = {"1 process": (1, 1), "dp=2 ep=1": (2, 1), "dp=1 ep=2": (2, 2), "dp=2 ep=2": (4, 2)}[layout]
    results = request.getfixturevalue(f"fsdp_world{world}")
    _check_parity(results[0]["parity"][(ep, accum, ac)], accum, ac, root, layout)


@pytest.mark.parametrize("layout", ["dp=1 ep=4", "dp=4 ep=1", "1 process (FSDP2)", "1 plain process"])
def test_dcp_resume_across_layouts_is_bitwise(layout: str, root: Path, fsdp_world4: list[dict],
                                              request: pytest.FixtureRequest) -> None:
    """Saved under (2, 2) at step 2: model and AdamW state load bit for bit under another layout."""
    folder = latest_folder(root / "resume" / DCP_NAME)
    assert folder is not None and read_meta(folder)["step"] == 2
    assert len(list(folder.glob("__*_0.distcp"))) == 4  # every rank wrote its own shards
    if layout.startswith("dp="):
        got = fsdp_world4[0]["resume"][{"dp=1 ep=4": 4, "dp=4 ep=1": 1}[layout]]
    elif layout == "1 process (FSDP2)":
        got = request.getfixturevalue("fsdp_world1")[0]["resume"]
    else:
        t = Trainer(make_model(torch.float32), FixedTask(Schedule(steps=4, ckpt_every=2)), root / "resume",
                    resume=True, progress=False)
        got = {"step": t.step, "equal": _bitwise(full_state(t), torch.load(root / "saved_state.pt"))}
    assert got["step"] == 2 and got["equal"], got


@pytest.mark.parametrize("where", ["before_commit", "mid_write"])
def test_kill_9_during_a_save_leaves_the_previous_checkpoint(where: str, tmp_path: Path) -> None:
    """SIGKILL while step 2 is being saved: LATEST still names step 1, which loads and resumes."""
    run_dir = tmp_path / "run"
    results = run_world(kill_during_save_worker, 2, str(run_dir), where, timeout_s=120, pg_timeout_s=5,
                        may_die=[0] if where == "before_commit" else [1])
    survivor = results[1] if where == "before_commit" else results[0]
    assert survivor is not None and survivor["error"] is not None and survivor["step"] == 2, survivor
    root = run_dir / DCP_NAME
    assert (root / "step-00000002").exists(), "the interrupted save should have left its partial folder"
    folder = latest_folder(root)
    assert folder is not None and folder.name == "step-00000001" and read_meta(folder)["step"] == 1
    t = Trainer(make_model(torch.float32), FixedTask(Schedule(steps=3, ckpt_every=1)), run_dir, resume=True,
                progress=False)
    assert t.step == 1 and t.task.draw == 1
    t.run()  # and the run finishes from there (one process: single-file checkpoints, the newer one wins)
    assert load_checkpoint(run_dir)["step"] == 3


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_dead_or_hung_peer_under_fsdp2_raises_peer_failure(how: str, tmp_path: Path) -> None:
    """Rank 1 dies in backward / hangs in forward at step 2: rank 0 raises PeerFailureError naming the step.

    Killed: rank 0's backward is waiting on FSDP2's reduce-scatter, which sees the closed connection. Hung (after
    its block's all-gather was issued): rank 0 finishes the forward and waits in the next collective, the finite
    check, until the 3 s group timeout."""
    t0 = time.monotonic()
    results = run_world(failure_worker, 2, how, str(tmp_path / "release"), str(tmp_path / "run"), timeout_s=120,
                        pg_timeout_s=3, may_die=[1])
    got = results[0]
    assert got["collective"] is not None, got["error"]
    assert got["step"] == 2 and "step 2" in got["error"], got
    assert "A peer process probably died or is stuck" in got["error"]
    if how == "killed":
        assert got["collective"].startswith("backward (FSDP2"), got["collective"]
    else:
        assert got["elapsed"] >= 3 * 0.8, got  # only the group timeout can end the wait
    assert got["elapsed"] < 40, got
    assert time.monotonic() - t0 < 120


@pytest.fixture(scope="module")
def nan_bf16(root: Path) -> list[dict]:
    """NaN on rank 1 at step 2, then bf16 and fp32 runs, under (dp=1, ep=2)."""
    return run_world(nan_and_bf16_worker, 2, str(root / "nanbf16"), timeout_s=200)


def test_nan_on_one_rank_stops_every_rank_on_the_same_step(nan_bf16: list[dict]) -> None:
    """Both ranks raise TrainingDiverged at step 2, before any optimizer step with the NaN."""
    for rank, res in enumerate(nan_bf16):
        assert res["nan"] is not None and res["nan"]["step"] == 2, f"rank {rank}: {res['nan']}"


def test_bf16_mixed_precision_keeps_routers_and_master_weights_fp32(nan_bf16: list[dict]) -> None:
    """Blocks compute in bf16, routers in fp32; parameters (and so AdamW state) stay fp32; losses track fp32."""
    got = nan_bf16[0]["bf16"]
    assert got["seen"]["router_weight"] == got["seen"]["router_in"] == "torch.float32", got["seen"]
    assert got["seen"]["experts_weight"] == "torch.bfloat16", got["seen"]
    assert got["seen"]["block_out"] == "torch.bfloat16"
    assert set(got["master"].values()) == {"torch.float32"}
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(got["fp32_losses"]), rtol=2e-2, atol=0)


def test_async_checkpoint_is_committed_and_holds_the_state_at_save_time(root: Path) -> None:
    """train.async_checkpoint: save() returns with the write in flight; the step-2 folder holds the step-2 state
    although step 3 trained meanwhile; the run ends with step 3 committed, which resumes bitwise on (2, 1)."""
    from moeflow.train.sharded_checkpoint import read_full
    got = run_world(async_save_worker, 2, str(root), timeout_s=200)
    assert got[0]["pending"] == [True, True] and got[0]["step"] == 3 and got[0]["resumed_equal"], got[0]
    run = root / "async" / DCP_NAME
    assert latest_folder(run).name == "step-00000003"
    at_save = torch.load(root / "async_step2.pt")
    written = read_full(run / "step-00000002")
    assert _bitwise(written["model"], at_save["model"])
    assert _bitwise(written["optim"]["state"], at_save["optim"]["state"])


def test_single_file_checkpoint_of_an_old_run_resumes_under_torchrun(tmp_path: Path) -> None:
    """A one-process run's checkpoint.pt (the format of every run before sharded checkpoints) loads bitwise
    under (dp=1, ep=2), and the run continues there with sharded checkpoints."""
    from fsdp_workers import resume_single_file_worker
    run = tmp_path / "run"
    t = Trainer(make_model(torch.float32), FixedTask(Schedule(steps=4, ckpt_every=2)), run, progress=False)
    t.run(stop_at=2)
    torch.save(full_state(t), tmp_path / "saved.pt")
    assert (run / "checkpoint.pt").exists() and not (run / DCP_NAME).exists()
    got = run_world(resume_single_file_worker, 2, str(run), str(tmp_path / "saved.pt"), timeout_s=150)
    assert got[0]["equal"] and got[0]["step"] == 4, got[0]
    assert read_meta(latest_folder(run / DCP_NAME))["step"] == 4
    assert load_checkpoint(run)["step"] == 4  # the newer of the two formats
