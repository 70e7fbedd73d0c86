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
