"""Divergence before a NaN (train/health.py) and runs with nothing left to train: no garbage checkpoint, no NaN."""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from pathlib import Path

import pytest
import torch

import moeflow.train.trainer as trainer_mod
from moeflow.cli import main
from moeflow.config import ConfigError
from moeflow.train import RunConfig, TrainingDiverged, apply_overrides, get_preset, lm_trainer, load_checkpoint
from moeflow.train.health import LossWatch


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """A small corpus of stdlib sources."""
    import json as j
    f = tmp_path / "corpus.txt"
    f.write_text(inspect.getsource(j) * 3)
    return f


def tiny_cfg(data: Path, **extra: object) -> object:
    """A model small enough for many steps per second."""
    o: dict[str, object] = {
        "model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "model.n_kv_heads": 1,
        "model.max_seq_len": 32, "model.ffn_hidden": 64, "model.moe.d_hidden": 32, "model.moe.num_experts": 4,
        "train.steps": 20, "train.batch_size": 4, "train.seq_len": 16, "train.eval_every": 0, "train.eval_batches": 1,
        "train.ckpt_every": 2, "train.warmup": 2, "data.path": str(data)}
    o.update(extra)
    return apply_overrides(get_preset("tiny"), o)


def test_loss_watch_judges_spikes_against_the_healthy_history() -> None:
    watch = LossWatch(factor=2.0, window=5, patience=3, min_delta=0.5)
    for loss in (5.5, 4.0, 3.2, 3.5, 2.9, 3.1):  # a falling, noisy loss is healthy throughout
        assert watch.observe(loss) and watch.healthy
    assert watch.reference == 3.2 and len(watch.history) == 5
    assert not watch.observe(9.0) and not watch.healthy and not watch.diverged  # one spike: no checkpoint yet
    assert watch.reference == 3.2  # spikes stay out of the history: a long excursion is judged from before it
    assert watch.observe(3.0) and watch.healthy  # recovered
    for _ in range(3):
        watch.observe(1e4)
    assert watch.diverged and "1e+04" in watch.describe()
    small = LossWatch(factor=2.0, min_delta=0.5)
    small.observe(0.02)
    assert small.observe(0.2)  # ten times a tiny loss is still within min_delta: not a spike
    off = LossWatch(factor=0.0)
    off.observe(1.0)
    assert off.observe(1e9) and not off.diverged
    restored = LossWatch()
    restored.load_state_dict(watch.state_dict())
    assert restored.history == watch.history and restored.spikes == watch.spikes


def test_an_exploding_run_stops_before_a_nan_and_names_the_last_healthy_checkpoint(
        tmp_path: Path, text_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_lr = trainer_mod.lr_at
    # healthy for 6 steps, then the learning rate explodes (the scenario, made deterministic)
    monkeypatch.setattr(trainer_mod, "lr_at", lambda step, cfg: 30.0 if step >= 6 else real_lr(step, cfg))
    trainer = lm_trainer(tiny_cfg(text_file), tmp_path / "r", progress=False)
    with pytest.raises(TrainingDiverged, match=r"diverged.*last healthy checkpoint is .* \(step 6\)") as info:
        trainer.run()
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    assert all(math.isfinite(v) for v in losses.values())  # stopped on the spike, before any NaN
    assert info.value.step > 6 and records[-1]["kind"] == "diverged"
    ckpt = load_checkpoint(tmp_path / "r")
    assert ckpt["step"] == 6  # the steps after the explosion were not saved, even those due a checkpoint
    assert max(float(t.abs().max()) for t in ckpt["model"].values()) < 100  # healthy weights, not 1e28


def test_detection_can_be_turned_off(tmp_path: Path, text_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_lr = trainer_mod.lr_at
    monkeypatch.setattr(trainer_mod, "lr_at", lambda step, cfg: 30.0 if step >= 6 else real_lr(step, cfg))
    trainer = lm_trainer(tiny_cfg(text_file, **{"train.diverge_factor": 0.0, "train.steps": 10}), tmp_path / "r",
                         progress=False)
    try:
        trainer.run()
    except TrainingDiverged as e:  # only a non-finite value may stop it now
        assert "not finite" in str(e)
    with pytest.raises(ConfigError, match="diverge_factor must be 0 \\(off\\) or > 1"):
        tiny_cfg(text_file, **{"train.diverge_factor": 0.5})


def _hashes(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


def test_resuming_a_finished_run_changes_nothing(tmp_path: Path, text_file: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from moeflow.analysis import plots
    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    sets = [a for k, v in {"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "model.n_kv_heads": 1,
                           "model.max_seq_len": 32, "model.ffn_hidden": 64, "model.moe.d_hidden": 32,
                           "model.moe.num_experts": 4, "train.batch_size": 2, "train.seq_len": 16,
                           "train.eval_batches": 1, "train.warmup": 1}.items() for a in ("--set", f"{k}={v}")]
    run = tmp_path / "runs" / "done"
    assert main(["train", "--data", str(text_file), "--out", str(tmp_path / "runs"), "--name", "done",
                 "--max-steps", "3", "--quiet", *sets]) == 0
    capsys.readouterr()
    before = _hashes(run)
    assert main(["train", "--resume", str(run)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["train", "--resume", str(run), "--max-steps", "2"]) == 2
    assert "--max-steps 2 is below the checkpoint's step 3" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--max-steps", "6", "--stop-at", "3"]) == 2
    assert "--stop-at 3 is not after the checkpoint's step 3" in capsys.readouterr().err
    assert _hashes(run) == before
    summary = json.loads((run / "summary.json").read_text())  # valid JSON: no NaN was ever written
    assert math.isfinite(summary["tokens_per_s"]) and summary["train_loss"] > 0
    saved = json.loads((run / "config.json").read_text())
    saved.pop("preset")
    trainer = lm_trainer(RunConfig.from_dict(saved), run, resume=True, progress=False)
    with pytest.raises(ConfigError, match="nothing to train: the run is at step 3"):  # the library refuses too
        trainer.run()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 3
