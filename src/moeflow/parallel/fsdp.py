"""FSDP2 over the ("dp", "ep") DeviceMesh: dense parameters sharded over every rank, experts as DTensors.

`shard_model(model, dims)` runs after `parallelize` (which sliced each MoELayer's experts to this rank's block and
swapped in the all-to-all dispatcher) and before the optimizer is built:

* expert weights become DTensors `Shard(0)` over `mesh["ep"]` (the sharding annotation: their global shape is the
  logical `[E, ...]`), then `fully_shard(experts, mesh=mesh["dp"])` shards each block again over the ranks that hold
  the same experts. FSDP2 composes the two into `(_StridedShard(0), Shard(0))` on the 2-D mesh, so a state dict
  holds logical tensors and DCP reshards them to any other layout;
* every transformer block (each element of the model's `nn.ModuleList`s) and then the root are
  `fully_shard(..., mesh=world_mesh)`: attention, norms, embeddings, routers and shared experts are sharded over
  all ranks, gathered per block in forward and reduce-scattered per block during backward (overlapping it);
* routers are their own FSDP units with an fp32 policy, so under bf16 mixed precision routing stays fp32.

Gradient convention (DESIGN.md §4): each rank's loss is the mean over its tokens and the global loss is the mean of
the rank losses. FSDP2 averages over the mesh it reduces on: for dense parameters that is every rank, which is the
convention. An expert's local gradient already sums the contributions of its whole EP group (their tokens reached
it through the all-to-all), so after FSDP2's mean over `dp` it is divided by `ep` as well (a reduce hook on the
expert units): the world mean, and gradients do not depend on the layout.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Shard

from moeflow.layers import moe_layers
from moeflow.parallel.ep_dispatch import AllToAllDispatcher
from moeflow.parallel.groups import ParallelConfigError, ParallelDims
from moeflow.parallel.watchdog import collective_guard

# NOTE: methods the models call on a block's submodule from OUTSIDE the block's forward, so the block's FSDP2
# unit has not gathered their parameters: seq2seq decoders compute cross-attention keys/values once per source
# (CrossAttention.kv). Such submodules become FSDP2 units of their own with the method registered as a forward.
EXTRA_FORWARD_METHODS = ("kv",)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def mixed_precision_policy(name: str) -> MixedPrecisionPolicy | None:
    """"fp32" -> None (no casts); "bf16"/"fp16" -> that compute dtype with fp32 master weights and reductions."""
    if name not in DTYPES:
        raise ParallelConfigError(f"mixed precision {name!r} is not one of {sorted(DTYPES)}")
    if name == "fp32":
        return None
    return MixedPrecisionPolicy(param_dtype=DTYPES[name], reduce_dtype=torch.float32)


def _blocks(model: nn.Module) -> Iterator[nn.Module]:
    """The repeated blocks: every element of every nn.ModuleList (decoder layers, encoder and decoder stacks)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            yield from module


def _annotate_experts(experts: nn.Module, dims: ParallelDims) -> None:
    """Replace the local `[E/ep, ...]` expert slices by DTensor parameters `Shard(0)` over mesh["ep"]."""
    for name, p in list(experts.named_parameters(recurse=False)):
        local = p.detach()
        # every rank holds E/ep rows (checked by parallelize): the global shape follows without communication
        d = DTensor.from_local(local, dims.mesh["ep"], [Shard(0)], run_check=False)
        setattr(experts, name, nn.Parameter(d, requires_grad=p.requires_grad))


def _divide(factor: int, reduced: Tensor) -> None:
    """In place: the FSDP2 hook that finishes the expert gradients' world mean (FSDP2 did the dp part)."""
    reduced.div_(factor)


def shard_model(model: nn.Module, dims: ParallelDims, precision: str = "fp32",
                reshard_after_forward: bool = True) -> nn.Module:
    """Apply FSDP2 in place (see the module docstring); returns the model, now an `FSDPModule`.

    Call after `parallelize(model, dims)` and before building the optimizer. `precision` is "fp32", "bf16" or
    "fp16" (compute dtype; master weights and gradient reductions stay fp32; routers compute in fp32).
    """
    if dims.mesh is None or dims.world_mesh is None:
        raise ParallelConfigError("shard_model needs the DeviceMesh: build dims with init_distributed()")
    if isinstance(model, FSDPModule):
        raise ParallelConfigError("the model is already sharded; call shard_model once")
    mp = mixed_precision_policy(precision)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=True)
    kw = {"reshard_after_forward": reshard_after_forward}
    for _, layer in moe_layers(model):
        if isinstance(layer.dispatcher, AllToAllDispatcher):
            _annotate_experts(layer.experts, dims)
            unit = fully_shard(layer.experts, mesh=dims.mesh["dp"], mp_policy=mp or MixedPrecisionPolicy(), **kw)
            # FSDP2 averages over dp; the remaining 1/ep is applied to the reduced shard. NOTE: not
            # set_gradient_divide_factor(world): with a one-rank dp mesh and an fp64/fp16 reduce dtype, torch 2.13
            # divides by that factor twice (_fsdp_collectives.py, the world_size == 1 branch); measured.
            unit.set_all_reduce_hook(functools.partial(_divide, dims.ep))
        if mp is not None:  # routing in fp32 whatever the compute dtype (router logits decide discrete choices)
            fully_shard(layer.router, mesh=dims.world_mesh, mp_policy=fp32, **kw)
    for block in _blocks(model):
        for sub in block.modules():
            methods = [m for m in EXTRA_FORWARD_METHODS if callable(getattr(sub, m, None))]
            if methods and sub is not block:
                fully_shard(sub, mesh=dims.world_mesh, mp_policy=mp or MixedPrecisionPolicy(), **kw)
                for m in methods:
                    register_fsdp_forward_method(sub, m)
        fully_shard(block, mesh=dims.world_mesh, mp_policy=mp or MixedPrecisionPolicy(), **kw)
    fully_shard(model, mesh=dims.world_mesh, mp_policy=mp or MixedPrecisionPolicy(), **kw)
    return model


def local_grad_sq(params: list[Tensor]) -> Tensor:
    """Sum of squared gradient entries this rank holds (fp64), local shards only."""
    sq = torch.zeros((), dtype=torch.float64)
    for p in params:
        g = p.grad
        if g is None:
            continue
        g = g.to_local() if isinstance(g, DTensor) else g
        sq += g.detach().double().square().sum().cpu()
    return sq


def clip_grad_norm_(params: list[Tensor], dims: ParallelDims, max_norm: float) -> Tensor:
    """Global L2 gradient norm of the logical model, clipping in place to `max_norm` if > 0; returns the norm.

    After `shard_model` every gradient entry of the logical model lives on exactly one rank (dense: sharded over
    all ranks; experts: over dp x ep), so the squared norm is one all-reduce of the local sums over the world.
    NaN/inf norms leave the gradients alone: the trainer stops on them.
    """
    sq = local_grad_sq(params).to(dims.comm_device)
    if dims.distributed:
        with collective_guard("all_reduce(gradient norm)", dims):
            dist.all_reduce(sq, group=dims.world_group)
    total = sq.sqrt().cpu()
    if max_norm > 0 and bool(torch.isfinite(total)):
        scale = max_norm / (float(total) + 1e-6)
        if scale < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.detach().mul_(scale)
    return total.float()


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Turn FSDP2's gradient reduce-scatter off for accumulation micro-batches and back on for the last one."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(sync, recurse=False)
