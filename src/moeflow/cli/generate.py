"""`moeflow generate`: continue a prompt with a trained run's model (sampling, with or without the KV cache)."""

from __future__ import annotations

import argparse
import codecs
import os
import sys
import time

import torch

from moeflow.cli.args import NON_NEGATIVE, POSITIVE, THREADS, float_in
from moeflow.cli.runs import require_run
from moeflow.config import ConfigError
from moeflow.models import generate
from moeflow.models.generate import decode_is_serial
from moeflow.train.lm import model_from_run
from moeflow.train.trainer import resolve_device


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `generate` subcommand."""
    p = sub.add_parser("generate", help="sample text from a trained run")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run folder made by `moeflow train`")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=200,
                   help="bytes to generate (default 200); past the model's max_seq_len the oldest context slides out")
    p.add_argument("--temperature", type=float_in(0.0, note=", 0 = greedy"), default=0.8,
                   help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=NON_NEGATIVE, default=0, help="keep the k most likely bytes (0 = off)")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, low_open=True, note=", 1 = off"), default=1.0,
                   help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="sampling seed (default 0)")
    p.add_argument("--no-cache", action="store_true", help="re-run the whole prefix every step (no KV cache)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    p.add_argument("--threads", type=THREADS, default=None,
                   help="torch CPU threads (default: 1 where a cached decode step is small, else the run's "
                        "train.threads)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the run's model, sample, print prompt + continuation (speed on stderr)."""
    try:
        # argv holds undecodable bytes as surrogates (PEP 383): a byte-level model can take them back as bytes
        ids = list(os.fsencode(args.prompt))
    except UnicodeEncodeError:
        raise ConfigError("--prompt holds characters that are not valid text (lone surrogates); pass UTF-8 "
                          "text") from None
    if not ids:
        raise ConfigError("--prompt is empty; give at least one character")
    require_run(args.run, "lm", "moeflow generate")
    device = resolve_device(args.device)
    model, cfg, ckpt = model_from_run(args.run, device=str(device))
    threads = args.threads
    if threads is None:
        # small cached decode steps are faster on one thread (decode_is_serial); else the run's own count
        threads = 1 if device.type == "cpu" and not args.no_cache and decode_is_serial(model, 1) \
            else cfg.train.threads
    if threads:
        torch.set_num_threads(threads)
    if cfg.model.vocab_size < 256:
        raise ConfigError(f"this model's vocabulary ({cfg.model.vocab_size}) is not byte-level; generate needs 256")
    limit = cfg.model.max_seq_len
    if len(ids) + args.max_new_tokens > limit:
        print(f"note: prompt ({len(ids)}) + new tokens ({args.max_new_tokens}) exceed the model's context "
              f"(max_seq_len={limit}); the oldest tokens slide out of it (the newest {max(1, limit // 2)} are kept "
              "each time it fills)", file=sys.stderr)
    prompt = torch.tensor([ids], device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    # stream the continuation as it is sampled (a long run shows progress, and an interrupt keeps what was shown);
    # the incremental decoder waits for the rest of a multi-byte character and replaces invalid bytes like decode()
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(utf8.decode(bytes(ids)))

    def show(token: torch.Tensor) -> None:
        sys.stdout.write(utf8.decode(bytes([int(token[0])])))
        sys.stdout.flush()

    t0 = time.perf_counter()
    try:
        out = generate(model, prompt, args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k or None, top_p=args.top_p if args.top_p < 1.0 else None,
                       use_cache=not args.no_cache, generator=gen, slide=True, on_token=show)
    finally:
        print(utf8.decode(b"", final=True))
    dt = time.perf_counter() - t0
    new = out.shape[1] - len(ids)
    print(f"[{new} bytes in {dt:.2f} s = {new / max(dt, 1e-9):,.0f} bytes/s, step {ckpt['step']}, "
          f"{'no ' if args.no_cache else ''}KV cache]", file=sys.stderr)
    return 0
