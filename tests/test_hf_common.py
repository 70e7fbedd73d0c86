"""Tiny random Hugging Face MoE models built from configs (no download), shared by the test_hf_* files.

Every architecture moeflow interoperates with appears once, sized to run in milliseconds, with the features
that distinguish it switched on: Qwen2-MoE a dense first layer, tied embeddings and its gated shared expert;
DeepSeek-V3 dense first layer, group-limited routing and a random (non-zero) correction bias; Switch an
expert capacity small enough that tokens are dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

ARCHS = ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "switch_transformers"]
VOCAB = 64


def hf_config(arch: str, **overrides: Any) -> Any:
    """A tiny transformers config of `arch` (eos/pad unset so greedy generation never stops early)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if arch == "mixtral":
        cfg = tf.MixtralConfig(**common, intermediate_size=48, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2)
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": 50000.0}
    elif arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**common, intermediate_size=40, moe_intermediate_size=16,
                                shared_expert_intermediate_size=24, num_key_value_heads=2, num_experts=4,
                                num_experts_per_tok=2, mlp_only_layers=[0], tie_word_embeddings=True)
    elif arch == "olmoe":
        cfg = tf.OlmoeConfig(**common, intermediate_size=24, num_key_value_heads=2, num_experts=4,
                             num_experts_per_tok=2)
    elif arch == "deepseek_v3":
        cfg = tf.DeepseekV3Config(**common, intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=4,
                                  n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                                  first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
                                  qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5)
    elif arch == "switch_transformers":
        cfg = tf.SwitchTransformersConfig(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                          num_decoder_layers=2, num_heads=4, num_experts=4, expert_capacity=2,
                                          num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
                                          eos_token_id=None, pad_token_id=0)
        cfg.decoder_start_token_id = 0
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def hf_model(arch: str, seed: int = 0, **overrides: Any) -> Any:
    """A tiny random HF model of `arch` in eval mode (DeepSeek gets a random correction bias)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = hf_config(arch, **overrides)
    if arch == "switch_transformers":
        model = tf.SwitchTransformersForConditionalGeneration(cfg)
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.05)  # zero would leave the bias path untested
    return model.float().eval()


def save_hf_model(arch: str, folder: Path, **kwargs: Any) -> Any:
    """Build, save_pretrained into `folder`, return the HF model."""
    model = hf_model(arch, **kwargs)
    model.save_pretrained(folder)
    return model


def hf_logits(model: Any, ids: torch.Tensor, dec: torch.Tensor | None = None) -> torch.Tensor:
    """HF logits for decoder-only ids, or encoder ids + decoder ids."""
    with torch.no_grad():
        if dec is not None:
            return model(input_ids=ids, decoder_input_ids=dec).logits
        return model(input_ids=ids).logits


def ours_logits(model: Any, ids: torch.Tensor, dec: torch.Tensor | None = None) -> torch.Tensor:
    """moeflow logits with the same calling convention."""
    with torch.no_grad():
        return model(ids) if dec is None else model(ids, dec)


def token_batch(arch: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input ids [2, 12], decoder ids [2, 9] for Switch else None)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    dec = torch.randint(0, VOCAB, (2, 9), generator=g) if arch == "switch_transformers" else None
    return ids, dec




@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """arch -> (folder written by save_pretrained, the HF model)."""
    pytest.importorskip("transformers")
    out = {}
    for arch in ARCHS:
        folder = tmp_path_factory.mktemp(arch)
        out[arch] = (folder, save_hf_model(arch, folder))
    return out
