"""Export back to Hugging Face: load_hf -> save_hf -> transformers.from_pretrained gives identical weights and logits;
natively built moeflow models export to the architecture they match; `moeflow convert` both ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_hf_common import ARCHS, hf_dirs, hf_logits, ours_logits, token_batch  # noqa: F401

import moeflow
from moeflow.cli import main
from moeflow.config import ConfigError, MoEConfig
from moeflow.interop import load_moeflow, save_moeflow
from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.deepseek import DeepSeekConfig, DeepSeekV3
from moeflow.models.switch_t5 import SwitchConfig, SwitchTransformer

pytestmark = pytest.mark.hf
transformers = pytest.importorskip("transformers")


def from_pretrained(arch: str, folder: Path) -> torch.nn.Module:
    """transformers' own loader, asserting that it found every tensor and nothing else."""
    cls = (transformers.SwitchTransformersForConditionalGeneration if arch == "switch_transformers"
           else transformers.AutoModelForCausalLM)
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[k], f"{arch} {k}: {info[k]}"
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_load_save_from_pretrained_is_identity(arch: str, hf_dirs: dict, tmp_path: Path) -> None:
    folder, hf = hf_dirs[arch]
    ours = moeflow.load_hf(folder)
    # a tiny shard limit exercises the sharded writer and its index on every architecture
    moeflow.save_hf(ours, tmp_path, max_shard_bytes=16 << 10)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    back = from_pretrained(arch, tmp_path)
    want, got = hf.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    ids, dec = token_batch(arch)
    assert torch.equal(hf_logits(back, ids, dec), hf_logits(hf, ids, dec))


def _native_models() -> dict[str, torch.nn.Module]:
    """moeflow models built from moeflow configs (no HF origin), one per architecture they should export to."""
    torch.manual_seed(0)
    moe = dict(d_model=32, d_hidden=16, num_experts=4, top_k=2)
    base = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64, ffn_hidden=40,
                rope_theta=5e4)
    return {
        "mixtral": MoETransformer(ModelConfig(**base, moe=MoEConfig(**moe, router="topk"))),
        "olmoe": MoETransformer(ModelConfig(**base, qk_norm=True, moe=MoEConfig(**moe, normalize=False))),
        # every other layer MoE after one dense layer: written as Qwen2's mlp_only_layers
        "qwen2_moe": MoETransformer(ModelConfig(**base, attn_bias=True, first_dense_layers=1, moe_every=2,
                                                tie_embeddings=True,
                                                moe=MoEConfig(**moe, shared_d_hidden=24, shared_gate=True))),
        "deepseek_v3": DeepSeekV3(DeepSeekConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, q_lora_rank=12,
                                                 kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                                 v_head_dim=8, max_seq_len=64, ffn_hidden=40, first_dense_layers=1,
                                                 moe=MoEConfig(**{**moe, "num_experts": 8}, router="deepseek",
                                                               n_group=2, topk_group=1, shared_d_hidden=16,
                                                               routed_scaling_factor=1.5))),
        "switch_transformers": SwitchTransformer(SwitchConfig(vocab_size=64, d_model=32, d_kv=8, n_heads=4, d_ff=40,
                                                              n_encoder_layers=3, n_decoder_layers=2,
                                                              encoder_sparse_step=1, num_experts=4,
                                                              expert_capacity=3)),
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_native_model_exports(arch: str, tmp_path: Path) -> None:
    ours = _native_models()[arch].eval()
    with torch.no_grad():  # random, non-trivial norms and biases so a mis-mapped one would show
        for name, p in ours.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
        for name, b in ours.named_buffers():
            b.normal_(0, 0.05)
    moeflow.save_hf(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == arch  # inferred, not given
    back = from_pretrained(arch, tmp_path)
    ids, dec = token_batch(arch)
    assert (hf_logits(back, ids, dec) - ours_logits(ours, ids, dec)).abs().max().item() <= 1e-4


def test_inexpressible_model_is_refused(tmp_path: Path) -> None:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=64,
                      moe=MoEConfig(d_model=32, d_hidden=16, num_experts=4, top_k=2, capacity_factor=1.25))
    with pytest.raises(ConfigError, match="capacity factor"):
        moeflow.save_hf(MoETransformer(cfg), tmp_path)
    with pytest.raises(ConfigError, match="mixtral: .*dense layers"):
        moeflow.save_hf(MoETransformer(cfg.replace(moe=cfg.moe.replace(capacity_factor=None), first_dense_layers=1,
                                                   n_layers=2)), tmp_path, arch="mixtral")


def test_moeflow_folder_round_trip(hf_dirs: dict, tmp_path: Path) -> None:
    ours = moeflow.load_hf(hf_dirs["qwen2_moe"][0])
    again = load_moeflow(save_moeflow(ours, tmp_path))
    ids, _ = token_batch("qwen2_moe")
    assert torch.equal(ours_logits(again, ids), ours_logits(ours, ids))
    assert again.output.weight is again.tok_embeddings.weight  # tied embeddings survive the streaming load


def test_cli_convert_both_ways(hf_dirs: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder, hf = hf_dirs["olmoe"]
    assert main(["convert", str(folder), str(tmp_path / "mf")]) == 0
    assert (tmp_path / "mf" / "moeflow.json").is_file()
    assert main(["convert", str(tmp_path / "mf"), str(tmp_path / "hf"), "--max-shard-size", "20KB"]) == 0
    assert "peak RSS" in capsys.readouterr().out
    back = from_pretrained("olmoe", tmp_path / "hf")
    ids, _ = token_batch("olmoe")
    assert torch.equal(hf_logits(back, ids), hf_logits(hf, ids))
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2


def test_cli_convert_training_checkpoint(tmp_path: Path) -> None:
    from moeflow.train.checkpoint import save_checkpoint

    model = _native_models()["mixtral"].eval()
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", model_state=model.state_dict(), optimizer_state={}, step=3,
                    data_state={}, config={"model": model.cfg.to_dict()})
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    ids, _ = token_batch("mixtral")
    back = from_pretrained("mixtral", tmp_path / "hf")
    assert (hf_logits(back, ids) - ours_logits(model, ids)).abs().max().item() <= 1e-4
