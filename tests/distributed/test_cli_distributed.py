"""`moeflow train --ep` on two gloo ranks: a bad layout or a killed peer is a short message and an exit status."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from cli_workers import cli_worker
from dist_harness import run_world

pytestmark = pytest.mark.distributed

TINY = ["--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
        "--set", "model.n_kv_heads=1", "--set", "model.max_seq_len=32", "--set", "model.ffn_hidden=64",
        "--set", "model.moe.d_hidden=32", "--set", "train.batch_size=4", "--set", "train.seq_len=16",
        "--set", "train.eval_every=0", "--set", "train.eval_batches=1", "--set", "train.warmup=1", "--quiet"]


def _argv(tmp_path: Path, name: str, *extra: str) -> list[str]:
    data = tmp_path / "data.txt"
    if not data.exists():
        import json
        data.write_text(inspect.getsource(json) * 2)
    return ["train", "--data", str(data), "--out", str(tmp_path), "--name", name, *TINY, *extra]


def _clean(result: dict, code: int, *phrases: str) -> None:
    text = result["out"] + result["err"]
    assert result["code"] == code, text
    assert "Traceback" not in text and result["err"].startswith("error: "), text
    assert len(result["err"].strip().splitlines()) <= 6, result["err"]
    for phrase in phrases:
        assert phrase in result["err"], result["err"]


def test_a_layout_that_does_not_fit_is_a_message(tmp_path: Path) -> None:
    runs = [_argv(tmp_path, "a", "--ep", "3", "--max-steps", "2"),  # 3 does not divide the 2 ranks
            _argv(tmp_path, "b", "--ep", "2", "--max-steps", "2", "--set", "model.moe.num_experts=3")]
    for rank_results in run_world(cli_worker, 2, runs):
        _clean(rank_results[0], 2, "ep=3 must divide the world size 2")
        _clean(rank_results[1], 2, "num_experts=3 is not divisible by ep=2")
    assert not (tmp_path / "a" / "checkpoint.pt").exists() and not (tmp_path / "b" / "checkpoint.pt").exists()


def test_a_killed_peer_is_one_paragraph_and_exit_1(tmp_path: Path) -> None:
    runs = [_argv(tmp_path, "k", "--ep", "2", "--max-steps", "6", "--set", "train.ckpt_every=2")]
    results = run_world(cli_worker, 2, runs, (1, 4), may_die=[1], pg_timeout_s=30.0)
    assert results[1] is None  # rank 1 was killed at the start of step 4
    _clean(results[0][0], 1, "failed at step 4", "A peer process probably died")
    from moeflow.train import load_checkpoint
    assert load_checkpoint(tmp_path / "k")["step"] == 2  # the checkpoint before the failure is intact
