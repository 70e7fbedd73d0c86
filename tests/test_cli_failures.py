"""Every subcommand with wrong, empty, huge, negative or malformed values and with missing, empty, truncated, binary
or wrong-kind files: a non-zero exit, a short message and no traceback, and nothing already saved is modified.

One tiny language-model run and one tiny translation run are trained once for the module; each case runs the CLI
in-process (`moeflow.cli.main`) and hashes every file under the module's folder before and after.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from moeflow.cli import main

TINY = ["--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
        "--set", "model.n_kv_heads=1", "--set", "model.max_seq_len=32", "--set", "model.ffn_hidden=64",
        "--set", "model.moe.d_hidden=32", "--set", "model.moe.num_experts=4", "--set", "train.batch_size=2",
        "--set", "train.seq_len=16", "--set", "train.eval_every=0", "--set", "train.eval_batches=1",
        "--set", "train.warmup=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Runs and damaged files to point the CLI at; the values fill the {placeholders} of the cases."""
    base = tmp_path_factory.mktemp("cli-failures")
    import json as some_module
    data = base / "data.txt"
    data.write_text(inspect.getsource(some_module) * 2)
    runs = base / "runs"
    with pytest.MonkeyPatch.context() as mp:
        from moeflow.analysis import plots
        mp.setattr(plots, "have_matplotlib", lambda: False)  # plots are tested elsewhere; keep this module fast
        assert main(["train", "--data", str(data), "--out", str(runs), "--name", "lm", "--max-steps", "4",
                     "--quiet", *TINY]) == 0
        assert main(["train", "--task", "translate", "--preset", "tiny", "--max-steps", "2", "--out", str(runs),
                     "--name", "tr", "--quiet"]) == 0
    lm, tr = runs / "lm", runs / "tr"
    for name, src in (("trunc", lm), ("trtrunc", tr)):  # a save cut short: config.json fine, checkpoint torn
        (base / name).mkdir()
        shutil.copy(src / "config.json", base / name / "config.json")
        (base / name / "checkpoint.pt").write_bytes((src / "checkpoint.pt").read_bytes()[:3000])
    (base / "empty").mkdir()
    (base / "emptyfile.txt").write_bytes(b"")
    (base / "binary.json").write_bytes(b"\xff\xfe\x00\x81binary")
    (base / "tiny.txt").write_text("too short")
    (base / "hf").mkdir()
    (base / "hf" / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    (base / "hf" / "model.safetensors").write_bytes(b"not safetensors")
    (base / "hfnoweights").mkdir()
    (base / "hfnoweights" / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    yield {"base": str(base), "data": str(data), "runs": str(runs), "lm": str(lm), "tr": str(tr),
           "trunc": str(base / "trunc"), "trtrunc": str(base / "trtrunc"), "empty": str(base / "empty"),
           "missing": str(base / "missing"), "emptyfile": str(base / "emptyfile.txt"),
           "binary": str(base / "binary.json"), "tinyfile": str(base / "tiny.txt"), "hf": str(base / "hf"),
           "hfnoweights": str(base / "hfnoweights"),
           "new": str(base / "new-output")}


# (id, arguments); every case must fail cleanly
CASES: list[tuple[str, str]] = [
    # generate
    ("gen-top-p-2", "generate --run {lm} --top-p 2 --max-new-tokens 5"),
    ("gen-top-p-0", "generate --run {lm} --top-p 0 --max-new-tokens 5"),
    ("gen-new-0", "generate --run {lm} --max-new-tokens 0"),
    ("gen-new-neg", "generate --run {lm} --max-new-tokens -5"),
    ("gen-temp-neg", "generate --run {lm} --temperature -1 --max-new-tokens 5"),
    ("gen-temp-nan", "generate --run {lm} --temperature nan --max-new-tokens 5"),
    ("gen-top-k-neg", "generate --run {lm} --top-k -1 --max-new-tokens 5"),
    ("gen-threads-neg", "generate --run {lm} --threads -1 --max-new-tokens 5"),
    ("gen-device-bogus", "generate --run {lm} --device foo --max-new-tokens 5"),
    ("gen-prompt-empty", "generate --run {lm} --prompt= --max-new-tokens 5"),
    ("gen-missing", "generate --run {missing}"),
    ("gen-truncated", "generate --run {trunc}"),
    ("gen-empty-dir", "generate --run {empty}"),
    ("gen-a-file", "generate --run {lm}/config.json"),
    ("gen-translate-run", "generate --run {tr}"),
    # eval
    ("eval-batches-neg", "eval --run {lm} --batches -1"),
    ("eval-batches-0", "eval --run {lm} --batches 0"),
    ("eval-threads-0", "eval --run {lm} --threads 0"),
    ("eval-data-empty", "eval --run {lm} --data {emptyfile}"),
    ("eval-data-short", "eval --run {lm} --data {tinyfile}"),
    ("eval-data-missing", "eval --run {lm} --data {missing}"),
    ("eval-translate-run", "eval --run {tr}"),
    ("eval-truncated", "eval --run {trunc}"),
    ("eval-split-bogus", "eval --run {lm} --split test"),
    # train
    ("train-report-missing", "train --report-only {missing}"),
    ("train-report-empty", "train --report-only {empty}"),
    ("train-report-translate", "train --report-only {tr}"),
    ("train-resume-set", "train --resume {lm} --set train.lr=1"),
    ("train-resume-translate", "train --resume {tr}"),
    ("train-resume-empty", "train --resume {empty}"),
    ("train-resume-truncated", "train --resume {trunc}"),
    ("train-resume-a-file", "train --resume {lm}/config.json"),
    ("train-translate-preset", "train --preset gshard --show-config"),
    ("train-stop-at-0", "train --stop-at 0"),
    ("train-stop-at-neg", "train --stop-at -1"),
    ("train-max-steps-0", "train --max-steps 0"),
    ("train-max-steps-word", "train --max-steps ten"),
    ("train-ep-no-torchrun", "train --ep 2 --data {data} --out {new} --max-steps 1"),
    ("train-ep-0", "train --ep 0"),
    ("train-config-binary", "train --config {binary} --show-config"),
    ("train-config-empty", "train --config {emptyfile} --show-config"),
    ("train-config-missing", "train --config {missing} --show-config"),
    ("train-config-of-summary", "train --config {lm}/summary.json --show-config"),
    ("train-set-unknown", "train --set train.lrr=1 --show-config"),
    ("train-set-no-equals", "train --set train.lr --show-config"),
    ("train-set-negative", "train --set train.threads=-1 --show-config"),
    ("train-data-empty", "train --data {emptyfile} --out {new} --max-steps 1"),
    ("train-data-missing", "train --data {missing} --out {new} --max-steps 1"),
    ("train-existing-name", "train --data {data} --out {runs} --name lm --max-steps 1"),
    ("train-translate-data", "train --task translate --data {data} --out {new}"),
    ("train-translate-resume-lm", "train --task translate --resume {lm}"),
    ("train-translate-resume-done", "train --task translate --resume {tr}"),
    # compare
    ("compare-experts-word", "compare --experts a,b --out {new}"),
    ("compare-experts-0", "compare --experts 0 --out {new}"),
    ("compare-experts-repeated", "compare --experts 4,4 --data {data} --max-steps 1 --out {new}"),
    ("compare-translate-preset", "compare --preset gshard"),
    ("compare-into-runs", "compare --data {data} --out {base} --name runs --max-steps 1"),
    # convert
    ("convert-into-itself", "convert {lm} {lm}"),
    ("convert-checkpoint-into-its-run", "convert {lm}/checkpoint.pt {lm}"),
    ("convert-into-other-run", "convert {lm} {tr}"),
    ("convert-onto-a-file", "convert {lm} {lm}/config.json"),
    ("convert-missing", "convert {missing} {new}"),
    ("convert-empty-dir", "convert {empty} {new}"),
    ("convert-truncated", "convert {trunc} {new}"),
    ("convert-translate-run", "convert {tr} {new}"),
    ("convert-bad-hf", "convert {hf} {new}"),
    ("convert-hf-no-weights", "convert {hfnoweights} {new} --to moeflow"),
    ("convert-shard-word", "convert {lm} {new} --max-shard-size abc"),
    ("convert-shard-0", "convert {lm} {new} --max-shard-size 0"),
    # demo
    ("demo-tokens-0", "demo --tokens 0"),
    ("demo-tokens-neg", "demo --tokens -1"),
    ("demo-experts-1", "demo --experts 1"),
    ("demo-d-model-0", "demo --d-model 0"),
    ("demo-capacity-neg", "demo --capacity-factor -1"),
    ("demo-capacity-nan", "demo --capacity-factor nan"),
    # translate
    ("translate-to-comma", "translate --run {tr} --to , --text hi"),
    ("translate-to-unknown", "translate --run {tr} --to xyz --text hi"),
    ("translate-text-empty", "translate --run {tr} --to cip --text="),
    ("translate-text-charset", "translate --run {tr} --to cip --text héllo"),
    ("translate-beam-0", "translate --run {tr} --to cip --text hi --beam 0"),
    ("translate-lm-run", "translate --run {lm} --to cip --text hi"),
    ("translate-truncated", "translate --run {trtrunc} --to cip --text hi"),
    ("translate-missing", "translate --run {missing} --to cip --text hi"),
    # translate-train, ablate
    ("translate-train-preset", "translate-train --preset foo --out {new}"),
    ("translate-train-steps-neg", "translate-train --set steps=-1 --out {new}"),
    ("translate-train-existing", "translate-train --preset tiny --out {tr}"),
    ("ablate-jobs-0", "ablate --jobs 0 --out {new}"),
    ("ablate-seeds-word", "ablate --seeds a --out {new}"),
    ("ablate-axis-unknown", "ablate --axis bogus=1 --out {new}"),
    ("ablate-dense-preset", "ablate --preset dense --out {new}"),
    ("ablate-steps-0", "ablate --preset tiny --axis none --no-dense --steps 0 --out {new}"),
    ("ablate-into-a-run", "ablate --preset tiny --axis none --no-dense --steps 1 --out {lm}"),
    # top level
    ("no-command", ""),
    ("unknown-command", "fly"),
]


def _hashes(root: Path) -> dict[str, str]:
    """Relative path -> sha1 of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(argv: list[str]) -> int:
    """`moeflow argv` in-process; argparse's exits become their status."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def _check_clean_failure(code: int, out: str, err: str) -> None:
    assert code not in (0, None), f"exit {code}\n{out}\n{err}"
    assert "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 12, err  # argparse: usage lines + one error line; ours: one paragraph
    assert "error" in err.lower() or "moeflow" in err.lower(), err


@pytest.mark.parametrize("argv", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_cleanly_and_changes_nothing(argv: str, world: dict[str, str],
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    base = Path(world["base"])
    monkeypatch.chdir(base)  # a default output folder (runs/...) would land here, and be seen
    before = _hashes(base)
    code = run_cli([a.format(**world) for a in argv.split()])
    captured = capsys.readouterr()
    _check_clean_failure(code, captured.out, captured.err)
    assert _hashes(base) == before, "a failing command modified saved files"


def _copy_run(world: dict[str, str], tmp_path: Path) -> Path:
    run = tmp_path / "lm"
    shutil.copytree(world["lm"], run)
    return run


class _FullDisk(io.FileIO):
    """A file on a disk that is already full."""

    def write(self, b: bytes) -> int:  # type: ignore[override]
        """Fail like a full disk."""
        raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_during_a_checkpoint_says_so_and_keeps_the_previous_one(
        world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from moeflow.analysis import plots
    from moeflow.train import checkpoint as ckpt_mod

    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    run = _copy_run(world, tmp_path)
    saved = (run / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(ckpt_mod, "open", lambda p, mode: _FullDisk(p, mode), raising=False)
    code = run_cli(["train", "--resume", str(run), "--max-steps", "5", "--quiet"])
    captured = capsys.readouterr()
    _check_clean_failure(code, captured.out, captured.err)
    assert "no space left on device" in captured.err and "inline_container" not in captured.err
    assert (run / "checkpoint.pt").read_bytes() == saved
    assert not list(run.glob("checkpoint.pt.tmp*"))


def test_full_disk_during_the_report_says_so(world: dict[str, str], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from moeflow.analysis import plots

    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    run = _copy_run(world, tmp_path)
    real = Path.write_text

    def full(self: Path, *args: object, **kwargs: object) -> int:
        if self.name == "report.md":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", full)
    code = run_cli(["train", "--report-only", str(run)])
    captured = capsys.readouterr()
    _check_clean_failure(code, captured.out, captured.err)
    assert "no space left on device" in captured.err


def test_stale_temp_files_are_removed_when_a_run_resumes(world: dict[str, str], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import subprocess
    import sys

    run = _copy_run(world, tmp_path)
    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                             text=True).stdout)
    stale = run / f"checkpoint.pt.tmp.{pid}"  # the name a writer killed mid-save left behind
    stale.write_bytes(b"\0" * 1000)
    assert run_cli(["train", "--resume", str(run), "--max-steps", "5", "--quiet"]) == 0
    assert not stale.exists() and f"removed {stale.name}" in capsys.readouterr().out


def test_convert_force_replaces_only_what_it_writes(world: dict[str, str], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "hf"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    (dst / "model-00001-of-00002.safetensors").write_bytes(b"an older export")
    assert run_cli(["convert", world["lm"], str(dst)]) == 2  # not empty: refused
    assert sorted(p.name for p in dst.iterdir()) == ["model-00001-of-00002.safetensors", "notes.txt"]
    assert run_cli(["convert", world["lm"], str(dst), "--force"]) == 0
    assert (dst / "notes.txt").read_text() == "mine"  # never deleted
    assert {"config.json", "model.safetensors", "model-00001-of-00002.safetensors"} <= {p.name for p in
                                                                                         dst.iterdir()}
    assert "model-00001-of-00002.safetensors" in capsys.readouterr().err  # named as possibly stale
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_generate_streams_so_an_interrupt_keeps_what_was_shown(world: dict[str, str],
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import moeflow.cli.generate as gen_cli

    real = gen_cli.generate

    def interrupted(*args: object, on_token: object = None, **kwargs: object) -> object:
        count = [0]

        def tick(token: object) -> None:
            on_token(token)  # type: ignore[operator]
            count[0] += 1
            if count[0] == 5:
                raise KeyboardInterrupt  # Ctrl-C after five bytes

        return real(*args, on_token=tick, **kwargs)

    monkeypatch.setattr(gen_cli, "generate", interrupted)
    code = run_cli(["generate", "--run", world["lm"], "--prompt", "abc", "--max-new-tokens", "50",
                    "--temperature", "0"])
    captured = capsys.readouterr()
    assert code == 130 and "interrupted" in captured.err and "Traceback" not in captured.err
    import torch

    from moeflow.train.data import decode
    from moeflow.train.lm import model_from_run
    model, _, _ = model_from_run(world["lm"])
    first5 = real(model, torch.tensor([list(b"abc")]), 5, temperature=0.0, slide=True)
    assert captured.out == decode(first5[0].tolist()) + "\n"  # the five bytes were shown before the interrupt
