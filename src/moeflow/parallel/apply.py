"""Apply expert + data parallelism to a built model from outside, and reduce its gradients.

`parallelize` is a module swap (DESIGN.md §2, seam 3): every MoELayer keeps only its rank's block of experts
(`GroupedExperts.w_in`/`w_out` sliced on dim 0) and gets an `AllToAllDispatcher`; the model code is unchanged.
Which parameters are EP-sharded is read from the structure (the experts of layers whose dispatcher is an
`AllToAllDispatcher`), so it survives `model.to(device)` and dtype casts.

Gradient convention (DESIGN.md §4): each rank's loss is the mean over ITS tokens; the global loss is the mean of
the rank losses. A replicated parameter's gradient is therefore all-reduced over the world and divided by the
world size. An expert's local gradient already sums the contributions of every rank of its EP group (their
tokens reached it through the all-to-all), so it is all-reduced over the expert-data-parallel group only, and
divided by the world size too: gradients then do not depend on the EP size (DeepSpeed `_reduce_expert_gradients`,
Megatron's edp/dp pre-scale).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

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
    tensors = [t.data for t in list(model.parameters()) + list(model.buffers())]
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        group = [t for t in tensors if t.dtype == dtype]
        flat = _flatten_dense_tensors(group).to(dims.comm_device)
        with collective_guard("broadcast(parameters) in parallelize", dims):
            dist.broadcast(flat, src=0, group=dims.world_group)
        for t, v in zip(group, _unflatten_dense_tensors(flat, group)):
            t.copy_(v)


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


def _reduce(grads: list[Tensor], group: dist.ProcessGroup | None, divisor: int, dims: ParallelDims,
            what: str) -> None:
    """Sum `grads` over `group` (one flat buffer per dtype) and divide by `divisor`, in place."""
    for dtype in sorted({g.dtype for g in grads}, key=str):
        same = [g for g in grads if g.dtype == dtype]
        flat = _flatten_dense_tensors(same)
        if group is not None:
            with collective_guard(f"all_reduce({what} gradients)", dims):
                dist.all_reduce(flat, group=group)
        flat.div_(divisor)
        for g, v in zip(same, _unflatten_dense_tensors(flat, same)):
            g.copy_(v)


def allreduce_gradients(model: nn.Module, dims: ParallelDims) -> None:
    """Average gradients across ranks after backward (call before clipping and optimizer.step()).

    Replicated parameters: all-reduce over the world, / world. Expert parameters: all-reduce over the
    expert-data-parallel group, / world. A parameter without a gradient counts as zero (every rank must join
    the same collectives, even if a layer got no tokens).
    """
    if not dims.distributed:
        return
    expert_ids = {id(p) for p in expert_parameters(model).values()}
    dense, expert = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (expert if id(p) in expert_ids else dense).append(p.grad)
    if dense:
        _reduce(dense, dims.world_group, dims.world, dims, "replicated")
    if expert:
        _reduce(expert, dims.edp_group if dims.edp > 1 else None, dims.world, dims, "expert")


def clip_grad_norm_(model: nn.Module, dims: ParallelDims, max_norm: float,
                    params: list[Tensor] | None = None) -> Tensor:
    """Global L2 norm of the gradients of the logical (unsharded) model, clipped to `max_norm` if > 0.

    Returns the norm before clipping (fp32 tensor). After `allreduce_gradients` replicated gradients are equal
    on every rank while each EP rank holds a different slice of the expert gradients, so the experts' squared
    norms are summed over the EP group (a per-rank `torch.nn.utils.clip_grad_norm_` would give every rank a
    different norm, and different updates). `params` (default: all of the model's) restricts the norm.
    """
    params = [p for p in (model.parameters() if params is None else params) if p.grad is not None]
    expert_ids = {id(p) for p in expert_parameters(model).values()}
    sq = torch.zeros(2, dtype=torch.float64, device=dims.comm_device)  # [replicated, expert]
    for p in params:
        sq[int(id(p) in expert_ids)] += p.grad.detach().double().square().sum().to(sq.device)
    if dims.distributed and dims.ep > 1:
        expert_sq = sq[1:].clone()
        with collective_guard("all_reduce(expert gradient norm)", dims):
            dist.all_reduce(expert_sq, group=dims.ep_group)
        sq[1:] = expert_sq
    total = sq.sum().sqrt()
    if max_norm > 0 and bool(torch.isfinite(total)):  # NaN/inf: leave the weights alone, the trainer stops
        scale = max_norm / (float(total) + 1e-6)
        if scale < 1.0:
            for p in params:
                p.grad.detach().mul_(scale)
    return total.float()


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
