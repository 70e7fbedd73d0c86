"""The first hour, as the README tells it: `./dev`, the CLI's defaults, the documented commands and help texts."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from moeflow.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _without_omp_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _spin_count(env: dict[str, str]) -> str | None:
    """libgomp's effective spin count when `python -m moeflow` runs (None: not libgomp, nothing to check)."""
    out = subprocess.run([sys.executable, "-m", "moeflow", "train", "--list-keys"], capture_output=True, text=True,
                         env={**env, "OMP_DISPLAY_ENV": "VERBOSE"}, timeout=120)
    assert out.returncode == 0, out.stderr
    m = re.search(r"GOMP_SPINCOUNT = '(\d+)'", out.stderr)
    return m.group(1) if m else None


def test_cli_defaults_openmp_to_passive_waits_and_keeps_an_explicit_policy() -> None:
    env = _without_omp_env()
    spin = _spin_count(env)
    if spin is None:
        pytest.skip("torch here is not linked against libgomp (no OMP_DISPLAY_ENV report)")
    assert spin == "0"  # PASSIVE: sleep at once instead of spinning (libgomp's default spins 300000 times)
    assert _spin_count({**env, "OMP_WAIT_POLICY": "ACTIVE"}) != "0"


def test_dev_runs_the_venv_tools_with_the_passive_default(tmp_path: Path) -> None:
    """`./dev torchrun ...` and `./dev <subcommand>` reach the venv's executables (no PATH needed)."""
    (tmp_path / "dev").write_bytes((ROOT / "dev").read_bytes())
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("python", "moeflow", "torchrun"):
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $* OMP_WAIT_POLICY=$OMP_WAIT_POLICY"\n')
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    (tmp_path / ".venv" / ".moeflow-ready").touch()
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}

    def dev(*args: str) -> str:
        out = subprocess.run(["bash", str(tmp_path / "dev"), *args], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert dev("torchrun", "--nproc-per-node", "2", "-m", "moeflow", "train") == \
        "torchrun --nproc-per-node 2 -m moeflow train OMP_WAIT_POLICY=PASSIVE"
    assert dev("generate", "--run", "r") == "moeflow generate --run r OMP_WAIT_POLICY=PASSIVE"
    assert dev() == "moeflow train OMP_WAIT_POLICY=PASSIVE"
    assert dev("python", "-V") == "python -V OMP_WAIT_POLICY=PASSIVE"


def _readme_commands() -> list[list[str]]:
    """Every `./dev <subcommand> ...` line of the README's shell blocks, as moeflow argv."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if len(words) < 2 or words[0] != "./dev" or words[1] in ("test", "python", "pip"):
                continue
            if words[1] == "torchrun":
                words = ["./dev"] + words[words.index("moeflow") + 1:]
            commands.append(words[1:])
    return commands


def test_every_readme_command_parses() -> None:
    commands = _readme_commands()
    assert len(commands) >= 15 and ["generate", "--run", "runs/a", "--prompt", "def ", "--temperature", "0.8",
                                    "--top-k", "40", "--max-new-tokens", "300"] in commands
    parser = build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README command does not parse: moeflow {' '.join(argv)}")
    assert "\nmoeflow " not in (ROOT / "README.md").read_text()  # no bare `moeflow` that is not on PATH


def _help(*argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_offers_only_what_each_command_accepts(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--task translate" not in _help("compare", capsys=capsys)  # compare has no --task
    assert "--preset {tiny,tiny-dense,small}" in _help("compare", capsys=capsys)
    train = _help("train", capsys=capsys)
    assert "for the language model tiny, tiny-dense, small" in train and "with --task translate gshard" in train


def test_output_piped_into_head_ends_quietly() -> None:
    env = _without_omp_env()
    # `head -c 0` exits before python has started: every write meets a closed pipe
    cmd = f"{shlex.quote(sys.executable)} -m moeflow train --list-keys | head -c 0"
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout == "" and out.stderr == ""


def test_list_keys_documents_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    from moeflow.cli import main
    from moeflow.train.config import config_keys

    assert main(["train", "--list-keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == config_keys()  # the key stays the first word (scripts)
    notes = {line.split()[0]: line for line in lines}
    assert "(tiny: 2.0)" in notes["train.diverge_factor"] and "0 = divergence check off" in notes[
        "train.diverge_factor"]
    assert "(tiny: 1)" in notes["train.threads"]  # the default preset's value, not the dataclass default
