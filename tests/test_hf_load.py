"""moeflow.load_hf against transformers as the oracle: same logits (fp32, <= 1e-4) and the same greedy tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_hf_common import ARCHS, hf_dirs, hf_logits, ours_logits, save_hf_model, token_batch  # noqa: F401

import moeflow
from moeflow.config import ConfigError
from moeflow.layers import moe_layers
from moeflow.models import MoETransformer, generate
from moeflow.models.deepseek import DeepSeekV3
from moeflow.models.switch_t5 import SwitchTransformer

pytestmark = pytest.mark.hf
transformers = pytest.importorskip("transformers")

EXPECTED_CLASS = {"mixtral": MoETransformer, "qwen2_moe": MoETransformer, "olmoe": MoETransformer,
                  "deepseek_v3": DeepSeekV3, "switch_transformers": SwitchTransformer}


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch: str, hf_dirs: dict) -> None:
    folder, hf = hf_dirs[arch]
    ours = moeflow.load_hf(folder)
    assert isinstance(ours, EXPECTED_CLASS[arch])
    ids, dec = token_batch(arch)
    want, got = hf_logits(hf, ids, dec), ours_logits(ours, ids, dec)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4, f"{arch}: max |diff| {(got - want).abs().max().item():.2e}"


def test_switch_capacity_drops_tokens(hf_dirs: dict) -> None:
    # the parity above is only meaningful for Switch if capacity actually bites: expert_capacity=2, 12 tokens, 4 experts
    ours = moeflow.load_hf(hf_dirs["switch_transformers"][0])
    ids, dec = token_batch("switch_transformers")
    ours(ids, dec)
    dropped = [float(m.last_routing.dropped_fraction) for _, m in moe_layers(ours)]
    assert max(dropped) > 0.1, dropped
    assert all(m.last_routing.tokens_per_expert.max() <= 2 * ids.shape[0] for _, m in moe_layers(ours))


def test_deepseek_bias_and_groups_are_loaded(hf_dirs: dict) -> None:
    folder, hf = hf_dirs["deepseek_v3"]
    ours = moeflow.load_hf(folder)
    layer = ours.layers[1].ffn
    torch.testing.assert_close(layer.router.e_score_correction_bias, hf.model.layers[1].mlp.gate.e_score_correction_bias)
    assert layer.router.e_score_correction_bias.dtype == torch.float32
    assert (layer.cfg.n_group, layer.cfg.topk_group, layer.cfg.routed_scaling_factor) == (4, 2, 2.5)
    assert not isinstance(ours.layers[0].ffn, moeflow.MoELayer)  # first_k_dense_replace=1


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_matches(arch: str, hf_dirs: dict) -> None:
    folder, hf = hf_dirs[arch]
    ours = moeflow.load_hf(folder)
    ids, _ = token_batch(arch, seed=3)
    ids = ids[:, :6]
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=5, do_sample=False)
    got = ours.generate(ids, 5) if arch == "switch_transformers" else generate(ours, ids, 5, temperature=0.0)
    assert torch.equal(got, want), f"{arch}:\n{got}\n{want}"


@pytest.mark.parametrize("arch,overrides", [
    ("deepseek_v3", dict(q_lora_rank=None, rope_interleave=False)),  # one query projection, half-split RoPE
    ("switch_transformers", dict(tie_word_embeddings=False)),  # separate stack embeddings, unscaled head
    ("olmoe", dict(norm_topk_prob=True, tie_word_embeddings=True)),
    ("deepseek_v3", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "beta_fast": 32,
                                          "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                                          "original_max_position_embeddings": 16})),  # DeepSeek-V3's YaRN
])
def test_config_variants_from_sharded_checkpoints(arch: str, overrides: dict, tmp_path: Path) -> None:
    hf = save_hf_model(arch, tmp_path, **overrides)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")  # sharded via model.safetensors.index.json
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = moeflow.load_hf(tmp_path)
    ids, dec = token_batch(arch)
    assert (ours_logits(ours, ids, dec) - hf_logits(hf, ids, dec)).abs().max().item() <= 1e-4


def test_streaming_never_maps_a_whole_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """safe_open's mapping is closed every `remap_bytes`, so read pages cannot pile up in resident memory."""
    import safetensors
    from safetensors.torch import save_file

    from moeflow.interop.hf import stream_tensors

    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    path = tmp_path / "t.safetensors"
    save_file({f"t{i}": torch.full((256, 256), float(i)) for i in range(8)}, path)  # 256 KiB each
    opens = []
    real_open = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: opens.append(a[0]) or real_open(*a, **k))
    mapped = []
    for key, t in stream_tensors(path, [f"t{i}" for i in range(8)], remap_bytes=600 << 10):
        assert t[0, 0].item() == float(key[1:])
        mapped.append(sum(str(path) in line for line in maps.read_text().splitlines()))
    assert len(opens) == 3  # 600 KiB window, 256 KiB tensors: t0-t2, t3-t5, t6-t7
    assert max(mapped) <= 1  # never two mappings of the file at once
    del t  # a tensor from get_tensor keeps its mapping alive (load_hf drops each one after copying it)
    assert sum(str(path) in line for line in maps.read_text().splitlines()) == 0  # none left afterwards


def test_bf16_load(hf_dirs: dict) -> None:
    ours = moeflow.load_hf(hf_dirs["mixtral"][0], dtype=torch.bfloat16)
    assert ours.tok_embeddings.weight.dtype == torch.bfloat16
    ids, _ = token_batch("mixtral")
    want = hf_logits(hf_dirs["mixtral"][1], ids)
    assert (ours_logits(ours, ids).float() - want).abs().max().item() < 0.05


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named(hf_dirs: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _copy(hf_dirs["mixtral"][0], tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(KeyError, match=r"missing.*layers\.1\.block_sparse_moe\.experts\.3\.w2\.weight"):
        moeflow.load_hf(folder)


def test_shape_mismatch_and_unsupported_arch(hf_dirs: dict, tmp_path: Path) -> None:
    folder = _copy(hf_dirs["olmoe"][0], tmp_path / "o")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 20}))
    with pytest.raises(ValueError, match="config.json and weights disagree"):
        moeflow.load_hf(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="unsupported architecture.*llama.*mixtral"):
        moeflow.load_hf(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(ConfigError, match="yarn"):
        moeflow.load_hf(folder)
    with pytest.raises(FileNotFoundError, match="config.json"):
        moeflow.load_hf(tmp_path / "nowhere")

