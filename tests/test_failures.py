"""Faults a run meets outside the happy path: killed saves, a full disk, plots of runs without drops."""

from __future__ import annotations

import errno
import io
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moeflow.train import checkpoint as ckpt_mod
from moeflow.train.checkpoint import atomic_torch_save, clean_stale_temps


def _dead_pid() -> int:
    """The id of a process that has exited (a writer killed mid-save)."""
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(out.stdout)


def test_stale_temp_files_of_dead_writers_are_removed_live_ones_kept(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"step": 1}, path)
    dead, host = _dead_pid(), socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [tmp_path / f"checkpoint.pt.tmp.{dead}", tmp_path / f"checkpoint.pt.tmp.{dead}.{host}"]
        kept = [tmp_path / f"checkpoint.pt.tmp.{live.pid}.{host}",  # a writer still saving
                tmp_path / f"checkpoint.pt.tmp.{dead}.other-host.example",  # its pid means nothing here
                tmp_path / "checkpoint.pt.tmp.notapid", tmp_path / "other.pt.tmp.1"]
        for f in stale + kept:
            f.write_bytes(b"x" * 100)
        assert sorted(clean_stale_temps(path)) == sorted(stale)
        assert all(f.exists() for f in kept) and not any(f.exists() for f in stale)
        for f in stale:
            f.write_bytes(b"x")
        atomic_torch_save({"step": 2}, path)  # the next save cleans too
        assert not any(f.exists() for f in stale) and all(f.exists() for f in kept)
        assert torch.load(path, weights_only=True)["step"] == 2
    finally:
        live.kill()
        live.wait()


class _FullDisk(io.FileIO):
    """A file on a disk that fills up after `room` bytes."""

    room = 2000

    def write(self, b: bytes) -> int:  # type: ignore[override]
        """Fail like a full disk once the room is used up."""
        _FullDisk.room -= len(b)
        if _FullDisk.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(b)


def test_full_disk_during_save_is_enospc_and_keeps_the_previous_checkpoint(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, path)
    monkeypatch.setattr(ckpt_mod, "open", lambda p, mode: _FullDisk(p, mode), raising=False)
    with pytest.raises(OSError) as info:
        atomic_torch_save({"step": 2, "w": torch.randn(10_000)}, path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert info.value.__context__ is None or info.value.__suppress_context__  # one error, not torch's zip error
    old = torch.load(path, weights_only=True)
    assert old["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.fixture
def saved_figures(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every matplotlib figure saved during the test (the files are still written)."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figures: list[object] = []
    real = Figure.savefig

    def keep(fig: Figure, *args: object, **kwargs: object) -> None:
        figures.append(fig)
        real(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def test_dropless_drop_plot_says_so_instead_of_flat_lines(tmp_path: Path, saved_figures: list) -> None:
    from moeflow.analysis.plots import plot_layer_lines

    steps = np.arange(1, 51)
    plot_layer_lines(steps, np.zeros((50, 4)), tmp_path / "d.png", "dropped fraction", "drops",
                     all_zero_note="dropless: no drops")
    ax = saved_figures[-1].axes[0]
    assert [t.get_text() for t in ax.texts] == ["dropless: no drops"] and not ax.lines
    plot_layer_lines(steps, np.full((50, 2), 0.1), tmp_path / "e.png", "dropped fraction", "drops",
                     all_zero_note="dropless: no drops")
    assert len(saved_figures[-1].axes[0].lines) == 2  # real drops are still drawn


def test_expert_heat_map_labels_every_expert(tmp_path: Path, saved_figures: list) -> None:
    from moeflow.analysis.plots import plot_expert_load

    plot_expert_load(np.arange(1, 11), [np.full((10, 8), 1 / 8), np.full((10, 6), 1 / 6)], tmp_path / "h.png")
    axes = saved_figures[-1].axes
    assert list(axes[0].get_yticks()) == list(range(8)) and list(axes[1].get_yticks()) == list(range(6))


def test_report_of_a_dropless_run_has_no_drop_lines(tmp_path: Path, saved_figures: list) -> None:
    import json

    from moeflow.analysis.report import write_report

    (tmp_path / "config.json").write_text(json.dumps({"model": {"moe": {"capacity_factor": None}}, "train": {}}))
    layer = {"tokens_per_expert": [4, 4], "dropped_fraction": 0.0, "entropy": 0.6, "losses": {}}
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"kind": "train", "step": s, "loss": 3.0, "tokens_per_s": 100.0, "layers": [layer, layer]}) + "\n"
        for s in (1, 2, 3)))
    write_report(tmp_path)
    texts = [t.get_text() for fig in saved_figures for ax in fig.axes for t in ax.texts]
    assert "dropless: no drops" in texts


def test_load_hf_names_what_is_missing(tmp_path: Path) -> None:
    import json

    from moeflow import load_hf
    from moeflow.config import ConfigError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(FileNotFoundError, match="no weights in"):  # was KeyError: 'hidden_size'
        load_hf(tmp_path)
    pytest.importorskip("safetensors")
    (tmp_path / "model.safetensors").write_bytes(b"torn")
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        load_hf(tmp_path)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="config.json lacks 'hidden_size', which a mixtral config needs"):
        load_hf(tmp_path)
