"""CLI smoke tests: train a tiny run in a temp folder, then generate, eval, resume, compare, and the error paths."""

from __future__ import annotations

import inspect
import json
import math
import re
from pathlib import Path

import pytest

from moeflow.cli import main

TINY = ["--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2",
        "--set", "model.n_kv_heads=1", "--set", "model.max_seq_len=48", "--set", "model.ffn_hidden=64",
        "--set", "model.moe.d_hidden=32", "--set", "model.moe.num_experts=4", "--set", "train.batch_size=4",
        "--set", "train.seq_len=16", "--set", "train.eval_every=3", "--set", "train.eval_batches=2",
        "--set", "train.warmup=2"]




@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A small text corpus (stdlib sources)."""
    import json as j
    f = tmp_path / "data.txt"
    f.write_text(inspect.getsource(j) * 3)
    return f


def _train(tmp_path: Path, data: Path, *extra: str) -> int:
    return main(["train", "--data", str(data), "--out", str(tmp_path / "runs"), "--name", "t", "--max-steps", "6",
                 *TINY, *extra])


def test_train_generate_eval(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _train(tmp_path, data) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "t"
    assert re.search(r"step 6/6 loss \d+\.\d+ .*tok/s [\d,]+ dropped 0\.000 max/mean load \d+\.\d+", out)
    assert f"report:     {run / 'report.md'}" in out and "done: 6 steps" in out
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "report.md", "summary.json", "loss.png",
                 "expert_load.png", "dropped.png"):
        assert (run / name).exists(), name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["preset"] == "tiny" and cfg["train"]["steps"] == 6 and cfg["model"]["moe"]["num_experts"] == 4
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7))
    layer = train[-1]["layers"][0]
    assert len(layer["tokens_per_expert"]) == 4 and sum(layer["tokens_per_expert"]) == 4 * 16 * 2
    assert {"dropped_fraction", "entropy", "losses"} <= set(layer) and "lr" in train[-1] and "aux" in train[-1]
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [3, 6]
    report = (run / "report.md").read_text()
    assert "![Loss](loss.png)" in report and "| final validation bits per byte |" in report

    assert main(["generate", "--run", str(run), "--prompt", "def ", "--max-new-tokens", "20", "--seed", "3"]) == 0
    gen = capsys.readouterr()
    assert gen.out.startswith("def ") and "20 bytes" in gen.err
    # the streamed text is the decoded generation (an untrained model emits invalid UTF-8: replaced alike)
    import torch

    from moeflow.models import generate
    from moeflow.train.data import decode
    from moeflow.train.lm import model_from_run
    model, _, _ = model_from_run(run)
    ids = generate(model, torch.tensor([list(b"def ")]), 20, temperature=0.8,
                   generator=torch.Generator().manual_seed(3), slide=True)
    assert gen.out == decode(ids[0].tolist()) + "\n"
    assert main(["generate", "--run", str(run), "--prompt", "def ", "--max-new-tokens", "20", "--seed", "3",
                 "--temperature", "0", "--no-cache"]) == 0
    greedy_nocache = capsys.readouterr().out
    assert main(["generate", "--run", str(run), "--prompt", "def ", "--max-new-tokens", "20",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out == greedy_nocache  # dropless router: the KV cache changes nothing

    assert main(["eval", "--run", str(run)]) == 0
    line = capsys.readouterr().out
    loss, bpb = map(float, re.search(r"loss (\d+\.\d+) nats/byte, (\d+\.\d+) bits per byte", line).groups())
    summary = json.loads((run / "summary.json").read_text())
    assert loss == pytest.approx(summary["val_loss"], rel=1e-5) and bpb == pytest.approx(loss / math.log(2), 1e-3)


def test_stop_then_resume_via_cli(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from moeflow.analysis import plots
    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)  # plots are covered above; keep this test fast
    assert _train(tmp_path, data, "--stop-at", "3") == 0
    run = tmp_path / "runs" / "t"
    assert _train(tmp_path, data) == 2  # the folder already holds a run
    assert "already holds a run; continue it with --resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--set", "train.lr=1.0"]) == 2
    assert "only --max-steps, --stop-at and --device" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert "resuming at step 3 of 6" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_config_errors_exit_2_with_a_message(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _train(tmp_path, data, "--set", "train.lrr=1") == 2
    assert "unknown config key 'train.lrr'; did you mean train.lr" in capsys.readouterr().err
    assert _train(tmp_path, data, "--set", "model.moe.top_k=two") == 2
    assert "model.moe.top_k='two': expected int, got str" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path)]) == 2
    assert "missing.txt: no such file or folder" in capsys.readouterr().err
    assert main(["train", "--show-config", "--set", "train.lr=0.01"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["lr"] == 0.01
    assert main(["train", "--list-keys"]) == 0
    assert "model.moe.num_experts" in capsys.readouterr().out.split()
    assert main(["eval", "--run", str(tmp_path / "nothing")]) == 2
    assert "nothing: no such folder" in capsys.readouterr().err
    (tmp_path / "nothing").mkdir()
    assert main(["eval", "--run", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint there" in capsys.readouterr().err


def test_report_without_matplotlib_says_so(tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moeflow.analysis import plots
    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    assert _train(tmp_path, data, "--quiet", "--max-steps", "2") == 0
    run = tmp_path / "runs" / "t"
    report = (run / "report.md").read_text()
    assert "matplotlib is not installed" in report and not list(run.glob("*.png"))


def test_compare_prints_a_table(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--data", str(data), "--out", str(tmp_path), "--name", "c", "--max-steps", "3",
                 "--experts", "2,4", "--quiet", *TINY]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| dense") or line.startswith("| moe-")]
    assert [r.split("|")[1].strip() for r in rows] == ["dense", "moe-2x2", "moe-4x2"]
    total, active = ([int(r.split("|")[i].strip().replace(",", "")) for r in rows] for i in (3, 4))
    # MoE variants differ in total parameters; active ones differ only by the router (2 more experts x d_model
    # per layer), and the dense model lacks the router altogether
    assert active[2] - active[1] == 2 * 2 * 32 and active[1] - active[0] == 2 * 2 * 32
    assert total[2] - total[1] > 10 * (active[2] - active[1])
    assert "moe-4x2 vs dense: validation loss" in out
    saved = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert [r["label"] for r in saved["rows"]] == ["dense", "moe-2x2", "moe-4x2"]
