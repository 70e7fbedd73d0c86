"""Worker bodies for the FSDP2 + DCP tests: the real `Trainer` with `DistributedHooks` on a fixed-data task.

`FixedTask` serves predetermined global batches (so a single process on the whole batch is the exact reference)
and a tiny fp64 (parity) or fp32 (bitwise resume) MoETransformer. Every worker returns plain results; the test
modules compare them with in-process references.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeflow import MoEConfig
from moeflow.models import MoETransformer
from moeflow.models.config import ModelConfig
from moeflow.parallel import DistributedHooks, PeerFailureError, init_distributed
from moeflow.train.trainer import Trainer, TrainingDiverged

VOCAB, SEQ, MICRO_BATCH = 32, 6, 4


@dataclass
class Schedule:
    """The TrainSchedule fields (plus the scale-out ones) for a few-step run."""

    steps: int = 3
    batch_size: int = MICRO_BATCH
    lr: float = 1e-2
    min_lr_ratio: float = 0.1
    warmup: int = 1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 0.5
    aux_loss: bool = False  # the balance loss is per-rank statistics: its parity is tested on the layer
    eval_every: int = 0
    ckpt_every: int = 0
    log_every: int = 1
    grad_accum: int = 1
    precision: str = "fp32"
    activation_checkpointing: bool = False
    compile: bool = False


class FixedTask:
    """Next-token loss on fixed random batches: step s, micro-batch i is rows [i*B, (i+1)*B) of batch s."""

    device = "cpu"
    resumable = frozenset({"train.steps"})

    def __init__(self, schedule: Schedule, steps_of_data: int = 8, nan_at: tuple[int, int] | None = None) -> None:
        """`nan_at` = (rank, draw): that rank's loss is NaN on that batch draw (0-based)."""
        self.train = schedule
        g = torch.Generator().manual_seed(1)
        rows = schedule.batch_size * schedule.grad_accum
        self.data = torch.randint(0, VOCAB, (steps_of_data, rows, SEQ + 1), generator=g)
        self.draw = 0
        self.nan_at = nan_at
        self._rank = 0

    def config_dict(self) -> dict[str, Any]:
        """What a resume must match."""
        return {"train": {"steps": self.train.steps, "batch_size": self.train.batch_size}}

    def next_batch(self, rank: int, world: int) -> tuple[Tensor, int]:
        """This rank's rows of the next micro-batch, and the draw number."""
        step, micro = divmod(self.draw, self.train.grad_accum)
        b = self.train.batch_size
        rows = self.data[step, micro * b:(micro + 1) * b]
        per = b // world
        self.draw += 1
        self._rank = rank
        return rows[rank * per:(rank + 1) * per], self.draw - 1

    def tokens(self, batch: tuple[Tensor, int]) -> int:
        """Global tokens of a micro-batch."""
        return self.train.batch_size * SEQ

    def loss_tokens(self, batch: tuple[Tensor, int]) -> int:
        """Targets of this rank's micro-batch."""
        return batch[0][:, 1:].numel()

    def loss(self, model: nn.Module, batch: tuple[Tensor, int]) -> tuple[Tensor, dict[str, float]]:
        """Token-mean cross-entropy."""
        ids, draw = batch
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))
        if self.nan_at == (self._rank, draw):
            loss = loss * float("nan")
        return loss, {}

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Loss on the last fixed batch."""
        ids = self.data[-1, :2]
        return {"val_loss": float(F.cross_entropy(model(ids[:, :-1]).reshape(-1, VOCAB).float(),
                                                   ids[:, 1:].reshape(-1)))}

    def state_dict(self) -> dict[str, Any]:
        """The draw counter."""
        return {"draw": self.draw}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the draw counter."""
        self.draw = int(state["draw"])


def make_model(dtype: torch.dtype = torch.float64) -> MoETransformer:
    """A 2-layer MoE decoder with a shared expert, identically seeded everywhere."""
    torch.manual_seed(0)
    moe = MoEConfig(d_model=16, d_hidden=8, num_experts=4, top_k=2, shared_d_hidden=8)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=SEQ,
                      ffn_hidden=16, moe=moe)
    return MoETransformer(cfg).to(dtype)


def metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The train records of a run's metrics.jsonl."""
    import json
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def full_state(trainer: Trainer) -> dict[str, Any]:
    """The logical model and optimizer state (rank 0; empty elsewhere), on CPU, copied (the state dicts share
    plain tensors such as Adam's step with the optimizer, which increments them in place)."""
    model_sd, optim_sd = trainer.hooks.state_dicts(trainer.model, trainer.optimizer, full=True)
    return _clone({"model": model_sd, "optim": optim_sd})


def _clone(x: Any) -> Any:
    """Deep copy of nested dicts/lists of tensors."""
    if isinstance(x, Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clone(v) for v in x]
    return x


def run_parity(rank: int, ep: int, run_dir: str, accum: int, ac: bool, precision: str = "fp32") -> dict[str, Any]:
    """A 3-step Trainer run under (world / ep, ep); rank 0 returns its logged records and final weights."""
    hooks = DistributedHooks(init_distributed(ep=ep, timeout_s=60))
    sched = Schedule(grad_accum=accum, activation_checkpointing=ac, precision=precision,
                     batch_size=MICRO_BATCH)
    trainer = Trainer(make_model(), FixedTask(sched), run_dir, hooks=hooks, progress=False)
    trainer.run()
    state = full_state(trainer)
    return {"records": metrics(run_dir) if rank == 0 else None, "model": state["model"] if rank == 0 else None}


def parity_worker(rank: int, world: int, root: str, cases: list[tuple[int, int, bool]]) -> dict:
    """Every (ep, accum, activation checkpointing) case on this world."""
    return {case: run_parity(rank, case[0], f"{root}/w{world}-ep{case[0]}-a{case[1]}-ac{int(case[2])}", *case[1:])
            for case in cases}


def save_then_resume_worker(rank: int, world: int, root: str, resume_eps: list[int]) -> dict:
    """fp32: train (dp=2, ep=2) 2 steps (DCP save at step 2), keep its logical state; then resume that run under
    each ep of `resume_eps` and return whether the loaded state is bitwise the saved one."""
    run_dir = f"{root}/resume"
    hooks = DistributedHooks(init_distributed(ep=2, timeout_s=60))
    sched = Schedule(steps=4, ckpt_every=2)
    first = Trainer(make_model(torch.float32), FixedTask(sched), run_dir, hooks=hooks, progress=False)
    t0 = time.perf_counter()
    first.run(stop_at=2)
    saved = full_state(first)
    if rank == 0:
        torch.save(saved, f"{root}/saved_state.pt")
    out: dict[str, Any] = {"save_s": first.last_save_s, "run_s": time.perf_counter() - t0}
    for ep in resume_eps:
        hooks = DistributedHooks(init_distributed(ep=ep, timeout_s=60))
        again = Trainer(make_model(torch.float32), FixedTask(sched), run_dir, resume=True, hooks=hooks,
                        progress=False)
        got = full_state(again)
        out[ep] = {"step": again.step, "draw": again.task.draw,
                   "equal": _bitwise(got, saved) if rank == 0 else None}
    return out


def _bitwise(a: Any, b: Any) -> bool:
    """Nested dicts/lists of tensors and numbers, equal bit for bit."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_bitwise(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_bitwise(x, y) for x, y in zip(a, b))
    return a == b


def kill_during_save_worker(rank: int, world: int, run_dir: str, where: str) -> dict:
    """(dp=2, ep=1), a checkpoint every step; during the save of step 2 one rank is SIGKILLed: `before_commit`
    (rank 0, after every shard and .metadata were written, before LATEST moves) or `mid_write` (rank 1, while
    DCP writes its shard file). The survivor reports what it saw."""
    import moeflow.train.sharded_checkpoint as sc
    from torch.distributed.checkpoint import filesystem

    hooks = DistributedHooks(init_distributed(ep=1, timeout_s=5))
    trainer = Trainer(make_model(torch.float32), FixedTask(Schedule(steps=3, ckpt_every=1)), run_dir, hooks=hooks,
                      progress=False)
    if where == "before_commit" and rank == 0:
        commit = sc._commit

        def killing_commit(root: Path, folder: Path) -> None:
            if trainer.step == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            commit(root, folder)
        sc._commit = killing_commit
    if where == "mid_write" and rank == 1:
        write = filesystem._write_item

        def killing_write(*args: Any, **kwargs: Any) -> Any:
            if trainer.step == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return write(*args, **kwargs)
        filesystem._write_item = killing_write
    try:
        trainer.run()
    except Exception as e:  # noqa: BLE001 - the survivor's view is the result
        return {"error": f"{type(e).__name__}: {e}", "step": trainer.step}
    return {"error": None, "step": trainer.step}


def failure_worker(rank: int, world: int, how: str, release: str, run_dir: str) -> dict | None:
    """(dp=2, ep=1) Trainer; at step 2 rank 1 dies in a block's backward (FSDP2 reduce-scatter pending) or hangs
    in its forward (FSDP2 all-gather pending); rank 0 reports the error and how long it took."""
    hooks = DistributedHooks(init_distributed(ep=1, timeout_s=3))
    trainer = Trainer(make_model(torch.float32), FixedTask(Schedule(steps=4)), run_dir, hooks=hooks,
                      progress=False)
    block = trainer.model.layers[1]
    if rank == 1:
        def die(module: nn.Module, grad_output: tuple) -> None:
            if hooks.dims.step == 2:
                os._exit(17)

        def hang(module: nn.Module, args: tuple) -> None:
            if hooks.dims.step != 2:
                return
            deadline = time.monotonic() + 60
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.05)
            os._exit(0)
        if how == "killed":
            block.register_full_backward_pre_hook(die)
        else:
            block.register_forward_pre_hook(hang)
    t0 = time.monotonic()
    try:
        trainer.run()
    except PeerFailureError as e:
        Path(release).touch()
        return {"error": str(e), "collective": e.collective, "step": e.step, "elapsed": time.monotonic() - t0}
    except Exception:  # noqa: BLE001
        Path(release).touch()
        return {"error": traceback.format_exc(), "collective": None, "step": None, "elapsed": 0.0}
    return {"error": None}


def nan_and_bf16_worker(rank: int, world: int, root: str) -> dict:
    """NaN on rank 1 only (step 2) stops both ranks on that step; then a bf16 run: routers stay fp32."""
    hooks = DistributedHooks(init_distributed(ep=2, timeout_s=30))
    out: dict[str, Any] = {}
    trainer = Trainer(make_model(torch.float32), FixedTask(Schedule(steps=3), nan_at=(1, 1)), f"{root}/nan",
                      hooks=hooks, progress=False)
    try:
        trainer.run()
        out["nan"] = None
    except TrainingDiverged as e:
        out["nan"] = {"step": e.step, "message": str(e)}
    seen: dict[str, str] = {}
    bf16 = Trainer(make_model(torch.float32), FixedTask(Schedule(steps=3, precision="bf16")), f"{root}/bf16",
                   hooks=hooks, progress=False)
    layer = bf16.model.layers[0].ffn

    def note(key: str, value: object) -> None:  # forward hooks must return None (else they replace the output)
        seen.setdefault(key, str(value))
    # pre-hooks registered after FSDP2's: they see the unsharded (compute-dtype) parameters and the cast inputs
    layer.router.register_forward_pre_hook(lambda m, a: note("router_weight", m.weight.dtype))
    layer.router.register_forward_pre_hook(lambda m, a: note("router_in", a[0].dtype))
    layer.experts.register_forward_pre_hook(lambda m, a: note("experts_weight", m.w_in.to_local().dtype))
    bf16.model.layers[0].register_forward_hook(lambda m, a, o: note("block_out", o.dtype))
    bf16.run()
    fp32 = Trainer(make_model(torch.float32), FixedTask(Schedule(steps=3)), f"{root}/fp32", hooks=hooks,
                   progress=False)
    fp32.run()
    master = {n: str(p.dtype) for n, p in bf16.model.named_parameters()}
    out["bf16"] = {"seen": seen, "master": master,
                   "losses": [r["loss"] for r in metrics(f"{root}/bf16")] if rank == 0 else None,
                   "fp32_losses": [r["loss"] for r in metrics(f"{root}/fp32")] if rank == 0 else None}
    return out


def async_save_worker(rank: int, world: int, root: str) -> dict:
    """(dp=1, ep=2), async checkpoints at steps 2 and 3 (training runs on while step 2 is written). Older folders
    are kept (rmtree disabled) so the step-2 folder can be compared with the state captured when it was saved;
    then the run is resumed as (dp=2, ep=1)."""
    import moeflow.train.sharded_checkpoint as sc

    sc.shutil.rmtree = lambda *a, **k: None  # type: ignore[assignment]  # this process only
    run_dir = f"{root}/async"
    hooks = DistributedHooks(init_distributed(ep=2, timeout_s=60))
    trainer = Trainer(make_model(torch.float32), FixedTask(Schedule(steps=3, ckpt_every=2)), run_dir, hooks=hooks,
                      progress=False)
    trainer.tc.async_checkpoint = True
    captured: dict[int, Any] = {}
    save = trainer.save

    def capturing_save(*args: Any, **kwargs: Any) -> None:
        captured[trainer.step] = full_state(trainer)
        save(*args, **kwargs)
        captured[f"pending{trainer.step}"] = trainer._pending is not None
    trainer.save = capturing_save  # type: ignore[method-assign]
    trainer.run()
    assert trainer._pending is None
    hooks = DistributedHooks(init_distributed(ep=1, timeout_s=60))
    again = Trainer(make_model(torch.float32), FixedTask(Schedule(steps=3, ckpt_every=2)), run_dir, resume=True,
                    hooks=hooks, progress=False)
    got = full_state(again)
    out = {"pending": [captured["pending2"], captured["pending3"]], "step": again.step}
    if rank == 0:
        torch.save(captured[2], f"{root}/async_step2.pt")
        out["resumed_equal"] = _bitwise(got, captured[3])
    return out


def resume_single_file_worker(rank: int, world: int, run_dir: str, saved: str) -> dict:
    """Resume a one-process run's checkpoint.pt under (dp=1, ep=world): the full tensors are sharded on load."""
    hooks = DistributedHooks(init_distributed(ep=world, timeout_s=60))
    t = Trainer(make_model(torch.float32), FixedTask(Schedule(steps=4, ckpt_every=2)), run_dir, resume=True,
                hooks=hooks, progress=False)
    got = full_state(t)
    t.run()  # and it continues, now writing sharded checkpoints
    return {"step": t.step, "equal": _bitwise(got, torch.load(saved)) if rank == 0 else None}
