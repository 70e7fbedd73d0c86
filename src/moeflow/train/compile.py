"""Per-block activation checkpointing and torch.compile, switched on from the training config.

Activation checkpointing is the model's own switch (`MoETransformer.activation_checkpointing`: each block is
recomputed in backward); `apply_activation_checkpointing` only checks the model has it. `compile_blocks` compiles
every block (each element of the model's `nn.ModuleList`s) with `torch.compile` in place, after FSDP2 wrapped them,
as torchtitan does; where torch.compile cannot work here it leaves the blocks eager and says why, once.
"""

from __future__ import annotations

import shutil
import sys
from typing import TextIO

import torch
from torch import nn

from moeflow.config import ConfigError


def apply_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn per-block recomputation on or off; a model without the switch is a ConfigError when asked."""
    if not hasattr(model, "activation_checkpointing"):
        if enabled:
            raise ConfigError(f"train.activation_checkpointing=true but {type(model).__name__} has no per-block "
                              "activation checkpointing; set it to false for this model")
        return
    model.activation_checkpointing = enabled


def compile_unavailable_reason() -> str | None:
    """Why torch.compile cannot run in this process (None when it can)."""
    import torch._dynamo  # noqa: F401 - part of torch; imported here so that `import moeflow` never pays for it
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support Python {sys.version.split()[0]} in this torch build"
    if not torch.cuda.is_available() and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "torch.compile's CPU backend needs a C++ compiler (c++, g++ or clang++) on PATH"
    return None


def compile_blocks(model: nn.Module, stream: TextIO | None = None) -> int:
    """torch.compile every block in place; returns how many were compiled (0 with a message if unavailable)."""
    reason = compile_unavailable_reason()
    if reason is not None:
        if stream is not None:
            print(f"train.compile: {reason}; training without compilation", file=stream)
        return 0
    blocks = [b for m in model.modules() if isinstance(m, nn.ModuleList) for b in m]
    for block in blocks:
        block.compile()
    return len(blocks)
