"""Apply expert parallelism to a built model from outside (FSDP2 then shards it: moeflow.parallel.fsdp).

`parallelize` is a module swap (DESIGN.md §2, seam 3): every MoELayer keeps only its rank's block of experts
(`GroupedExperts.w_in`/`w_out` sliced on dim 0) and gets an `AllToAllDispatcher`; the model code is unchanged.
Which parameters are EP-sharded is read from the structure (the experts of layers whose dispatcher is an
`AllToAllDispatcher`), so it survives `model.to(device)` and dtype casts.

Gradients are reduced by FSDP2 (see moeflow.parallel.fsdp for the convention that keeps them layout-free).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moeflow.layers import moe_layers
from moeflow.routing.deepseek import deepseek_loads
from moeflow.routing.log import RoutingLog
from moeflow.parallel.ep_dispatch import AllToAllDispatcher
from moeflow.parallel.groups import ParallelConfigError, ParallelDims
from moeflow.parallel.watchdog import collective_guard


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Qualified name -> parameter, for the expert weights sharded over the EP group (empty if ep = 1)."""
    out: dict[str, nn.Parameter] = {}
    for name, layer in moe_layers(model):
        if isinstance(layer.dispatcher, AllToAllDispatcher):
            prefix = f"{name}.experts." if name else "experts."
            out.update({prefix + n: p for n, p in layer.experts.named_parameters()})
    return out


def _broadcast_from_rank0(model: nn.Module, dims: ParallelDims) -> None:
    """Make every replica start from rank 0's weights and buffers (before experts are sliced)."""
    for t in [t.data for t in list(model.parameters()) + list(model.buffers())]:
        buf = t.to(dims.comm_device)
        with collective_guard("broadcast(parameters) in parallelize", dims):
            dist.broadcast(buf, src=0, group=dims.world_group)
        t.copy_(buf)


def parallelize(model: nn.Module, dims: ParallelDims, mode: str = "auto", sync_params: bool = True) -> nn.Module:
    """Shard every MoELayer's experts over the EP group and swap in the all-to-all dispatcher (in place).

    Call it after building the model and before creating the optimizer (expert parameters are replaced by their
    local slices). `sync_params` first broadcasts rank 0's weights so all replicas start equal. `mode` is the
    dispatcher mode ("auto": padded splits for capacity routers, variable splits for dropless).
    """
    layers = moe_layers(model)
    for name, layer in layers:  # validate everything before changing anything
        dims.local_experts(layer.cfg.num_experts, name or "MoELayer")
        if isinstance(layer.dispatcher, AllToAllDispatcher):
            raise ParallelConfigError(f"{name or 'MoELayer'} is already parallelized; call parallelize once")
    if dims.distributed and sync_params:
        _broadcast_from_rank0(model, dims)
    if dims.ep == 1:
        return model  # experts replicated: plain data parallelism
    for name, layer in layers:
        local = dims.local_experts(layer.cfg.num_experts, name)
        experts = layer.experts
        for pname in ("w_in", "w_out"):
            p = getattr(experts, pname)
            setattr(experts, pname, nn.Parameter(p.data[local.start:local.stop].clone(),
                                                 requires_grad=p.requires_grad))
        experts.num_experts = len(local)
        layer.dispatcher = AllToAllDispatcher(dims, layer.cfg.num_experts, layer.cfg.num_groups,
                                              mode, name or "moe")
    return model


def update_router_biases(log: RoutingLog, dims: ParallelDims, rate: float | None = None) -> int:
    """After optimizer.step(): nudge every DeepSeek router's balancing bias from the GLOBAL load of its layer.

    The load is read from the step's routing log (`record_routing()` around the forward). Each rank only sees its
    own tokens; updating from local counts would let the replicated biases drift apart (and routing differ between
    ranks). The per-layer counts are summed over the world in one all-reduce, so every rank applies the same update,
    equal to the single-process one on the global batch. Returns how many routers were updated.
    """
    loads = deepseek_loads(log)
    if not loads:
        return 0
    counts = torch.stack([routing.tokens_per_expert for _, routing in loads])
    if dims.distributed:
        counts = counts.to(dims.comm_device)
        with collective_guard("all_reduce(expert load for bias update)", dims):
            dist.all_reduce(counts, group=dims.world_group)
    for (layer, _), load in zip(loads, counts):
        layer.router.update_bias(load.to(layer.router.e_score_correction_bias.device), rate)
    return len(loads)
