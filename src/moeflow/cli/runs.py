"""Which kind of run a folder holds, so each command refuses the wrong kind with a hint instead of a KeyError."""

from __future__ import annotations

import json
from pathlib import Path

from moeflow.config import ConfigError
from moeflow.train.checkpoint import CheckpointError

# what each kind of run is made and read by, for the hints
_MADE_BY = {"lm": "`moeflow train` (a language model)", "translate": "`moeflow train --task translate`"}
_READ_BY = {"lm": "moeflow generate / eval / convert", "translate": "moeflow translate"}


def run_kind(run_dir: str | Path) -> str | None:
    """'lm' or 'translate' from the folder's config.json; None when there is none or it cannot be read."""
    try:
        cfg = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    if cfg.get("task") == "translate" or "languages" in cfg:
        return "translate"
    if "train" in cfg and "model" in cfg:
        return "lm"
    return None


def require_run(run_dir: str | Path, kind: str, command: str) -> Path:
    """The run folder, checked to exist and (when config.json says) to be of `kind`; else a clear error."""
    path = Path(run_dir)
    if not path.exists():
        raise CheckpointError(f"{path}: no such folder; {command} takes a run folder made by {_MADE_BY[kind]}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder; {command} takes the run folder (the one holding "
                              "config.json and checkpoint.pt), not a file in it")
    found = run_kind(path)
    if found is not None and found != kind:
        raise ConfigError(f"{path} holds a run made by {_MADE_BY[found]}; {command} needs one made by "
                          f"{_MADE_BY[kind]} (use {_READ_BY[found]} for this one)")
    return path
