"""Load Hugging Face MoE checkpoints into moeflow models and save them back, streaming one tensor at a time.

Loading builds the model on the meta device, allocates its parameters uninitialised (`to_empty`), then reads
each safetensors tensor with `safe_open` and copies it straight into its slot: per-expert HF tensors land in
their row of the stacked [E, ...] expert weights, gate/up halves in their half of `w_in`. No state dict of the
whole model is ever built, and the file mapping is closed every REMAP_BYTES, so peak memory is one copy of the
weights plus at most REMAP_BYTES of mapped file pages (measured: 1.09x a 1 GiB checkpoint, against 2.0x for
`load_file` + copy; `python benchmarks/hf.py rss`).

PyTorch checkpoints (pytorch_model.bin, or pytorch_model-0000i-of-0000n.bin + index) stream the same way:
`torch.load(mmap=True, weights_only=True)` maps the file instead of reading it, and is re-done every REMAP_BYTES
for the same reason. Safetensors are preferred when a folder has both.

Reads config.json and the weight files directly: `transformers` is not needed to load or save.
"""

from __future__ import annotations

import json
import pickle
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moeflow.config import ConfigError
from moeflow.interop.hf_config import (DTYPES, AnyConfig, arch_of_model, build_model, config_dict, config_from_dict,
                                       config_from_hf, config_to_hf, hf_dtype)
from moeflow.interop.rules import check_keys, plan, slot_view, unique_state

INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
MOEFLOW_CONFIG = "moeflow.json"
REMAP_BYTES = 32 << 20  # file pages one mapping of a weight file may keep resident before it is closed


def _safetensors() -> Any:
    """The safetensors package, with an install hint if it is missing."""
    try:
        import safetensors
        import safetensors.torch  # noqa: F401
    except ImportError:
        raise ImportError("reading/writing checkpoints needs safetensors: pip install 'moeflow[hf]'") from None
    return safetensors


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, with errors that name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected a Hugging Face model folder with config.json and "
                                "*.safetensors (or pytorch_model*.bin)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return d


def _index_files(index: Path) -> dict[str, list[str]]:
    """Shard file -> its tensor names, from a sharded checkpoint's index (every shard checked to exist)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ConfigError(f"{index} has no weight_map")
    files: dict[str, list[str]] = defaultdict(list)
    for key, fname in weight_map.items():
        files[fname].append(key)
    for fname in files:
        if not (index.parent / fname).is_file():
            raise FileNotFoundError(f"{index.parent / fname} is listed in {index} but missing")
    return dict(files)


def torch_state(path: Path) -> dict[str, Tensor]:
    """The state dict of a PyTorch .bin checkpoint, memory-mapped (no tensor data is read until it is used)."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except (FileNotFoundError, PermissionError):
        raise
    except (RuntimeError, OSError, pickle.UnpicklingError, EOFError, ValueError) as e:  # OSError: EINVAL on some cuts
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0]}); it may be "
                         "truncated or corrupt, or written by torch.save without the zip format (mmap needs it): "
                         "re-save it, or convert it to safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (got {type(state).__name__}); expected "
                         "the pytorch_model*.bin that save_pretrained writes")
    return state


def checkpoint_files(folder: Path) -> dict[str, list[str]]:
    """Weight file -> its tensor names: safetensors (from the shard index, else the headers) if the folder has
    any, else pytorch_model.bin (from its index, else the file itself)."""
    index = folder / INDEX_NAME
    if index.is_file():
        return _index_files(index)
    paths = sorted(folder.glob("*.safetensors"))
    if paths:
        st = _safetensors()
        out = {}
        for p in paths:
            try:
                with st.safe_open(str(p), framework="pt") as f:
                    out[p.name] = list(f.keys())
            except Exception as e:  # safetensors raises its own error type for a torn or foreign file
                raise ValueError(f"{p}: not a readable safetensors file ({str(e).splitlines()[0][:200]}); it may be "
                                 "truncated") from None
        return out
    if (folder / BIN_INDEX_NAME).is_file():
        return _index_files(folder / BIN_INDEX_NAME)
    if (folder / BIN_NAME).is_file():
        return {BIN_NAME: list(torch_state(folder / BIN_NAME))}
    raise FileNotFoundError(f"no weights in {folder}: expected *.safetensors (with {INDEX_NAME} when sharded) or "
                            f"{BIN_NAME} (with {BIN_INDEX_NAME} when sharded)")


@contextmanager
def open_tensors(path: Path) -> Iterator[Callable[[str], Tensor]]:
    """A getter of tensors by name from one safetensors or PyTorch .bin file, memory-mapped while open."""
    if path.suffix == ".safetensors":
        with _safetensors().safe_open(str(path), framework="pt", device="cpu") as f:
            yield f.get_tensor
        return
    state = torch_state(path)

    def get(key: str) -> Tensor:
        if key not in state:
            raise KeyError(f"{path} has no tensor {key}, but the checkpoint's index lists it there")
        return state.pop(key)  # popped: the file mapping goes away with the last tensor handed out

    yield get
    state.clear()


def stream_tensors(path: Path, keys: list[str], remap_bytes: int = REMAP_BYTES) -> Iterator[tuple[str, Tensor]]:
    """(key, tensor) for `keys` of one safetensors or PyTorch .bin file, one tensor at a time.

    NOTE: both formats memory-map the file, and every page read stays resident (and counted in RSS) until the
    mapping closes: reading a whole shard through one mapping would hold a second copy of it. Re-opening the
    file every `remap_bytes` bounds that to `remap_bytes` while parsing the header only a few times per shard.
    A mapping outlives its handle while any tensor from it lives, so callers must drop each tensor after use.
    """
    i = 0
    while i < len(keys):
        with open_tensors(path) as get:
            mapped = 0
            while i < len(keys) and mapped < remap_bytes:
                t = get(keys[i])
                mapped += t.numel() * t.element_size()
                yield keys[i], t
                del t
                i += 1
        del get


def empty_model(arch: str, cfg: AnyConfig, dtype: torch.dtype, device: torch.device | str = "cpu") -> nn.Module:
    """The model with uninitialised storage: built on meta (no init cost), then allocated (no copy)."""
    with torch.device("meta"):
        model = build_model(arch, cfg).to(dtype)
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.is_floating_point():
                    # selection biases stay fp32, as in HF (`_keep_in_fp32_modules_strict`)
                    module._buffers[name] = buf.float()
    state = set(model.state_dict())
    loose = [n for n, _ in model.named_buffers() if n not in state]
    if loose:
        raise RuntimeError(f"cannot stream-load: non-persistent buffers {loose} would stay uninitialised")
    # to_empty gives every parameter its own storage, which unties tied weights (e.g. output = embedding)
    owners: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                owners[id(p)].append((module, name))
    model = model.to_empty(device=device)
    for places in owners.values():
        first_module, first_name = places[0]
        for module, name in places[1:]:
            module._parameters[name] = first_module._parameters[first_name]
    return model


@torch.no_grad()
def load_hf(path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """Load an HF folder (config.json + safetensors or PyTorch .bin, single or sharded) as a moeflow model, in eval mode.

    Supports Mixtral, Qwen2-MoE, OLMoE (-> MoETransformer), DeepSeek-V3 (-> DeepSeekV3) and SwitchTransformers
    (-> SwitchTransformer). `dtype` defaults to the checkpoint's. The model remembers the HF config it came from
    (`model.hf_config`) so that `save_hf` writes back the fields moeflow does not model.
    """
    folder = Path(path)
    hf = read_json(folder / "config.json")
    files = checkpoint_files(folder)  # before the config: a folder without weights says so, not KeyError
    try:
        arch, cfg = config_from_hf(hf)
    except KeyError as e:
        raise ConfigError(f"{folder / 'config.json'} lacks {e.args[0]!r}, which a {hf.get('model_type', '?')} "
                          "config needs; is it a complete Hugging Face config?") from None
    model = empty_model(arch, cfg, dtype or hf_dtype(hf), device)
    expected = plan(model, arch)
    n_layers = getattr(cfg, "n_layers", 0)
    check_keys(expected, {k for keys in files.values() for k in keys}, arch, str(folder), n_layers)
    params = unique_state(model)
    for fname, keys in files.items():
        wanted = [k for k in keys if k in expected]  # the rest are ignored extras (check_keys vetted them)
        for key, src in stream_tensors(folder / fname, wanted):
            slot = expected[key]
            dst = slot_view(params[slot.name], slot)
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"{folder / fname}: tensor {key} has shape {tuple(src.shape)} but the model built "
                                 f"from config.json expects {tuple(dst.shape)}; config.json and weights disagree")
            dst.copy_(src)
            del src
    model.hf_config = hf  # type: ignore[assignment]
    model.hf_arch = arch  # type: ignore[assignment]
    return model.eval()


def _hf_tensors(model: nn.Module, arch: str, dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
    """(HF key, tensor) pairs in the model's order, each a fresh contiguous copy in `dtype`."""
    params = unique_state(model)
    for key, slot in plan(model, arch).items():
        t = slot_view(params[slot.name].detach(), slot)
        if slot.name.endswith("e_score_correction_bias"):
            yield key, t.float().contiguous().clone()
        else:
            yield key, t.to(dtype).contiguous().clone()


@torch.no_grad()
def save_hf(model: nn.Module, path: str | Path, arch: str | None = None, dtype: torch.dtype | None = None,
            max_shard_bytes: int = 4 << 30) -> Path:
    """Write `model` as an HF folder (config.json + safetensors, sharded with an index past max_shard_bytes)
    that `transformers` loads with from_pretrained. Returns the folder.

    `arch` defaults to the architecture the model came from (load_hf) or the one it matches exactly. Memory:
    tensors are copied one shard at a time, so the extra peak is about one shard.
    """
    st = _safetensors()
    arch = arch or getattr(model, "hf_arch", None) or arch_of_model(model)
    cfg = getattr(model, "cfg")
    if dtype is None:
        dtype = next(iter(unique_state(model).values())).dtype
    hf = config_to_hf(arch, cfg, getattr(model, "hf_config", None), dtype)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Tensor]] = [{}]
    size = total = 0
    weight_map: dict[str, str] = {}
    names: list[str] = []

    def flush() -> None:
        name = f"part-{len(names) + 1:05d}.safetensors.tmp"
        st.torch.save_file(shards[-1], str(folder / name), metadata={"format": "pt"})
        names.append(name)
        for k in shards[-1]:
            weight_map[k] = name
        shards[-1] = {}

    for key, t in _hf_tensors(model, arch, dtype):
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shards[-1][key] = t
        size += nbytes
        total += nbytes
    flush()
    for old in list(folder.glob("model*.safetensors")) + [folder / INDEX_NAME]:
        old.unlink(missing_ok=True)  # stale shards of an earlier save would confuse loaders
    # HF's names: model.safetensors, or model-0000i-of-0000n.safetensors + index
    final = (["model.safetensors"] if len(names) == 1 else
             [f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i in range(len(names))])
    for tmp, name in zip(names, final):
        (folder / tmp).replace(folder / name)
    weight_map = {k: final[names.index(v)] for k, v in weight_map.items()}
    if len(names) > 1:
        (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2))
    (folder / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    return folder


# ------------------------------------------------------------------------------------ moeflow export format
@torch.no_grad()
def save_moeflow(model: nn.Module, path: str | Path) -> Path:
    """A moeflow model folder: moeflow.json (architecture + config) and model.safetensors (moeflow names)."""
    st = _safetensors()
    arch = getattr(model, "hf_arch", None) or arch_of_model(model)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in unique_state(model).items()}
    st.torch.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    dtype = next(iter(tensors.values())).dtype
    meta = {"format": "moeflow", "arch": arch, "dtype": str(dtype).removeprefix("torch."),
            "config": config_dict(getattr(model, "cfg")), "hf_config": getattr(model, "hf_config", None)}
    (folder / MOEFLOW_CONFIG).write_text(json.dumps(meta, indent=2))
    return folder


@torch.no_grad()
def load_moeflow(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Inverse of save_moeflow (streaming, like load_hf)."""
    st = _safetensors()
    folder = Path(path)
    meta = read_json(folder / MOEFLOW_CONFIG)
    if meta.get("format") != "moeflow":
        raise ConfigError(f"{folder / MOEFLOW_CONFIG} is not a moeflow model description")
    arch = meta["arch"]
    cfg = config_from_dict(arch, meta["config"])
    fname = folder / "model.safetensors"
    with st.safe_open(str(fname), framework="pt", device="cpu") as f:
        keys = list(f.keys())
    model = empty_model(arch, cfg, DTYPES[meta.get("dtype", "float32")], device)
    params = unique_state(model)
    missing, extra = set(params) - set(keys), set(keys) - set(params)
    if missing or extra:
        raise KeyError(f"{fname}: missing tensors {sorted(missing)[:8]}, unexpected tensors {sorted(extra)[:8]}")
    for key, src in stream_tensors(fname, keys):
        if src.shape != params[key].shape:
            raise ValueError(f"{fname}: {key} has shape {tuple(src.shape)}, expected {tuple(params[key].shape)}")
        params[key].copy_(src)
    model.hf_config = meta.get("hf_config")  # type: ignore[assignment]
    model.hf_arch = arch  # type: ignore[assignment]
    return model.eval()
