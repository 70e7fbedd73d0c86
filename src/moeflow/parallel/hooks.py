"""`DistributedHooks`: the trainer's `ParallelHooks` seam (moeflow.train.trainer) on FSDP2 + expert parallelism.

    dims = init_distributed(ep=args.ep)
    trainer = Trainer(model, task, run_dir, hooks=DistributedHooks(dims))

`wrap_model` slices the experts and swaps in the all-to-all dispatcher (`parallelize`), then applies FSDP2 over the
DeviceMesh (`shard_model`). Gradients are reduce-scattered by FSDP2 during the backward; the hooks only add what
FSDP2 does not do: a global gradient norm, agreement on finiteness, the DeepSeek bias update from the global load,
and the state dicts a Distributed Checkpoint saves (local shards under logical names). Setting
`hooks.dims.step = step` at the start of each step makes a `PeerFailureError` name the step.
Everything here is collective: every rank must make the same calls in the same order.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from moeflow.parallel.apply import parallelize, update_router_biases
from moeflow.parallel.fsdp import clip_grad_norm_, set_gradient_sync, shard_model
from moeflow.parallel.groups import ParallelDims
from moeflow.parallel.watchdog import barrier_with_timeout, collective_guard, step_guard
from moeflow.routing.log import RoutingLog


class DistributedHooks:
    """FSDP2 + expert parallelism for the training loop; at world 1 it runs the same code on a one-rank mesh."""

    sharded_checkpoints = True

    def __init__(self, dims: ParallelDims, mode: str = "auto") -> None:
        """Bind to a layout from `init_distributed`; `mode` is the EP dispatcher mode (see `parallelize`)."""
        self.dims, self.mode = dims, mode
        self.rank, self.world = dims.rank, dims.world
        self._model: nn.Module | None = None
        self._ckpt_group: dist.ProcessGroup | None = None

    def wrap_model(self, model: nn.Module, precision: str = "fp32") -> nn.Module:
        """Broadcast rank 0's weights, shard the experts over ep, FSDP2 over the mesh (`precision`: compute dtype,
        "fp32" or "bf16"; master weights and reductions stay fp32, routers compute in fp32)."""
        self._model = shard_model(parallelize(model, self.dims, self.mode), self.dims, precision)
        return self._model

    def begin_step(self, step: int) -> None:
        """Record the step about to run, so a PeerFailureError names it."""
        self.dims.step = step

    def guard(self, what: str) -> AbstractContextManager[None]:
        """Around forward/backward: a dead or hung peer inside FSDP2's own collectives becomes PeerFailureError."""
        return step_guard(what, self.dims)

    def gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        """Off for gradient-accumulation micro-batches (gradients accumulate unreduced), on for the last one."""
        set_gradient_sync(model, enabled)

    def all_finite(self, finite: bool) -> bool:
        """True only if every rank's value was finite (all ranks then stop on the same step)."""
        if not self.dims.distributed:
            return finite
        flag = torch.tensor([1.0 if finite else 0.0], device=self.dims.comm_device)
        with collective_guard("all_reduce(finite check)", self.dims):
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def clip_grad_norm(self, params: list[Tensor], max_norm: float) -> Tensor:
        """Norm of the logical model's gradients (one all-reduce of the local shards' squares), clipped if > 0."""
        return clip_grad_norm_(params, self.dims, max_norm)

    def mean(self, value: float) -> float:
        """Average of a Python number over ranks."""
        return self.sum(value) / self.dims.world

    def sum(self, value: float) -> float:
        """Sum of a Python number over ranks (global token counts)."""
        if not self.dims.distributed:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.dims.comm_device)
        with collective_guard("all_reduce(sum)", self.dims):
            dist.all_reduce(t)
        return float(t.item())

    def barrier(self, name: str) -> None:
        """Wait for every rank (bounded by the group timeout; the error names the missing ranks)."""
        barrier_with_timeout(self.dims, name)

    def checkpoint_group(self) -> dist.ProcessGroup | None:
        """A gloo group of every rank for asynchronous checkpoint writes, created on first use (collective: the
        first save runs on every rank); its background collectives never interleave with training's."""
        if not self.dims.distributed:
            return None
        if self._ckpt_group is None:
            self._ckpt_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.dims.timeout_s))
        return self._ckpt_group

    def state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                    full: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model, optimizer) state dicts keyed by parameter name: local DTensor shards (for DCP), or with `full`
        the gathered logical tensors on rank 0 (empty on the others)."""
        opts = StateDictOptions(full_state_dict=full, cpu_offload=full)
        with collective_guard("gather state dict" if full else "state dict", self.dims):
            return get_state_dict(model, optimizer, options=opts)

    def load_state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                         optim_state: dict[str, Any], full: bool = False) -> None:
        """Load what `state_dicts` returned (`full`: logical tensors, e.g. an old single-file checkpoint, which
        every rank holds whole and keeps its own shards of)."""
        opts = StateDictOptions(full_state_dict=full, strict=True)
        with collective_guard("load state dict", self.dims):
            set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                           options=opts)

    def update_router_biases(self, log: RoutingLog, rate: float | None = None) -> int:
        """After optimizer.step(): DeepSeek-style bias update from the global expert load of the step's routing log
        (same on every rank)."""
        return update_router_biases(log, self.dims, rate)
