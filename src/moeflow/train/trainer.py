"""The training loop: AdamW with warmup + cosine decay, routing statistics every step, evaluation, atomic
checkpoints, exact resume, and a hard stop on a non-finite loss, for any `Task` (train/task.py): the language
model (train/lm.py) and the translation task (tasks/translate_train.py) run through this one loop.

Routing statistics and aux losses come from `record_routing()` around the task's forward (routing/log.py), never
from module attributes: an activation-checkpoint recompute runs in backward, outside the scope, so it is neither
lost nor counted twice. The loop never sets the CPU thread count (the CLI does, once).

The loop is linear (nanoGPT style). Parallelism enters only through `ParallelHooks`, a handful of calls the loop
makes at fixed points (wrap the model, gradient sync for accumulation, agree on finiteness, the global gradient
norm, state dicts for checkpoints); the default `LocalHooks` is the single-process identity, and moeflow.parallel
provides the FSDP2 + expert-parallel one. With `sharded_checkpoints` hooks every rank writes its own shards (DCP,
train/sharded_checkpoint.py); otherwise rank 0 writes one file. A resume reads whichever of the two is newer, so a
run can move between one process and any torchrun layout.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

import torch
from torch import Tensor, nn

from moeflow.analysis.stats import layer_stats, summarize_layers
from moeflow.config import ConfigError
from moeflow.routing.deepseek import update_router_biases
from moeflow.routing.log import RoutingLog, record_routing
from moeflow.train.checkpoint import (CHECKPOINT_NAME, FORMAT_VERSION, load_checkpoint,
                                      load_optimizer_state_by_name, optimizer_state_by_name, rng_state,
                                      save_checkpoint, set_rng_state)
from moeflow.train.compile import apply_activation_checkpointing, compile_blocks
from moeflow.train.sharded_checkpoint import (DCP_NAME, PendingSave, finish_save, latest_folder, load_sharded,
                                              read_meta, save_sharded, start_sharded_save)
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
    sharded_checkpoints: bool  # True: each rank saves its shards (DCP); False: one file of the logical model

    def wrap_model(self, model: nn.Module, precision: str = "fp32") -> nn.Module:
        """Shard or wrap a freshly built (identically seeded) model; return the module to train. `precision` is
        the compute dtype ("fp32" or "bf16": fp32 master weights and reductions, fp32 routers)."""
        ...

    def begin_step(self, step: int) -> None:
        """The 1-based step about to run (so that a failure in a collective can name it)."""
        ...

    def guard(self, what: str) -> AbstractContextManager[None]:
        """Context around forward/backward that turns a peer's failure inside the framework's collectives into
        the same error our own collectives raise."""
        ...

    def gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        """Whether the next backward reduces gradients over ranks (off for gradient-accumulation micro-batches)."""
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

    def sum(self, value: float) -> float:
        """Sum a Python number over ranks (global token counts)."""
        ...

    def barrier(self, name: str) -> None:
        """Wait for every rank (checkpoint commits)."""
        ...

    def checkpoint_group(self) -> Any:
        """The process group asynchronous checkpoint writes use (never the training one); None: default."""
        ...

    def state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                    full: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model, optimizer) state keyed by parameter name: this rank's shards for a sharded checkpoint, or with
        `full` the logical tensors (may be empty on non-zero ranks)."""
        ...

    def load_state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                         optim_state: dict[str, Any], full: bool = False) -> None:
        """Load what `state_dicts` returned (`full`: logical tensors, under any number of ranks)."""
        ...

    def update_router_biases(self, log: RoutingLog) -> int:
        """After optimizer.step(): aux-loss-free balancing bias update from the step's (global) expert load, read
        from the step's routing log (not from module state, which an activation-checkpoint recompute rewrites)."""
        ...


class LocalHooks:
    """Single process: every hook is the identity."""

    rank = 0
    world = 1
    sharded_checkpoints = False

    def wrap_model(self, model: nn.Module, precision: str = "fp32") -> nn.Module:
        """Unchanged (mixed precision needs FSDP2: a ConfigError that says how to get it)."""
        if precision != "fp32":
            raise ConfigError(f"train.precision={precision} runs through FSDP2's MixedPrecisionPolicy: launch with "
                              "torchrun (`torchrun --nproc-per-node 1 -m moeflow train ...` works on one process)")
        return model

    def begin_step(self, step: int) -> None:
        """Nothing to record."""

    def guard(self, what: str) -> AbstractContextManager[None]:
        """No peers to fail."""
        return nullcontext()

    def gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        """Nothing to reduce: gradients simply accumulate."""

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

    def sum(self, value: float) -> float:
        """Unchanged."""
        return value

    def barrier(self, name: str) -> None:
        """Nobody to wait for."""

    def checkpoint_group(self) -> Any:
        """No group: single-file checkpoints are written synchronously."""
        return None

    def state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                    full: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        """model.state_dict() and the optimizer state keyed by parameter name (`full` or not: one process holds
        everything; the sharded form comes from torch's get_state_dict so a DCP checkpoint loads here too)."""
        if full:
            return model.state_dict(), optimizer_state_by_name(model, optimizer)
        from torch.distributed.checkpoint.state_dict import get_state_dict
        return get_state_dict(model, optimizer)

    def load_state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                         optim_state: dict[str, Any], full: bool = False) -> None:
        """Inverse of state_dicts (strict)."""
        if full:
            model.load_state_dict(model_state)
            load_optimizer_state_by_name(model, optimizer, optim_state)
            return
        from torch.distributed.checkpoint.state_dict import set_state_dict
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)

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
        self.accum = int(getattr(self.tc, "grad_accum", 1))
        apply_activation_checkpointing(model, bool(getattr(self.tc, "activation_checkpointing", False)))
        # on its device before wrapping: an expert-parallel wrap broadcasts and shards the weights where they live
        self.model = self.hooks.wrap_model(model.to(self.device), str(getattr(self.tc, "precision", "fp32")))
        if getattr(self.tc, "compile", False):
            compile_blocks(self.model, self.out if self.is_main else None)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, self.tc)
        self.step = 0
        self.elapsed_before = self.cpu_before = 0.0
        self.last_ckpt_step: int | None = None
        self.watch = LossWatch.from_config(self.tc)  # checkpoints only while the loss is healthy
        self.ckpt_path = self.run_dir / CHECKPOINT_NAME
        self.dcp_root = self.run_dir / DCP_NAME
        self.last_save_s = 0.0
        self._pending: PendingSave | None = None  # an asynchronous sharded save not yet committed
        self.metrics_path = self.run_dir / METRICS_NAME
        if resume:
            self._restore()

    # -------------------------------------------------------------------------------------------- state
    def _newest_checkpoint(self) -> tuple[str, Any]:
        """("file", path) or ("dcp", step folder): whichever of the run's checkpoints has the later step."""
        folder = latest_folder(self.dcp_root) if self.dcp_root.exists() else None
        if folder is None:
            return "file", self.ckpt_path
        if not self.ckpt_path.exists():
            return "dcp", folder
        file_step = int(load_checkpoint(self.ckpt_path, map_location="cpu")["step"])
        dcp_step = int(read_meta(folder)["step"])
        # a tie means the same state twice: read the format this layout writes
        if dcp_step > file_step or (dcp_step == file_step and self.hooks.sharded_checkpoints):
            return "dcp", folder
        return "file", self.ckpt_path

    def _restore(self) -> None:
        kind, where = self._newest_checkpoint()
        if kind == "dcp":
            ckpt = read_meta(where)
        else:
            ckpt = load_checkpoint(where, map_location=self.device)
        saved, now = flatten(ckpt["config"]), flatten(self.task.config_dict())
        diff = sorted(k for k in saved.keys() | now.keys()
                      if k not in self.task.resumable and saved.get(k) != now.get(k))
        if diff:
            raise ConfigError(f"{where}: checkpoint was made with a different config ({', '.join(diff[:6])}"
                              f"{', ...' if len(diff) > 6 else ''}); resume with the run's own config.json")
        if kind == "dcp":
            # the template holds THIS layout's shards; DCP reads the overlapping pieces of every saved shard
            model_sd, optim_sd = self.hooks.state_dicts(self.model, self.optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            load_sharded(where, state)
            self.hooks.load_state_dicts(self.model, self.optimizer, state["model"], state["optim"])
        else:  # a single-file checkpoint (one process, or a run from before sharded checkpoints)
            self.hooks.load_state_dicts(self.model, self.optimizer, ckpt["model"], ckpt["optimizer"], full=True)
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
        """Write the checkpoint atomically: each rank its shards (sharded hooks), else one file from rank 0."""
        meta = {"format_version": FORMAT_VERSION, "step": self.step, "rng": rng_state(),
                "data": self.task.state_dict(), "config": self.task.config_dict(),
                "extra": {"elapsed_s": elapsed_s, "cpu_s": cpu_s, "loss_watch": self.watch.state_dict()}}
        if self.hooks.sharded_checkpoints:
            self.finish_pending_save()  # one save in flight at a time: commit the previous one first
            model_sd, optim_sd = self.hooks.state_dicts(self.model, self.optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            if getattr(self.tc, "async_checkpoint", False):
                self._pending = start_sharded_save(self.dcp_root, state, meta, self.step, self.hooks.rank,
                                                   self.hooks.barrier, self.hooks.checkpoint_group())
            else:
                _, self.last_save_s = save_sharded(self.dcp_root, state, meta, self.step, self.hooks.rank,
                                                   self.hooks.barrier)
        else:
            t0 = time.perf_counter()
            state, opt_state = self.hooks.state_dicts(self.model, self.optimizer, full=True)
            if self.is_main:
                save_checkpoint(self.ckpt_path, model_state=state, optimizer_state=opt_state,
                                step=self.step, data_state=meta["data"], config=meta["config"], extra=meta["extra"])
            self.last_save_s = time.perf_counter() - t0
        self.last_ckpt_step = self.step

    def finish_pending_save(self) -> None:
        """Commit the asynchronous save in flight, if any (collective; the run calls it before returning)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.last_save_s = finish_save(pending, self.hooks.barrier)

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
        batches = [batch] + [self.task.next_batch(self.hooks.rank, self.hooks.world)
                             for _ in range(self.accum - 1)]
        weights = self._micro_weights(batches)
        self.optimizer.zero_grad(set_to_none=True)
        log = RoutingLog()
        loss_v = ce_v = aux_v = 0.0
        extra: dict[str, float] = {}
        for i, (mb, w) in enumerate(zip(batches, weights)):
            # the forward runs inside the scope, backward after it: an activation-checkpoint recompute is not
            # recorded
            with record_routing() as mb_log, self.hooks.guard("forward (FSDP2 all-gather)"):
                task_loss, mb_extra = self.task.loss(self.model, mb)
            aux = mb_log.aux_loss(task_loss.device) if tc.aux_loss else task_loss.new_zeros(())
            loss = task_loss + aux
            # the finiteness check is per micro-batch: a NaN must stop every rank before any backward uses it
            if not self.hooks.all_finite(math.isfinite(float(loss.detach()))):
                raise self._diverged("the training loss", float(loss.detach()))
            log.entries.extend(mb_log.entries)
            loss_v += w * float(loss.detach())
            ce_v += w * float(task_loss.detach())
            aux_v += w * float(aux.detach())
            for k, v in mb_extra.items():
                extra[k] = extra.get(k, 0.0) + w * v
            self.hooks.gradient_sync(self.model, i == len(batches) - 1)  # reduce once, after the last
            with self.hooks.guard("backward (FSDP2 all-gather/reduce-scatter)"):
                (loss * w).backward()
        gnorm = float(self.hooks.clip_grad_norm(self.params, tc.grad_clip))
        if not math.isfinite(gnorm):
            raise self._diverged("the gradient norm", gnorm)
        self.optimizer.step()
        self.hooks.update_router_biases(log)
        self.step += 1
        layers = layer_stats(log.per_layer(routed_layers(log)))
        rec = {"loss": loss_v, "ce": ce_v, **extra}
        if self.hooks.world > 1:
            # each rank saw 1/world of the global batch: log the global-batch means, not rank 0's share
            rec = {k: self.hooks.mean(v) for k, v in rec.items()}
        return {"kind": "train", "step": self.step, **rec, "aux": aux_v, "lr": lr, "grad_norm": gnorm,
                "tokens": sum(self.task.tokens(b) for b in batches), "layers": layers}

    def _micro_weights(self, batches: list[Any]) -> list[float]:
        """Per-micro-batch loss weights: token-mean losses become a mean over the step's global token count.

        A task that counts its loss tokens (`loss_tokens`) gets weights n_i * world / N, N summed over every rank
        and micro-batch (the reduction then averages over ranks), so padding-heavy micro-batches weigh less;
        otherwise every micro-batch weighs 1 / accum (equal token counts, e.g. the language model).
        """
        count = getattr(self.task, "loss_tokens", None)
        if count is None or len(batches) == 1:
            return [1.0 / len(batches)] * len(batches)
        local = [float(count(b)) for b in batches]
        total = self.hooks.sum(sum(local))
        return [n * self.hooks.world / total for n in local]

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
            self.finish_pending_save()
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
