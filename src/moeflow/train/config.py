"""Run configuration: model + training + data dataclasses, named presets, and typed dotted overrides.

A run is fully described by a `RunConfig`; `config.json` in a run folder is its `to_dict()`. Overrides address
every field by its dotted path (`train.lr`, `model.moe.num_experts`) and are type-checked against the dataclass
annotations; unknown keys fail with the closest known keys.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from moeflow.config import Config, ConfigError, MoEConfig, check_int, check_number, closest, dataclass_in, need
from moeflow.models import MODEL_PRESETS, ModelConfig
from moeflow.train.data import DataConfig

DEVICES = ("auto", "cpu", "cuda", "mps")
C = TypeVar("C")


@dataclass(kw_only=True)
class TrainConfig(Config):
    """Optimisation and bookkeeping for one training run (AdamW, linear warmup, cosine decay)."""

    steps: int = 800  # total optimizer steps; the cosine schedule spans exactly these
    batch_size: int = 16  # sequences per step (global: split over data-parallel ranks)
    seq_len: int = 128  # tokens per sequence (<= model.max_seq_len)
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    warmup: int = 30  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decay on matrices (not on norms, biases or the router)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    aux_loss: bool = True  # add the routers' scaled auxiliary losses (load balance, z-loss) to the loss
    eval_every: int = 100  # validation every N steps (and at the end); 0 = only at the end
    eval_batches: int = 8  # validation batches (fixed windows of the held-out files)
    ckpt_every: int = 200  # checkpoint every N steps (and at the end); 0 = only at the end
    log_every: int = 10  # progress line period when stdout is not a terminal
    seed: int = 0  # model init, data stream and router noise
    device: str = "auto"  # auto: cuda if available, else cpu
    threads: int = 0  # torch CPU threads (0: torch's default); bitwise resume needs the same value
    # divergence (train/health.py): a loss above diverge_factor x the median of the last diverge_window healthy
    # losses (and diverge_min_delta above it) is a spike: no checkpoint is written then, and diverge_patience
    # spiking steps in a row stop the run naming the last healthy checkpoint. diverge_factor=0 turns it off.
    diverge_factor: float = 2.0  # spike: loss > this x the recent healthy median (0 = divergence check off)
    diverge_window: int = 20  # healthy losses the median is taken over
    diverge_patience: int = 3  # spiking steps in a row that stop the run
    diverge_min_delta: float = 0.5  # a spike also exceeds the median by this much (nats)

    config_name = "train"  # errors name fields by the dotted keys `--set` takes (not annotated: not a field)

    def __post_init__(self) -> None:
        """Validate every field."""
        check_int(self, "steps", "batch_size", "seq_len", "eval_batches", "log_every")
        check_int(self, "warmup", "eval_every", "ckpt_every", "threads", "seed", lo=0)
        check_number(self, "lr", lo=0, lo_open=True)
        check_number(self, "min_lr_ratio", hi=1)
        check_number(self, "weight_decay", "grad_clip")
        check_number(self, "beta1", "beta2", hi=1, hi_open=True)
        check_int(self, "diverge_window", "diverge_patience")
        check_number(self, "diverge_factor", "diverge_min_delta")
        need(self.diverge_factor == 0 or self.diverge_factor > 1,
             f"train.diverge_factor must be 0 (off) or > 1, got {self.diverge_factor!r}")
        need(isinstance(self.device, str) and self.device.split(":")[0] in DEVICES,
             f"train.device={self.device!r} is unknown; use one of {', '.join(DEVICES)} "
             "(optionally with an index, e.g. cuda:1)")


@dataclass(kw_only=True)
class RunConfig(Config):
    """Everything a run needs: the model, how to train it, and what data to train it on."""

    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        """Cross-field checks."""
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len="
                              f"{self.model.max_seq_len}; lower one or raise the other")


# ------------------------------------------------------------------------------------------- presets
def _tiny_train() -> TrainConfig:
    # 800 steps x 16 x 128 = 1.6M bytes (~1/7 of the corpus): ~4.5 min on one core of a 2-core laptop-class CPU.
    # One thread: at these shapes a second one gains little, and when the cores are shared OpenMP's spinning
    # barriers make two threads several times slower than one (measured: 11 s vs 1.6 s per step under load).
    return TrainConfig(steps=800, batch_size=16, seq_len=128, lr=3e-3, warmup=30, eval_every=100, eval_batches=8,
                       ckpt_every=200, threads=1)


def _tiny() -> RunConfig:
    # Mixtral-style 8 experts, top-2, each half the dense FFN: same active parameters as tiny-dense
    return RunConfig(model=MODEL_PRESETS["tiny"](), train=_tiny_train())


def _tiny_dense() -> RunConfig:
    return RunConfig(model=MODEL_PRESETS["tiny-dense"](), train=_tiny_train())


def _small() -> RunConfig:
    return RunConfig(model=MODEL_PRESETS["small"](),
                     train=TrainConfig(steps=3000, batch_size=32, seq_len=256, lr=1.5e-3, warmup=100,
                                       eval_every=250, ckpt_every=500))


RUN_PRESETS: dict[str, Callable[[], RunConfig]] = {"tiny": _tiny, "tiny-dense": _tiny_dense, "small": _small}


def get_preset(name: str) -> RunConfig:
    """A fresh RunConfig for a named preset."""
    if name not in RUN_PRESETS:
        close = closest(name, RUN_PRESETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; choose one of {', '.join(RUN_PRESETS)}")
    return RUN_PRESETS[name]()


def dense_counterpart(model: ModelConfig) -> ModelConfig:
    """The dense model with the same active FFN width: ffn_hidden = top_k * d_hidden (+ shared experts)."""
    if model.moe is None:
        return model
    width = model.moe.top_k * model.moe.d_hidden + model.moe.shared_d_hidden
    return dataclasses.replace(model, moe=None, ffn_hidden=width, head_dim=model.head_dim)


# ------------------------------------------------------------------------------------------- overrides
# One parser for every run config: RunConfig (`train.lr`, `model.moe.top_k`) and the translation task's
# TranslateConfig (`steps`, `model.moe.capacity_factor`) alike. A config class only needs type-annotated dataclass
# fields, `to_dict()` and `from_dict()`; the annotations drive the key check and the type check.


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def config_keys(cls: type = RunConfig) -> list[str]:
    """Every dotted key `--set` accepts for a config class (nested dataclasses expanded, e.g. model.moe.top_k)."""
    out: list[str] = []

    def walk(klass: type, prefix: str) -> None:
        for name, hint in _hints(klass).items():
            key = f"{prefix}{name}"
            out.append(key)
            sub = dataclass_in(hint)
            if sub is not None:
                walk(sub, key + ".")

    walk(cls, "")
    return out


def _unknown_key(key: str, cls: type) -> ConfigError:
    close = closest(key, config_keys(cls))
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    lister = "moeflow train --list-keys" if cls is RunConfig else "--list-keys"
    return ConfigError(f"unknown config key {key!r}{hint} (`{lister}` prints them all)")


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Return `value` if it matches the annotation (int promoted to float), else raise ConfigError."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _check_type(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r}: expected {_type_name(hint)}, got {type(value).__name__}")
    if hint is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(hint):
        if isinstance(value, dict):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint in (bool, str):
        if isinstance(value, hint):
            return value
    elif hint is Any:
        return value
    elif typing.get_origin(hint) in (list, tuple):
        if isinstance(value, (list, tuple)):  # the elements are validated by the config's __post_init__
            return value
    raise ConfigError(f"{key}={value!r}: expected {_type_name(hint)}, got {type(value).__name__}")


def parse_value(text: str) -> Any:
    """A `--set` value: a Python literal (1e-3, True, None, 'x', [1, 2]) or, failing that, a bare string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_set(items: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-3", ...]` -> {"train.lr": 0.001}; a missing `=` is an error."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-3")
        out[key.strip()] = parse_value(text.strip())
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict (a config file) -> dotted keys; a dict value under a known dataclass field is descended."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(cfg: C, overrides: dict[str, Any]) -> C:
    """A new config of the same class with dotted-key overrides applied, type-checked, and the whole config
    re-validated (by the class's `from_dict`).

    Changing `model.d_model` also moves `model.moe.d_model` unless that key is overridden too, since the two
    must agree; changing `model.d_model` or `model.n_heads` re-derives `model.head_dim` where the model has one.
    """
    cls = type(cfg)
    tree = cfg.to_dict()  # type: ignore[attr-defined]
    for key, value in overrides.items():
        _set_key(tree, cls, key, value)
    model = tree.get("model")
    if isinstance(model, dict):
        if isinstance(model.get("moe"), dict) and "model.moe.d_model" not in overrides and "d_model" in model:
            model["moe"]["d_model"] = model["d_model"]
        if "head_dim" in model and "model.head_dim" not in overrides and (
                "model.d_model" in overrides or "model.n_heads" in overrides):
            model["head_dim"] = None
    try:
        return cls.from_dict(tree)  # type: ignore[attr-defined, no-any-return]
    except TypeError as e:
        # a dataclass built from a partial dict (e.g. model.moe on a dense preset) names its missing field
        raise ConfigError(f"incomplete config: {e}") from None


def _set_key(tree: dict[str, Any], cls: type, key: str, value: Any) -> None:
    """Set one dotted key in the config's dict, checking the key and the value's type against `cls`."""
    node, klass = tree, cls
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = _hints(klass)
        if part not in hints:
            raise _unknown_key(key, cls)
        if i == len(parts) - 1:
            node[part] = _check_type(key, value, hints[part])
            return
        sub = dataclass_in(hints[part])
        if sub is None:
            raise _unknown_key(key, cls)
        if node.get(part) is None:
            node[part] = {}  # e.g. model.moe on a dense preset: built from the keys given (validated after)
        node, klass = node[part], sub


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON (or, with pyyaml installed, YAML) config file into flat dotted overrides."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text file (invalid UTF-8); --config takes a JSON or YAML file") from None
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml  # optional: JSON always works
        except ImportError:
            raise ConfigError(f"{p}: YAML configs need pyyaml (pip install pyyaml); or write it as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({e})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a config file must hold a mapping like {{\"train\": {{\"lr\": 1e-3}}}}")
    data.pop("preset", None)  # run folders record it for humans; the sections below are the config
    return flatten(data)


__all__ = ["TrainConfig", "RunConfig", "DataConfig", "MoEConfig", "RUN_PRESETS", "get_preset", "dense_counterpart",
           "apply_overrides", "parse_set", "parse_value", "load_config_file", "config_keys", "flatten"]
