"""Experts with stacked weights, applied with one grouped matmul per weight.

Shape legend: R = rows sorted by expert, D = model dim, H = expert hidden dim, F = input-projection width
(2H for gated activations: gate rows first, then up rows), E = experts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moeflow.config import GATED, MoEConfig
from moeflow.ops.grouped import grouped_linear, resolve_impl
from moeflow.ops.grouped_mlp import GradBuffers, activate, grouped_mlp
from moeflow.ops.rows import ExpertRows
from moeflow.ops.threads import WorkerPool


def _local(w: Tensor) -> Tensor:
    """This rank's rows of a weight: the local shard of an expert-parallel DTensor, else the tensor itself.

    NOTE: duck-typed (`to_local`) so this module never imports torch.distributed; under expert parallelism the
    weights are DTensors sharded Shard(0) over the EP mesh (moeflow.parallel.fsdp) and the all-to-all
    dispatcher has already brought this rank's experts their rows, so the math is the local one.
    """
    to_local = getattr(w, "to_local", None)
    return w if to_local is None else to_local()


class GroupedExperts(nn.Module):
    """E FFNs stored as `w_in` [E, F, D] and `w_out` [E, D, H], run on the rows an `ExpertRows` plan names.

    On CPU (the "loop" impl) the whole FFN runs fused and chunked per expert, on the experts' own pool of
    single-threaded workers (`pool`, sized by `MoEConfig.cpu_workers`); on CUDA bf16 (Hopper+) as two
    `torch._grouped_mm` calls around the activation.
    """

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, activation: str = "swiglu",
                 impl: str = "auto", cpu_workers: int | None = None) -> None:
        """Allocate and initialise the stacked weights."""
        super().__init__()
        self.num_experts, self.d_model, self.d_hidden = num_experts, d_model, d_hidden
        self.activation, self.impl = activation, impl
        f = 2 * d_hidden if activation in GATED else d_hidden
        self.w_in = nn.Parameter(torch.empty(num_experts, f, d_model))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_model, d_hidden))
        self.grad_buffers = GradBuffers()  # weight-gradient memory reused across steps (see GradBuffers)
        self.pool = WorkerPool(cpu_workers)
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: MoEConfig) -> "GroupedExperts":
        """Build from an MoEConfig."""
        return cls(cfg.num_experts, cfg.d_model, cfg.d_hidden, cfg.activation, cfg.expert_impl,
                   cfg.cpu_workers)

    def reset_parameters(self) -> None:
        """nn.Linear-like scale: std 1/sqrt(fan_in) per projection."""
        nn.init.normal_(self.w_in, std=1.0 / math.sqrt(self.d_model))
        nn.init.normal_(self.w_out, std=1.0 / math.sqrt(self.d_hidden))

    def forward(self, x: Tensor, rows: ExpertRows) -> Tensor:
        """Expert e on its `rows.splits[e]` rows: [T, D] -> [T, D] token sums if `rows.tokens`, else [R, D] rows.

        Each output row is scaled by `rows.weights_R` when the plan gives them (see ExpertRows).
        """
        w_in, w_out = _local(self.w_in), _local(self.w_out)
        impl = resolve_impl(x, w_in, self.impl)
        if impl == "loop":
            # fused and chunked: no [R, H] / [R, F] temporaries besides the saved pre-activation (see grouped_mlp)
            return grouped_mlp(x, w_in, w_out, rows.splits, self.activation, self.grad_buffers,
                               rows.weights_R, rows.tokens, self.pool)
        x_RD = x if rows.tokens is None else rows.tokens.gather(x)
        h_RF = grouped_linear(x_RD, w_in, rows.counts_E, rows.splits, impl)
        y_RD = grouped_linear(activate(h_RF, self.activation), w_out, rows.counts_E, rows.splits, impl)
        return weight_and_sum(y_RD, rows)

    def extra_repr(self) -> str:
        """Sizes for print(model)."""
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
                f"activation={self.activation}, impl={self.impl}, cpu_workers={self.pool.workers}")


def weight_and_sum(y_RD: Tensor, rows: ExpertRows) -> Tensor:
    """Finish unfused expert outputs the way the plan asks: scale rows by their weights, sum them per token."""
    w_R = None if rows.weights_R is None else rows.weights_R.to(y_RD.dtype)
    if rows.tokens is not None:
        return rows.tokens.combine(y_RD, w_R)
    return y_RD if w_R is None else y_RD * w_R.unsqueeze(1)
