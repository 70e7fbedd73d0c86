"""The seam between the training loop and what is trained: a `Task` owns data, loss, evaluation and report.

`Trainer` (train/trainer.py) runs one loop for every task: LR schedule, optimizer, routing statistics, NaN stop,
checkpoints and parallel hooks. A task supplies the rest:

    task.next_batch(rank, world)   this rank's share of the next global batch (the stream is the task's state)
    task.loss(model, batch)        (task loss tensor, extra metrics); the Trainer runs it inside record_routing()
                                   and adds the routers' aux losses itself
    task.evaluate(model)           {"val_loss": ..., ...}; called in eval mode, under no_grad, RNG forked
    task.state_dict()              the data stream's state, saved in every checkpoint (bitwise resume)
    task.report(model, result, d)  summary.json / report.md of a finished run (rank 0, the logical model)

`moeflow.train.lm.LMTask` (next-byte prediction) and `moeflow.tasks.translate_train.TranslateTask` (the embedded
translation task) implement it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from torch import Tensor, nn


class TrainSchedule(Protocol):
    """The optimisation fields the loop reads (`TrainConfig` and `TranslateConfig` both carry them)."""

    steps: int  # total optimizer steps; the cosine schedule spans exactly these
    batch_size: int  # global batch (split over data-parallel ranks)
    lr: float
    min_lr_ratio: float
    warmup: int
    weight_decay: float
    beta1: float
    beta2: float
    grad_clip: float  # 0: off
    aux_loss: bool  # add the routers' scaled auxiliary losses to the task loss
    eval_every: int  # 0: only at the end
    ckpt_every: int  # 0: only at the end
    log_every: int


class Task(Protocol):
    """What the Trainer needs from a training task (see the module docstring for the call order)."""

    train: TrainSchedule
    device: str  # where the model trains ("auto", "cpu", "cuda", ...)
    resumable: frozenset[str]  # dotted config keys a resume may change (e.g. the schedule length)

    def config_dict(self) -> dict[str, Any]:
        """The resolved run config as a JSON-able dict (config.json and every checkpoint)."""
        ...

    def next_batch(self, rank: int, world: int) -> Any:
        """This rank's rows of the next global batch (every rank draws the same global batch)."""
        ...

    def tokens(self, batch: Any) -> int:
        """Tokens of the whole step over all ranks (for tokens/s)."""
        ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        """The task loss of this rank's batch (a mean, so that the mean over ranks is the global loss) and any
        extra per-step numbers to log."""
        ...

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Validation numbers; must hold "val_loss". Every rank runs the same forwards (collectives)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The data stream's state (enough to continue it exactly)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        ...

    def report(self, model: nn.Module, result: Any, run_dir: Path) -> dict[str, Any]:
        """Write summary.json and report.md for a finished run; returns the summary."""
        ...


__all__ = ["Task", "TrainSchedule"]
