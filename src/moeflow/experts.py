"""Experts with stacked weights, applied with one grouped matmul per weight.

Shape legend: R = rows sorted by expert, D = model dim, H = expert hidden dim, F = input-projection width
(2H for gated activations: gate rows first, then up rows), E = experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeflow.config import MoEConfig
from moeflow.ops.grouped import grouped_linear, resolve_impl
from moeflow.ops.grouped_mlp import GATED, GradBuffers, grouped_mlp
from moeflow.ops.rows import TokenRows


def activate(h: Tensor, activation: str) -> Tensor:
    """Apply the FFN nonlinearity; gated ones split h into (gate, up) halves."""
    if activation in GATED:
        gate, up = h.chunk(2, dim=-1)
        return (F.silu(gate) if activation == "swiglu" else F.gelu(gate)) * up
    if activation == "relu":
        return F.relu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "silu":
        return F.silu(h)
    raise ValueError(f"unknown activation {activation!r}")


class GroupedExperts(nn.Module):
    """E FFNs stored as `w_in` [E, F, D] and `w_out` [E, D, H]; rows of expert e are a contiguous block."""

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, activation: str = "swiglu",
                 impl: str = "auto") -> None:
        """Allocate and initialise the stacked weights."""
        super().__init__()
        self.num_experts, self.d_model, self.d_hidden = num_experts, d_model, d_hidden
        self.activation, self.impl = activation, impl
        f = 2 * d_hidden if activation in GATED else d_hidden
        self.w_in = nn.Parameter(torch.empty(num_experts, f, d_model))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_model, d_hidden))
        self.grad_buffers = GradBuffers()  # weight-gradient memory reused across steps (see GradBuffers)
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: MoEConfig) -> "GroupedExperts":
        """Build from an MoEConfig."""
        return cls(cfg.num_experts, cfg.d_model, cfg.d_hidden, cfg.activation, cfg.expert_impl)

    def reset_parameters(self) -> None:
        """nn.Linear-like scale: std 1/sqrt(fan_in) per projection."""
        nn.init.normal_(self.w_in, std=1.0 / math.sqrt(self.d_model))
        nn.init.normal_(self.w_out, std=1.0 / math.sqrt(self.d_hidden))

    def gathers_rows(self, x: Tensor) -> bool:
        """Whether forward(..., tokens=) runs fused here (dispatch gather and combine sum inside the expert kernel)."""
        return resolve_impl(x, self.w_in, self.impl) == "loop"

    def forward(self, x: Tensor, counts_E: Tensor, splits: list[int] | None = None,
                weights_R: Tensor | None = None, tokens: TokenRows | None = None) -> Tensor:
        """Run expert e on its block of rows: [R, D] -> [R, D], each output row scaled by weights_R if given.

        With `tokens` (the dispatch's token <-> row map) x is token-major [T, D], and the result is each token's
        sum of its (weighted) rows, [T, D]: fused into the expert kernel where `gathers_rows(x)`.
        """
        impl = resolve_impl(x, self.w_in, self.impl)
        if splits is None:
            splits = counts_E.tolist()
        if impl == "loop":
            # fused and chunked: no [R, H] / [R, F] temporaries besides the saved pre-activation (see grouped_mlp)
            return grouped_mlp(x, self.w_in, self.w_out, splits, self.activation, self.grad_buffers, weights_R,
                               tokens)
        x_RD = x if tokens is None else tokens.gather(x)
        h_RF = grouped_linear(x_RD, self.w_in, counts_E, splits, impl)
        a_RH = activate(h_RF, self.activation)
        y_RD = grouped_linear(a_RH, self.w_out, counts_E, splits, impl)
        w_R = None if weights_R is None else weights_R.to(y_RD.dtype)
        if tokens is not None:
            return tokens.combine(y_RD, w_R)
        return y_RD if w_R is None else y_RD * w_R.unsqueeze(1)

    def extra_repr(self) -> str:
        """Sizes for print(model)."""
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
                f"activation={self.activation}, impl={self.impl}")
