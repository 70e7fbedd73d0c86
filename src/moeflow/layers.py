"""Layers: the dense FFN, RMSNorm, and MoELayer (route -> dispatch -> experts -> combine [+ shared experts])."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moeflow.config import GATED, MoEConfig
from moeflow.dispatch import LocalDispatcher
from moeflow.experts import GroupedExperts, activate
from moeflow.routing import Routing, build_router
from moeflow.routing.log import log_routing


class FFN(nn.Module):
    """Dense feed-forward block with the same parameterisation as one expert (`w_in` [F, D], `w_out` [D, H])."""

    def __init__(self, d_model: int, d_hidden: int, activation: str = "swiglu") -> None:
        """Allocate and initialise the two projections."""
        super().__init__()
        self.activation = activation
        f = 2 * d_hidden if activation in GATED else d_hidden
        self.w_in = nn.Parameter(torch.empty(f, d_model))
        self.w_out = nn.Parameter(torch.empty(d_model, d_hidden))
        nn.init.normal_(self.w_in, std=1.0 / math.sqrt(d_model))
        nn.init.normal_(self.w_out, std=1.0 / math.sqrt(d_hidden))

    def forward(self, x: Tensor) -> Tensor:
        """[..., D] -> [..., D]."""
        return nn.functional.linear(activate(nn.functional.linear(x, self.w_in), self.activation), self.w_out)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        """A learned per-channel scale initialised to 1."""
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise the last dimension."""
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class RecordsRouting:
    """Mixin for modules that keep their last forward's Routing in `last_routing`.

    Copies and pickles leave it out: it holds non-leaf tensors of the last autograd graph, which
    `copy.deepcopy` refuses, and it describes a past batch, not the module's state.
    """

    def __getstate__(self) -> dict:
        """The module's state without the last Routing record."""
        state = dict(super().__getstate__())  # type: ignore[misc]
        state["last_routing"] = None
        return state


class MoELayer(RecordsRouting, nn.Module):
    """A drop-in replacement for an FFN: input [..., D], output [..., D].

    After each forward, `last_routing` holds the Routing record (aux losses, per-expert counts, drops,
    entropy) and `aux_loss` the coefficient-scaled sum to add to the training loss.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        """Build router, dispatcher, experts and (optionally) shared experts from one config."""
        super().__init__()
        self.cfg = cfg
        self.router = build_router(cfg)
        self.dispatcher = LocalDispatcher()
        self.experts = GroupedExperts.from_config(cfg)
        self.shared = FFN(cfg.d_model, cfg.shared_d_hidden, cfg.activation) if cfg.shared_d_hidden else None
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if (self.shared and cfg.shared_gate) else None
        self.last_routing: Routing | None = None

    @property
    def aux_loss(self) -> Tensor:
        """The scaled auxiliary loss of the last forward (0 before any forward)."""
        if self.last_routing is None or self.last_routing.aux_loss is None:
            return torch.zeros((), device=self.router.weight.device)
        return self.last_routing.aux_loss

    def forward(self, x: Tensor) -> Tensor:
        """route -> dispatch -> experts -> combine (+ shared experts)."""
        if x.dim() == 0 or x.shape[-1] != self.cfg.d_model:
            raise ValueError(f"MoELayer expects inputs [..., d_model={self.cfg.d_model}], got shape {tuple(x.shape)}; "
                             "the last dimension must equal MoEConfig.d_model")
        x_TD = x.reshape(-1, x.shape[-1])
        routing = self.router(x_TD, seq_len=x.shape[-2] if x.dim() > 2 else None)  # for groups by sequence
        x_in, plan = self.dispatcher.dispatch(x_TD, routing)
        y = self.experts(x_in, plan.rows)
        y_TD = self.dispatcher.combine(y, plan)
        if self.shared is not None:
            s_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                s_TD = torch.sigmoid(self.shared_gate(x_TD)) * s_TD
            y_TD = y_TD + s_TD
        self.last_routing = routing
        log_routing(self, routing)
        return y_TD.view(x.shape).to(x.dtype) if y_TD.dtype != x.dtype else y_TD.view(x.shape)


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """(qualified name, layer) of every MoELayer in `model`, in registration (= layer) order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
