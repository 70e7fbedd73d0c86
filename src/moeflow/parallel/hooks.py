"""`DistributedHooks`: the trainer's `ParallelHooks` seam (moeflow.train.trainer) implemented with EP + DP.

    dims = init_distributed(ep=args.ep)
    trainer = Trainer(cfg, run_dir, hooks=DistributedHooks(dims))

Each method is one of the functions of this package; the class only binds them to one `ParallelDims`.
Setting `hooks.dims.step = step` at the start of each step makes a `PeerFailureError` name the step.
Everything here is collective: every rank must make the same calls in the same order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moeflow.parallel.apply import allreduce_gradients, clip_grad_norm_, parallelize, update_router_biases
from moeflow.parallel.checkpoint import (gather_full_optimizer_state, gather_full_state_dict,
                                         load_full_optimizer_state, load_full_state_dict)
from moeflow.parallel.groups import ParallelDims
from moeflow.parallel.watchdog import collective_guard
from moeflow.routing.log import RoutingLog


class DistributedHooks:
    """Expert + data parallelism for the training loop; with world 1 every call is the single-process identity."""

    def __init__(self, dims: ParallelDims, mode: str = "auto") -> None:
        """Bind to a layout from `init_distributed`; `mode` is the EP dispatcher mode (see `parallelize`)."""
        self.dims, self.mode = dims, mode
        self.rank, self.world = dims.rank, dims.world
        self._model: nn.Module | None = None

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Broadcast rank 0's weights, shard the experts, swap in all-to-all dispatchers."""
        self._model = parallelize(model, self.dims, self.mode)
        return self._model

    def begin_step(self, step: int) -> None:
        """Record the step about to run, so a PeerFailureError names it."""
        self.dims.step = step

    def reduce_gradients(self, model: nn.Module) -> None:
        """Replicated grads: world mean; expert grads: EDP sum / world."""
        allreduce_gradients(model, self.dims)

    def all_finite(self, finite: bool) -> bool:
        """True only if every rank's value was finite (all ranks then stop on the same step)."""
        if not self.dims.distributed:
            return finite
        flag = torch.tensor([1.0 if finite else 0.0], device=self.dims.comm_device)
        with collective_guard("all_reduce(finite check)", self.dims):
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def clip_grad_norm(self, params: list[Tensor], max_norm: float) -> Tensor:
        """Norm of the logical model's gradients (experts summed over the EP group), clipped if max_norm > 0."""
        if self._model is None:
            raise RuntimeError("DistributedHooks.clip_grad_norm before wrap_model: wrap the model first")
        return clip_grad_norm_(self._model, self.dims, max_norm, params)

    def mean(self, value: float) -> float:
        """Average of a Python number over ranks."""
        if not self.dims.distributed:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.dims.comm_device)
        with collective_guard("all_reduce(mean)", self.dims):
            dist.all_reduce(t)
        return float(t.item()) / self.dims.world

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """Logical state dict on rank 0 (full [E, ...] experts); empty on the other ranks."""
        return gather_full_state_dict(model, self.dims) or {}

    def load_full_state_dict(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        """Each rank keeps its experts' block of a logical state dict."""
        load_full_state_dict(model, state, self.dims)

    def full_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Optimizer state keyed by parameter name with full expert moments, on rank 0 (empty elsewhere).

        Save this instead of `optimizer.state_dict()` under EP: rank 0's own state only covers its experts.
        """
        return gather_full_optimizer_state(model, optimizer, self.dims) or {}

    def load_full_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                                  state: dict[str, Any]) -> None:
        """Load what `full_optimizer_state` saved, under any EP size."""
        load_full_optimizer_state(model, optimizer, state, self.dims)

    def update_router_biases(self, log: RoutingLog, rate: float | None = None) -> int:
        """After optimizer.step(): DeepSeek-style bias update from the global expert load of the step's routing log
        (same on every rank)."""
        return update_router_biases(log, self.dims, rate)
