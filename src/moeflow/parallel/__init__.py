"""Expert parallelism (EP) combined with data parallelism over torch.distributed, applied from outside the model.

The only package besides `train/` that imports torch.distributed. What a trainer calls, in order
(`torchrun --nproc-per-node 4 -m moeflow train --ep 2`: 4 ranks, experts split in 2, each shard replicated twice;
without torchrun the same code runs as one process with ep=1):

    from moeflow.parallel import (init_distributed, parallelize, allreduce_gradients, clip_grad_norm_, is_main,
                                  barrier_with_timeout, gather_full_state_dict, load_full_state_dict)

    dims = init_distributed(ep=args.ep, timeout_s=300)   # reads RANK/WORLD_SIZE; world 1 works without torchrun
    torch.manual_seed(seed)                              # same init everywhere (parallelize also broadcasts rank 0's)
    model = MoETransformer(cfg)
    if resume:                                           # a logical checkpoint saved under any EP size
        state = torch.load(path, map_location="cpu")
    parallelize(model, dims)                             # slice experts to E/ep per rank, swap in a2a dispatchers
    if resume:
        load_full_state_dict(model, state, dims)         # every rank: keeps its own experts' block
    opt = torch.optim.AdamW(model.parameters(), lr)      # AFTER parallelize: expert params were replaced
    for step, (ids, targets) in enumerate(loader):       # each rank reads its own 1/world of the global batch
        dims.step = step                                 # named in PeerFailureError messages
        loss = cross_entropy(model(ids), targets) + model.aux_loss()   # mean over THIS rank's tokens
        loss.backward()
        allreduce_gradients(model, dims)                 # replicated: world mean; experts: EDP sum / world
        clip_grad_norm_(model, dims, max_norm=1.0)       # global norm of the logical model
        opt.step(); opt.zero_grad(set_to_none=True)
        update_router_biases(model, dims)                # DeepSeek aux-free bias from the GLOBAL load (if any)
        if step % save_every == 0:
            state = gather_full_state_dict(model, dims)  # collective; full [E, ...] experts on rank 0 only
            if is_main(dims):
                torch.save(state, path)
            barrier_with_timeout(dims, "checkpoint")     # names ranks that never arrive
    shutdown(dims)

Losses reported for logging should be averaged over ranks by the trainer (each rank sees only its tokens).
`DistributedHooks(dims)` packages these calls as the `ParallelHooks` that moeflow.train.Trainer accepts.
Under EP save `gather_full_optimizer_state` rather than `optimizer.state_dict()` (rank 0 holds only its experts'
moments) and restore it with `load_full_optimizer_state`, so optimizer state reshards like the weights.
A dead or stuck peer makes every other rank raise `PeerFailureError` within `timeout_s` (often at once).
Single-process equivalence: an EP layer on P ranks with `num_groups = g` routes like the single-process layer
with `num_groups = P * g` on the concatenated batch (each rank's tokens are its own routing groups).
"""

from moeflow.parallel.apply import (allreduce_gradients, clip_grad_norm_, expert_parameters, parallelize,
                                    update_router_biases)
from moeflow.parallel.checkpoint import (gather_full_optimizer_state, gather_full_state_dict,
                                         load_full_optimizer_state, load_full_state_dict)
from moeflow.parallel.collectives import all_to_all, exchange_counts
from moeflow.parallel.ep_dispatch import AllToAllDispatcher, CommStats, EPDispatchPlan
from moeflow.parallel.groups import ParallelConfigError, ParallelDims, init_distributed, is_main, shutdown
from moeflow.parallel.hooks import DistributedHooks
from moeflow.parallel.launch import WorkerError, spawn_local
from moeflow.parallel.watchdog import PeerFailureError, barrier_with_timeout, collective_guard, hang_watchdog

__all__ = ["ParallelDims", "ParallelConfigError", "init_distributed", "is_main", "shutdown", "parallelize",
           "allreduce_gradients", "clip_grad_norm_", "expert_parameters", "AllToAllDispatcher",
           "EPDispatchPlan", "CommStats", "all_to_all", "exchange_counts", "gather_full_state_dict",
           "load_full_state_dict", "gather_full_optimizer_state", "load_full_optimizer_state", "DistributedHooks",
           "PeerFailureError", "barrier_with_timeout", "collective_guard", "hang_watchdog", "spawn_local",
           "WorkerError", "update_router_biases"]
