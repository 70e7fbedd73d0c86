"""Benchmark moeflow's MoELayer on CPU against a dense-equivalent FFN and a naive per-expert loop MoE.

For each config it prints the median forward and forward+backward times (fp32, training mode, autograd on),
their ratios to (a) `dense`: one SwiGLU FFN with hidden H over the T*k rows of x repeated k times (the same expert
FLOPs with no routing) and (b) `naive`: a Hugging Face v4 Mixtral-style loop (per expert: torch.where on the
routing mask, gather, FFN, index_add), all timed interleaved in the same run. Peak memory is the rise of the
resident set during one forward+backward step, measured in a fresh subprocess per config (`--no-memory` skips it),
plus the MoE's peak at T and 2T to show that it grows linearly in T (no [T, E, C] tensor). The `gemms` row times only
the six matmuls per expert (equal row blocks, on moeflow's expert pool): what any grouped-expert layer must run.

    python benchmarks/layer.py                      # configs A-D, 10 repeats, 2 threads
    python benchmarks/layer.py --configs A,B --repeats 20 --impls auto,bmm
    python benchmarks/layer.py --quick              # tiny sizes (the smoke test)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

# NOTE: set before torch loads OpenMP. With the default (active) policy a thread that reaches a barrier spins,
# and on a shared CPU the sibling it waits for may be descheduled: every parallel region then costs a time
# slice. Measured on config B, 2 threads, 3 other busy processes: MoE fwd+bwd 5.3 s active vs 0.27 s passive
# (dense 0.28 s vs 0.18 s). Passive waits add microseconds per region on an idle machine; override by
# exporting OMP_WAIT_POLICY=ACTIVE.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from moeflow import MoEConfig, MoELayer  # noqa: E402
from moeflow.ops.grouped_mlp import GradBuffers  # noqa: E402
from moeflow.ops.threads import WorkerPool  # noqa: E402

_POOL = WorkerPool()  # the gemms floor runs on a pool like the experts' own (as many workers as threads)


@dataclass(frozen=True)
class Shape:
    """One benchmark configuration."""

    tokens: int
    d_model: int
    d_hidden: int
    num_experts: int
    top_k: int
    router: str = "topk"
    capacity_factor: float | None = None

    def moe_config(self, impl: str) -> MoEConfig:
        """The MoELayer config for this shape."""
        return MoEConfig(d_model=self.d_model, d_hidden=self.d_hidden, num_experts=self.num_experts,
                         top_k=self.top_k, router=self.router, capacity_factor=self.capacity_factor,
                         expert_impl=impl)

    def describe(self) -> str:
        """A short human-readable summary."""
        cf = "" if self.capacity_factor is None else f" cf={self.capacity_factor}"
        return (f"T={self.tokens} D={self.d_model} H={self.d_hidden} E={self.num_experts} k={self.top_k} "
                f"{self.router}{cf}")


CONFIGS = {
    "A": Shape(4096, 512, 1024, 8, 2),
    "B": Shape(4096, 512, 256, 64, 2),
    "C": Shape(8192, 256, 512, 32, 1, router="switch", capacity_factor=1.25),
    "D": Shape(1024, 1024, 2816, 8, 2),
}
QUICK = {
    "A": Shape(128, 32, 64, 8, 2),
    "B": Shape(128, 32, 16, 16, 2),
    "C": Shape(256, 16, 32, 8, 1, router="switch", capacity_factor=1.25),
    "D": Shape(64, 64, 96, 4, 2),
}


class DenseEquivalent(nn.Module):
    """One SwiGLU FFN over T*k rows (x repeated k times, built once outside the timed region): no routing."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        """Weights shaped like one expert."""
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(2 * d_hidden, d_model) / d_model ** 0.5)
        self.w_out = nn.Parameter(torch.randn(d_model, d_hidden) / d_hidden ** 0.5)

    def forward(self, x_ND: Tensor) -> Tensor:
        """Plain PyTorch SwiGLU: the reference every MoE implementation is compared with."""
        gate, up = F.linear(x_ND, self.w_in).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w_out)


class NaiveLoopMoE(nn.Module):
    """Hugging Face v4 Mixtral-style MoE: an nn.ModuleList of experts and a Python loop with torch.where.

    Copies its weights from a MoELayer so both compute the same function. For capacity-limited routing it
    keeps the first `capacity` tokens of each expert in position order (Switch Transformers' cumsum mask).
    `aux_loss` holds the router losses of the last forward, as in MoELayer.
    """

    def __init__(self, layer: MoELayer) -> None:
        """Unstack the layer's router and expert weights into per-expert modules."""
        super().__init__()
        cfg = layer.cfg
        self.cfg = cfg
        self.gate = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(DenseEquivalent(cfg.d_model, cfg.d_hidden) for _ in range(cfg.num_experts))
        with torch.no_grad():
            self.gate.weight.copy_(layer.router.weight)
            for e, expert in enumerate(self.experts):
                expert.w_in.copy_(layer.experts.w_in[e])
                expert.w_out.copy_(layer.experts.w_out[e])

    def forward(self, x_TD: Tensor) -> Tensor:
        """Route, then loop over the experts that received tokens."""
        cfg = self.cfg
        gate_in = x_TD
        if self.training and cfg.jitter_eps:
            gate_in = x_TD * torch.empty_like(x_TD).uniform_(1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps)
        logits_TE = self.gate(gate_in).float()
        probs_TE = torch.softmax(logits_TE, dim=-1)
        weights_TK, experts_TK = torch.topk(probs_TE, cfg.top_k, dim=-1)
        if cfg.normalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        mask_TKE = F.one_hot(experts_TK, cfg.num_experts)
        # the router losses HF adds in training (load balance; Switch also z-loss), as MoELayer computes them
        f_E = mask_TKE.sum((0, 1)) / mask_TKE.shape[0] / cfg.top_k
        self.aux_loss = cfg.aux_loss_coef * cfg.num_experts * (f_E * probs_TE.mean(0)).sum()
        if cfg.z_loss_coef:
            self.aux_loss = self.aux_loss + cfg.z_loss_coef * torch.logsumexp(logits_TE, -1).square().mean()
        capacity = cfg.capacity(x_TD.shape[0])
        if capacity is not None:  # position = running count per expert: the same drops as moeflow for top-1 only
            if cfg.top_k != 1:
                raise ValueError("NaiveLoopMoE models capacity for top-1 routing only")
            mask_TKE = mask_TKE * (mask_TKE.cumsum(0) <= capacity)
        mask_EKT = mask_TKE.permute(2, 1, 0)
        out_TD = torch.zeros_like(x_TD)
        for e in torch.nonzero(mask_EKT.sum((1, 2))).flatten().tolist():
            slot, token = torch.where(mask_EKT[e])
            y = self.experts[e](x_TD[token]) * weights_TK[token, slot, None]
            out_TD.index_add_(0, token, y.to(x_TD.dtype))
        return out_TD


class _GemmsOnly(torch.autograd.Function):
    """The six matmuls per expert of a SwiGLU MoE's fwd+bwd, on equal row blocks, spread over the expert pool as
    moeflow runs them; nothing else (no routing, activation, gather or combine). Its gradients are not meaningful:
    the forward's pre-activation stands in for d(pre-activation) so that every GEMM sees real-valued operands."""

    @staticmethod
    def forward(ctx, x_RD: Tensor, w_in: Tensor, w_out: Tensor,  # type: ignore[override]
                grad_buffers: GradBuffers) -> Tensor:
        """Per expert: h = x W_in^T, y = h[:, :H] W_out^T."""
        e, hid = w_in.shape[0], w_out.shape[2]
        bounds = [x_RD.shape[0] * i // e for i in range(e + 1)]
        h_RF = x_RD.new_empty(x_RD.shape[0], w_in.shape[1])
        y_RD = torch.empty_like(x_RD)

        def expert(i: int) -> None:
            rows = slice(bounds[i], bounds[i + 1])
            torch.mm(x_RD[rows], w_in[i].t(), out=h_RF[rows])
            torch.mm(h_RF[rows, :hid], w_out[i].t(), out=y_RD[rows])

        _POOL.run(expert, [bounds[i + 1] - bounds[i] for i in range(e)])
        ctx.save_for_backward(x_RD, w_in, w_out, h_RF)
        ctx.bounds, ctx.grad_buffers = bounds, grad_buffers
        return y_RD

    @staticmethod
    def backward(ctx, g_RD: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:  # type: ignore[override]
        """Per expert: d a, d W_out, d W_in, d x."""
        x_RD, w_in, w_out, h_RF = ctx.saved_tensors
        bounds, hid = ctx.bounds, w_out.shape[2]
        g_RD = g_RD.contiguous()
        ga_RH, gx_RD = x_RD.new_empty(x_RD.shape[0], hid), torch.empty_like(x_RD)
        # the weight-gradient memory is reused across steps, as moeflow's experts do (fresh 100 MB would fault in)
        gw_in = ctx.grad_buffers.empty_like("w_in", w_in)
        gw_out = ctx.grad_buffers.empty_like("w_out", w_out)

        def expert(i: int) -> None:
            rows = slice(bounds[i], bounds[i + 1])
            torch.mm(g_RD[rows], w_out[i], out=ga_RH[rows])
            torch.mm(g_RD[rows].t(), h_RF[rows, :hid], out=gw_out[i])
            torch.mm(h_RF[rows].t(), x_RD[rows], out=gw_in[i])
            torch.mm(h_RF[rows], w_in[i], out=gx_RD[rows])

        _POOL.run(expert, [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)])
        return gx_RD, gw_in, gw_out, None


class ExpertGemmsOnly(nn.Module):
    """The floor row: only the expert GEMMs every grouped-expert implementation must run (see _GemmsOnly)."""

    def __init__(self, num_experts: int, d_model: int, d_hidden: int) -> None:
        """Stacked weights shaped like MoELayer's experts."""
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(num_experts, 2 * d_hidden, d_model) / d_model ** 0.5)
        self.w_out = nn.Parameter(torch.randn(num_experts, d_model, d_hidden) / d_hidden ** 0.5)
        self.grad_buffers = GradBuffers()

    def forward(self, x_RD: Tensor) -> Tensor:
        """[T*k, D] -> [T*k, D] through the expert GEMMs alone."""
        return _GemmsOnly.apply(x_RD, self.w_in, self.w_out, self.grad_buffers)


def build(shape: Shape, impls: list[str], tokens: int, seed: int = 0) -> dict[str, tuple[nn.Module, Tensor]]:
    """Modules and their leaf inputs, keyed by impl name: dense, naive and one MoELayer per expert impl."""
    torch.manual_seed(seed)
    x_TD = torch.randn(tokens, shape.d_model)
    out: dict[str, tuple[nn.Module, Tensor]] = {}
    out["dense"] = (DenseEquivalent(shape.d_model, shape.d_hidden), x_TD.repeat(shape.top_k, 1))
    layers = {}
    for impl in impls:
        torch.manual_seed(seed + 1)
        layers[impl] = MoELayer(shape.moe_config(impl))
        out[f"moe[{impl}]"] = (layers[impl], x_TD.clone())
    out["naive"] = (NaiveLoopMoE(layers[impls[0]]), x_TD.clone())
    out["gemms"] = (ExpertGemmsOnly(shape.num_experts, shape.d_model, shape.d_hidden), x_TD.repeat(shape.top_k, 1))
    return out


def step(module: nn.Module, x: Tensor, clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """One training step's forward and forward+backward times in seconds (grads reset first)."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    t0 = clock()
    y = module(x)
    t1 = clock()
    # a fixed-pattern output gradient; the MoE layers also backpropagate their router losses
    loss = (y * torch.linspace(-1.0, 1.0, y.shape[-1])).sum()
    if isinstance(module, (MoELayer, NaiveLoopMoE)):
        loss = loss + module.aux_loss
    loss.backward()
    t2 = clock()
    return t1 - t0, t2 - t0


def check_outputs(models: dict[str, tuple[nn.Module, Tensor]]) -> float:
    """Largest |moe - naive| of outputs and aux losses over the MoE impls (eval mode, so no router jitter):
    both compute the same function, so the timings compare like with like."""
    naive, x = models["naive"]
    naive.eval()
    worst = 0.0
    with torch.no_grad():
        ref = naive(x)
        for name, (module, _) in models.items():
            if name.startswith("moe"):
                module.eval()
                worst = max(worst, (module(x) - ref).abs().max().item(),
                            (module.aux_loss - naive.aux_loss).abs().item())
                module.train()
    naive.train()
    return worst


def time_config(shape: Shape, impls: list[str], repeats: int, clock: Callable[[], float],
                warmup: int = 2) -> tuple[dict, float]:
    """Median (fwd, fwd+bwd) seconds per impl, all impls interleaved within each repeat."""
    models = build(shape, impls, shape.tokens)
    err = check_outputs(models)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    names = list(models)
    for r in range(warmup + repeats):
        # rotate the order: each impl inherits the allocator state (heap size, mapped pages) of the one before
        for name in names[r % len(names):] + names[:r % len(names)]:
            module, x = models[name]
            t = step(module, x, clock)
            if r >= warmup:
                samples[name].append(t)
    med = {name: (statistics.median(s[0] for s in ts), statistics.median(s[1] for s in ts))
           for name, ts in samples.items()}
    return med, err


def _rss_kb(field: str) -> int:
    """A VmRSS/VmHWM line of /proc/self/status, in kB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def peak_step_mb(module: nn.Module, x: Tensor) -> float:
    """Rise of the resident set during one forward+backward step, in MB (after a warm-up step)."""
    step(module, x)
    module.zero_grad(set_to_none=True)
    if isinstance(module, MoELayer):
        # count the weight gradients as the other impls do: they are allocated inside the measured step
        module.experts.grad_buffers.clear()
    gc.collect()
    # return freed heap pages to the OS and reset the high-water mark, so earlier steps do not hide this one
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_kb("VmRSS")
    step(module, x)
    return (_rss_kb("VmHWM") - base) / 1024


def memory_probe(shape: Shape, impls: list[str]) -> dict[str, float]:
    """Peak MB per impl at T, and of each MoE impl at 2T (run in a fresh subprocess per config)."""
    models = build(shape, impls, shape.tokens)
    peaks = {name: peak_step_mb(module, x) for name, (module, x) in models.items() if name != "gemms"}
    del models
    big = build(shape, impls, 2 * shape.tokens)
    for name, (module, x) in big.items():
        if name.startswith("moe"):
            peaks[name + "@2T"] = peak_step_mb(module, x)
    return peaks


def dispatch_mask_mb(shape: Shape, tokens: int) -> float:
    """Size of the [T, E, C] one-hot dispatch tensor of GShard-style dense dispatch (what this design avoids)."""
    capacity = math.ceil((shape.capacity_factor or 1.0) * shape.top_k * tokens / shape.num_experts)
    return tokens * shape.num_experts * capacity * 4 / 2**20


def measure_memory(names: list[str], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Run `memory_probe` for each config in a fresh interpreter (clean heap) and parse its JSON line.

    --quick probes all its tiny configs in one interpreter (the smoke test's time goes to imports, not probes).
    """
    out: dict[str, dict[str, float]] = {}
    for group in [names] if args.quick else [[n] for n in names]:
        cmd = [sys.executable, __file__, "--memory-probe", ",".join(group), "--threads", str(args.threads),
               "--impls", args.impls] + (["--quick"] if args.quick else [])
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"memory probe for configs {group} failed:\n{res.stderr}")
        out.update(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def _ms(seconds: float) -> str:
    """Milliseconds with one decimal, or three below 1 ms (--quick sizes would otherwise print 0.0)."""
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms >= 1.0 else f"{ms:.3f}"


def main(argv: list[str] | None = None) -> int:
    """Parse flags, time every config, print the tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="A,B,C,D", help="comma-separated subset of " + ",".join(CONFIGS))
    p.add_argument("--repeats", type=int, default=10, help="timed steps per impl (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--impls", default="auto", help="MoELayer expert_impl values to time, e.g. auto,loop,bmm")
    p.add_argument("--quick", action="store_true", help="tiny shapes and 3 repeats (smoke test)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: perf_counter; cpu: process CPU time of all threads (steadier on a shared machine)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-probe", metavar="CONFIGS", help=argparse.SUPPRESS)  # internal: the subprocess side
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = QUICK if args.quick else CONFIGS
    impls = [s for s in args.impls.split(",") if s]
    names = [s for s in args.configs.split(",") if s]
    probe = [s for s in (args.memory_probe or "").split(",") if s]
    unknown = [n for n in names + probe if n not in table]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {','.join(table)}")
    if probe:
        print(json.dumps({name: memory_probe(table[name], impls) for name in probe}))
        return 0
    repeats = min(args.repeats, 3) if args.quick else args.repeats
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    memory = {} if args.no_memory else measure_memory(names, args)
    print(f"torch {torch.__version__}, fp32, CPU, {args.threads} threads, OMP_WAIT_POLICY="
          f"{os.environ['OMP_WAIT_POLICY']}, {args.clock} clock, median of {repeats} steps, times in ms; ratios are "
          "fwd+bwd (fwd) vs the row named")
    head = (f"{'cfg':<4}{'impl':<12}{'fwd ms':>9}{'fwd+bwd ms':>12}{'vs dense':>15}{'vs naive':>15}"
            f"{'peak MB':>10}")
    print(head)
    print("-" * len(head))
    scaling = []
    for name in names:
        shape = table[name]
        med, err = time_config(shape, impls, repeats, clock)
        mem = memory.get(name, {})
        for impl, (fwd, full) in med.items():
            vs_dense = f"{full / med['dense'][1]:.2f} ({fwd / med['dense'][0]:.2f})"
            vs_naive = f"{full / med['naive'][1]:.2f} ({fwd / med['naive'][0]:.2f})"
            peak = f"{mem[impl]:.0f}" if impl in mem else "-"
            print(f"{name:<4}{impl:<12}{_ms(fwd):>9}{_ms(full):>12}{vs_dense:>15}{vs_naive:>15}{peak:>10}")
        print(f"    {shape.describe()}; max |moe - naive| = {err:.1e}; gemms = the expert matmuls alone (a floor)")
        scaling += [(name, impl, mem[f"moe[{impl}]"], mem[f"moe[{impl}]@2T"]) for impl in impls if mem]
    if scaling:
        print("\nMoE peak step memory at T and 2T: linear in T (the weight gradients are a constant part);\n"
              "a GShard-style dense [T, E, C] fp32 dispatch mask alone (C at the config's cf, else 1.0) grows 4x")
        for name, impl, m1, m2 in scaling:
            ratio = f"{m2 / m1:.2f}" if m1 > 0 else "-"
            mask = [dispatch_mask_mb(table[name], t) for t in (table[name].tokens, 2 * table[name].tokens)]
            print(f"{name:<4}{'moe[' + impl + ']':<12}T: {m1:8.0f} MB   2T: {m2:8.0f} MB   ratio {ratio:>5}   "
                  f"[T, E, C] mask: {mask[0]:.0f} -> {mask[1]:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
