"""The training loop: AdamW with warmup + cosine decay, routing statistics every step, evaluation, atomic
checkpoints, exact resume, and a hard stop on a non-finite loss, for any `Task` (train/task.py): the language
model (train/lm.py) and the translation task (tasks/translate_train.py) run through this one loop.

Routing statistics and aux losses come from `record_routing()` around the task's forward (routing/log.py), never
from module attributes: an activation-checkpoint recompute runs in backward, outside the scope, so it is neither
lost nor counted twice. The loop never sets the CPU thread count (the CLI does, once).

The loop is linear (nanoGPT style). Parallelism enters only through `ParallelHooks`, a handful of calls the loop
makes at fixed points (wrap the model, reduce gradients, agree on finiteness, gather a full state dict); the
default `LocalHooks` is the single-process identity, and moeflow.parallel provides the distributed one.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

import torch
from torch import Tensor, nn

from moeflow.analysis.stats import layer_stats, summarize_layers
from moeflow.config import ConfigError
from moeflow.routing.deepseek import update_router_biases
from moeflow.routing.log import RoutingLog, record_routing
from moeflow.train.checkpoint import (CHECKPOINT_NAME, load_checkpoint, load_optimizer_state_by_name,
                                      optimizer_state_by_name, save_checkpoint, set_rng_state)
from moeflow.train.config import flatten
from moeflow.train.health import LossWatch
from moeflow.train.metrics import METRICS_NAME, MetricsLog, Progress
from moeflow.train.task import Task, TrainSchedule

LN2 = math.log(2.0)


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the message names the step and the last good checkpoint."""

    def __init__(self, message: str, step: int) -> None:
        """Keep the failing step for callers."""
        super().__init__(message)
        self.step = step


class ParallelHooks(Protocol):
    """The seam for data/expert parallelism: everything distributed the loop needs, and nothing more."""

    rank: int
    world: int

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Shard or wrap a freshly built (identically seeded) model; return the module to train."""
        ...

    def begin_step(self, step: int) -> None:
        """The 1-based step about to run (so that a failure in a collective can name it)."""
        ...

    def reduce_gradients(self, model: nn.Module) -> None:
        """Average gradients over the ranks that share each parameter (after backward, before clipping)."""
        ...

    def all_finite(self, finite: bool) -> bool:
        """True only if every rank saw a finite loss (so all ranks stop on the same step)."""
        ...

    def clip_grad_norm(self, params: list[Tensor], max_norm: float) -> Tensor:
        """Global gradient norm over all ranks (clipping in place when max_norm > 0)."""
        ...

    def mean(self, value: float) -> float:
        """Average a Python number over ranks (validation loss)."""
        ...

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The unsharded model state dict (for checkpoints; may be empty on non-zero ranks)."""
        ...

    def load_full_state_dict(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        """Load an unsharded state dict into the (possibly sharded) model."""
        ...

    def full_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Optimizer state keyed by parameter name, experts unsharded (may be empty on non-zero ranks)."""
        ...

    def load_full_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                                  state: dict[str, Any]) -> None:
        """Load what `full_optimizer_state` saved (under any number of ranks)."""
        ...

    def update_router_biases(self, log: RoutingLog) -> int:
        """After optimizer.step(): aux-loss-free balancing bias update from the step's (global) expert load, read
        from the step's routing log (not from module state, which an activation-checkpoint recompute rewrites)."""
        ...


class LocalHooks:
    """Single process: every hook is the identity."""

    rank = 0
    world = 1

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Unchanged."""
        return model

    def begin_step(self, step: int) -> None:
        """Nothing to record."""

    def reduce_gradients(self, model: nn.Module) -> None:
        """Nothing to reduce."""

    def all_finite(self, finite: bool) -> bool:
        """This rank's answer."""
        return finite

    def clip_grad_norm(self, params: list[Tensor], max_norm: float) -> Tensor:
        """torch's clip (or just the norm when clipping is off)."""
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])

    def mean(self, value: float) -> float:
        """Unchanged."""
        return value

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """model.state_dict()."""
        return model.state_dict()

    def load_full_state_dict(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        """model.load_state_dict (strict)."""
        model.load_state_dict(state)

    def full_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """optimizer.state_dict() keyed by parameter name."""
        return optimizer_state_by_name(model, optimizer)

    def load_full_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                                  state: dict[str, Any]) -> None:
        """Inverse of full_optimizer_state."""
        load_optimizer_state_by_name(model, optimizer, state)

    def update_router_biases(self, log: RoutingLog) -> int:
        """DeepSeek routers nudge their balancing bias from this step's load (no-op for other routers)."""
        return update_router_biases(log)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else cpu; an unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is unknown; use auto, cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available here; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={name!r} but MPS is not available here; use --device cpu")
    return dev


def lr_at(step: int, cfg: TrainSchedule) -> float:
    """Learning rate for 0-based step: linear warmup to cfg.lr, then cosine down to lr * min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup - 1)
    progress = min(1.0, (step - cfg.warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainSchedule) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not norms, biases, or routers, whose scale sets routing sharpness)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and ".router." not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports."""

    run_dir: Path
    step: int
    train_loss: float  # mean over the last logged steps
    val_loss: float
    tokens_per_s: float  # median over logged steps
    elapsed_s: float
    checkpoint: Path
    tokens_per_cpu_s: float = float("nan")  # median tokens per CPU-second (all threads): robust to shared CPUs
    cpu_s: float = 0.0  # process CPU time of the training steps (all threads), over every session of the run

    @property
    def val_bpb(self) -> float:
        """Bits per byte (byte-level tokens: loss / ln 2)."""
        return self.val_loss / LN2


class Trainer:
    """Trains a built model on a task in a run folder; `run()` trains (or, with `resume`, continues)."""

    def __init__(self, model: nn.Module, task: Task, run_dir: str | Path, *, resume: bool = False,
                 hooks: ParallelHooks | None = None, stream: TextIO | None = None, progress: bool = True) -> None:
        """Wrap the model, build the optimizer; with `resume`, restore the run folder's checkpoint (config must
        match). The model should be freshly built and identically seeded on every rank."""
        self.task, self.tc, self.run_dir = task, task.train, Path(run_dir)
        self.hooks: ParallelHooks = hooks or LocalHooks()
        self.is_main = self.hooks.rank == 0
        self.out = stream or sys.stdout
        self.show_progress = progress and self.is_main
        self.device = resolve_device(task.device)
        if self.tc.batch_size % self.hooks.world:
            raise ConfigError(f"batch_size={self.tc.batch_size} must be divisible by the {self.hooks.world} "
                              "data-parallel ranks")
        # on its device before wrapping: an expert-parallel wrap broadcasts and shards the weights where they live
        self.model = self.hooks.wrap_model(model.to(self.device))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, self.tc)
        self.step = 0
        self.elapsed_before = self.cpu_before = 0.0
        self.last_ckpt_step: int | None = None
        self.watch = LossWatch.from_config(self.tc)  # checkpoints only while the loss is healthy
        self.ckpt_path = self.run_dir / CHECKPOINT_NAME
        self.metrics_path = self.run_dir / METRICS_NAME
        if resume:
            self._restore()

    # -------------------------------------------------------------------------------------------- state
    def _restore(self) -> None:
        ckpt = load_checkpoint(self.ckpt_path, map_location=self.device)
        saved, now = flatten(ckpt["config"]), flatten(self.task.config_dict())
        diff = sorted(k for k in saved.keys() | now.keys()
                      if k not in self.task.resumable and saved.get(k) != now.get(k))
        if diff:
            raise ConfigError(f"{self.ckpt_path}: checkpoint was made with a different config ({', '.join(diff[:6])}"
                              f"{', ...' if len(diff) > 6 else ''}); resume with the run's own config.json")
        self.hooks.load_full_state_dict(self.model, ckpt["model"])
        self.hooks.load_full_optimizer_state(self.model, self.optimizer, ckpt["optimizer"])
        self.task.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"])
        self.step = int(ckpt["step"])
        self.last_ckpt_step = self.step
        self.elapsed_before = float(ckpt["extra"].get("elapsed_s", 0.0))
        self.cpu_before = float(ckpt["extra"].get("cpu_s", 0.0))
        self.watch.load_state_dict(ckpt["extra"].get("loss_watch", {}))
        if self.is_main:
            MetricsLog.truncate_after(self.metrics_path, self.step)

    def save(self, elapsed_s: float, cpu_s: float = 0.0) -> None:
        """Write the checkpoint atomically (rank 0 writes; every rank takes part in gathering)."""
        state = self.hooks.full_state_dict(self.model)
        opt_state = self.hooks.full_optimizer_state(self.model, self.optimizer)
        if self.is_main:
            save_checkpoint(self.ckpt_path, model_state=state, optimizer_state=opt_state,
                            step=self.step, data_state=self.task.state_dict(), config=self.task.config_dict(),
                            extra={"elapsed_s": elapsed_s, "cpu_s": cpu_s, "loss_watch": self.watch.state_dict()})
        self.last_ckpt_step = self.step

    def write_config(self, preset: str | None = None) -> None:
        """config.json: the resolved config (plus the preset name, for humans)."""
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            d = {"preset": preset, **self.task.config_dict()}
            (self.run_dir / "config.json").write_text(json.dumps(d, indent=2) + "\n")

    # -------------------------------------------------------------------------------------------- steps
    def evaluate(self) -> dict[str, Any]:
        """The task's validation numbers (eval mode, no grad, global RNG untouched), averaged over ranks."""
        was = self.model.training
        self.model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = self.task.evaluate(self.model)
        self.model.train(was)
        if self.hooks.world > 1:
            out = {k: self.hooks.mean(v) if isinstance(v, float) else v for k, v in out.items()}
        return out

    def _diverged(self, what: str, value: float) -> TrainingDiverged:
        if self.last_ckpt_step is not None:
            where = f"the last good checkpoint is {self.ckpt_path} (step {self.last_ckpt_step})"
        else:
            where = "no checkpoint was written yet"
        return TrainingDiverged(
            f"step {self.step + 1}: {what} is {value} (not finite); stopped before the optimizer step, {where}. "
            "Lower the learning rate, keep grad_clip > 0, or check the data.", self.step + 1)

    def _spiked(self) -> TrainingDiverged:
        where = (f"the last healthy checkpoint is {self.ckpt_path} (step {self.last_ckpt_step})"
                 if self.last_ckpt_step is not None else "no checkpoint was written yet")
        return TrainingDiverged(
            f"step {self.step}: the training loss diverged ({self.watch.describe()}, {self.watch.spikes} step(s) in a "
            f"row); stopped without saving, {where}. Lower the learning rate, keep grad_clip > 0, or raise "
            "train.diverge_factor (0 turns this check off).", self.step)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns the record to log (raises TrainingDiverged on NaN/inf)."""
        tc = self.tc
        self.hooks.begin_step(self.step + 1)
        batch = self.task.next_batch(self.hooks.rank, self.hooks.world)
        lr = lr_at(self.step, tc)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        # the forward runs inside the scope, backward after it: an activation-checkpoint recompute is not recorded
        with record_routing() as log:
            task_loss, extra = self.task.loss(self.model, batch)
        aux = log.aux_loss(task_loss.device) if tc.aux_loss else task_loss.new_zeros(())
        loss = task_loss + aux
        loss_v = float(loss.detach())
        if not self.hooks.all_finite(math.isfinite(loss_v)):
            raise self._diverged("the training loss", loss_v)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.hooks.reduce_gradients(self.model)
        gnorm = float(self.hooks.clip_grad_norm(self.params, tc.grad_clip))
        if not math.isfinite(gnorm):
            raise self._diverged("the gradient norm", gnorm)
        self.optimizer.step()
        self.hooks.update_router_biases(log)
        self.step += 1
        layers = layer_stats(log.per_layer(routed_layers(log)))
        rec = {"loss": loss_v, "ce": float(task_loss.detach()), **extra}
        if self.hooks.world > 1:
            # each rank saw 1/world of the global batch: log the global-batch means, not rank 0's share
            rec = {k: self.hooks.mean(v) for k, v in rec.items()}
        return {"kind": "train", "step": self.step, **rec, "aux": float(aux.detach()), "lr": lr, "grad_norm": gnorm,
                "tokens": self.task.tokens(batch), "layers": layers}

    # -------------------------------------------------------------------------------------------- loop
    def run(self, stop_at: int | None = None, cpu_limit_s: float = 0.0) -> TrainResult:
        """Train until the last step (or `stop_at`, for a planned interruption; or once the training steps used
        `cpu_limit_s` of process CPU time, summed over resumes), evaluating and checkpointing."""
        tc = self.tc
        end = tc.steps if stop_at is None else min(stop_at, tc.steps)
        if self.step >= end:
            raise ConfigError(f"nothing to train: the run is at step {self.step} and would stop at step {end}")
        log = MetricsLog(self.metrics_path) if self.is_main else None
        progress = Progress(end, start=self.step, every=tc.log_every, stream=self.out, enabled=self.show_progress)
        t_start = time.perf_counter()
        cpu_s = self.cpu_before
        rates: list[float] = []
        cpu_rates: list[float] = []  # tokens per CPU-second of this process: comparable across a shared machine
        recent: list[float] = []
        evaluation: dict[str, Any] = {}
        self.model.train()
        try:
            while self.step < end:
                t0, c0 = time.perf_counter(), time.process_time()
                rec = self.train_step()
                healthy = self.watch.observe(rec["loss"])
                dt, cdt = time.perf_counter() - t0, time.process_time() - c0
                cpu_s += cdt
                rates.append(rec["tokens"] / dt)
                cpu_rates.append(rec["tokens"] / max(cdt, 1e-9))
                recent = (recent + [rec["loss"]])[-20:]
                rec.update(tokens_per_s=rates[-1], tokens_per_cpu_s=cpu_rates[-1],
                           elapsed_s=self.elapsed_before + time.perf_counter() - t_start, cpu_s=cpu_s)
                if log:
                    log.write(rec)
                progress.update(self.step, _progress_fields(rec, rates))
                # every rank must stop on the same step: agree on the CPU budget like on finiteness
                out_of_cpu = cpu_limit_s > 0 and not self.hooks.all_finite(cpu_s < cpu_limit_s)
                last = self.step == tc.steps or out_of_cpu
                if (tc.eval_every and self.step % tc.eval_every == 0) or last:
                    evaluation = self._log_eval(log, progress)
                due = (tc.ckpt_every and self.step % tc.ckpt_every == 0) or last or self.step == end
                if self.watch.diverged or (due and not healthy and (last or self.step == end)):
                    raise self._spiked()
                if due and healthy:
                    self.save(self.elapsed_before + time.perf_counter() - t_start, cpu_s)
                elif due:
                    progress.message(f"step {self.step}: no checkpoint while the loss spikes ({self.watch.describe()})")
                if out_of_cpu:
                    progress.message(f"CPU limit {cpu_limit_s:.0f} s reached at step {self.step}")
                    break
        except TrainingDiverged as e:
            if log:
                log.write({"kind": "diverged", "step": e.step, "message": str(e)})
            raise
        finally:
            progress.close()
            if log:
                log.close()
        if not evaluation:
            evaluation = self.evaluate()  # stopped early between evaluations
        elapsed = self.elapsed_before + time.perf_counter() - t_start
        return TrainResult(self.run_dir, self.step, sum(recent) / max(len(recent), 1), evaluation["val_loss"],
                           _median(rates), elapsed, self.ckpt_path, _median(cpu_rates), cpu_s)

    def _log_eval(self, log: MetricsLog | None, progress: Progress) -> dict[str, Any]:
        """Evaluate, log the record and print its line."""
        evaluation = self.evaluate()
        if log:
            log.write({"kind": "eval", "step": self.step, **evaluation})
        text = f"eval step {self.step}: val loss {evaluation['val_loss']:.4f}"
        if "val_bpb" in evaluation:
            text += f" ({evaluation['val_bpb']:.3f} bits/byte)"
        progress.message(text)
        return evaluation


def routed_layers(log: RoutingLog) -> list[object]:
    """The MoE blocks that logged a routing, each once, in the order of their first forward (= layer order)."""
    return list(dict.fromkeys(layer for layer, _ in log.entries))


def _progress_fields(rec: dict[str, Any], rates: list[float]) -> dict[str, str]:
    """The progress line: loss, lr, median tokens/s of the last 20 steps, drops and worst load."""
    window = sorted(rates[-20:])
    fields = {"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.2e}", "tok/s": f"{window[len(window) // 2]:,.0f}"}
    summ = summarize_layers(rec["layers"])
    if summ:
        fields["dropped"] = f"{summ['dropped']:.3f}"
        fields["max/mean load"] = f"{summ['imbalance']:.2f}"
    return fields


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else float("nan")


__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "ParallelHooks", "LocalHooks", "lr_at", "build_optimizer",
           "resolve_device", "routed_layers"]
