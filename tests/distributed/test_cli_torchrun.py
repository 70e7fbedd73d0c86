"""`torchrun -m moeflow train --ep 2`: the real launcher, two gloo ranks (FSDP2, sharded checkpoint), then a resume
on one process (EP 2 -> 1), the conversions of the sharded checkpoint, and a bad layout refused up front."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed


def _env() -> dict[str, str]:
    """Quiet, single-threaded ranks (two processes share the CI machine's two cores)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    env.pop("WORLD_SIZE", None)
    return env


def test_torchrun_ep2_then_resume_on_one_process(tmp_path: Path) -> None:
    """A 2-rank EP run writes one run folder (rank 0 only) that a single process can resume."""
    common = ["--out", str(tmp_path), "--name", "ep", "--quiet", "--set", "train.eval_every=2",
              "--set", "train.ckpt_every=2", "--set", "train.batch_size=4", "--set", "train.seq_len=32",
              "--set", "train.eval_batches=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "moeflow", "train",
           "--ep", "2", "--max-steps", "2", *common]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env())
    assert out.returncode == 0, out.stdout + out.stderr
    run = tmp_path / "ep"
    assert out.stdout.count("run folder ") == 1, "only rank 0 prints"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "train"] == [1, 2]
    resume = [sys.executable, "-m", "moeflow", "train", "--resume", str(run), "--max-steps", "3", "--quiet"]
    out = subprocess.run(resume, capture_output=True, text=True, timeout=240, env=_env())
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads((run / "summary.json").read_text())["step"] == 3
    # the sharded checkpoint of step 2 (each rank wrote its shards) converts to HF, to one file and back
    assert sorted(p.name for p in (run / "checkpoint.dcp" / "step-00000002").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]
    os.remove(run / "checkpoint.pt")  # the one-process resume's file: convert must read the DCP folder
    for args in (["--to", "hf"], ["--to", "single"]):
        dst = tmp_path / args[1]
        out = subprocess.run([sys.executable, "-m", "moeflow", "convert", str(run), str(dst), *args],
                             capture_output=True, text=True, timeout=240, env=_env())
        assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "hf" / "model.safetensors").exists() and (tmp_path / "single" / "checkpoint.pt").exists()
    back = tmp_path / "back"
    out = subprocess.run([sys.executable, "-m", "moeflow", "convert", str(tmp_path / "single"), str(back), "--to",
                          "dcp"], capture_output=True, text=True, timeout=240, env=_env())
    assert out.returncode == 0 and (back / "checkpoint.dcp" / "LATEST").exists(), out.stdout + out.stderr
    resume = [sys.executable, "-m", "moeflow", "train", "--resume", str(back), "--max-steps", "3", "--quiet"]
    out = subprocess.run(resume, capture_output=True, text=True, timeout=240, env=_env())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resuming at step 2" in out.stdout


def test_torchrun_bad_layout_fails_before_any_work(tmp_path: Path) -> None:
    """--dp 3 --ep 2 on 2 processes: a short message naming the numbers, exit 2 on every rank, no traceback."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "moeflow", "train",
           "--ep", "2", "--dp", "3", "--out", str(tmp_path), "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert out.returncode != 0
    assert "dp x ep must equal the world size: dp=3 x ep=2 = 6, but 2 processes were launched" in out.stderr
    assert "src/moeflow/" not in out.stderr, "a rank printed a traceback (torchrun's own report is fine)"
    assert not any(tmp_path.iterdir())
