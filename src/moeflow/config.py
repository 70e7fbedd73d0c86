"""Configuration dataclasses for moeflow's MoE layer: typed, validated at construction, stdlib only."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

ROUTER_NAMES = ("topk", "noisy_topk", "switch", "gshard", "expert_choice", "deepseek", "hierarchical")
GATED = ("swiglu", "geglu")  # gated activations: the input projection is [gate; up], 2H wide
ACTIVATIONS = GATED + ("relu", "gelu", "silu")
DROP_POLICIES = ("position", "probs")
EXPERT_IMPLS = ("auto", "loop", "grouped_mm", "bmm")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and how to fix it."""


# ------------------------------------------------------------------------------------------- validation
def need(cond: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless `cond` (for the cross-field checks the validators below cannot express)."""
    if not cond:
        raise ConfigError(msg)


def _where(obj: object, name: str) -> str:
    """How an error names a field: `ModelConfig.d_model`, or `train.lr` for a class with `config_name = "train"`."""
    return f"{getattr(obj, 'config_name', type(obj).__name__)}.{name}"


def check_int(obj: object, *names: str, lo: int = 1, hi: int | None = None, none: str | None = None) -> None:
    """Each named field must be an int (not a bool) in [lo, hi]; with `none` (what None means) None is allowed too."""
    for name in names:
        v = getattr(obj, name)
        if v is None and none is not None:
            continue
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)):
            want = ("a positive integer" if (lo, hi) == (1, None) else f"an integer >= {lo}" if hi is None
                    else f"an integer in [{lo}, {hi}]")
            alt = f" (or None for {none})" if none is not None else ""
            raise ConfigError(f"{_where(obj, name)} must be {want}{alt}, got {v!r}")


def check_number(obj: object, *names: str, lo: float = 0.0, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False, none: str | None = None) -> None:
    """Each named field must be a finite int or float in the range from lo to hi (open ends as flagged).

    With `none` (what None means, e.g. "dropless") None is allowed too. The range appears in the message.
    """
    for name in names:
        v = getattr(obj, name)
        if v is None and none is not None:
            continue
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
            and (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
        if not ok:
            if hi is None:
                want = f"a finite number {'>' if lo_open else '>='} {lo:g}"
            else:
                want = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            alt = f" (or None for {none})" if none is not None else ""
            raise ConfigError(f"{_where(obj, name)} must be {want}{alt}, got {v!r}")


def check_choice(obj: object, name: str, choices: Sequence[object]) -> None:
    """The named field must be one of `choices`; the message lists them (and the closest, for strings)."""
    v = getattr(obj, name)
    if v not in choices:
        close = closest(v, [str(c) for c in choices]) if isinstance(v, str) else []
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{_where(obj, name)}={v!r} is unknown; choose one of "
                          f"{', '.join(str(c) for c in choices)}{hint}")


def closest(name: str, known: Iterable[str], n: int = 4) -> list[str]:
    """The known names a typo most likely meant: those with the same last dotted part, then difflib's matches."""
    known = list(known)
    leaf = name.rsplit(".", 1)[-1]
    out = [k for k in known if k.rsplit(".", 1)[-1] == leaf and k != name]
    out += [k for k in difflib.get_close_matches(name, known, n=n, cutoff=0.6) if k not in out]
    return out[:n]


# ------------------------------------------------------------------------------------------- dicts
def dataclass_in(hint: Any) -> type | None:
    """The dataclass inside a type hint like `MoEConfig | None`, else None."""
    if dataclasses.is_dataclass(hint):
        return hint  # type: ignore[return-value]
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg  # type: ignore[return-value]
    return None


def _plain(v: Any) -> Any:
    """A JSON-able copy: dataclasses to dicts, tuples to lists (JSON gives lists back, so round trips compare equal)."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


class Config:
    """Base of every moeflow config dataclass: `to_dict`, a `from_dict` that names unknown keys, `replace`.

    `from_dict` builds nested config dataclasses (a field annotated `MoEConfig | None` given a dict) and refuses an
    unknown key at any depth by its dotted name with the closest known keys, so a typo in a config file is an error,
    not a silently ignored option.
    """

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON-able): nested configs become dicts, tuples lists."""
        return _plain(self)

    @classmethod
    def from_dict(cls, d: Any, where: str | None = None) -> Any:
        """Inverse of `to_dict`, validated; unknown or missing keys raise ConfigError naming them."""
        where = where or cls.__name__
        if not isinstance(d, dict):
            raise ConfigError(f"{where} must be a mapping of field names to values, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = [k for k in d if k not in fields]
        if unknown:
            parts = []
            for k in unknown:
                close = closest(str(k), fields)
                parts.append(f"{k} (did you mean {', '.join(close)}?)" if close else str(k))
            raise ConfigError(f"unknown key(s) in {where}: {'; '.join(parts)}; known keys: {', '.join(fields)}")
        missing = [n for n, f in fields.items() if n not in d and f.init and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"incomplete config: {where} is missing required field(s) {', '.join(missing)}")
        hints = typing.get_type_hints(cls)
        kw = {}
        for k, v in d.items():
            sub = dataclass_in(hints[k])
            if sub is not None and isinstance(v, dict):
                v = sub.from_dict(v, f"{where}.{k}")
            elif sub is not None and v is not None and not isinstance(v, sub):
                raise ConfigError(f"{where}.{k} must be a mapping of {sub.__name__} fields, got {type(v).__name__}")
            kw[k] = v
        return cls(**kw)

    def replace(self, **changes: Any) -> Any:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def expert_capacity(capacity_factor: float, top_k: int, tokens: int, num_experts: int, min_capacity: int = 0) -> int:
    """Slots per expert: max(ceil(capacity_factor * top_k * tokens / num_experts), min_capacity).

    NOTE: the product is taken in exact rational arithmetic on the factor's decimal value, because in floats
    1.1 * 100 / 10 = 11.000000000000002 and the ceiling would give 12 slots instead of 11.
    """
    exact = Fraction(repr(float(capacity_factor))) * top_k * tokens / num_experts
    return max(math.ceil(exact), min_capacity)


@dataclass(kw_only=True)
class MoEConfig(Config):
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
    expert_capacity: int | None = None  # a fixed C per routing group instead of capacity_factor (Switch/HF)
    eval_capacity_factor: float | str | None = "train"  # in eval mode: "train" = capacity_factor; None = dropless
    drop_policy: str = "position"  # position: earlier tokens (first choices first) win; probs: higher router prob wins
    num_groups: int = 1  # GShard local groups: tokens split into G groups routed (and capacity-counted) independently
    eval_num_groups: int | None = None  # routing groups in eval mode (None: num_groups)
    group_by_sequence: bool = False  # each sequence of an input [B, S, D] is a routing group (Switch/HF capacity)
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
        check_int(self, "d_model", "d_hidden", "num_experts", "top_k", "num_groups", "n_group", "topk_group",
                  "num_clusters")
        check_int(self, "eval_num_groups", none="num_groups")
        check_int(self, "cpu_workers", none="torch's intra-op threads")
        check_int(self, "min_capacity", "shared_d_hidden", lo=0)
        check_int(self, "expert_capacity", lo=0, none="capacity_factor")
        for name, choices in (("router", ROUTER_NAMES), ("activation", ACTIVATIONS), ("drop_policy", DROP_POLICIES),
                              ("expert_impl", EXPERT_IMPLS)):
            check_choice(self, name, choices)
        need(self.top_k <= self.num_experts,
             f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}; "
             "a token cannot choose more experts than exist")
        if self.router == "switch":
            need(self.top_k == 1, f"router='switch' routes each token to one expert; set top_k=1 (got {self.top_k})")
        if self.router == "gshard":
            need(self.top_k == 2, f"router='gshard' is top-2 routing; set top_k=2 (got {self.top_k})")
        check_number(self, "capacity_factor", lo=0, lo_open=True, none="dropless")
        if self.eval_capacity_factor != "train":
            check_number(self, "eval_capacity_factor", lo=0, lo_open=True, none="dropless, or 'train' for capacity_factor")
        need(self.expert_capacity is None or (self.capacity_factor is None and self.eval_capacity_factor == "train"),
             f"MoEConfig.expert_capacity={self.expert_capacity} fixes the capacity in both modes; leave "
             "capacity_factor and eval_capacity_factor unset (got "
             f"{self.capacity_factor!r}, {self.eval_capacity_factor!r})")
        need(not self.group_by_sequence or (self.num_groups == 1 and self.eval_num_groups is None),
             "MoEConfig.group_by_sequence makes each sequence a routing group; leave num_groups=1 and "
             f"eval_num_groups=None (got {self.num_groups}, {self.eval_num_groups})")
        check_number(self, "aux_loss_coef", "importance_coef", "load_coef", "bias_update_rate")
        if self.jitter_eps is None:
            self.jitter_eps = 1e-2 if self.router == "switch" else 0.0
        check_number(self, "jitter_eps", hi=1.0, hi_open=True)
        if self.z_loss_coef is None:
            self.z_loss_coef = 1e-3 if self.router == "switch" else 0.0
        check_number(self, "z_loss_coef")
        check_number(self, "routed_scaling_factor", lo=0, lo_open=True)
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

    def groups(self, training: bool) -> int:
        """Routing groups per forward in this mode (group_by_sequence overrides it: one group per sequence)."""
        return self.num_groups if training or self.eval_num_groups is None else self.eval_num_groups

    def capacity(self, tokens_per_group: int, training: bool = True) -> int | None:
        """Slots per expert per routing group in this mode, or None when dropless."""
        if self.expert_capacity is not None:
            return self.expert_capacity
        cf = self.capacity_factor if training or self.eval_capacity_factor == "train" else self.eval_capacity_factor
        if cf is None:
            return None
        assert not isinstance(cf, str)
        return expert_capacity(cf, self.top_k, tokens_per_group, self.num_experts, self.min_capacity)
