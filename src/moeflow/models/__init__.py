"""Decoder-only MoE language models (Llama/Mixtral-style) and autoregressive generation."""

from moeflow.models.attention import Attention, KVCache, apply_rope, rope_cos_sin, rotate_half
from moeflow.models.config import MODEL_PRESETS, ModelConfig
from moeflow.models.generate import filter_logits, generate, sample_next
from moeflow.models.llama import Block, MoETransformer

__all__ = ["Attention", "KVCache", "apply_rope", "rope_cos_sin", "rotate_half", "MODEL_PRESETS", "ModelConfig",
           "filter_logits", "generate", "sample_next", "Block", "MoETransformer"]
