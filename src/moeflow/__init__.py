"""moeflow: Mixture-of-Experts layers, models, training and parallelism on plain PyTorch."""

from moeflow.config import ConfigError, MoEConfig
from moeflow.dispatch import DispatchPlan, LocalDispatcher
from moeflow.experts import GroupedExperts
from moeflow.layers import FFN, MoELayer, RMSNorm, moe_layers
from moeflow.routing import ROUTERS, Router, Routing, build_router
from moeflow.interop import load_hf, patch_hf, save_hf

__version__ = "0.1.0"

__all__ = ["ConfigError", "MoEConfig", "DispatchPlan", "LocalDispatcher", "GroupedExperts", "FFN", "MoELayer",
           "RMSNorm", "moe_layers", "ROUTERS", "Router", "Routing", "build_router", "__version__",
           "load_hf", "save_hf", "patch_hf"]
