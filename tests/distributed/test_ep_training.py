"""SGD training of a tiny MoETransformer under EP gives the single-process losses; checkpoints reshard.

World 2 trains 3 steps with EP=1 and EP=2 (topk dropless and Switch with capacity), saves the logical state
(model + momentum) gathered from EP=2, then takes a 4th step. World 4 loads that checkpoint with EP=4 and
EP=2 x EDP=2 and takes the same 4th step (ep_workers.train_worker, spawned by conftest.py). This process runs
the single-process reference (fp64, same global batches, num_groups = world) and loads the checkpoint with
EP=1: losses, clipped gradient norms and logits must agree (RMSNorm computes in fp32, hence 1e-6 relative).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import torch
from ep_workers import STEPS, make_data, make_model, probe_logits, train_step

from moeflow.parallel import ParallelDims, load_full_optimizer_state, load_full_state_dict

pytestmark = pytest.mark.distributed


@lru_cache(maxsize=None)
def _trained_reference(router: str, world: int) -> dict:
    """`_reference` from scratch, computed once per (router, world)."""
    return _reference(router, world)


def _reference(router: str, world: int, state: dict | None = None) -> dict:
    """Single process on the global batch with num_groups = world; optionally starting from a checkpoint."""
    dims = ParallelDims(world=1, ep=1)
    model = make_model(router, num_groups=world)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses, norms = [], []
    if state is not None:
        load_full_state_dict(model, state["model"], dims)
        load_full_optimizer_state(model, opt, state["optim"], dims)
    else:
        for step in range(STEPS - 1):
            loss, norm = train_step(model, opt, make_data()[step], dims)
            losses.append(loss)
            norms.append(norm)
    probe = probe_logits(model, make_data()[STEPS], dims)
    loss, norm = train_step(model, opt, make_data()[STEPS - 1], dims)
    return {"losses": losses + [loss], "norms": norms + [norm], "probe": probe, "model": model}


def _close(a: list[float], b: list[float], what: str) -> None:
    """Lists of floats equal to 1e-6 relative."""
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-6, atol=1e-8, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("router,ep", [("topk", 1), ("topk", 2), ("switch", 2)])
def test_training_losses_match_single_process(world2: list[dict], router: str, ep: int) -> None:
    """4 SGD steps (momentum, global-norm clipping) under EP give the single-process losses and grad norms."""
    ref = _trained_reference(router, 2)
    for rank, res in enumerate(world2):
        got = res["train"][(router, ep)]
        _close(got["losses"], ref["losses"], f"rank {rank} losses")
        _close(got["norms"], ref["norms"], f"rank {rank} grad norms")
        torch.testing.assert_close(got["probe"], ref["probe"][rank * 2:(rank + 1) * 2], rtol=1e-6, atol=1e-8)
    assert ref["norms"][0] > 0.5, "clipping never engaged: raise the norm or lower max_norm"


@pytest.mark.parametrize("router", ["topk", "switch"])
def test_checkpoint_from_ep2_loads_with_ep1(ckpt_dir: Path, world2: list[dict], router: str) -> None:
    """The gathered EP=2 checkpoint is the single-process model: same weights, same next step."""
    state = torch.load(ckpt_dir / f"{router}.pt", weights_only=False)
    ref = _trained_reference(router, 2)
    resumed = _reference(router, world=2, state=state)
    assert state["model"]["layers.0.ffn.experts.w_in"].shape[0] == 4  # logical [E, ...], not a shard
    _close(resumed["losses"], ref["losses"][-1:], "resumed step-4 loss")
    torch.testing.assert_close(resumed["probe"], ref["probe"], rtol=1e-6, atol=1e-8)
    ep2 = torch.cat([world2[r]["train"][(router, 2)]["probe"] for r in range(2)])
    torch.testing.assert_close(resumed["probe"], ep2, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("router,ep", [("topk", 4), ("topk", 2), ("switch", 4)])
def test_checkpoint_from_ep2_loads_with_ep4(ckpt_dir: Path, world4: list[dict], router: str, ep: int) -> None:
    """Resharding 2 -> 4 (and 2 -> 2x2): outputs and the next training step equal the reference's."""
    state = torch.load(ckpt_dir / f"{router}.pt", weights_only=False)
    ref = _reference(router, world=4, state=state)
    for rank, res in enumerate(world4):
        got = res["train"][(router, ep)]
        torch.testing.assert_close(got["probe"], ref["probe"][rank:rank + 1], rtol=1e-6, atol=1e-8)
        _close(got["losses"], ref["losses"], f"rank {rank} step-4 loss after resharding")
        _close(got["norms"], ref["norms"], f"rank {rank} step-4 grad norm after resharding")


def test_trainer_with_distributed_hooks_matches_single_process(world2: list[dict], corpus: Path,
                                                               tmp_path: Path) -> None:
    """moeflow.train.Trainer + DistributedHooks on 2 ranks (EP=2, stopped at step 2 and resumed) logs the grad norms
    and final validation loss of an uninterrupted single-process run with num_groups=2 (fp32 tolerance)."""
    import json

    from ep_workers import trainer_overrides

    from moeflow.train import apply_overrides, get_preset, lm_trainer
    got = world2[0]["trainer"]
    assert "error" not in got, got.get("error")
    cfg = apply_overrides(get_preset("tiny"), trainer_overrides(str(corpus), **{"model.moe.num_groups": 2}))
    ref = lm_trainer(cfg, tmp_path / "ref", progress=False).run()
    ref_recs = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    got_recs = [json.loads(x) for x in got["metrics"].splitlines()]
    norms = [[r["grad_norm"] for r in recs if r["kind"] == "train"] for recs in (ref_recs, got_recs)]
    assert got["step"] == ref.step == 4 and len(norms[1]) == 4
    _close(norms[1], norms[0], "Trainer grad norms per step (EP=2 with a resume vs single process)")
    assert got["val_loss"] == pytest.approx(ref.val_loss, rel=1e-5)
    assert world2[1]["trainer"]["val_loss"] == pytest.approx(got["val_loss"], rel=1e-6)  # ranks agree
