"""`moeflow demo`: build one MoE layer per router, run it on random tokens, print routing statistics."""

from __future__ import annotations

import argparse
import time

import torch

from moeflow.cli.args import NON_NEGATIVE, POSITIVE, float_in, int_at_least
from moeflow.config import MoEConfig
from moeflow.layers import MoELayer
from moeflow.routing import ROUTERS


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `demo` subcommand."""
    p = sub.add_parser("demo", help="run one MoE layer per router and print routing statistics")
    p.add_argument("--tokens", type=POSITIVE, default=2048, help="tokens per batch (default 2048)")
    p.add_argument("--d-model", type=POSITIVE, default=256)
    p.add_argument("--d-hidden", type=POSITIVE, default=512)
    p.add_argument("--experts", type=int_at_least(2, " (the top-2 routers need two)"), default=8)
    p.add_argument("--capacity-factor", type=float_in(0.0, low_open=True), default=1.25,
                   help="for switch/gshard (default 1.25)")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print one line of statistics per router."""
    torch.manual_seed(args.seed)
    x = torch.randn(args.tokens, args.d_model)
    print(f"{'router':<14}{'k':>3}{'cap':>6}{'fwd+bwd ms':>12}{'dropped':>9}{'entropy':>9}{'aux':>9}  tokens/expert")
    for name in ROUTERS:
        k = 1 if name == "switch" else 2
        cf = args.capacity_factor if name in ("switch", "gshard") else None
        cfg = MoEConfig(d_model=args.d_model, d_hidden=args.d_hidden, num_experts=args.experts, top_k=k,
                        router=name, capacity_factor=cf)
        layer = MoELayer(cfg)
        xi = x.clone().requires_grad_(True)
        t0 = time.perf_counter()
        y = layer(xi)
        (y.square().mean() + layer.aux_loss).backward()
        ms = (time.perf_counter() - t0) * 1e3
        r = layer.last_routing
        cap = "-" if r.capacity is None else str(r.capacity)
        print(f"{name:<14}{k:>3}{cap:>6}{ms:>12.1f}{float(r.dropped_fraction):>9.3f}{float(r.entropy):>9.3f}"
              f"{float(r.aux_loss.detach()):>9.4f}  {r.tokens_per_expert.tolist()}")
    return 0
