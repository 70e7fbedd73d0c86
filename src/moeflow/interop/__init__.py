"""Hugging Face interop: load/save MoE checkpoints (no transformers needed) and patch live transformers models."""

from moeflow.interop.hf import load_hf, load_moeflow, save_hf, save_moeflow
from moeflow.interop.patch import patch_hf

__all__ = ["load_hf", "save_hf", "load_moeflow", "save_moeflow", "patch_hf"]
