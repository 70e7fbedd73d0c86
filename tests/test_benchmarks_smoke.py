"""Smoke test of benchmarks/layer.py: the --quick run completes and prints a well-formed table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "layer.py"
ROW = re.compile(r"^(?P<cfg>[A-D])\s+(?P<impl>\S+)\s+(?P<fwd>[\d.]+)\s+(?P<full>[\d.]+)\s+(?P<dense>[\d.]+) \([\d.]+\)"
                 r"\s+(?P<naive>[\d.]+) \([\d.]+\)\s+(?P<peak>\d+|-)$")


def test_layer_benchmark_quick_runs_and_prints_the_table() -> None:
    """Tiny configs A and C (top-k dropless; Switch with capacity), both MoE impls, memory probes included, on one
    thread (two stall on OpenMP barriers when the shared CPU is busy): every row parses, the reference rows have
    ratio 1, the MoE output equals the naive loop's, and the T / 2T memory lines are printed."""
    cmd = [sys.executable, str(SCRIPT), "--quick", "--configs", "A,C", "--impls", "loop,bmm", "--repeats", "2",
           "--threads", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    rows = [m.groupdict() for line in res.stdout.splitlines() if (m := ROW.match(line))]
    assert [(r["cfg"], r["impl"]) for r in rows] == [(c, i) for c in "AC"
                                                     for i in ("dense", "moe[loop]", "moe[bmm]", "naive", "gemms")]
    for r in rows:
        assert float(r["full"]) >= float(r["fwd"]) > 0
        if r["impl"] == "dense":
            assert r["dense"] == "1.00"
        if r["impl"] == "naive":
            assert r["naive"] == "1.00"
        assert (r["peak"] == "-") == (r["impl"] == "gemms")  # the floor row has no memory probe
    errors = [float(e.rstrip(";")) for e in re.findall(r"max \|moe - naive\| = (\S+)", res.stdout)]
    assert len(errors) == 2 and max(errors) < 1e-4
    scaling = re.findall(r"^([AC])\s+moe\[(\w+)\]\s+T:\s+\d+ MB\s+2T:\s+\d+ MB\s+ratio\s+(?:[\d.]+|-)\s+"
                         r"\[T, E, C\] mask: \d+ -> \d+ MB$", res.stdout, re.M)
    assert sorted(scaling) == [("A", "bmm"), ("A", "loop"), ("C", "bmm"), ("C", "loop")]


def test_scale_benchmark_quick_prints_shard_ratios() -> None:
    """benchmarks/scale.py --quick (tiny preset, layouts 1x1, 2x1, 1x2): every rank's dense and expert memory is
    half of world 1's, and rank 0 reports a save time and its memory rise during the save."""
    script = SCRIPT.parent / "scale.py"
    res = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=300,
                         check=False)
    assert res.returncode == 0, res.stderr
    row = re.compile(r"^\s*(\d) x (\d)\s+(\d)\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s+([\d.]+)\s+\S+\s+\d+\s+\d+\s+([\d.]+)"
                     r"(?:\s+([\d.]+))?\s*$")
    rows = [m.groups() for line in res.stdout.splitlines() if (m := row.match(line))]
    assert [(r[0], r[1], r[2]) for r in rows] == [("1", "1", "0"), ("2", "1", "0"), ("2", "1", "1"),
                                                  ("1", "2", "0"), ("1", "2", "1")]
    for dp, ep, rank, dense, expert, save_s, save_mb in rows:
        want = 1.0 / (int(dp) * int(ep))
        assert float(dense) == pytest.approx(want, abs=0.01) and float(expert) == pytest.approx(want, abs=0.01)
        assert float(save_s) > 0 and (save_mb is not None) == (rank == "0")
    assert "load average before:" in res.stdout and "load average after:" in res.stdout


def test_compress_benchmark_quick_runs_and_prints_the_tables() -> None:
    """benchmarks/compress.py --quick (two tiny runs, 2 fine-tune steps): both tables, the winners and the timing."""
    script = SCRIPT.parent / "compress.py"
    cmd = [sys.executable, str(script), "--quick", "--methods", "base-lowrank,prune", "--ratios", "0.5"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr
    for kind in ("lm", "translate"):
        assert re.search(rf"^## {kind}: .* \(step 4\)$", res.stdout, re.M)
    rows = re.findall(r"^\| (base-lowrank|prune) \| [\d.]+ / [\d.]+ \| [\d.]+ / [\d.]+ \|$", res.stdout, re.M)
    assert rows.count("base-lowrank") >= 2 and rows.count("prune") >= 2  # bits table of each run (+ CER)
    assert res.stdout.count("Lowest at each ratio: ratio 0.5, training-free:") == 2
    assert re.search(r"^\| original \| [\d.]+ \| 1\.00 \|$", res.stdout, re.M)
    assert "cip" in res.stdout  # the language x expert finding


@pytest.mark.parametrize("script, args, summary", [
    ("plan_validate.py", ["--quick"], r"^step: median \|error\| \d+%, max \d+%, within 25%: \d+/\d+$"),
    ("plan_scale.py", ["--quick"], r"\S"),
    ("ep.py", ["--quick"], r"^  W=4: flat [\d.]+ KiB"),
    ("train.py", ["--quick"], r"^\| cache speed-up \| [\d.]+x \|$"),
    ("hf.py", ["moe", "--tokens", "64", "--d-model", "32", "--d-hidden", "64", "--reps", "2"],
     r"^moeflow patch_hf\s+[\d.]+"),
])
def test_other_benchmarks_run_at_tiny_sizes(script: str, args: list[str], summary: str) -> None:
    """Every other script in benchmarks/ completes at tiny sizes and prints its table (a script that an API change
    broke fails here, not in a user's hands); plan_validate's predicted bytes equal the dispatcher's CommStats."""
    res = subprocess.run([sys.executable, str(SCRIPT.parent / script), *args], capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    assert re.search(summary, res.stdout, re.M), res.stdout[-2000:]
    if script == "plan_validate.py":
        case = re.compile(r"^\s*[24]\s+\d+\s+\d+\s+[\d.]+\s+\w+")
        cases = [line.split() for line in res.stdout.splitlines() if case.match(line)]
        assert cases and all(c[6] == "ok" for c in cases)  # predicted bytes equal the dispatcher's CommStats
