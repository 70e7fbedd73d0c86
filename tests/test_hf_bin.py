"""moeflow.load_hf on PyTorch .bin checkpoints (single and sharded), against transformers as the oracle.

transformers 5 always writes safetensors, so the .bin folders are made the way transformers 4's
`save_pretrained(safe_serialization=False)` laid them out: each shard's tensors torch.save'd under the same keys,
as pytorch_model.bin or pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json. transformers itself
loading the folder checks that the layout is a real HF one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_hf_common import hf_logits, hf_model, ours_logits, save_hf_model, token_batch

import moeflow
from moeflow.interop.hf import BIN_INDEX_NAME, BIN_NAME, INDEX_NAME, stream_tensors

pytestmark = pytest.mark.hf
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def to_bin(folder: Path) -> None:
    """Replace the safetensors of an HF folder by the equivalent PyTorch .bin files (and index)."""
    index = folder / INDEX_NAME
    if index.is_file():
        meta = json.loads(index.read_text())
        names = sorted(set(meta["weight_map"].values()))
        rename = {n: n.replace("model-", "pytorch_model-").replace(".safetensors", ".bin") for n in names}
        meta["weight_map"] = {k: rename[v] for k, v in meta["weight_map"].items()}
        (folder / BIN_INDEX_NAME).write_text(json.dumps(meta))
        index.unlink()
    else:
        rename = {"model.safetensors": BIN_NAME}
    for st_name, bin_name in rename.items():
        torch.save(safetensors_torch.load_file(folder / st_name), folder / bin_name)
        (folder / st_name).unlink()
    assert not list(folder.glob("*.safetensors"))


def bin_folder(arch: str, folder: Path, sharded: bool, **overrides: Any) -> Any:
    """An HF folder with .bin weights; returns the HF model it was saved from."""
    hf = hf_model(arch, **overrides)
    hf.save_pretrained(folder, **({"max_shard_size": "20KB"} if sharded else {}))
    assert (folder / INDEX_NAME).is_file() == sharded
    to_bin(folder)
    return hf


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])  # qwen2_moe: tied embeddings, shared expert, dense layer
def test_bin_logits_match_transformers(arch: str, sharded: bool, tmp_path: Path) -> None:
    hf = bin_folder(arch, tmp_path, sharded)
    assert (tmp_path / (BIN_INDEX_NAME if sharded else BIN_NAME)).is_file()
    if sharded:
        assert len(list(tmp_path.glob("pytorch_model-*-of-*.bin"))) > 1
    ours = moeflow.load_hf(tmp_path)
    ids, _ = token_batch(arch)
    want = hf_logits(hf, ids)
    assert (ours_logits(ours, ids) - want).abs().max().item() <= 1e-4
    # the folder is one transformers itself reads as this model, so the layout above is not made up
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(hf_logits(back, ids), want)


def test_safetensors_preferred_over_bin(tmp_path: Path) -> None:
    hf = save_hf_model("mixtral", tmp_path)
    (tmp_path / BIN_NAME).write_bytes(b"not a checkpoint")  # would fail to load if it were read
    ours = moeflow.load_hf(tmp_path)
    ids, _ = token_batch("mixtral")
    assert (ours_logits(ours, ids) - hf_logits(hf, ids)).abs().max().item() <= 1e-4


def test_bin_dtype_is_converted(tmp_path: Path) -> None:
    hf = bin_folder("mixtral", tmp_path, sharded=False)
    ours = moeflow.load_hf(tmp_path, dtype=torch.bfloat16)
    assert ours.tok_embeddings.weight.dtype == torch.bfloat16
    ids, _ = token_batch("mixtral")
    assert (ours_logits(ours, ids).float() - hf_logits(hf, ids)).abs().max().item() < 0.05


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_truncated_bin_names_the_file(sharded: bool, tmp_path: Path) -> None:
    bin_folder("mixtral", tmp_path, sharded)
    victim = sorted(tmp_path.glob("pytorch_model*.bin"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{victim.name} is not a readable PyTorch checkpoint.*truncated or corrupt"):
        moeflow.load_hf(tmp_path)


def test_legacy_and_non_tensor_bin_are_refused(tmp_path: Path) -> None:
    bin_folder("mixtral", tmp_path, sharded=False)
    state = torch.load(tmp_path / BIN_NAME, weights_only=True)
    torch.save(state, tmp_path / BIN_NAME, _use_new_zipfile_serialization=False)  # pre-1.6 format: no mmap
    with pytest.raises(ValueError, match=rf"{BIN_NAME} is not a readable PyTorch checkpoint.*zip format"):
        moeflow.load_hf(tmp_path)
    torch.save({"step": 3}, tmp_path / BIN_NAME)
    with pytest.raises(ValueError, match=rf"{BIN_NAME} does not hold a state dict of tensors"):
        moeflow.load_hf(tmp_path)
    (tmp_path / BIN_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights in .*safetensors.*pytorch_model\.bin"):
        moeflow.load_hf(tmp_path)


def test_bin_index_naming_a_missing_tensor(tmp_path: Path) -> None:
    bin_folder("mixtral", tmp_path, sharded=True)
    meta = json.loads((tmp_path / BIN_INDEX_NAME).read_text())
    key = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    shard = meta["weight_map"][key]
    state = torch.load(tmp_path / shard, weights_only=True)
    del state[key]
    torch.save(state, tmp_path / shard)
    with pytest.raises(KeyError, match=rf"{shard} has no tensor {key}"):
        moeflow.load_hf(tmp_path)


def test_bin_streaming_never_maps_a_whole_file(tmp_path: Path) -> None:
    """Like the safetensors stream: the .bin is re-mapped every `remap_bytes` and no mapping outlives its tensors."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    path = tmp_path / "t.bin"
    torch.save({f"t{i}": torch.full((256, 256), float(i)) for i in range(8)}, path)  # 256 KiB each

    def mappings() -> int:
        return sum(str(path) in line for line in maps.read_text().splitlines())

    seen = []
    for key, t in stream_tensors(path, [f"t{i}" for i in range(8)], remap_bytes=600 << 10):
        assert t[0, 0].item() == float(key[1:])
        seen.append(mappings())
        del t  # as load_hf does after copying
    assert seen[0] == 1 and max(seen) <= 1  # memory-mapped (not read into memory), one mapping at a time
    assert mappings() == 0
