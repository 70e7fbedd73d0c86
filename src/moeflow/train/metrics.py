"""Run bookkeeping: the metrics.jsonl log and the terminal progress line (no tqdm)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    """Append-only JSON-lines log, one record per step or evaluation, flushed as it goes (safe to tail)."""

    def __init__(self, path: str | Path) -> None:
        """Open `path` for appending (created if missing)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record; non-finite floats are written as null so every line stays valid JSON."""
        self._f.write(json.dumps(_finite(record), separators=(",", ":")) + "\n")
        self._f.flush()

    def close(self) -> None:
        """Close the file."""
        self._f.close()

    @staticmethod
    def truncate_after(path: str | Path, step: int) -> int:
        """Drop records of steps after `step` (they will be re-run on resume); returns how many were dropped."""
        path = Path(path)
        if not path.exists():
            return 0
        kept, dropped = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1  # a line torn by a kill mid-write
                continue
            if rec.get("step", 0) > step:
                dropped += 1
            else:
                kept.append(line)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
        return dropped


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """A one-line `\\r` progress bar on a terminal; plain periodic lines otherwise (logs, CI, pipes)."""

    def __init__(self, total: int, start: int = 0, every: int = 10, stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        """`every`: line period in steps when the stream is not a terminal."""
        self.total, self.start, self.every = total, start, every
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self._last_draw = 0.0
        self._open_line = False

    def update(self, step: int, fields: dict[str, str]) -> None:
        """Show step `step` (1-based, of `total`) with the given already-formatted fields."""
        if not self.enabled:
            return
        now = time.perf_counter()
        done = step - self.start
        eta = (now - self.t0) / max(done, 1) * (self.total - step)
        text = f"step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in fields.items())
        if self.tty:
            if now - self._last_draw < 0.1 and step < self.total:
                return
            self._last_draw = now
            width = 20
            filled = int(width * step / self.total)
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r[{bar}] {text} eta {_fmt_time(eta)}\x1b[K")
            self._open_line = True
        elif step % self.every == 0 or step == self.total or step == self.start + 1:
            self.stream.write(f"{text} elapsed {_fmt_time(now - self.t0)} eta {_fmt_time(eta)}\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """Print a line of its own (an evaluation, a checkpoint) without breaking the bar."""
        if not self.enabled:
            return
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False
