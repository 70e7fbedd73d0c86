"""MoEConfig: validation errors name the field at fault; router defaults resolve to each paper's values."""

from __future__ import annotations

import pytest

from moeflow import ROUTERS, ConfigError, MoEConfig, build_router
from moeflow.config import ROUTER_NAMES

BASE = {"d_model": 8, "d_hidden": 16}

# (bad fields, a regex the message must match: the field name and, where useful, the fix)
INVALID = [
    (dict(top_k=9, num_experts=8), r"top_k=9 exceeds num_experts=8"),
    (dict(capacity_factor=0.0), r"capacity_factor must be a finite number > 0 \(or None for dropless\)"),
    (dict(capacity_factor=-1.25), r"capacity_factor must be a finite number > 0 \(or None for dropless\)"),
    (dict(capacity_factor=float("nan")), r"capacity_factor must be a finite number > 0 \(or None for dropless\)"),
    (dict(capacity_factor=float("inf")), r"capacity_factor must be a finite number > 0 \(or None for dropless\)"),
    (dict(capacity_factor="1.0"), r"capacity_factor must be a finite number > 0 \(or None for dropless\)"),
    (dict(capacity_factor=True), r"capacity_factor must be a finite number > 0 \(or None for dropless\)"),
    (dict(router="mixtral"), r"router='mixtral' is unknown; choose one of .*topk"),
    (dict(router="switch", top_k=2), r"router='switch'.*set top_k=1"),
    (dict(router="gshard", top_k=1), r"router='gshard'.*set top_k=2"),
    (dict(activation="tanh"), r"activation='tanh' is unknown"),
    (dict(drop_policy="random"), r"drop_policy='random' is unknown; choose one of position, probs"),
    (dict(expert_impl="cuda"), r"expert_impl='cuda' is unknown"),
    (dict(d_model=0), r"d_model must be a positive integer"),
    (dict(d_hidden=2.5), r"d_hidden must be a positive integer"),
    (dict(num_experts=0, top_k=1), r"num_experts must be a positive integer"),
    (dict(top_k=0), r"top_k must be a positive integer"),
    (dict(top_k=True), r"top_k must be a positive integer"),
    (dict(num_groups=0), r"num_groups must be a positive integer"),
    (dict(min_capacity=-1), r"min_capacity must be an integer >= 0"),
    (dict(min_capacity=1.5), r"min_capacity must be an integer >= 0"),
    (dict(aux_loss_coef=-0.1), r"aux_loss_coef must be a finite number >= 0"),
    (dict(aux_loss_coef=float("nan")), r"aux_loss_coef must be a finite number >= 0"),
    (dict(importance_coef=-1.0), r"importance_coef must be a finite number >= 0"),
    (dict(load_coef=float("inf")), r"load_coef must be a finite number >= 0"),
    (dict(z_loss_coef=-1e-3), r"z_loss_coef must be a finite number >= 0"),
    (dict(jitter_eps=1.0), r"jitter_eps must be in \[0, 1\)"),
    (dict(jitter_eps=-0.1), r"jitter_eps must be in \[0, 1\)"),
    (dict(score_func="relu"), r"score_func must be 'softmax' or 'sigmoid'"),
    (dict(shared_d_hidden=-4), r"shared_d_hidden must be an integer >= 0"),
]


@pytest.mark.parametrize("fields, message", INVALID, ids=[m.split()[0].strip("r'\\") for _, m in INVALID])
def test_invalid_values_raise_config_error_naming_the_field(fields, message) -> None:
    """Each bad value raises ConfigError (a ValueError) whose message names the field."""
    with pytest.raises(ConfigError, match=message):
        MoEConfig(**{**BASE, **fields})
    assert issubclass(ConfigError, ValueError)


def test_unknown_field_and_positional_arguments_are_rejected() -> None:
    """The dataclass is keyword-only and has no catch-all: a typo is an error, not a silently ignored option."""
    with pytest.raises(TypeError, match="capacity_fact"):
        MoEConfig(**BASE, capacity_fact=1.0)
    with pytest.raises(TypeError):
        MoEConfig(8, 16)  # type: ignore[misc]


def test_replace_validates_again() -> None:
    """cfg.replace(...) returns a validated copy and leaves the original alone."""
    cfg = MoEConfig(**BASE, top_k=2)
    assert cfg.replace(top_k=1).top_k == 1 and cfg.top_k == 2
    with pytest.raises(ConfigError, match="top_k=99 exceeds"):
        cfg.replace(top_k=99)


@pytest.mark.parametrize("router, k, jitter, z, normalize", [
    ("topk", 2, 0.0, 0.0, True),
    ("switch", 1, 1e-2, 1e-3, False),
    ("gshard", 2, 0.0, 0.0, True),
    ("noisy_topk", 2, 0.0, 0.0, False),
    ("expert_choice", 2, 0.0, 0.0, False),
])
def test_router_defaults_follow_the_papers(router, k, jitter, z, normalize) -> None:
    """Fields left as None resolve per router: Switch gets jitter 1e-2 and z-loss 1e-3; Mixtral-style top-k and
    GShard renormalise; explicit values are kept."""
    cfg = MoEConfig(**BASE, router=router, top_k=k)
    assert (cfg.jitter_eps, cfg.z_loss_coef, cfg.normalize) == (jitter, z, normalize)
    assert cfg.capacity_factor is None and cfg.drop_policy == "position" and cfg.num_groups == 1
    explicit = MoEConfig(**BASE, router=router, top_k=k, jitter_eps=0.5, z_loss_coef=0.25, normalize=False)
    assert (explicit.jitter_eps, explicit.z_loss_coef, explicit.normalize) == (0.5, 0.25, False)


def test_every_accepted_router_name_can_be_built() -> None:
    """The names MoEConfig accepts and the ROUTERS registry agree, so a valid config always builds a router."""
    assert set(ROUTER_NAMES) == set(ROUTERS)
    for name in ("topk", "switch", "gshard", "noisy_topk", "expert_choice"):
        k = 1 if name == "switch" else 2
        router = build_router(MoEConfig(**BASE, router=name, top_k=k))
        assert isinstance(router, ROUTERS[name]) and tuple(router.weight.shape) == (8, 8)
