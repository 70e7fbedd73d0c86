"""`moeflow eval`: validation loss and bits per byte of a trained run."""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch
import torch.nn.functional as F

from moeflow.cli.args import POSITIVE, THREADS
from moeflow.cli.runs import require_run
from moeflow.train.data import DataError, eval_batches, load_corpus
from moeflow.train.lm import model_from_run
from moeflow.train.trainer import resolve_device


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `eval` subcommand."""
    p = sub.add_parser("eval", help="validation loss and bits per byte of a trained run")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run folder made by `moeflow train`")
    p.add_argument("--batches", type=POSITIVE, default=None,
                   help="validation batches (default: the run's eval_batches; at most what the split holds)")
    p.add_argument("--split", choices=("val", "train"), default="val", help="which split to score (default val)")
    p.add_argument("--data", metavar="PATH", help="score other data instead of the run's own (same formats as train)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    p.add_argument("--threads", type=THREADS, default=None,
                   help="torch CPU threads (default: the run's train.threads)")
    p.set_defaults(func=run)


@torch.no_grad()
def evaluate_run(run_dir: str, batches: int | None = None, split: str = "val", data: str | None = None,
                 device: str = "cpu", threads: int | None = None) -> tuple[float, int, int]:
    """(mean loss in nats per token, tokens scored, step of the checkpoint).

    `batches` beyond the split's non-overlapping windows (at least one batch) are capped: more would only score
    the same tokens again.
    """
    dev = resolve_device(device)
    model, cfg, ckpt = model_from_run(run_dir, device=str(dev))
    threads = cfg.train.threads if threads is None else threads
    if threads:
        torch.set_num_threads(threads)
    corpus = load_corpus(cfg.data if data is None else dataclasses.replace(cfg.data, path=data))
    if corpus.max_token >= cfg.model.vocab_size:
        raise DataError(f"{corpus.source}: token id {corpus.max_token} is outside the model's vocabulary "
                        f"({cfg.model.vocab_size})")
    tokens = corpus.val if split == "val" else corpus.train
    windows = max(1, (len(tokens) - 1) // cfg.train.seq_len)
    n = min(batches or cfg.train.eval_batches, max(1, windows // cfg.train.batch_size))
    total, count = 0.0, 0
    for x, y in eval_batches(tokens, n, cfg.train.batch_size, cfg.train.seq_len):
        logits = model(x.to(dev))
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), y.to(dev).flatten(), reduction="sum"))
        count += y.numel()
    return total / count, count, int(ckpt["step"])


def run(args: argparse.Namespace) -> int:
    """Print loss (nats/byte) and bits per byte."""
    require_run(args.run, "lm", "moeflow eval")
    loss, count, step = evaluate_run(args.run, args.batches, args.split, args.data, args.device, args.threads)
    print(f"{args.run} (step {step}), {args.split} split, {count:,} tokens: loss {loss:.4f} nats/byte, "
          f"{loss / math.log(2):.4f} bits per byte")
    return 0
