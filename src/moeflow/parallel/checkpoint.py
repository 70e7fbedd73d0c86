"""EP-aware checkpoint helpers: save the logical model, load it under any EP size.

A checkpoint always holds the LOGICAL tensors: every expert weight as one `[E, ...]` tensor, exactly what a
single-process model's `state_dict()` holds. Saving gathers the expert slices of rank 0's EP group onto rank 0;
loading gives each rank its block `[ep_rank * E/ep, (ep_rank + 1) * E/ep)`. So a checkpoint written with EP=2
loads with EP=1, 2 or 4 (or into a plain `MoETransformer` without moeflow.parallel at all). Optimizer state is
handled the same way, keyed by parameter name instead of by position.

Typical use (every rank calls the gather; only rank 0 gets the dict):
    state = gather_full_state_dict(model, dims)
    if is_main(dims):
        torch.save(state, path)
    ...
    load_full_state_dict(model, torch.load(path, map_location="cpu"), dims)   # every rank
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moeflow.layers import moe_layers
from moeflow.parallel.apply import expert_parameters
from moeflow.parallel.groups import ParallelDims
from moeflow.parallel.watchdog import collective_guard


def _expert_params(model: nn.Module, dims: ParallelDims) -> dict[str, Tensor]:
    """Name -> parameter for the EP-sharded expert weights (error if the model should be sharded but is not)."""
    out = expert_parameters(model)
    if dims.ep > 1 and moe_layers(model) and not out:
        raise RuntimeError("the model has MoE layers but no expert-parallel parameters: call "
                           "parallelize(model, dims) before saving or loading with ep > 1")
    return out


def _gather_dim0(t: Tensor, dims: ParallelDims, what: str) -> Tensor | None:
    """Concatenate the EP group's slices of `t` along dim 0 on global rank 0 (None elsewhere)."""
    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(dims.ep)] if dims.rank == 0 else None
    with collective_guard(f"gather({what}) for checkpoint", dims):
        dist.gather(t, parts, dst=0, group=dims.ep_group)
    return torch.cat(parts, 0).cpu() if parts is not None else None


def _sharded(dims: ParallelDims) -> bool:
    """Whether expert tensors are split across ranks."""
    return dims.distributed and dims.ep > 1


def gather_full_state_dict(model: nn.Module, dims: ParallelDims) -> dict[str, Tensor] | None:
    """The logical state dict (full `[E, ...]` experts, on CPU) on rank 0; None on the other ranks.

    Collective over rank 0's EP group: call it on every rank (ranks outside that group return at once).
    """
    expert = _expert_params(model, dims)
    if dims.rank != 0 and (not _sharded(dims) or dims.edp_rank != 0):
        return None
    state = model.state_dict()
    full: dict[str, Tensor] = {}
    for key in state:  # same order on every rank: collectives must match one to one
        if key in expert and _sharded(dims):
            gathered = _gather_dim0(state[key], dims, key)
            if gathered is not None:
                full[key] = gathered
        elif dims.rank == 0:
            full[key] = state[key].detach().cpu().clone()
    return full if dims.rank == 0 else None


def _local_slice(key: str, full: Tensor, local_shape: torch.Size, dims: ParallelDims) -> Tensor:
    """This rank's block of a logical `[E, ...]` tensor, with a clear error if the shapes cannot match."""
    n_local = local_shape[0]
    n_full = n_local * (dims.ep if _sharded(dims) else 1)
    if full.shape[0] != n_full or full.shape[1:] != local_shape[1:]:
        raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(full.shape)} but this model expects "
                         f"[{n_full}, {', '.join(map(str, local_shape[1:]))}] (= {n_local} local experts x "
                         f"ep={dims.ep}); the checkpoint was saved from a model with a different config")
    if not _sharded(dims):
        return full
    return full[dims.ep_rank * n_local:(dims.ep_rank + 1) * n_local]


def load_full_state_dict(model: nn.Module, state: dict[str, Tensor], dims: ParallelDims,
                         strict: bool = True) -> None:
    """Load a logical state dict (as saved by `gather_full_state_dict`); each rank keeps its experts' block."""
    expert = _expert_params(model, dims)
    local = {k: (_local_slice(k, v, expert[k].shape, dims) if k in expert else v) for k, v in state.items()}
    model.load_state_dict(local, strict=strict)


def _names_in_optimizer_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order torch.optim numbers them in its state_dict."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    names = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in by_id:
                raise ValueError("the optimizer holds a parameter that is not in the model; build the optimizer "
                                 "from model.parameters() after parallelize(model, dims)")
            names.append(by_id[id(p)])
    return names


def gather_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                                dims: ParallelDims) -> dict[str, Any] | None:
    """The optimizer state keyed by parameter name, with expert state tensors gathered to `[E, ...]`, on rank 0.

    Collective like `gather_full_state_dict`. Per-parameter tensors shaped like the local expert slice (Adam's
    moments) are gathered; scalars (Adam's `step`) are taken from rank 0.
    """
    expert = _expert_params(model, dims)
    names = _names_in_optimizer_order(model, optimizer)
    if dims.rank != 0 and (not _sharded(dims) or dims.edp_rank != 0):
        return None
    sd = optimizer.state_dict()
    state: dict[str, dict[str, Any]] = {}
    for idx in sorted(sd["state"]):
        name = names[idx]
        entry = {}
        for key in sorted(sd["state"][idx]):
            val = sd["state"][idx][key]
            if (name in expert and _sharded(dims) and isinstance(val, Tensor)
                    and val.shape == expert[name].shape):
                val = _gather_dim0(val, dims, f"{name}.{key}")
            elif isinstance(val, Tensor):
                val = val.detach().cpu().clone()
            entry[key] = val
        state[name] = entry
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups} if dims.rank == 0 else None


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, full: dict[str, Any],
                              dims: ParallelDims) -> None:
    """Load optimizer state saved by `gather_full_optimizer_state`; expert state is sliced to this rank's block."""
    expert = _expert_params(model, dims)
    names = _names_in_optimizer_order(model, optimizer)
    index = {name: i for i, name in enumerate(names)}
    missing = [n for g in full["param_groups"] for n in g["params"] if n not in index]
    if missing:
        raise ValueError(f"optimizer checkpoint names parameters the model lacks: {missing[:5]}")
    state = {}
    for name, entry in full["state"].items():
        state[index[name]] = {
            k: (_local_slice(f"{name}.{k}", v, expert[name].shape, dims)
                if name in expert and isinstance(v, Tensor) and v.dim() > 0
                and v.shape[1:] == expert[name].shape[1:] else v)
            for k, v in entry.items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
              for g in full["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
