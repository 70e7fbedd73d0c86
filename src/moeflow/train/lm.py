"""The language-model task: next-byte prediction on a corpus with `MoETransformer` (what `moeflow train` runs).

    trainer = lm_trainer(get_preset("tiny"), "runs/x")     # LMTask + seeded model + Trainer
    result = trainer.run()
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeflow.compress.model import apply_layouts
from moeflow.models import MoETransformer
from moeflow.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from moeflow.train.config import RunConfig
from moeflow.train.data import BatchStream, Corpus, DataError, eval_batches, load_corpus
from moeflow.train.trainer import ParallelHooks, Trainer, TrainResult

LN2 = math.log(2.0)


class LMTask:
    """Random windows of a byte corpus, token-mean cross-entropy, validation on fixed held-out windows."""

    # the schedule may grow; divergence thresholds only judge the loss (and older runs lack them); recompute,
    # compilation and asynchronous saving do not change the numbers
    resumable = frozenset({"train.steps", "train.device", "train.log_every", "train.diverge_factor",
                           "train.diverge_window", "train.diverge_patience", "train.diverge_min_delta",
                           "train.activation_checkpointing", "train.compile", "train.async_checkpoint"})

    def __init__(self, cfg: RunConfig, corpus: Corpus | None = None) -> None:
        """Load the corpus (unless given) and check that its token ids fit the model's vocabulary."""
        self.cfg, self.train, self.device = cfg, cfg.train, cfg.train.device
        self.corpus = corpus if corpus is not None else load_corpus(cfg.data)
        if self.corpus.max_token >= cfg.model.vocab_size:
            raise DataError(f"{self.corpus.source}: token id {self.corpus.max_token} does not fit "
                            f"model.vocab_size={cfg.model.vocab_size}; --set model.vocab_size="
                            f"{self.corpus.max_token + 1} (or larger)")
        tc = cfg.train
        self.batches = BatchStream(self.corpus.train, tc.batch_size, tc.seq_len, tc.seed)
        self.val_batches = eval_batches(self.corpus.val, tc.eval_batches, tc.batch_size, tc.seq_len)

    def build_model(self) -> MoETransformer:
        """The model, initialised from the run seed (every rank builds the same one)."""
        torch.manual_seed(self.train.seed)
        return MoETransformer(self.cfg.model)

    def config_dict(self) -> dict[str, Any]:
        """The RunConfig as a dict."""
        return self.cfg.to_dict()

    def next_batch(self, rank: int, world: int) -> tuple[Tensor, Tensor]:
        """(inputs, targets) [B/world, S] of this rank."""
        return self.batches.next_batch(rank, world)

    def loss_tokens(self, batch: tuple[Tensor, Tensor]) -> int:
        """Target tokens of this rank's batch (the count its mean loss is over)."""
        return batch[1].numel()

    def tokens(self, batch: tuple[Tensor, Tensor]) -> int:
        """batch_size * seq_len (the global batch)."""
        return self.train.batch_size * self.train.seq_len

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Token-mean next-token cross-entropy (fp32 logits)."""
        dev = _device_of(model)
        x, y = batch[0].to(dev), batch[1].to(dev)
        logits = model(x)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), y.flatten()), {}

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Mean next-token loss over the fixed validation windows, in nats and bits per byte."""
        dev = _device_of(model)
        total = 0.0
        for x, y in self.val_batches:
            logits = model(x.to(dev))
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), y.to(dev).flatten()))
        val = total / len(self.val_batches)
        return {"val_loss": val, "val_bpb": val / LN2}

    def state_dict(self) -> dict[str, Any]:
        """The batch stream's generator."""
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the batch stream."""
        self.batches.load_state_dict(state)

    def report(self, model: nn.Module, result: TrainResult, run_dir: Path) -> dict[str, Any]:
        """summary.json (final numbers, read by the report and by compare) and report.md (curves, expert load)."""
        from moeflow.analysis.report import write_report

        cfg_path = run_dir / "config.json"
        preset = json.loads(cfg_path.read_text()).get("preset") if cfg_path.exists() else None
        summary = {"preset": preset, "step": result.step, "train_loss": result.train_loss,
                   "val_loss": result.val_loss, "val_bpb": result.val_bpb, "tokens_per_s": result.tokens_per_s,
                   "tokens_per_cpu_s": result.tokens_per_cpu_s, "elapsed_s": result.elapsed_s,
                   "data_source": self.corpus.source}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        summary["report"] = str(write_report(run_dir))
        return summary


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def lm_trainer(cfg: RunConfig, run_dir: str | Path, *, corpus: Corpus | None = None,
               hooks: ParallelHooks | None = None, **kwargs: Any) -> Trainer:
    """The Trainer for a language-model run: LMTask, the seeded MoETransformer, and the loop."""
    task = LMTask(cfg, corpus)
    return Trainer(task.build_model(), task, run_dir, hooks=hooks, **kwargs)


def model_from_run(run_dir: str | Path, device: str = "cpu") -> tuple[MoETransformer, RunConfig, dict[str, Any]]:
    """Rebuild the trained model of a run folder from its checkpoint (eval mode)."""
    ckpt = load_checkpoint(Path(run_dir) / CHECKPOINT_NAME, map_location=device)
    cfg = RunConfig.from_dict(ckpt["config"])
    model = MoETransformer(cfg.model)
    if ckpt.get("extra", {}).get("compression"):  # a `moeflow compress` run: its experts are CompressedExperts
        apply_layouts(model, ckpt["extra"]["compression"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg, ckpt


__all__ = ["LMTask", "lm_trainer", "model_from_run"]
