"""Hugging Face interop benchmarks.

  python benchmarks/hf.py moe  [--tokens 1024 --d-model 512 --d-hidden 1792 --experts 8 --top-k 2 --reps 7 --threads 1
                                --device cpu --dtype float32]
      forward+backward of one transformers MixtralSparseMoeBlock, unpatched with each experts implementation
      transformers offers (config._experts_implementation: eager, grouped_mm, batched_mm), and patched by
      moeflow.patch_hf (same weights). Variants run round-robin so machine load hits them alike; medians.
  python benchmarks/hf.py rss  [--size-mb 256]
      peak resident memory of moeflow.load_hf on a Mixtral-like checkpoint of that size, in a fresh process,
      against the naive load (safetensors.load_file + load_state_dict into an initialised model).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


# ------------------------------------------------------------------------------------------------ block timing
def _mixtral_block(d: int, h: int, e: int, k: int, seed: int = 0) -> nn.Module:
    """A bare, initialised transformers MixtralSparseMoeBlock."""
    import transformers as tf
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = tf.MixtralConfig(hidden_size=d, intermediate_size=h, num_local_experts=e, num_experts_per_tok=k)
    torch.manual_seed(seed)
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.normal_(0, d ** -0.5)
        block.experts.gate_up_proj.normal_(0, d ** -0.5)
        block.experts.down_proj.normal_(0, h ** -0.5)
    return block


def _step(block: nn.Module, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """One forward+backward; (seconds, output)."""
    block.zero_grad(set_to_none=True)
    x.grad = None
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    y = block(x)
    y.float().square().mean().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, y.detach().float()


def _gemm_floor(tokens: int, d: int, h: int, e: int, k: int, device: str, dtype: torch.dtype) -> Callable[[], float]:
    """A timer for only the expert GEMMs of one fwd+bwd (tokens*k/e rows per expert, no routing, no activation).

    Every correct implementation must run these six matmuls per expert, so 1 / this time bounds any speed-up.
    """
    rows = tokens * k // e
    gen = torch.Generator().manual_seed(2)
    x, g = (torch.randn(rows, d, generator=gen).to(device, dtype) for _ in range(2))
    a, grad_h = torch.randn(rows, h, generator=gen).to(device, dtype), torch.randn(rows, 2 * h, generator=gen).to(
        device, dtype)
    w_in, w_out = torch.randn(2 * h, d).to(device, dtype), torch.randn(d, h).to(device, dtype)
    h_in, y, grad_a = torch.empty(rows, 2 * h).to(device, dtype), torch.empty_like(x), torch.empty_like(a)
    gw_in, gw_out, gx = torch.empty_like(w_in), torch.empty_like(w_out), torch.empty_like(x)

    def step() -> float:
        """Seconds for e experts' six GEMMs."""
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(e):
            torch.mm(x, w_in.t(), out=h_in)  # forward: input projection (gate and up)
            torch.mm(a, w_out.t(), out=y)  # forward: output projection
            torch.mm(g, w_out, out=grad_a)  # backward: d activation
            torch.mm(g.t(), a, out=gw_out)  # backward: d w_out
            torch.mm(grad_h.t(), x, out=gw_in)  # backward: d w_in
            torch.mm(grad_h, w_in, out=gx)  # backward: d x
        if x.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return step


def bench_moe(args: argparse.Namespace) -> None:
    """Print the timing table."""
    import moeflow

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    base = _mixtral_block(args.d_model, args.d_hidden, args.experts, args.top_k).to(args.device, dtype)
    variants: dict[str, nn.Module] = {}
    for impl in ("eager", "grouped_mm", "batched_mm"):
        gathered = args.tokens * args.top_k * 3 * args.d_model * args.d_hidden * 4  # batched_mm copies weights per token
        if impl == "batched_mm" and gathered > args.max_gather_gb * 2**30:
            print(f"(skipping transformers batched_mm: it would gather {gathered / 2**30:.1f} GiB of expert weights "
                  f"per step; raise --max-gather-gb to run it)")
            continue
        b = copy.deepcopy(base)
        b.experts.config = copy.deepcopy(b.experts.config)
        b.experts.config._experts_implementation = impl
        variants[f"transformers {impl}"] = b
    holder = nn.ModuleDict({"moe": copy.deepcopy(base)})
    variants["moeflow patch_hf"] = moeflow.patch_hf(holder)["moe"]
    x = torch.randn(1, args.tokens, args.d_model, generator=torch.Generator().manual_seed(1))
    x = x.to(args.device, dtype).requires_grad_(True)
    floor = _gemm_floor(args.tokens, args.d_model, args.d_hidden, args.experts, args.top_k, args.device, dtype)
    times: dict[str, list[float]] = {name: [] for name in variants}
    floor_times: list[float] = []
    outputs: dict[str, torch.Tensor] = {}
    errors: dict[str, str] = {}
    for rep in range(args.reps + 1):  # rep 0 is warm-up
        dt = floor()
        if rep:
            floor_times.append(dt)
        for name, block in variants.items():
            if name in errors:
                continue
            try:
                dt, y = _step(block, x)
            except Exception as exc:  # an implementation without a CPU kernel or backward: report, go on
                errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
                continue
            if rep:
                times[name].append(dt)
            outputs.setdefault(name, y)
    ref = outputs["transformers eager"]
    unpatched = [statistics.median(times[n]) for n in times if n.startswith("transformers") and times[n]]
    best = min(unpatched)
    where = (torch.cuda.get_device_name() if x.is_cuda else f"CPU, {torch.get_num_threads()} threads")
    print(f"MixtralSparseMoeBlock fwd+bwd, T={args.tokens} D={args.d_model} H={args.d_hidden} E={args.experts} "
          f"k={args.top_k}, {args.dtype}, {where}, torch {torch.__version__}, median of {args.reps}")
    floor_med = statistics.median(floor_times)
    print(f"{'implementation':<26}{'median ms':>11}{'min ms':>9}{'speedup vs best HF':>20}{'max|y-eager|':>14}"
          f"{'GEMM floor / time':>19}")
    for name in variants:
        if name in errors:
            print(f"{name:<26}{'failed':>11}   {errors[name]}")
            continue
        med = statistics.median(times[name])
        diff = (outputs[name] - ref).abs().max().item()
        print(f"{name:<26}{med * 1e3:>11.1f}{min(times[name]) * 1e3:>9.1f}{best / med:>19.2f}x{diff:>14.1e}"
              f"{floor_med / med:>18.0%}")
    print(f"{'expert GEMMs only (floor)':<26}{floor_med * 1e3:>11.1f}{min(floor_times) * 1e3:>9.1f}"
          f"{best / floor_med:>19.2f}x{'-':>14}{'100%':>18}")
    print(f"(the floor row runs only the six matmuls per expert that any implementation needs, on T*k/E rows each: "
          f"no implementation can beat the best transformers option by more than {best / floor_med:.2f}x here)")


# ------------------------------------------------------------------------------------------------ peak memory
_CHILD = r"""
import json, resource, sys, time
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) / 1024
    return out
import torch, moeflow
from moeflow.interop.hf import load_hf
mode, folder = sys.argv[1], sys.argv[2]
base = status()["VmRSS"]
t0 = time.perf_counter()
if mode == "moeflow":
    model = load_hf(folder)
else:
    from safetensors.torch import load_file
    from moeflow.interop.hf_config import build_model, config_from_hf
    from moeflow.interop.rules import plan, slot_view, unique_state
    arch, cfg = config_from_hf(json.load(open(folder + "/config.json")))
    model = build_model(arch, cfg)                 # initialised parameters: one copy
    state = load_file(folder + "/model.safetensors")  # the whole checkpoint: a second copy
    params = unique_state(model)
    with torch.no_grad():
        for key, slot in plan(model, arch).items():
            slot_view(params[slot.name], slot).copy_(state[key])
s = status()
print(json.dumps({"base_mb": base, "peak_mb": s["VmHWM"], "after_mb": s["VmRSS"], "anon_mb": s["RssAnon"],
                  "seconds": time.perf_counter() - t0}))
"""


def bench_rss(args: argparse.Namespace) -> None:
    """Write a checkpoint of about --size-mb, then load it in fresh processes and print peak RSS."""
    from moeflow import MoEConfig
    from moeflow.interop import save_hf
    from moeflow.models import ModelConfig, MoETransformer

    d, h, e = 512, 1024, 8
    per_layer = e * 3 * d * h + 4 * d * d  # experts + attention (n_kv_heads = n_heads)
    layers = max(1, round(args.size_mb * 2**20 / 4 / per_layer))
    cfg = ModelConfig(vocab_size=1024, d_model=d, n_layers=layers, n_heads=8, n_kv_heads=8, max_seq_len=128,
                      moe=MoEConfig(d_model=d, d_hidden=h, num_experts=e, top_k=2))
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(MoETransformer(cfg), tmp)
        size_mb = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors")) / 2**20
        print(f"checkpoint: Mixtral-like, {layers} layers x {e} experts, {size_mb:.0f} MB on disk (fp32)")
        print(f"{'loader':<34}{'peak RSS - base':>16}{'x checkpoint':>14}{'seconds':>9}")
        for mode in ("moeflow", "naive"):
            out = subprocess.run([sys.executable, "-c", _CHILD, mode, tmp], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            extra = r["peak_mb"] - r["base_mb"]
            name = "moeflow.load_hf (streaming)" if mode == "moeflow" else "load_file + copy into built model"
            print(f"{name:<34}{extra:>13.0f} MB{extra / size_mb:>13.2f}x{r['seconds']:>9.2f}")


def main() -> None:
    """Parse the subcommand and run it."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("moe")
    m.add_argument("--tokens", type=int, default=1024)
    m.add_argument("--d-model", type=int, default=512)
    m.add_argument("--d-hidden", type=int, default=1792)
    m.add_argument("--experts", type=int, default=8)
    m.add_argument("--top-k", type=int, default=2)
    m.add_argument("--reps", type=int, default=7)
    m.add_argument("--max-gather-gb", type=float, default=2.0, help="skip batched_mm above this much weight copying")
    m.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (default 1: on a shared, loaded CPU more threads mostly measure waiting; "
                        "0 keeps torch's default)")
    m.add_argument("--device", default="cpu")
    m.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    r = sub.add_parser("rss")
    r.add_argument("--size-mb", type=float, default=256)
    args = p.parse_args()
    bench_moe(args) if args.what == "moe" else bench_rss(args)


if __name__ == "__main__":
    main()
