"""Expert parallelism (EP) and FSDP2 data parallelism over torch.distributed, applied from outside the model.

The only package besides `train/` that imports torch.distributed. What a trainer does, in order
(`torchrun --nproc-per-node 4 -m moeflow train --ep 2`: a ("dp", "ep") = (2, 2) DeviceMesh; without torchrun the
same code runs on a world-1 mesh):

    from moeflow.parallel import init_distributed, parallelize, shard_model, clip_grad_norm_

    dims = init_distributed(ep=args.ep, timeout_s=300)   # reads RANK/WORLD_SIZE; builds the mesh
    torch.manual_seed(seed)                              # same init everywhere (parallelize also broadcasts rank 0's)
    model = shard_model(parallelize(MoETransformer(cfg), dims), dims)   # experts: DTensor Shard(0) over ep + FSDP2
    opt = torch.optim.AdamW(model.parameters(), lr)      # AFTER sharding: parameters were replaced by DTensors
    for step, (ids, targets) in enumerate(loader):       # each rank reads its own 1/world of the global batch
        dims.step = step                                 # named in PeerFailureError messages
        loss = cross_entropy(model(ids), targets) + model.aux_loss()   # mean over THIS rank's tokens
        loss.backward()                                  # FSDP2 reduce-scatters gradients block by block
        clip_grad_norm_(params, dims, max_norm=1.0)      # global norm of the logical model
        opt.step(); opt.zero_grad(set_to_none=True)
        update_router_biases(log, dims)                  # DeepSeek aux-free bias from the GLOBAL load (if any)
    shutdown(dims)

`DistributedHooks(dims)` packages these calls as the `ParallelHooks` that moeflow.train.Trainer accepts, including
the state dicts that moeflow.train.sharded_checkpoint saves with DCP (each rank its shards; any layout resumes).
A dead or stuck peer makes every other rank raise `PeerFailureError` within `timeout_s` (often at once).
Single-process equivalence: an EP layer on P ranks with `num_groups = g` routes like the single-process layer
with `num_groups = P * g` on the concatenated batch (each rank's tokens are its own routing groups).
"""

from moeflow.parallel.apply import expert_parameters, parallelize, update_router_biases
from moeflow.parallel.collectives import all_to_all, exchange_counts
from moeflow.parallel.ep_dispatch import AllToAllDispatcher, CommStats, EPDispatchPlan
from moeflow.parallel.fsdp import clip_grad_norm_, mixed_precision_policy, set_gradient_sync, shard_model
from moeflow.parallel.groups import (ParallelConfigError, ParallelDims, check_layout, init_distributed, is_main,
                                     shutdown)
from moeflow.parallel.hooks import DistributedHooks
from moeflow.parallel.launch import WorkerError, spawn_local
from moeflow.parallel.watchdog import (PeerFailureError, barrier_with_timeout, collective_guard, hang_watchdog,
                                       step_guard)

__all__ = ["ParallelDims", "ParallelConfigError", "check_layout", "init_distributed", "is_main", "shutdown",
           "parallelize", "shard_model", "clip_grad_norm_", "set_gradient_sync", "mixed_precision_policy",
           "expert_parameters", "AllToAllDispatcher", "EPDispatchPlan", "CommStats", "all_to_all", "exchange_counts",
           "DistributedHooks", "PeerFailureError", "barrier_with_timeout", "collective_guard", "hang_watchdog",
           "spawn_local", "WorkerError", "update_router_biases", "step_guard"]
