"""`moeflow generate`: continue a prompt with a trained run's model (sampling, with or without the KV cache)."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from moeflow.models import generate
from moeflow.train.checkpoint import CheckpointError
from moeflow.train.data import decode, encode
from moeflow.train.lm import model_from_run
from moeflow.train.trainer import resolve_device


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `generate` subcommand."""
    p = sub.add_parser("generate", help="sample text from a trained run")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run folder made by `moeflow train`")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="bytes to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely bytes (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--no-cache", action="store_true", help="re-run the whole prefix every step (no KV cache)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the run's train.threads)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the run's model, sample, print prompt + continuation (speed on stderr)."""
    try:
        device = resolve_device(args.device)
        model, cfg, ckpt = model_from_run(args.run, device=str(device))
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    threads = cfg.train.threads if args.threads is None else args.threads
    if threads:
        torch.set_num_threads(threads)
    ids = encode(args.prompt)
    if not ids:
        print("error: --prompt is empty; give at least one character", file=sys.stderr)
        return 2
    if cfg.model.vocab_size < 256:
        print(f"error: this model's vocabulary ({cfg.model.vocab_size}) is not byte-level; generate needs 256",
              file=sys.stderr)
        return 2
    prompt = torch.tensor([ids], device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.perf_counter()
    try:
        out = generate(model, prompt, args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k or None, top_p=args.top_p if args.top_p < 1.0 else None,
                       use_cache=not args.no_cache, generator=gen)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    new = out.shape[1] - len(ids)
    print(decode(out[0].tolist()))
    print(f"[{new} bytes in {dt:.2f} s = {new / max(dt, 1e-9):,.0f} bytes/s, step {ckpt['step']}, "
          f"{'no ' if args.no_cache else ''}KV cache]", file=sys.stderr)
    return 0
