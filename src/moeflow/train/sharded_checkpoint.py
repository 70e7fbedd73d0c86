"""Sharded checkpoints with Distributed Checkpoint (DCP): every rank writes its own shards, committed atomically.

Layout of `<run>/checkpoint.dcp/`:

    LATEST                      the committed folder's name (one line), replaced atomically by rank 0
    step-00000040/.metadata     DCP's index (written last by DCP, after every rank's shards)
    step-00000040/__<r>_0.distcp  rank r's shards of the model and optimizer state (logical FQNs, logical shapes)
    step-00000040/meta.pt       step, data-stream state, RNG, config, timings (rank 0, plain torch.save)

A save writes a NEW step folder, then rank 0 writes `meta.pt`, then replaces `LATEST`, then deletes the older
folders. A kill -9 at any point before `LATEST` is replaced leaves the previous folder named by `LATEST`, untouched
and loadable; after it, the new one. Readers only ever follow `LATEST`.

Tensors are stored under their logical names and shapes (expert weights `[E, ...]`, see moeflow.parallel.fsdp), so
DCP reshards on load: a checkpoint saved under (dp=2, ep=2) loads under (1, 4), (4, 1) or one plain process.
`read_full` loads one without any process group into ordinary tensors (for `moeflow convert` and evaluation).
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from moeflow.train.checkpoint import CheckpointError, _fsync_dir, atomic_torch_save

DCP_NAME = "checkpoint.dcp"
LATEST = "LATEST"
META = "meta.pt"


def latest_folder(root: str | Path) -> Path | None:
    """The committed step folder of a `checkpoint.dcp` root (None if nothing was committed yet)."""
    root = Path(root)
    try:
        name = (root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    folder = root / name
    if not name or not (folder / ".metadata").exists() or not (folder / META).exists():
        raise CheckpointError(f"{root}: {LATEST} names {name!r}, which is not a complete DCP checkpoint; the "
                              "folder was deleted or damaged by hand")
    return folder


def _commit(root: Path, folder: Path) -> None:
    """Point LATEST at `folder` atomically (temp file, fsync, rename, fsync the folder)."""
    tmp = root / f"{LATEST}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(folder.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def save_sharded(root: str | Path, state: dict[str, Any], meta: dict[str, Any], step: int, rank: int,
                 barrier: Callable[[str], None]) -> tuple[Path, float]:
    """Collective: write `state` (DCP-ready dicts of local shards) under a new step folder and commit it.

    `meta` is saved by rank 0 next to the shards; `barrier(name)` must block until every rank arrives (so no
    rank reads LATEST while rank 0 replaces it). Returns the committed folder and the seconds the save took.
    """
    t0 = time.perf_counter()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    barrier("checkpoint: before save")  # every rank has read LATEST from the previous commit
    current = (root / LATEST).read_text().strip() if (root / LATEST).exists() else ""
    # never write into the committed folder (a kill mid-save would destroy it): alternate names for one step
    name = f"step-{step:08d}"
    folder = root / (name if name != current else f"{name}-b")
    dcp.save(state, checkpoint_id=str(folder))
    if rank == 0:
        atomic_torch_save(meta, folder / META)
        _commit(root, folder)
        for old in root.iterdir():  # earlier commits and folders of interrupted saves
            if old.is_dir() and old != folder and old.name.startswith("step-"):
                shutil.rmtree(old, ignore_errors=True)
    barrier("checkpoint: committed")
    return folder, time.perf_counter() - t0


@dataclass
class PendingSave:
    """An asynchronous save in flight: its shards are being written; `finish_save` commits it."""

    future: Any
    root: Path
    folder: Path
    meta: dict[str, Any]
    rank: int
    t0: float


def start_sharded_save(root: str | Path, state: dict[str, Any], meta: dict[str, Any], step: int, rank: int,
                       barrier: Callable[[str], None], process_group: Any = None) -> PendingSave:
    """Collective: copy `state` to host memory and write it in a background thread (`dcp.async_save`).

    Training may continue (and change the weights) as soon as this returns. Nothing is committed until
    `finish_save`, so a crash before it leaves the previous checkpoint in place. `process_group` should be a
    group used only for checkpoints: the background thread's collectives must not interleave with training's.
    """
    t0 = time.perf_counter()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    barrier("checkpoint: before save")
    current = (root / LATEST).read_text().strip() if (root / LATEST).exists() else ""
    name = f"step-{step:08d}"
    folder = root / (name if name != current else f"{name}-b")
    future = dcp.async_save(state, checkpoint_id=str(folder), process_group=process_group)
    return PendingSave(future, root, folder, meta, rank, t0)


def finish_save(pending: PendingSave, barrier: Callable[[str], None]) -> float:
    """Collective: wait for an asynchronous save's shards (rank 0: and DCP's .metadata), then commit it like
    `save_sharded`. Returns the seconds from its start."""
    pending.future.result()
    if pending.rank == 0:
        atomic_torch_save(pending.meta, pending.folder / META)
        _commit(pending.root, pending.folder)
        for old in pending.root.iterdir():
            if old.is_dir() and old != pending.folder and old.name.startswith("step-"):
                shutil.rmtree(old, ignore_errors=True)
    barrier("checkpoint: committed")
    return time.perf_counter() - pending.t0


def read_meta(folder: str | Path) -> dict[str, Any]:
    """The step/data/RNG/config record of a committed step folder."""
    path = Path(folder) / META
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - several error types for truncated files
        raise CheckpointError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def load_sharded(folder: str | Path, state: dict[str, Any]) -> None:
    """Collective (or single process): fill the template `state` (this layout's shards) in place from `folder`."""
    try:
        with warnings.catch_warnings():  # one plain process loads without a group: what the warning assumes
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(folder))
    except Exception as e:  # noqa: BLE001 - DCP wraps every rank's failure in CheckpointException
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{folder}: cannot load this sharded checkpoint into the model ({first}); it was "
                              "saved from a model with a different config or is damaged") from None


def read_full(folder: str | Path) -> dict[str, Any]:
    """Every tensor of a DCP folder as plain full tensors, nested as saved ({"model": ..., "optim": ...}).

    No process group needed: the template is built from DCP's own metadata, so rank 0 of nothing loads it
    (this process then holds the whole model: use it for conversion and evaluation, not for training at scale).
    """
    reader = dcp.FileSystemReader(str(folder))
    md = reader.read_metadata()
    flat: dict[str, Any] = {}
    for key, item in md.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            flat[key] = torch.empty(item.size, dtype=item.properties.dtype)
        elif isinstance(item, BytesStorageMetadata):
            flat[key] = None
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(flat, storage_reader=reader, no_dist=True)
    return _unflatten(flat, md.planner_data)


def read_full_checkpoint(root: str | Path, newer_than: str | Path | None = None,
                         map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The committed checkpoint of a `checkpoint.dcp` root in the single-file layout (`load_checkpoint`'s dict).

    With `newer_than` (a single-file checkpoint), returns None unless the sharded one has the later step.
    """
    folder = latest_folder(root)
    if folder is None:
        return None
    meta = read_meta(folder)
    if newer_than is not None:
        other = torch.load(newer_than, map_location="cpu", weights_only=True)
        if int(other.get("step", -1)) >= int(meta["step"]):
            return None
    full = read_full(folder)
    model = {k: v.to(map_location) for k, v in full["model"].items()}
    return {**meta, "model": model, "optimizer": full["optim"]}


def write_sharded_from_full(ckpt: dict[str, Any], root: str | Path) -> Path:
    """One process: write a single-file checkpoint's dict (`load_checkpoint`'s) as a committed DCP checkpoint.

    The tensors are stored whole (one shard file); DCP reshards them on load like any other sharded checkpoint,
    so `moeflow train --resume` under torchrun continues from it on any layout.
    """
    root = Path(root)
    if latest_folder(root) is not None if root.exists() else False:
        raise CheckpointError(f"{root} already holds a sharded checkpoint; pick an empty destination")
    folder = root / f"step-{int(ckpt['step']):08d}"
    root.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # DCP warns that it saves from one process: that is the point here
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": ckpt["model"], "optim": ckpt["optimizer"]}, checkpoint_id=str(folder), no_dist=True)
    atomic_torch_save({k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}, folder / META)
    _commit(root, folder)
    return folder


def _unflatten(flat: dict[str, Any], mapping: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    """Undo DCP's key flattening ("optim.state.w.exp_avg" -> nested dicts), using the saved path of each key."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        path = mapping.get(key, (key,))
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {} if not isinstance(part, int) else {})
        node[path[-1]] = value
    return _lists(out)


def _lists(node: Any) -> Any:
    """Dicts keyed 0..n-1 by int back into lists (DCP flattens lists such as param_groups by index)."""
    if isinstance(node, dict):
        node = {k: _lists(v) for k, v in node.items()}
        if node and all(isinstance(k, int) for k in node) and sorted(node) == list(range(len(node))):
            return [node[i] for i in range(len(node))]
    return node


__all__ = ["DCP_NAME", "latest_folder", "save_sharded", "start_sharded_save", "finish_save", "PendingSave", "read_meta", "load_sharded", "read_full",
           "read_full_checkpoint", "write_sharded_from_full"]
