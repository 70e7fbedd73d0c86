"""The trainer: config overrides, LR schedule, atomic checkpoints, exact resume, NaN stop, the parallel seam."""

from __future__ import annotations

import inspect
import json
import re
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils.checkpoint

import moeflow.train.checkpoint as ckpt_mod
from moeflow.config import ConfigError
from moeflow.layers import moe_layers
from moeflow.models import ModelConfig
from moeflow.train import (DataError, LocalHooks, RunConfig, TrainingDiverged, apply_overrides, config_keys,
                           dense_counterpart, get_preset, lm_trainer, load_checkpoint, load_config_file, parse_set)
from moeflow.train.checkpoint import atomic_torch_save
from moeflow.train.config import TrainConfig
from moeflow.train.trainer import lr_at


def tiny_overrides(data: Path, **extra: object) -> dict[str, object]:
    """A model and run small enough for a few steps per second on one core."""
    o: dict[str, object] = {
        "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.n_kv_heads": 1,
        "model.max_seq_len": 32, "model.ffn_hidden": 64, "model.moe.d_hidden": 32, "model.moe.num_experts": 4,
        "train.steps": 8, "train.batch_size": 4, "train.seq_len": 16, "train.eval_every": 4, "train.eval_batches": 2,
        "train.ckpt_every": 4, "train.warmup": 2, "data.path": str(data)}
    o.update(extra)
    return o




@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """Real prose-like code: a few stdlib module sources."""
    import json as j
    import textwrap
    f = tmp_path / "corpus.txt"
    f.write_text((inspect.getsource(j) + inspect.getsource(textwrap)) * 2)
    return f


def tiny_cfg(data: Path, **extra: object) -> RunConfig:
    """The tiny preset shrunk by `tiny_overrides`."""
    return apply_overrides(get_preset("tiny"), tiny_overrides(data, **extra))


# ----------------------------------------------------------------------------------------------- config
def test_set_parses_literals_and_nested_keys(tmp_path: Path) -> None:
    o = parse_set(["train.lr=1e-3", "model.moe.num_experts=16", "model.moe.router=switch", "model.moe.top_k=1",
                   "model.moe.capacity_factor=None", "train.aux_loss=False"])
    assert o == {"train.lr": 1e-3, "model.moe.num_experts": 16, "model.moe.router": "switch", "model.moe.top_k": 1,
                 "model.moe.capacity_factor": None, "train.aux_loss": False}
    cfg = apply_overrides(get_preset("tiny"), o)
    assert cfg.train.lr == 1e-3 and cfg.model.moe is not None and cfg.model.moe.num_experts == 16
    assert cfg.model.moe.router == "switch" and cfg.train.aux_loss is False
    cfg = apply_overrides(get_preset("tiny"), {"train.lr": 1})  # int promoted to float
    assert isinstance(cfg.train.lr, float)


def test_set_errors_are_clear() -> None:
    base = get_preset("tiny")
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'.*train\.lr"):
        apply_overrides(base, {"train.lrr": 1e-3})
    with pytest.raises(ConfigError, match=r"unknown config key 'lr'.*train\.lr"):
        apply_overrides(base, {"lr": 1e-3})
    with pytest.raises(ConfigError, match=r"model\.moe\.num_expert'.*model\.moe\.num_experts"):
        apply_overrides(base, {"model.moe.num_expert": 4})
    with pytest.raises(ConfigError, match=r"train\.steps='many': expected int, got str"):
        apply_overrides(base, {"train.steps": "many"})
    with pytest.raises(ConfigError, match=r"train\.aux_loss=1: expected bool"):
        apply_overrides(base, {"train.aux_loss": 1})
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set(["train.lr"])
    with pytest.raises(ConfigError, match="top_k=9 exceeds num_experts=8"):
        apply_overrides(base, {"model.moe.top_k": 9})
    with pytest.raises(ConfigError, match="seq_len=512 exceeds model.max_seq_len"):
        apply_overrides(base, {"train.seq_len": 512})
    with pytest.raises(ConfigError, match="train.steps must be a positive integer"):
        apply_overrides(base, {"train.steps": 0})


def test_every_field_is_settable_and_d_model_moves_the_moe() -> None:
    keys = config_keys()
    for k in ("train.lr", "train.threads", "model.moe.num_experts", "model.rope_theta", "data.val_fraction"):
        assert k in keys
    cfg = apply_overrides(get_preset("tiny"), {"model.d_model": 64, "model.n_heads": 2})
    assert cfg.model.moe is not None and cfg.model.moe.d_model == 64 and cfg.model.head_dim == 32
    dense = apply_overrides(get_preset("tiny"), {"model.moe": None})
    assert dense.model.moe is None
    back = apply_overrides(dense, {"model.moe.d_hidden": 64, "model.moe.num_experts": 4})
    assert back.model.moe is not None and back.model.moe.d_model == back.model.d_model
    with pytest.raises(ConfigError, match="incomplete config.*d_hidden"):
        apply_overrides(dense, {"model.moe.num_experts": 4})


def test_config_file_json_and_round_trip(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"train": {"lr": 0.002, "steps": 7}, "model": {"moe": {"top_k": 1}}}))
    cfg = apply_overrides(get_preset("tiny"), load_config_file(f))
    assert cfg.train.lr == 0.002 and cfg.train.steps == 7 and cfg.model.moe.top_k == 1  # type: ignore[union-attr]
    full = tmp_path / "full.json"
    full.write_text(json.dumps({"preset": "x", **cfg.to_dict()}))
    assert apply_overrides(get_preset("tiny-dense"), load_config_file(full)).to_dict() == cfg.to_dict()
    bad = tmp_path / "bad.json"
    bad.write_text('{"train": {"lr": }')
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON at line 1"):
        load_config_file(bad)
    pytest.importorskip("yaml")
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  lr: 0.004\n")
    assert apply_overrides(get_preset("tiny"), load_config_file(y)).train.lr == 0.004


def test_dense_counterpart_matches_active_params() -> None:
    moe = get_preset("tiny").model
    dense = dense_counterpart(moe)
    assert dense.moe is None
    router = moe.n_layers * moe.moe.num_experts * moe.d_model  # type: ignore[union-attr]
    assert dense.num_params() == dense.num_active_params() == moe.num_active_params() - router


def test_lr_schedule_warmup_then_cosine() -> None:
    tc = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, tc) == pytest.approx(0.1) and lr_at(9, tc) == pytest.approx(1.0)
    assert lr_at(10, tc) == pytest.approx(1.0) and lr_at(99, tc) == pytest.approx(0.1)
    mid = 10 + (99 - 10) / 2
    assert lr_at(int(mid), tc) == pytest.approx(0.55, abs=0.02)
    assert all(lr_at(s, tc) >= lr_at(s + 1, tc) for s in range(10, 99))


# ----------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tmp_path: Path, text_file: Path) -> None:
    t = lm_trainer(tiny_cfg(text_file), tmp_path / "run", progress=False)
    t.train_step()
    t.save(elapsed_s=1.5)
    ck = load_checkpoint(tmp_path / "run")
    assert ck["step"] == 1 and ck["extra"]["elapsed_s"] == 1.5
    assert ck["config"] == t.task.config_dict()
    for k, v in t.model.state_dict().items():
        assert torch.equal(ck["model"][k], v), k
    params = dict(t.model.named_parameters())
    assert set(ck["optimizer"]["state"]) == set(params)  # keyed by name (the layout moeflow.parallel gathers)
    for name, entry in ck["optimizer"]["state"].items():
        assert torch.equal(entry["exp_avg"], t.optimizer.state[params[name]]["exp_avg"]), name
    assert torch.equal(ck["data"]["generator"], t.task.batches.generator.get_state())


def test_kill_during_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def dying_save(obj: object, f: object) -> None:
        real_save({"partial": torch.zeros(1000)}, f)  # bytes reach the temp file ...
        raise KeyboardInterrupt  # ... then the process is killed mid-save

    monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    old = torch.load(path, weights_only=True)
    assert old["step"] == 1 and torch.equal(old["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def test_damaged_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    from moeflow.train import CheckpointError
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        load_checkpoint(tmp_path / "elsewhere")


# ----------------------------------------------------------------------------------------------- resume
def _losses(run: Path) -> list[float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "train"]


@pytest.mark.parametrize("router", ["topk", "noisy_topk", "deepseek"])
def test_resume_equals_uninterrupted_run(tmp_path: Path, text_file: Path, router: str) -> None:
    # noisy_topk draws router noise from the global RNG and drops with a capacity; deepseek updates its balancing
    # bias after every step: all of it must be restored exactly
    extra: dict[str, object] = {"model.moe.router": router}
    if router == "noisy_topk":
        extra["model.moe.capacity_factor"] = 1.0
    if router == "deepseek":
        extra["model.moe.bias_update_rate"] = 0.01
    cfg = tiny_cfg(text_file, **extra)
    full = lm_trainer(cfg, tmp_path / "full", progress=False)
    res_full = full.run()
    half = lm_trainer(cfg, tmp_path / "half", progress=False)
    half.run(stop_at=4)
    assert load_checkpoint(tmp_path / "half")["step"] == 4
    torch.manual_seed(12345)  # a fresh process would start with other global RNG state
    resumed = lm_trainer(cfg, tmp_path / "half", resume=True, progress=False)
    assert resumed.step == 4
    res_resumed = resumed.run()
    assert _losses(tmp_path / "full") == _losses(tmp_path / "half")  # bitwise, all 8 steps
    assert len(_losses(tmp_path / "half")) == 8
    assert res_full.val_loss == res_resumed.val_loss
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    if router == "deepseek":  # the trainer applied the post-step bias update
        biases = [m.router.e_score_correction_bias for _, m in moe_layers(full.model)]
        assert all(b.abs().max() > 0 for b in biases)


@pytest.mark.parametrize("router", ["noisy_topk", "deepseek"])
def test_activation_checkpointing_gives_the_same_losses_and_logged_counts(tmp_path: Path, text_file: Path,
                                                                         router: str) -> None:
    """Recomputing every block in backward (torch.utils.checkpoint, non-reentrant) changes nothing the trainer
    logs or applies: losses, aux losses, grad norms, per-expert counts, and the DeepSeek bias updates."""
    extra: dict[str, object] = {"model.moe.router": router, "train.steps": 4, "train.eval_every": 0}
    extra.update({"model.moe.capacity_factor": 1.0} if router == "noisy_topk" else
                 {"model.moe.bias_update_rate": 0.01, "model.moe.aux_loss_coef": 1e-2})
    cfg = tiny_cfg(text_file, **extra)
    runs, forwards, biases = {}, {}, {}
    for ckpt in (False, True):
        t = lm_trainer(cfg, tmp_path / f"ckpt{ckpt}", progress=False)
        t.model.activation_checkpointing = ckpt
        moe = moe_layers(t.model)[0][1]
        calls = []
        moe.register_forward_hook(lambda *_: calls.append(1))
        # no early stop: the recompute runs each block to its end, log_routing call included
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            t.run()
        runs[ckpt] = [json.loads(x) for x in (tmp_path / f"ckpt{ckpt}" / "metrics.jsonl").read_text().splitlines()]
        forwards[ckpt] = len(calls)
        biases[ckpt] = [getattr(m.router, "e_score_correction_bias", torch.zeros(1)).tolist()
                        for _, m in moe_layers(t.model)]
    # the recompute really ran (one extra forward per training step), and the log counted each forward once
    assert forwards[True] == forwards[False] + cfg.train.steps
    train = [[{k: r[k] for k in ("loss", "aux", "ce", "grad_norm", "layers")} for r in recs if r.get("kind") == "train"]
             for recs in (runs[False], runs[True])]
    assert len(train[0]) == 4 and train[0] == train[1]  # bitwise: every float and every per-expert count
    assert all(sum(lay["tokens_per_expert"]) > 0 for rec in train[0] for lay in rec["layers"])
    assert train[0][0]["aux"] > 0
    assert biases[False] == biases[True]
    if router == "deepseek":  # the bias update ran, from the logged (not the recomputed) counts
        assert any(abs(b) > 0 for bias in biases[False] for b in bias)


def test_resume_refuses_a_different_config(tmp_path: Path, text_file: Path) -> None:
    lm_trainer(tiny_cfg(text_file), tmp_path / "r", progress=False).run(stop_at=4)
    with pytest.raises(ConfigError, match=r"different config \(train\.lr\)"):
        lm_trainer(tiny_cfg(text_file, **{"train.lr": 0.5}), tmp_path / "r", resume=True, progress=False)


# ----------------------------------------------------------------------------------------------- failures
def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path: Path, text_file: Path) -> None:
    cfg = tiny_cfg(text_file, **{"train.ckpt_every": 2})
    t = lm_trainer(cfg, tmp_path / "r", progress=False)
    calls = {"n": 0}

    def poison(_module: torch.nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 3 else out  # the 3rd training forward overflows

    t.model.register_forward_hook(poison)
    with pytest.raises(TrainingDiverged, match=r"step 3: the training loss is nan.*checkpoint\.pt \(step 2\)") as e:
        t.run()
    assert e.value.step == 3
    ck = load_checkpoint(tmp_path / "r")
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values())
    recs = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["kind"] == "diverged" and recs[-1]["step"] == 3


def test_huge_lr_diverges_cleanly(tmp_path: Path, text_file: Path) -> None:
    # no clipping and lr 1e6: weights blow up within a few steps; the run must stop on a non-finite number
    cfg = tiny_cfg(text_file, **{"train.lr": 1e6, "train.grad_clip": 0.0, "train.warmup": 0, "train.steps": 30,
                                 "train.eval_every": 0, "train.ckpt_every": 0})
    with pytest.raises(TrainingDiverged, match=r"step \d+: the (training loss|gradient norm) is (nan|inf)"):
        lm_trainer(cfg, tmp_path / "r", progress=False).run()


def test_token_ids_beyond_vocab_are_rejected(tmp_path: Path) -> None:
    np.save(tmp_path / "ids.npy", (np.arange(2000) % 300).astype(np.int32))
    cfg = apply_overrides(get_preset("tiny"), tiny_overrides(tmp_path / "ids.npy"))
    with pytest.raises(DataError, match=r"token id 299 does not fit model\.vocab_size=256.*vocab_size=300"):
        lm_trainer(cfg, tmp_path / "r", progress=False)


# ----------------------------------------------------------------------------------------------- parallel seam
class CountingHooks(LocalHooks):
    """Single-process hooks that record the calls the loop makes."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def wrap_model(self, model, precision="fp32"):  # type: ignore[no-untyped-def]
        self._count("wrap_model")
        return model

    def gradient_sync(self, model, enabled):  # type: ignore[no-untyped-def]
        self._count(f"gradient_sync({enabled})")

    def state_dicts(self, model, optimizer, full=False):  # type: ignore[no-untyped-def]
        self._count(f"state_dicts(full={full})")
        return super().state_dicts(model, optimizer, full)


def test_trainer_calls_the_parallel_hooks(tmp_path: Path, text_file: Path) -> None:
    hooks = CountingHooks()
    res = lm_trainer(tiny_cfg(text_file), tmp_path / "r", hooks=hooks, progress=False).run()
    assert hooks.calls == {"wrap_model": 1, "gradient_sync(True)": 8, "state_dicts(full=True)": 2}
    assert res.step == 8 and math.isfinite(res.val_loss)


def test_gradient_accumulation_syncs_only_the_last_micro_batch(tmp_path: Path, text_file: Path) -> None:
    """grad_accum=3: three micro-batches per step, the reduction enabled for the last one only; tokens/s counts
    all three."""
    hooks = CountingHooks()
    cfg = apply_overrides(tiny_cfg(text_file), {"train.grad_accum": 3, "train.steps": 2})
    lm_trainer(cfg, tmp_path / "r", hooks=hooks, progress=False).run()
    assert hooks.calls["gradient_sync(False)"] == 4 and hooks.calls["gradient_sync(True)"] == 2
    rec = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["tokens"] == 3 * cfg.train.batch_size * cfg.train.seq_len


@pytest.mark.parametrize("overrides,msg", [
    ({"train.precision": "fp8"}, "train.precision='fp8' is unknown; use fp32 or bf16"),
    ({"train.grad_accum": 0}, "train.grad_accum"),
])
def test_scale_out_fields_are_validated(overrides: dict, msg: str, text_file: Path) -> None:
    """Bad values name the key."""
    with pytest.raises(ConfigError, match=re.escape(msg)):
        apply_overrides(tiny_cfg(text_file), overrides)


def test_bf16_on_a_plain_process_says_how_to_get_fsdp2(tmp_path: Path, text_file: Path) -> None:
    """Mixed precision runs through FSDP2: without torchrun the error says to launch with --nproc-per-node 1."""
    cfg = apply_overrides(tiny_cfg(text_file), {"train.precision": "bf16"})
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 1"):
        lm_trainer(cfg, tmp_path / "r", progress=False)


def test_activation_checkpointing_and_compile_fields(tmp_path: Path, text_file: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """activation_checkpointing reaches the model; compile falls back to eager with a message when unavailable."""
    import io

    import moeflow.train.compile as comp
    cfg = apply_overrides(tiny_cfg(text_file), {"train.activation_checkpointing": True, "train.compile": True,
                                                "train.steps": 1})
    monkeypatch.setattr(comp, "compile_unavailable_reason", lambda: "no C++ compiler (test)")
    out = io.StringIO()
    t = lm_trainer(cfg, tmp_path / "r", progress=False, stream=out)
    assert t.model.activation_checkpointing is True
    assert "train.compile: no C++ compiler (test); training without compilation" in out.getvalue()
    t.run()
    with pytest.raises(ConfigError, match="has no per-block activation checkpointing"):
        comp.apply_activation_checkpointing(torch.nn.Linear(2, 2), True)


def test_dense_preset_trains_and_logs_no_routing(tmp_path: Path, text_file: Path) -> None:
    cfg = apply_overrides(get_preset("tiny-dense"), {k: v for k, v in tiny_overrides(text_file).items()
                                                    if not k.startswith("model.moe")})
    assert isinstance(cfg.model, ModelConfig) and cfg.model.moe is None
    res = lm_trainer(cfg, tmp_path / "d", progress=False).run()
    recs = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert res.step == 8 and all(r["layers"] == [] for r in recs if r["kind"] == "train")
    assert res.val_loss < math.log(256)  # it learned something in 8 steps


# ----------------------------------------------------------------------------------------------- stats, progress
def test_layer_stats_match_the_routing_records() -> None:
    from moeflow import MoEConfig, MoELayer
    from moeflow.analysis.stats import layer_stats, load_imbalance, smooth, summarize_layers

    layers = [MoELayer(MoEConfig(d_model=8, d_hidden=8, num_experts=4, top_k=k, router=r, capacity_factor=cf))
              for r, k, cf in (("topk", 2, None), ("switch", 1, 0.5))]
    x = torch.randn(32, 8)
    routings = []
    for layer in layers:
        layer(x)
        routings.append(layer.last_routing)
    stats = layer_stats(routings)
    for s, r in zip(stats, routings):
        assert s["tokens_per_expert"] == r.tokens_per_expert.tolist()
        assert s["dropped_fraction"] == pytest.approx(float(r.dropped_fraction))
        assert s["entropy"] == pytest.approx(float(r.entropy))
        assert s["losses"].keys() == r.losses.keys()
    assert sum(stats[0]["tokens_per_expert"]) == 64 and stats[0]["dropped_fraction"] == 0.0
    assert stats[1]["dropped_fraction"] >= 0.5  # capacity 0.5 * 32 / 4 = 4 slots x 4 experts for 32 tokens
    assert load_imbalance([4, 4, 4, 4]) == 1.0 and load_imbalance([16, 0, 0, 0]) == 4.0
    assert summarize_layers(stats)["imbalance"] == max(load_imbalance(s["tokens_per_expert"]) for s in stats)
    np.testing.assert_allclose(smooth(np.array([1.0, 3.0, np.nan, 5.0]), 2), [1.0, 2.0, 3.0, 5.0])


def test_progress_bar_on_tty_and_lines_elsewhere() -> None:
    import io

    from moeflow.train.metrics import Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, log = Tty(), io.StringIO()
    for stream in (tty, log):
        p = Progress(30, every=10, stream=stream)
        for step in range(1, 31):
            p.update(step, {"loss": "1.0"})
        p.message("eval")
        p.close()
    assert tty.getvalue().startswith("\r[") and "step 30/30 loss 1.0" in tty.getvalue()
    assert tty.getvalue().count("\n") == 1 + 1  # the bar's line is ended once before "eval", then "eval\n"
    lines = log.getvalue().splitlines()
    assert [ln.split()[1] for ln in lines[:-1]] == ["1/30", "10/30", "20/30", "30/30"] and lines[-1] == "eval"
