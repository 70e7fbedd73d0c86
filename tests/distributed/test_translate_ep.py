"""The translation task under expert parallelism: 2 gloo ranks (EP=2) through the one Trainer and the CLI.

Each rank trains on its rows of every global batch; the loss is normalised by the global target-token count, so the
mean over ranks is the single-process loss. The ranks stop at step 2 (library Trainer + DistributedHooks), then
`moeflow train --task translate --resume RUN --ep 2` finishes the run and rank 0 writes the report from the
logical model. With a dropless router and no aux loss (per-rank balance losses are not the global one), the
losses, grad norms and held-out loss equal an uninterrupted single-process run to float tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_harness import run_world

pytestmark = pytest.mark.distributed

OVERRIDES = {"steps": 4, "batch_size": 8, "eval_every": 2, "ckpt_every": 2, "warmup": 1, "eval_sentences": 2,
             "languages": ["cip", "rev"], "aux_loss": False, "model.moe.router": "topk",
             "model.moe.capacity_factor": None}


def _cfg():  # type: ignore[no-untyped-def]
    from moeflow.tasks.translate import translate_overrides, translate_preset
    return translate_overrides(translate_preset("tiny"), OVERRIDES)


def translate_ep_worker(rank: int, world: int, run_dir: str) -> dict:
    """Two steps with the library Trainer, then the CLI resumes the run to its end (EP = world)."""
    from moeflow.cli import main
    from moeflow.parallel import DistributedHooks, init_distributed
    from moeflow.tasks.translate_train import translate_trainer
    hooks = DistributedHooks(init_distributed(ep=world, timeout_s=60), mode="variable")
    first = translate_trainer(_cfg(), run_dir, hooks=hooks, progress=False)
    first.write_config("tiny")
    first.run(stop_at=2)
    code = main(["train", "--task", "translate", "--resume", run_dir, "--ep", str(world), "--quiet"])
    w_in = first.model.encoder[1].ffn.moe.experts.w_in  # a DTensor: logical shape, this rank's experts locally
    return {"code": code, "local_experts": int(w_in.to_local().shape[0]), "experts": int(w_in.shape[0])}


def _train(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_translate_ep2_with_resume_matches_single_process(tmp_path: Path) -> None:
    from moeflow.tasks.translate_train import translate_trainer
    got = run_world(translate_ep_worker, 2, str(tmp_path / "ep"), timeout_s=180)
    assert [r["code"] for r in got] == [0, 0] and [r["local_experts"] for r in got] == [2, 2]
    assert [r["experts"] for r in got] == [4, 4]
    torch.set_num_threads(1)
    ref = translate_trainer(_cfg(), tmp_path / "ref", progress=False, figures=False).run()
    ep, single = _train(tmp_path / "ep"), _train(tmp_path / "ref")
    assert [r["step"] for r in ep] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in ep]), torch.tensor([r[key] for r in single]),
                                   rtol=1e-5, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")
    # rank 0 logs the routing of its own rows: with dropless top-k each token routes as in the single process,
    # so rank 0's counts are part of the global ones
    for mine, full in zip(ep, single):
        for a, b in zip(mine["layers"], full["layers"]):
            assert all(0 < x < y for x, y in zip(a["tokens_per_expert"], b["tokens_per_expert"]))
    summary = json.loads((tmp_path / "ep" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["heldout_ce"] == pytest.approx(ref.val_loss, rel=1e-5)
    assert set(summary["eval"]) == {"cip", "rev"} and (tmp_path / "ep" / "report.md").is_file()
