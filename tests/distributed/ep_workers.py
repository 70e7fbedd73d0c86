"""Worker bodies for the multi-process tests; they run inside `run_world` ranks and return plain results.

One spawn per world size runs everything (`combined_worker`): spawning is the expensive part (every rank
imports torch), so the layer-parity cases, the a2a primitive and the training/checkpoint runs share it. The
test modules only compare the returned numbers against single-process references.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from dist_harness import world_mean

from moeflow import MoEConfig, MoELayer, moe_layers
from moeflow.models import MoETransformer
from moeflow.models.config import ModelConfig
from moeflow.routing.log import record_routing
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from moeflow.parallel import (ParallelDims, all_to_all, barrier_with_timeout, clip_grad_norm_, expert_parameters,
                              init_distributed, parallelize, shard_model, update_router_biases)

T_LOCAL, D = 12, 8
CASES: dict[str, dict] = {
    "topk_dropless": dict(router="topk", top_k=2, shared_d_hidden=4),
    "skewed_zero_splits": dict(router="topk", top_k=1, router_bias=True),
    "switch_capacity": dict(router="switch", top_k=1, capacity_factor=1.0),
    "switch_capacity_variable": dict(router="switch", top_k=1, capacity_factor=1.0, mode="variable"),
    "gshard_top2": dict(router="gshard", top_k=2, capacity_factor=1.0),
    "expert_choice": dict(router="expert_choice", top_k=2, capacity_factor=1.0),
    "hierarchical": dict(router="hierarchical", top_k=2, num_clusters=4),
    "deepseek_bias": dict(router="deepseek", top_k=2, n_group=4, topk_group=2, bias_update_rate=0.01),
    "topk_dedup": dict(router="topk", top_k=3, shared_d_hidden=4, mode="dedup"),
    "gshard_dedup": dict(router="gshard", top_k=2, capacity_factor=1.0, mode="dedup"),
    "hierarchical_dedup": dict(router="hierarchical", top_k=2, num_clusters=4, mode="dedup"),
}


def _a2a_primitive(rank: int, world: int, dims) -> dict[str, float]:
    """Uneven and zero splits, forward content and backward routing of all_to_all."""
    send = [(rank + 2 * j) % 3 for j in range(world)]  # includes zero-row splits
    recv = [(j + 2 * rank) % 3 for j in range(world)]
    x = torch.cat([torch.full((n, 2), 100.0 * rank + j, dtype=torch.float64) for j, n in enumerate(send)])
    x.requires_grad_(True)
    y = all_to_all(x, recv, send, dims.ep_group, dims)
    expected = torch.cat([torch.full((n, 2), 100.0 * j + rank, dtype=torch.float64) for j, n in enumerate(recv)])
    weight = torch.arange(y.shape[0] * 2, dtype=torch.float64).view(-1, 2) + 1000.0 * rank
    (y * weight).sum().backward()
    # the gradient of row i sent to rank j is the weight rank j applied to it: recompute rank j's weight rows
    grad_expected = []
    for j, n in enumerate(send):
        rows_before = sum((k + 2 * j) % 3 for k in range(rank))  # rows rank j received from ranks < rank
        full = torch.arange(sum((k + 2 * j) % 3 for k in range(world)) * 2, dtype=torch.float64).view(-1, 2)
        grad_expected.append(full[rows_before:rows_before + n] + 1000.0 * j)
    return {"a2a_fwd": float((y.detach() - expected).abs().max()) if y.numel() else 0.0,
            "a2a_bwd": float((x.grad - torch.cat(grad_expected)).abs().max()) if x.numel() else 0.0}


def reference_reduce(layer: torch.nn.Module, dims: ParallelDims) -> None:
    """The gradient convention FSDP2 implements, done by hand for a bare layer (the layer tests check the
    dispatcher, not the reduction): replicated grads world mean; expert grads EDP sum / world."""
    expert = {id(p) for p in expert_parameters(layer).values()}
    for p in layer.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if id(p) in expert:
            if dims.edp > 1:
                torch.distributed.all_reduce(p.grad, group=dims.edp_group)
        else:
            torch.distributed.all_reduce(p.grad)
        p.grad.div_(dims.world)


def _layer_case(name: str, rank: int, world: int, dims, device: str = "cpu") -> dict[str, float]:
    """Max abs differences EP layer vs reference for one router case (tensors and weights on `device`)."""
    spec = dict(CASES[name])
    mode = spec.pop("mode", "auto")
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=D, d_hidden=6, num_experts=8, **spec)
    ref = MoELayer(cfg.replace(num_groups=world)).double().eval().to(device)
    if name == "skewed_zero_splits":  # every token to expert 0 (rank 0): other ranks receive nothing
        with torch.no_grad():
            ref.router.bias.copy_(torch.tensor([8.0] + [0.0] * 7))
    layer = MoELayer(cfg).double().eval().to(device)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(world, T_LOCAL, D, dtype=torch.float64).to(device)
    g = torch.randn_like(x)
    xr = x.clone().requires_grad_(True)
    y_ref = ref(xr)
    ((y_ref * g).sum() / (world * T_LOCAL) + ref.aux_loss).backward()
    routing = ref.last_routing

    parallelize(layer, dims, mode=mode)
    xl = x[rank].clone().requires_grad_(True)
    with record_routing() as log:
        y = layer(xl)
    ((y * g[rank]).sum() / T_LOCAL + layer.aux_loss).backward()
    reference_reduce(layer, dims)

    out = {"y": float((y - y_ref[rank]).abs().max()),
           "x_grad": float((xl.grad - world * xr.grad[rank]).abs().max()),
           "aux": float((world_mean(layer.aux_loss) - ref.aux_loss).abs()),
           "dropped_ref": float(routing.dropped_fraction),
           "min_split": float(min(layer.dispatcher.last_comm.recv_rows)) if dims.ep > 1 else -1.0,
           "sent_rows": float(sum(layer.dispatcher.last_comm.send_rows)) if dims.ep > 1 else -1.0}
    if cfg.router == "deepseek":  # the aux-free bias update must see the global load on every rank
        ref.router.update_bias(routing.tokens_per_expert)
        update_router_biases(log, dims)
        bias = layer.router.e_score_correction_bias
        out["bias"] = float((bias - ref.router.e_score_correction_bias).abs().max())
        out["bias_unmoved"] = float(bool(bias.abs().max() == 0))  # 1 would mean the update did nothing
    for key, val in routing.losses.items():
        out[f"loss:{key}"] = float((world_mean(layer.last_routing.losses[key]) - val).abs())
    ref_params = dict(ref.named_parameters())
    sharded = expert_parameters(layer)
    assert set(sharded) == ({"experts.w_in", "experts.w_out"} if dims.ep > 1 else set())
    for pname, p in layer.named_parameters():
        g_ref = ref_params[pname].grad
        if pname in sharded:
            local = dims.local_experts(cfg.num_experts)
            g_ref = g_ref[local.start:local.stop]
        out[f"grad:{pname}"] = float((p.grad - g_ref).abs().max())
    return out


def parity_worker(rank: int, world: int, eps: list[int], device: str = "cpu") -> dict:
    """Every case under every EP size in `eps` (groups rebuilt per EP size)."""
    results: dict = {}
    for ep in eps:
        dims = init_distributed(ep=ep, timeout_s=30)
        if ep == world:
            results[("a2a", ep)] = _a2a_primitive(rank, world, dims)
        for name in CASES:
            results[(name, ep)] = _layer_case(name, rank, world, dims, device)
    return results


GLOBAL_BATCH, SEQ, VOCAB, STEPS = 4, 6, 32, 4
ROUTERS = {"topk": dict(router="topk", top_k=2), "switch": dict(router="switch", top_k=1, capacity_factor=1.0,
                                                                  jitter_eps=0.0)}


def make_model(router: str, num_groups: int) -> MoETransformer:
    """A 2-layer fp64 MoE decoder, identically seeded everywhere."""
    torch.manual_seed(0)
    moe = MoEConfig(d_model=16, d_hidden=8, num_experts=4, num_groups=num_groups, **ROUTERS[router])
    cfg = ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=SEQ,
                      ffn_hidden=16, moe=moe)
    model = MoETransformer(cfg).double()
    with torch.no_grad():  # decisive routing: no near-ties between experts for fp32-vs-fp64 noise to flip
        for _, layer in moe_layers(model):
            layer.router.weight.normal_(0.0, 1.0)
    return model


def make_data() -> torch.Tensor:
    """Token ids for every step and the probe batch: [STEPS + 1, GLOBAL_BATCH, SEQ + 1]."""
    return torch.randint(0, VOCAB, (STEPS + 1, GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))


def train_step(model, opt, ids: torch.Tensor, dims: ParallelDims) -> tuple[float, float]:
    """One SGD step on this rank's rows; returns (global mean loss, global grad norm)."""
    b = ids.shape[0] // dims.world
    local = ids[dims.rank * b:(dims.rank + 1) * b]
    logits = model(local[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), local[:, 1:].reshape(-1)) + model.aux_loss()
    opt.zero_grad(set_to_none=True)
    loss.backward()  # sharded: FSDP2 reduce-scatters here
    norm = clip_grad_norm_([p for p in model.parameters()], dims, max_norm=0.5)
    opt.step()
    mean = loss.detach().clone()
    if dims.distributed:
        torch.distributed.all_reduce(mean)
    return float(mean) / dims.world, float(norm)


def full_grads(model) -> dict[str, torch.Tensor]:
    """Logical gradients (full [E, ...] experts) by parameter name; collective over every rank."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().clone()
    return out


def probe_logits(model, ids: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """Logits for this rank's rows of the probe batch (eval mode)."""
    b = ids.shape[0] // dims.world
    model.eval()
    with torch.no_grad():
        out = model(ids[dims.rank * b:(dims.rank + 1) * b, :-1])
    model.train()
    return out


def train_worker(rank: int, world: int, runs: list[tuple[str, int]], ckpt_dir: str, resume: bool) -> dict:
    """From scratch: 3 steps, a DCP save (EP>1 runs), 4th step. Resume: load the world-2 EP=2 DCP checkpoint into
    this layout (DCP reshards), 4th step. Every run is FSDP2 over the (dp, ep) mesh."""
    data, out = make_data(), {}
    for router, ep in runs:
        dims = init_distributed(ep=ep, timeout_s=30)
        model = shard_model(parallelize(make_model(router, num_groups=1), dims), dims)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses, norms = [], []
        path = str(Path(ckpt_dir) / f"{router}.dcp")
        if resume:
            model_sd, optim_sd = get_state_dict(model, opt)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=path)
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            for step in range(STEPS - 1):
                loss, norm = train_step(model, opt, data[step], dims)
                losses.append(loss)
                norms.append(norm)
            if ep > 1:  # every rank writes its own shards
                model_sd, optim_sd = get_state_dict(model, opt)
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        probe = probe_logits(model, data[STEPS], dims)
        loss, norm = train_step(model, opt, data[STEPS - 1], dims)
        grads = full_grads(model)
        out[(router, ep)] = {"losses": losses + [loss], "norms": norms + [norm], "probe": probe,
                             "grads": grads if rank == 0 else None}
    return out


def trainer_overrides(corpus: str, **extra: object) -> dict[str, object]:
    """A Trainer run small enough for a few steps per second (the shape tests/test_train.py uses)."""
    o: dict[str, object] = {
        "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.n_kv_heads": 1,
        "model.max_seq_len": 32, "model.ffn_hidden": 64, "model.moe.d_hidden": 32, "model.moe.num_experts": 4,
        "train.steps": 4, "train.batch_size": 4, "train.seq_len": 16, "train.eval_every": 4, "train.eval_batches": 2,
        "train.ckpt_every": 2, "train.warmup": 1, "train.threads": 1, "data.path": corpus}
    o.update(extra)
    return o


def trainer_worker(rank: int, world: int, corpus: str, run_dir: str) -> dict:
    """moeflow.train.Trainer with DistributedHooks (EP = world): final val loss, logged grad norms, resume works."""
    from moeflow.parallel import DistributedHooks
    from moeflow.train import apply_overrides, get_preset, lm_trainer
    cfg = apply_overrides(get_preset("tiny"), trainer_overrides(corpus))
    hooks = DistributedHooks(init_distributed(ep=world, timeout_s=60))
    first = lm_trainer(cfg, run_dir, hooks=hooks, progress=False)
    first.run(stop_at=2)  # checkpoint at step 2 (gathered logical state), then resume from it
    res = lm_trainer(cfg, run_dir, resume=True, hooks=hooks, progress=False).run()
    metrics = (Path(run_dir) / "metrics.jsonl").read_text() if rank == 0 else ""
    return {"val_loss": res.val_loss, "step": res.step, "metrics": metrics}


def combined_worker(rank: int, world: int, parity_eps: list[int], train_runs: list[tuple[str, int]], ckpt_dir: str,
                    resume: bool, corpus: str | None = None) -> dict:
    """Layer parity for every EP size in `parity_eps`, the training runs, and (if `corpus`) a Trainer run.

    The Trainer part reports its own failure (traceback text) instead of raising, so a change in the training
    loop fails only its own test, not every parity test that shares this spawn.
    """
    parity = parity_worker(rank, world, parity_eps)
    barrier_with_timeout(init_distributed(ep=1), "between parity and training", timeout_s=60)  # all arrive
    out = {"parity": parity, "train": train_worker(rank, world, train_runs, ckpt_dir, resume)}
    if corpus is not None:
        try:
            out["trainer"] = trainer_worker(rank, world, corpus, str(Path(ckpt_dir) / "trainer_run"))
        except Exception:  # noqa: BLE001 - reported to the test that owns it
            out["trainer"] = {"error": traceback.format_exc()}
    return out
