"""Configuration dataclasses for moeflow's MoE layer: typed, validated at construction, stdlib only."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction

ROUTER_NAMES = ("topk", "noisy_topk", "switch", "gshard", "expert_choice", "deepseek", "hierarchical")
GATED = ("swiglu", "geglu")  # gated activations: the input projection is [gate; up], 2H wide
ACTIVATIONS = GATED + ("relu", "gelu", "silu")
DROP_POLICIES = ("position", "probs")
EXPERT_IMPLS = ("auto", "loop", "grouped_mm", "bmm")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and how to fix it."""


def expert_capacity(capacity_factor: float, top_k: int, tokens: int, num_experts: int, min_capacity: int = 0) -> int:
    """Slots per expert: max(ceil(capacity_factor * top_k * tokens / num_experts), min_capacity).

    NOTE: the product is taken in exact rational arithmetic on the factor's decimal value, because in floats
    1.1 * 100 / 10 = 11.000000000000002 and the ceiling would give 12 slots instead of 11.
    """
    exact = Fraction(repr(float(capacity_factor))) * top_k * tokens / num_experts
    return max(math.ceil(exact), min_capacity)


@dataclass(kw_only=True)
class MoEConfig:
    """Everything that defines one MoE layer: its size, its router, its capacity and its experts.

    Router-specific fields left as ``None`` take the defaults of the router's paper (see
    ``resolved()``), so ``MoEConfig(router="switch", ...)`` gives Switch's jitter and z-loss.
    """

    d_model: int
    d_hidden: int  # hidden size of one expert (per branch for gated activations)
    num_experts: int = 8
    top_k: int = 2
    router: str = "topk"
    activation: str = "swiglu"
    # capacity: None = dropless; else C = max(ceil(cf * k * T_g / E), min_capacity) per routing group
    capacity_factor: float | None = None
    min_capacity: int = 0
    drop_policy: str = "position"  # position: earlier tokens (first choices first) win; probs: higher router prob wins
    num_groups: int = 1  # GShard local groups: tokens split into G groups routed (and capacity-counted) independently
    normalize: bool | None = None  # renormalise top-k weights to sum to 1 (Mixtral: True; Qwen2-MoE/OLMoE: False)
    jitter_eps: float | None = None  # multiplicative router-input jitter U(1-eps, 1+eps) in training (Switch)
    aux_loss_coef: float = 1e-2  # load-balance loss coefficient (Switch alpha / GShard aux)
    z_loss_coef: float | None = None  # router z-loss coefficient (ST-MoE beta)
    importance_coef: float = 1e-2  # noisy top-k: w_importance
    load_coef: float = 1e-2  # noisy top-k: w_load
    random_routing: bool = True  # GShard: keep the 2nd expert only where 2*g2 > U(0,1) (training)
    eval_random_routing: bool = False  # GShard: also apply random routing in eval mode
    # DeepSeek-V3 family
    score_func: str | None = None  # "softmax" or "sigmoid" (deepseek defaults to sigmoid)
    n_group: int = 1  # group-limited routing: experts split into n_group groups ...
    topk_group: int = 1  # ... and only the best topk_group groups are eligible
    routed_scaling_factor: float = 1.0
    bias_update_rate: float = 0.0  # aux-loss-free balancing speed gamma (0 = off)
    # hierarchical routing
    num_clusters: int = 1
    # shared experts: a dense FFN every token passes through, added to the routed output
    shared_d_hidden: int = 0
    shared_gate: bool = False  # Qwen2-MoE: shared output scaled by sigmoid(x . w_gate)
    expert_impl: str = "auto"
    # CPU worker threads of the experts' pool (ops/threads.py); None: as many as torch's intra-op threads
    cpu_workers: int | None = None
    router_bias: bool = False  # linear bias on the router logits (most references have none)

    def __post_init__(self) -> None:
        """Validate every field and resolve router-specific defaults."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("d_model", "d_hidden", "num_experts", "top_k", "num_groups", "n_group",
                     "topk_group", "num_clusters"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                 f"MoEConfig.{name} must be a positive integer, got {v!r}")
        need(self.router in ROUTER_NAMES,
             f"MoEConfig.router={self.router!r} is unknown; choose one of {', '.join(ROUTER_NAMES)}")
        need(self.activation in ACTIVATIONS,
             f"MoEConfig.activation={self.activation!r} is unknown; choose one of {', '.join(ACTIVATIONS)}")
        need(self.drop_policy in DROP_POLICIES,
             f"MoEConfig.drop_policy={self.drop_policy!r} is unknown; choose one of {', '.join(DROP_POLICIES)}")
        need(self.expert_impl in EXPERT_IMPLS,
             f"MoEConfig.expert_impl={self.expert_impl!r} is unknown; choose one of {', '.join(EXPERT_IMPLS)}")
        need(self.cpu_workers is None or (isinstance(self.cpu_workers, int) and self.cpu_workers >= 1),
             f"MoEConfig.cpu_workers={self.cpu_workers!r} must be an int >= 1, or None to follow torch's threads")
        need(self.top_k <= self.num_experts,
             f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}; "
             "a token cannot choose more experts than exist")
        if self.router == "switch":
            need(self.top_k == 1, f"router='switch' routes each token to one expert; set top_k=1 (got {self.top_k})")
        if self.router == "gshard":
            need(self.top_k == 2, f"router='gshard' is top-2 routing; set top_k=2 (got {self.top_k})")
        if self.capacity_factor is not None:
            need(isinstance(self.capacity_factor, (int, float)) and not isinstance(self.capacity_factor, bool)
                 and math.isfinite(self.capacity_factor)
                 and self.capacity_factor > 0,
                 f"MoEConfig.capacity_factor must be > 0 (or None for dropless), got {self.capacity_factor!r}")
        need(isinstance(self.min_capacity, int) and not isinstance(self.min_capacity, bool) and self.min_capacity >= 0,
             f"MoEConfig.min_capacity must be an integer >= 0, got {self.min_capacity!r}")
        for name in ("aux_loss_coef", "importance_coef", "load_coef", "bias_update_rate"):
            v = getattr(self, name)
            need(math.isfinite(v) and v >= 0, f"MoEConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.jitter_eps is None:
            self.jitter_eps = 1e-2 if self.router == "switch" else 0.0
        need(0.0 <= self.jitter_eps < 1.0, f"MoEConfig.jitter_eps must be in [0, 1), got {self.jitter_eps}")
        if self.z_loss_coef is None:
            self.z_loss_coef = 1e-3 if self.router == "switch" else 0.0
        need(math.isfinite(self.z_loss_coef) and self.z_loss_coef >= 0,
             f"MoEConfig.z_loss_coef must be a finite number >= 0, got {self.z_loss_coef!r}")
        if self.normalize is None:
            self.normalize = self.router in ("topk", "gshard", "hierarchical", "deepseek")
        if self.score_func is None:
            self.score_func = "sigmoid" if self.router == "deepseek" else "softmax"
        need(self.score_func in ("softmax", "sigmoid"),
             f"MoEConfig.score_func must be 'softmax' or 'sigmoid', got {self.score_func!r}")
        if self.router == "deepseek":
            need(self.num_experts % self.n_group == 0,
                 f"num_experts={self.num_experts} must be divisible by n_group={self.n_group}")
            need(self.topk_group <= self.n_group,
                 f"topk_group={self.topk_group} must be <= n_group={self.n_group}")
            need(self.top_k <= self.topk_group * (self.num_experts // self.n_group),
                 f"top_k={self.top_k} exceeds the experts in the {self.topk_group} eligible groups")
        if self.router == "hierarchical":
            need(self.num_experts % self.num_clusters == 0,
                 f"num_experts={self.num_experts} must be divisible by num_clusters={self.num_clusters}")
            need(self.top_k <= self.num_experts // self.num_clusters,
                 f"top_k={self.top_k} exceeds the {self.num_experts // self.num_clusters} experts of one cluster")
        need(self.shared_d_hidden >= 0, f"MoEConfig.shared_d_hidden must be >= 0, got {self.shared_d_hidden}")

    def capacity(self, tokens_per_group: int) -> int | None:
        """Slots per expert per routing group, or None when dropless."""
        if self.capacity_factor is None:
            return None
        return expert_capacity(self.capacity_factor, self.top_k, tokens_per_group, self.num_experts,
                               self.min_capacity)

    def replace(self, **changes: object) -> "MoEConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
