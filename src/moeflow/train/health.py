"""Divergence detection from the training loss alone: a spike relative to the loss's own recent history.

A non-finite loss is caught by the loop before the optimizer step. An exploding run often stays finite for a long
time first (losses in the thousands, or a collapse to the uniform loss ln(vocab) with weights of 1e28), and a
checkpoint written then would be named "the last good one". `LossWatch` keeps the median of the last `window`
healthy losses; a loss above `factor` times that median (and at least `min_delta` above it, so that tiny losses
near zero are not judged by their ratio alone) is a spike. Spikes are not added to the history, so a long excursion
is measured against the loss from before it. The loop checkpoints only while the loss is healthy, and `patience`
spiking steps in a row stop the run.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LossWatch:
    """Spike detector over the training loss; `observe` each step's loss, ask `healthy` / `diverged`."""

    factor: float = 2.0  # spike: loss > factor * median of the recent healthy losses (0 = detection off)
    window: int = 20  # healthy losses the median is taken over
    patience: int = 3  # consecutive spiking steps that stop the run
    min_delta: float = 0.5  # a spike must also exceed the median by this much (nats)
    history: list[float] = field(default_factory=list)
    spikes: int = 0  # consecutive spiking steps so far
    last: float | None = None  # the latest loss observed

    @classmethod
    def from_config(cls, cfg: Any) -> LossWatch:
        """Thresholds from a train config's diverge_* fields (a config without them gets the defaults)."""
        defaults = cls()
        return cls(factor=getattr(cfg, "diverge_factor", defaults.factor),
                   window=getattr(cfg, "diverge_window", defaults.window),
                   patience=getattr(cfg, "diverge_patience", defaults.patience),
                   min_delta=getattr(cfg, "diverge_min_delta", defaults.min_delta))

    @property
    def reference(self) -> float | None:
        """The median of the recent healthy losses (None before the first one)."""
        return statistics.median(self.history) if self.history else None

    def is_spike(self, loss: float) -> bool:
        """Whether `loss` is a spike against the current history (without recording it)."""
        ref = self.reference
        return bool(self.factor) and ref is not None and loss > self.factor * ref and loss > ref + self.min_delta

    def observe(self, loss: float) -> bool:
        """Record one step's (finite) loss; returns whether it is healthy."""
        self.last = loss
        if self.is_spike(loss):
            self.spikes += 1
            return False
        self.spikes = 0
        self.history = (self.history + [loss])[-self.window:]
        return True

    @property
    def healthy(self) -> bool:
        """Whether the latest loss was not a spike (a checkpoint may be written)."""
        return self.spikes == 0

    @property
    def diverged(self) -> bool:
        """Whether the loss has spiked for `patience` steps in a row."""
        return bool(self.factor) and self.spikes >= self.patience

    def describe(self) -> str:
        """The latest loss against its reference, for messages."""
        ref = self.reference
        return (f"loss {self.last:.4g} vs a recent median of {ref:.4g} (spike: > {self.factor:g}x and "
                f"> +{self.min_delta:g})" if ref is not None and self.last is not None else "no loss history")

    def state_dict(self) -> dict[str, Any]:
        """The history and spike count (saved with the checkpoint, so a resume judges like the original run)."""
        return {"history": list(self.history), "spikes": self.spikes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.history = [float(v) for v in state.get("history", [])][-self.window:]
        self.spikes = int(state.get("spikes", 0))


__all__ = ["LossWatch"]
