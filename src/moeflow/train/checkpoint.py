"""Checkpoints written atomically: a crash or kill during a save leaves the previous checkpoint loadable.

A save writes `<name>.tmp.<pid>.<host>`, flushes and fsyncs it, then `os.replace`s it over `<name>` (atomic on POSIX
and Windows) and fsyncs the folder so the rename itself survives a power cut. A reader therefore sees either the old
file or the new one, never a torn one. A writer killed mid-save (kill -9, power cut) cannot remove its temp file;
the next save or start removes it once its writer process is gone (`clean_stale_temps`). A full disk is reported
as OSError(ENOSPC), not as torch's zip-writer error it causes.
"""

from __future__ import annotations

import errno
import os
import random
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the run; the message names the file."""


def _fsync_dir(path: Path) -> None:
    """Persist a rename in `path` (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def clean_stale_temps(path: str | Path) -> list[Path]:
    """Remove `<path>.tmp.<pid>[.<host>]` files left by killed writers on this host; returns what was removed.

    Only files whose writer process is gone go: a live writer's (another process saving now, this one included)
    and those written from another host (a shared filesystem: its pid means nothing here) are kept.
    """
    path = Path(path)
    host = socket.gethostname()
    removed = []
    for tmp in path.parent.glob(f"{path.name}.tmp.*"):
        pid_text, _, tmp_host = tmp.name[len(path.name) + len(".tmp."):].partition(".")
        if not pid_text.isdigit() or (tmp_host and tmp_host != host):
            continue
        pid = int(pid_text)
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            tmp.unlink()
        except FileNotFoundError:  # another process cleaned it first
            continue
        removed.append(tmp)
    return removed


def _out_of_space(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from or during, is a full disk (torch wraps it in its own)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file, fsync, then atomically replace `path`; the temp file never lingers.

    A full disk raises OSError(ENOSPC) naming `path`; the previous file at `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}.{socket.gethostname()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # KeyboardInterrupt included: the old checkpoint is untouched, only the partial temp file goes
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and _out_of_space(e):
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
        raise
    _fsync_dir(path.parent)


def rng_state() -> dict[str, Any]:
    """Every global RNG a training step may draw from (torch CPU/CUDA, numpy, python)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's state as tensors and numbers, so the checkpoint loads with weights_only=True
    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                                       "has_gauss": has_gauss, "gauss": gauss},
                             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, *, model_state: dict[str, Any], optimizer_state: dict[str, Any], step: int,
                    data_state: dict[str, Any], config: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Write everything needed to continue a run bit-for-bit: weights, optimizer, step, RNG and data stream."""
    atomic_torch_save({"format_version": FORMAT_VERSION, "step": step, "model": model_state,
                       "optimizer": optimizer_state, "rng": rng_state(), "data": data_state, "config": config,
                       "extra": extra or {}}, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`, with a clear error if it is missing or damaged."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise CheckpointError(f"{path}: no checkpoint there; train first (moeflow train) or pass the run folder "
                              "that holds checkpoint.pt")
    try:
        # weights_only: a checkpoint is data, never code
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e}); it may be truncated or "
                              "from another program") from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a moeflow checkpoint (format {FORMAT_VERSION} expected)")
    return ckpt


def checkpoint_step(path: str | Path) -> int:
    """The step a checkpoint was saved at, read without loading its tensors into memory (mmap)."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checkpoint there; train first (moeflow train)") from None
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}); it may be truncated or from "
                              "another program") from None
    if not isinstance(ckpt, dict) or "step" not in ckpt:
        raise CheckpointError(f"{path}: not a moeflow checkpoint (no step)")
    return int(ckpt["step"])


def _names_in_optimizer_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order torch.optim numbers them in its state_dict."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    try:
        return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]
    except KeyError:
        raise CheckpointError("the optimizer holds a parameter that is not in the model") from None


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() keyed by parameter name instead of position.

    The same layout as moeflow.parallel's gathered optimizer state, so a checkpoint resumes under any expert-
    parallel size, and a renamed or reordered parameter is an error instead of silently mismatched moments.
    """
    names = _names_in_optimizer_order(model, optimizer)
    sd = optimizer.state_dict()
    return {"state": {names[i]: dict(entry) for i, entry in sd["state"].items()},
            "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in
                                                                                       g["params"]]}
                             for g in sd["param_groups"]]}


def load_optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, full: dict[str, Any]) -> None:
    """Inverse of `optimizer_state_by_name`."""
    index = {name: i for i, name in enumerate(_names_in_optimizer_order(model, optimizer))}
    missing = sorted({n for g in full["param_groups"] for n in g["params"]} - set(index))
    if missing:
        raise CheckpointError(f"optimizer state names parameters the model lacks: {', '.join(missing[:5])}")
    optimizer.load_state_dict({
        "state": {index[name]: entry for name, entry in full["state"].items()},
        "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
                         for g in full["param_groups"]]})
