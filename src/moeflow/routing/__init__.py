"""Routers by name: every one returns a `Routing` record."""

from __future__ import annotations

from moeflow.config import ROUTER_NAMES, ConfigError, MoEConfig
from moeflow.routing.base import Router, Routing, Selection
from moeflow.routing.deepseek import DeepSeekRouter
from moeflow.routing.expert_choice import ExpertChoiceRouter
from moeflow.routing.gshard import GShardRouter
from moeflow.routing.hierarchical import HierarchicalRouter
from moeflow.routing.noisy import NoisyTopKRouter
from moeflow.routing.switch import SwitchRouter
from moeflow.routing.topk import TopKRouter

ROUTERS: dict[str, type[Router]] = {
    "topk": TopKRouter,
    "noisy_topk": NoisyTopKRouter,
    "switch": SwitchRouter,
    "gshard": GShardRouter,
    "expert_choice": ExpertChoiceRouter,
    "deepseek": DeepSeekRouter,
    "hierarchical": HierarchicalRouter,
}


def build_router(cfg: MoEConfig) -> Router:
    """The router named by `cfg.router`."""
    if cfg.router not in ROUTERS:
        raise ConfigError(f"router {cfg.router!r} is not available; choose one of {', '.join(ROUTERS)}")
    return ROUTERS[cfg.router](cfg)


__all__ = ["ROUTERS", "ROUTER_NAMES", "Router", "Routing", "Selection", "build_router", "TopKRouter",
           "NoisyTopKRouter", "SwitchRouter", "GShardRouter", "ExpertChoiceRouter", "DeepSeekRouter",
           "HierarchicalRouter"]
