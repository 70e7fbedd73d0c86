"""moeflow: Mixture-of-Experts layers, models, training and parallelism on plain PyTorch."""

from __future__ import annotations

import importlib
from typing import Any

from moeflow.config import ConfigError, MoEConfig

__version__ = "0.1.0"

# The torch-backed names load on first use (PEP 562), so `moeflow.cli` can set OpenMP's defaults before torch is
# imported; `from moeflow import MoELayer` works as before.
_LAZY = {"DispatchPlan": "moeflow.dispatch", "LocalDispatcher": "moeflow.dispatch",
         "GroupedExperts": "moeflow.experts", "FFN": "moeflow.layers", "MoELayer": "moeflow.layers",
         "RMSNorm": "moeflow.layers", "moe_layers": "moeflow.layers", "ROUTERS": "moeflow.routing",
         "Router": "moeflow.routing", "Routing": "moeflow.routing", "build_router": "moeflow.routing",
         "load_hf": "moeflow.interop", "patch_hf": "moeflow.interop", "save_hf": "moeflow.interop"}

__all__ = ["ConfigError", "MoEConfig", "DispatchPlan", "LocalDispatcher", "GroupedExperts", "FFN", "MoELayer",
           "RMSNorm", "moe_layers", "ROUTERS", "Router", "Routing", "build_router", "__version__",
           "load_hf", "save_hf", "patch_hf"]


def __getattr__(name: str) -> Any:
    """Import a torch-backed public name on first access."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moeflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names, loaded or not."""
    return sorted(set(globals()) | set(__all__))
