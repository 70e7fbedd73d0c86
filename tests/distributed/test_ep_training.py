"""SGD training of a tiny MoETransformer on FSDP2 + EP gives the single-process losses and gradients; DCP reshards.

World 2 trains 3 steps as (dp, ep) = (2, 1) and (1, 2) (topk dropless and Switch with capacity), saves a DCP
checkpoint (model + momentum, each rank its shards) from ep=2, then takes a 4th step. World 4 loads that
checkpoint as (1, 4), (2, 2) and (4, 1) and takes the same 4th step (ep_workers.train_worker, spawned by
conftest.py). This process runs the single-process reference (plain model, fp64, same global batches,
num_groups = world) and loads the checkpoint without any process group: losses, clipped gradient norms, the
logical gradients of the last step and logits must agree. Tolerance 1e-6 relative: the model is fp64 but
RMSNorm computes in fp32, and reduction order differs between layouts.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import torch
from ep_workers import STEPS, make_data, make_model, probe_logits, train_step

from moeflow.parallel import ParallelDims
from moeflow.train.checkpoint import load_optimizer_state_by_name
from moeflow.train.sharded_checkpoint import read_full

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
        model.load_state_dict(state["model"])
        load_optimizer_state_by_name(model, opt, state["optim"])
    else:
        for step in range(STEPS - 1):
            loss, norm = train_step(model, opt, make_data()[step], dims)
            losses.append(loss)
            norms.append(norm)
    probe = probe_logits(model, make_data()[STEPS], dims)
    loss, norm = train_step(model, opt, make_data()[STEPS - 1], dims)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return {"losses": losses + [loss], "norms": norms + [norm], "probe": probe, "model": model, "grads": grads}


def _same_grads(got: dict, ref: dict, what: str) -> None:
    """Every logical gradient of the last step agrees (experts as full [E, ...] tensors)."""
    assert got.keys() == ref.keys(), what
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-9, msg=lambda m: f"{what} {name}: {m}")


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
    _same_grads(world2[0]["train"][(router, ep)]["grads"], ref["grads"], f"(dp={2 // ep}, ep={ep}) step-4 grads")
    assert ref["norms"][0] > 0.5, "clipping never engaged: raise the norm or lower max_norm"


@pytest.mark.parametrize("router", ["topk", "switch"])
def test_checkpoint_from_ep2_loads_with_ep1(ckpt_dir: Path, world2: list[dict], router: str) -> None:
    """The sharded EP=2 checkpoint, read without a process group, is the single-process model: same next step."""
    state = read_full(ckpt_dir / f"{router}.dcp")
    ref = _trained_reference(router, 2)
    resumed = _reference(router, world=2, state=state)
    assert state["model"]["layers.0.ffn.experts.w_in"].shape[0] == 4  # logical [E, ...], not a shard
    _close(resumed["losses"], ref["losses"][-1:], "resumed step-4 loss")
    torch.testing.assert_close(resumed["probe"], ref["probe"], rtol=1e-6, atol=1e-8)
    ep2 = torch.cat([world2[r]["train"][(router, 2)]["probe"] for r in range(2)])
    torch.testing.assert_close(resumed["probe"], ep2, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("router,ep", [("topk", 4), ("topk", 2), ("topk", 1), ("switch", 4)])
def test_checkpoint_from_ep2_loads_with_ep4(ckpt_dir: Path, world4: list[dict], router: str, ep: int) -> None:
    """Resharding (1, 2) -> (1, 4), (2, 2) and (4, 1): outputs, the next step and its gradients equal the
    reference's."""
    state = read_full(ckpt_dir / f"{router}.dcp")
    ref = _reference(router, world=4, state=state)
    for rank, res in enumerate(world4):
        got = res["train"][(router, ep)]
        torch.testing.assert_close(got["probe"], ref["probe"][rank:rank + 1], rtol=1e-6, atol=1e-8)
        _close(got["losses"], ref["losses"], f"rank {rank} step-4 loss after resharding")
        _close(got["norms"], ref["norms"], f"rank {rank} step-4 grad norm after resharding")
    _same_grads(world4[0]["train"][(router, ep)]["grads"], ref["grads"], f"(dp={4 // ep}, ep={ep}) grads")


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
