"""`torchrun -m moeflow train --ep 2`: the real launcher, two gloo ranks, then a resume on one process (EP 2 -> 1)."""

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
