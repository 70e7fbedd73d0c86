"""The training loop: AdamW with warmup + cosine decay, routing statistics every step, evaluation, atomic
checkpoints, exact resume, and a hard stop on a non-finite loss.

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
import torch.nn.functional as F
from torch import Tensor, nn

from moeflow.analysis.stats import layer_stats, summarize_layers
from moeflow.config import ConfigError
from moeflow.layers import moe_layers
from moeflow.models import MoETransformer
from moeflow.routing.deepseek import update_router_biases
from moeflow.train.checkpoint import (CHECKPOINT_NAME, load_checkpoint, load_optimizer_state_by_name,
                                      optimizer_state_by_name, save_checkpoint, set_rng_state)
from moeflow.train.config import RunConfig
from moeflow.train.data import BatchStream, Corpus, DataError, eval_batches, load_corpus
from moeflow.train.metrics import METRICS_NAME, MetricsLog, Progress

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

    def wrap_model(self, model: MoETransformer) -> MoETransformer:
        """Shard or wrap a freshly built (identically seeded) model; return the module to train."""
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

    def update_router_biases(self, model: nn.Module) -> int:
        """After optimizer.step(): aux-loss-free balancing bias update from the step's (global) expert load."""
        ...


class LocalHooks:
    """Single process: every hook is the identity."""

    rank = 0
    world = 1

    def wrap_model(self, model: MoETransformer) -> MoETransformer:
        """Unchanged."""
        return model

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

    def update_router_biases(self, model: nn.Module) -> int:
        """DeepSeek routers nudge their balancing bias from this step's load (no-op for other routers)."""
        return update_router_biases(model)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else cpu; an unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available here; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={name!r} but MPS is not available here; use --device cpu")
    return dev


def lr_at(step: int, cfg: Any) -> float:
    """Learning rate for 0-based step: linear warmup to cfg.lr, then cosine down to lr * min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup - 1)
    progress = min(1.0, (step - cfg.warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: Any) -> torch.optim.AdamW:
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

    @property
    def val_bpb(self) -> float:
        """Bits per byte (byte-level tokens: loss / ln 2)."""
        return self.val_loss / LN2


class Trainer:
    """Builds model, optimizer and data for a RunConfig in a run folder; `run()` trains (or resumes)."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, corpus: Corpus | None = None,
                 hooks: ParallelHooks | None = None, stream: TextIO | None = None, progress: bool = True) -> None:
        """Set up everything; with `resume`, restore the run folder's checkpoint (config must match)."""
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.hooks: ParallelHooks = hooks or LocalHooks()
        self.is_main = self.hooks.rank == 0
        self.out = stream or sys.stdout
        self.show_progress = progress and self.is_main
        tc = cfg.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.device = resolve_device(tc.device)
        if tc.batch_size % self.hooks.world:
            raise ConfigError(f"train.batch_size={tc.batch_size} must be divisible by the {self.hooks.world} "
                              "data-parallel ranks")
        self.corpus = corpus if corpus is not None else load_corpus(cfg.data)
        if self.corpus.max_token >= cfg.model.vocab_size:
            raise DataError(f"{self.corpus.source}: token id {self.corpus.max_token} does not fit "
                            f"model.vocab_size={cfg.model.vocab_size}; --set model.vocab_size="
                            f"{self.corpus.max_token + 1} (or larger)")
        torch.manual_seed(tc.seed)
        # on its device before wrapping: an expert-parallel wrap broadcasts and shards the weights where they live
        self.model = self.hooks.wrap_model(MoETransformer(cfg.model).to(self.device))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, tc)
        self.batches = BatchStream(self.corpus.train, tc.batch_size, tc.seq_len, tc.seed)
        self.val_batches = eval_batches(self.corpus.val, tc.eval_batches, tc.batch_size, tc.seq_len)
        self.step = 0
        self.elapsed_before = 0.0
        self.last_ckpt_step: int | None = None
        self.ckpt_path = self.run_dir / CHECKPOINT_NAME
        self.metrics_path = self.run_dir / METRICS_NAME
        if resume:
            self._restore()

    # -------------------------------------------------------------------------------------------- state
    def _restore(self) -> None:
        ckpt = load_checkpoint(self.ckpt_path, map_location=self.device)
        saved, now = ckpt["config"], self.cfg.to_dict()
        # the schedule length may grow (extend a finished run); anything else changes the math of the run
        diff = [k for k in ("model", "data") if saved.get(k) != now[k]]
        diff += [f"train.{k}" for k in now["train"] if k not in ("steps", "device", "log_every")
                 and saved["train"].get(k) != now["train"][k]]
        if diff:
            raise ConfigError(f"{self.ckpt_path}: checkpoint was made with a different config ({', '.join(diff)}); "
                              "resume with the run's own config.json")
        self.hooks.load_full_state_dict(self.model, ckpt["model"])
        self.hooks.load_full_optimizer_state(self.model, self.optimizer, ckpt["optimizer"])
        self.batches.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"])
        self.step = int(ckpt["step"])
        self.last_ckpt_step = self.step
        self.elapsed_before = float(ckpt["extra"].get("elapsed_s", 0.0))
        if self.is_main:
            MetricsLog.truncate_after(self.metrics_path, self.step)

    def save(self, elapsed_s: float) -> None:
        """Write the checkpoint atomically (rank 0 writes; every rank takes part in gathering)."""
        state = self.hooks.full_state_dict(self.model)
        opt_state = self.hooks.full_optimizer_state(self.model, self.optimizer)
        if self.is_main:
            save_checkpoint(self.ckpt_path, model_state=state, optimizer_state=opt_state,
                            step=self.step, data_state=self.batches.state_dict(), config=self.cfg.to_dict(),
                            extra={"elapsed_s": elapsed_s})
        self.last_ckpt_step = self.step

    def write_config(self, preset: str | None = None) -> None:
        """config.json: the resolved config (plus the preset name, for humans)."""
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            d = {"preset": preset, **self.cfg.to_dict()}
            (self.run_dir / "config.json").write_text(json.dumps(d, indent=2) + "\n")

    # -------------------------------------------------------------------------------------------- steps
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss over the fixed validation windows (router noise off, RNG untouched)."""
        was = self.model.training
        self.model.eval()
        total = 0.0
        with torch.random.fork_rng(devices=[]):
            for x, y in self.val_batches:
                logits = self.model(x.to(self.device))
                total += float(F.cross_entropy(logits.flatten(0, 1).float(), y.to(self.device).flatten()))
        self.model.train(was)
        return self.hooks.mean(total / len(self.val_batches))

    def _diverged(self, what: str, value: float) -> TrainingDiverged:
        if self.last_ckpt_step is not None:
            where = f"the last good checkpoint is {self.ckpt_path} (step {self.last_ckpt_step})"
        else:
            where = "no checkpoint was written yet"
        return TrainingDiverged(
            f"step {self.step + 1}: {what} is {value} (not finite); stopped before the optimizer step, {where}. "
            "Lower train.lr, keep train.grad_clip > 0, or check the data.", self.step + 1)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns the record to log (raises TrainingDiverged on NaN/inf)."""
        tc, cfgm = self.cfg.train, self.cfg.model
        begin_step = getattr(self.hooks, "begin_step", None)  # optional: lets a PeerFailureError name the step
        if begin_step is not None:
            begin_step(self.step + 1)
        x, y = self.batches.next_batch(self.hooks.rank, self.hooks.world)
        x, y = x.to(self.device), y.to(self.device)
        lr = lr_at(self.step, tc)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        logits = self.model(x)
        ce = F.cross_entropy(logits.view(-1, cfgm.vocab_size).float(), y.flatten())
        aux = self.model.aux_loss() if tc.aux_loss else ce.new_zeros(())
        loss = ce + aux
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
        self.hooks.update_router_biases(self.model)
        self.step += 1
        layers = layer_stats(self.model.routings()) if moe_layers(self.model) else []
        ce_v = float(ce.detach())
        if self.hooks.world > 1:
            # each rank saw 1/world of the global batch: log the global-batch means, not rank 0's share
            loss_v, ce_v = self.hooks.mean(loss_v), self.hooks.mean(ce_v)
        return {"kind": "train", "step": self.step, "loss": loss_v, "ce": ce_v,
                "aux": float(aux.detach()), "lr": lr, "grad_norm": gnorm, "tokens": x.numel() * self.hooks.world,
                "layers": layers}

    # -------------------------------------------------------------------------------------------- loop
    def run(self, stop_at: int | None = None) -> TrainResult:
        """Train until train.steps (or `stop_at`, for a planned interruption), evaluating and checkpointing."""
        tc = self.cfg.train
        end = tc.steps if stop_at is None else min(stop_at, tc.steps)
        log = MetricsLog(self.metrics_path) if self.is_main else None
        progress = Progress(end, start=self.step, every=tc.log_every, stream=self.out, enabled=self.show_progress)
        t_start = time.perf_counter()
        rates: list[float] = []
        cpu_rates: list[float] = []  # tokens per CPU-second of this process: comparable across a shared machine
        recent: list[float] = []
        val_loss = float("nan")
        self.model.train()
        try:
            while self.step < end:
                t0, c0 = time.perf_counter(), time.process_time()
                rec = self.train_step()
                dt, cdt = time.perf_counter() - t0, time.process_time() - c0
                rates.append(rec["tokens"] / dt)
                cpu_rates.append(rec["tokens"] / max(cdt, 1e-9))
                recent = (recent + [rec["loss"]])[-20:]
                rec["tokens_per_s"] = rates[-1]
                rec["tokens_per_cpu_s"] = cpu_rates[-1]
                rec["elapsed_s"] = self.elapsed_before + time.perf_counter() - t_start
                if log:
                    log.write(rec)
                fields = {"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.2e}",
                          "tok/s": f"{sorted(rates[-20:])[len(rates[-20:]) // 2]:,.0f}"}
                summ = summarize_layers(rec["layers"])
                if summ:
                    fields["dropped"] = f"{summ['dropped']:.3f}"
                    fields["max/mean load"] = f"{summ['imbalance']:.2f}"
                progress.update(self.step, fields)
                last = self.step == tc.steps
                if (tc.eval_every and self.step % tc.eval_every == 0) or last:
                    val_loss = self.evaluate()
                    if log:
                        log.write({"kind": "eval", "step": self.step, "val_loss": val_loss,
                                   "val_bpb": val_loss / LN2})
                    progress.message(f"eval step {self.step}: val loss {val_loss:.4f} "
                                     f"({val_loss / LN2:.3f} bits/byte)")
                if (tc.ckpt_every and self.step % tc.ckpt_every == 0) or last or self.step == end:
                    self.save(self.elapsed_before + time.perf_counter() - t_start)
        except TrainingDiverged as e:
            if log:
                log.write({"kind": "diverged", "step": e.step, "message": str(e)})
            raise
        finally:
            progress.close()
            if log:
                log.close()
        if not math.isfinite(val_loss):
            val_loss = self.evaluate()  # stopped early between evaluations
        elapsed = self.elapsed_before + time.perf_counter() - t_start
        return TrainResult(self.run_dir, self.step, sum(recent) / max(len(recent), 1), val_loss, _median(rates),
                           elapsed, self.ckpt_path, _median(cpu_rates))


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else float("nan")


def model_from_run(run_dir: str | Path, device: str = "cpu") -> tuple[MoETransformer, RunConfig, dict[str, Any]]:
    """Rebuild the trained model of a run folder from its checkpoint (eval mode)."""
    ckpt = load_checkpoint(Path(run_dir) / CHECKPOINT_NAME, map_location=device)
    cfg = RunConfig.from_dict(ckpt["config"])
    model = MoETransformer(cfg.model)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg, ckpt


__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "ParallelHooks", "LocalHooks", "lr_at", "build_optimizer",
           "resolve_device", "model_from_run"]
