"""Process groups for expert parallelism combined with data parallelism (world = EP x EDP).

Every rank holds data (data-parallel size = world). Experts are split over an expert-parallel (EP) group of
`ep` consecutive ranks; the `world // ep` ranks that hold the same experts form an expert-data-parallel (EDP)
group (DeepSpeed's "E+D" layout, `utils/groups.py`):

    world 4, ep 2:   EP groups  [0, 1] [2, 3]      (different experts, exchange tokens)
                     EDP groups [0, 2] [1, 3]      (same experts, average expert gradients)

The same layout is a named 2-D DeviceMesh `("dp", "ep")` of shape `(world // ep, ep)`: `mesh["ep"]` is this
rank's EP group, `mesh["dp"]` its EDP group (the ranks that hold the same experts and shard them with FSDP2), and
`world_mesh` (the flattened mesh) shards the dense parameters over every rank.

`init_distributed` is the entry point: it reads torchrun's environment, creates the default process group with
an explicit timeout (so a dead peer becomes an error, not a hang) and builds the subgroups and the mesh. One
process without torchrun gets a world-1 mesh (a one-rank gloo group), so it runs the same FSDP2 code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DEFAULT_TIMEOUT_S = 300.0


class ParallelConfigError(ValueError):
    """The parallel layout cannot work (world size, EP size, expert count); the message says how to fix it."""


@dataclass
class ParallelDims:
    """The parallel layout of this process: world size, EP size, this rank, and the groups it belongs to.

    Build it with `init_distributed` (or `ParallelDims(world=1, ep=1)` for a single process). The trainer may set
    `step` before each step so that a `PeerFailureError` names it.
    """

    world: int
    ep: int
    rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    step: int | None = None
    ep_group: dist.ProcessGroup | None = field(default=None, repr=False)  # ranks holding different experts
    edp_group: dist.ProcessGroup | None = field(default=None, repr=False)  # ranks holding the same experts
    world_group: dist.ProcessGroup | None = field(default=None, repr=False)
    mesh: DeviceMesh | None = field(default=None, repr=False)  # ("dp", "ep"), built by build_mesh
    world_mesh: DeviceMesh | None = field(default=None, repr=False)  # mesh flattened: every rank, for dense params

    def __post_init__(self) -> None:
        """Check the layout is possible."""
        for name in ("world", "ep"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ParallelConfigError(f"ParallelDims.{name} must be a positive integer, got {v!r}")
        if self.world % self.ep:
            raise ParallelConfigError(
                f"expert-parallel size ep={self.ep} must divide the world size {self.world}; "
                f"launch a multiple of {self.ep} processes or pick ep from the divisors of {self.world}")
        if not 0 <= self.rank < self.world:
            raise ParallelConfigError(f"rank {self.rank} is outside the world of {self.world} processes")
        if self.timeout_s <= 0:
            raise ParallelConfigError(f"timeout_s must be > 0, got {self.timeout_s}")

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: replicas of each expert shard."""
        return self.world // self.ep

    @property
    def dp(self) -> int:
        """Data-parallel size: every rank holds its own slice of the batch."""
        return self.world

    @property
    def ep_rank(self) -> int:
        """Position of this rank in its EP group = index of the expert shard it holds."""
        return self.rank % self.ep

    @property
    def edp_rank(self) -> int:
        """Position of this rank in its EDP group."""
        return self.rank // self.ep

    @property
    def distributed(self) -> bool:
        """Whether there is more than one process."""
        return self.world > 1

    @property
    def comm_device(self) -> torch.device:
        """Where tensors handed to collectives must live: the current GPU under NCCL, else the CPU."""
        if self.distributed and dist.is_initialized() and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def ep_ranks(self) -> list[int]:
        """Global ranks of this rank's EP group."""
        base = self.edp_rank * self.ep
        return list(range(base, base + self.ep))

    def edp_ranks(self) -> list[int]:
        """Global ranks of this rank's EDP group."""
        return list(range(self.ep_rank, self.world, self.ep))

    def local_experts(self, num_experts: int, where: str = "MoE layer") -> range:
        """The global ids of the experts this rank holds (a contiguous block of num_experts // ep)."""
        if num_experts % self.ep:
            raise ParallelConfigError(
                f"{where}: num_experts={num_experts} is not divisible by ep={self.ep}; each rank must hold the "
                f"same number of experts: choose ep from the divisors of {num_experts}")
        n = num_experts // self.ep
        return range(self.ep_rank * n, (self.ep_rank + 1) * n)

    @property
    def mesh_shape(self) -> tuple[int, int]:
        """(dp, ep) of the DeviceMesh: dp = ranks holding the same experts (FSDP over them), ep = expert shards."""
        return (self.edp, self.ep)

    def build_mesh(self) -> None:
        """Create the named ("dp", "ep") DeviceMesh on an initialised default group (collective, even at world 1)."""
        if not dist.is_initialized():
            raise ParallelConfigError("build_mesh needs torch.distributed initialised; use init_distributed()")
        device = self.comm_device.type
        self.mesh = init_device_mesh(device, self.mesh_shape, mesh_dim_names=("dp", "ep"))
        # NOTE: a 1-D mesh of its own rather than mesh._flatten(): FSDP2 only needs a mesh whose group spans
        # every rank, and this keeps to public API
        self.world_mesh = init_device_mesh(device, (self.world,), mesh_dim_names=("world",))

    def build_groups(self) -> None:
        """Create the EP and EDP subgroups on an initialised default group (collective: every rank calls it)."""
        if not self.distributed:
            return
        if not dist.is_initialized():
            raise ParallelConfigError("build_groups needs torch.distributed initialised; use init_distributed()")
        if dist.get_world_size() != self.world:
            raise ParallelConfigError(f"ParallelDims.world={self.world} but the process group has "
                                      f"{dist.get_world_size()} ranks")
        timeout = timedelta(seconds=self.timeout_s)
        self.world_group = dist.group.WORLD
        # new_group is collective over the whole world: every rank creates every group, in the same order
        for i in range(self.edp):
            g = dist.new_group(list(range(i * self.ep, (i + 1) * self.ep)), timeout=timeout)
            if i == self.edp_rank:
                self.ep_group = g
        for j in range(self.ep):
            g = dist.new_group(list(range(j, self.world, self.ep)), timeout=timeout)
            if j == self.ep_rank:
                self.edp_group = g


def _default_backend() -> str:
    """nccl when CUDA is usable, else gloo."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def check_layout(world: int, ep: int, dp: int | None = None, num_experts: int | None = None) -> None:
    """Raise ParallelConfigError naming the numbers if (dp, ep) cannot tile `world` (or split the experts)."""
    for name, v in (("ep", ep), ("dp", dp)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ParallelConfigError(f"{name} must be a positive integer, got {v!r}")
    if world % ep:
        raise ParallelConfigError(
            f"expert-parallel size ep={ep} must divide the world size {world}; launch a multiple of {ep} "
            f"processes or pick ep from the divisors of {world}")
    if dp is not None and dp * ep != world:
        raise ParallelConfigError(
            f"dp x ep must equal the world size: dp={dp} x ep={ep} = {dp * ep}, but {world} processes were "
            f"launched; use dp={world // ep} (or leave --dp unset) or launch {dp * ep} processes")
    if num_experts is not None and num_experts % ep:
        raise ParallelConfigError(
            f"num_experts={num_experts} is not divisible by ep={ep}; each rank must hold the same number of "
            f"experts: choose ep from the divisors of {num_experts}")


def init_distributed(ep: int = 1, backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     dp: int | None = None, num_experts: int | None = None, mesh: bool = True) -> ParallelDims:
    """Join the job torchrun started (RANK, WORLD_SIZE, MASTER_ADDR/PORT); build the EP/EDP groups and the mesh.

    Without torchrun (no WORLD_SIZE, or 1) this is the world-1 layout: with `mesh` it initialises a one-rank gloo
    group so the FSDP2 path runs unchanged. If the default group is already initialised (e.g. by a test
    harness), it is reused. The layout is checked before any group exists: `dp` (if given) times `ep` must be
    the world size, and `ep` must divide `num_experts` (if given). `timeout_s` bounds every collective: a dead
    or stuck peer raises instead of hanging (converted to `PeerFailureError` by our calls).
    """
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if world > 1:
            check_layout(world, ep, dp, num_experts)  # before the rendezvous: a bad layout costs no waiting
            if not dist.is_available():
                raise ParallelConfigError("this torch build has no torch.distributed; run with one process")
            backend = backend or _default_backend()
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    if world == 1 and ep > 1:
        raise ParallelConfigError(f"ep={ep} needs {ep} processes but this is a single process; launch with "
                                  f"`torchrun --nproc-per-node {ep} -m moeflow train --ep {ep}`")
    check_layout(world, ep, dp, num_experts)
    dims = ParallelDims(world=world, ep=ep, rank=rank, timeout_s=timeout_s)
    dims.build_groups()
    if mesh:
        if not dist.is_initialized():  # world 1 without torchrun: a private one-rank group, no ports
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timedelta(seconds=timeout_s))
        dims.build_mesh()
    return dims


def is_main(dims: ParallelDims) -> bool:
    """Whether this is global rank 0 (the one that logs and writes checkpoints)."""
    return dims.rank == 0


def shutdown(dims: ParallelDims) -> None:
    """Destroy the process groups (call once at the end of training; also the world-1 group init_distributed made)."""
    if dist.is_initialized():
        dist.destroy_process_group()
