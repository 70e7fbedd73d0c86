"""ModelConfig for the decoder-only MoE language model, its analytic parameter counts, and named presets."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moeflow.config import GATED, Config, MoEConfig, check_int, check_number, need


@dataclass(kw_only=True)
class ModelConfig(Config):
    """A Llama/Mixtral-style decoder: sizes, attention options, and which FFNs are MoE layers.

    `head_dim=None` resolves to `d_model // n_heads` at construction. Layer i has an MoE FFN iff `moe` is set,
    `i >= first_dense_layers`, `(i - first_dense_layers) % moe_every == moe_every - 1` and i is not in
    `dense_layers` (stored sorted, as a tuple).
    """

    vocab_size: int = 256  # byte-level default
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention; must divide n_heads
    head_dim: int | None = None  # None -> d_model // n_heads
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    ffn_hidden: int = 512  # hidden size of dense FFN layers (dense baseline and non-MoE layers)
    moe: MoEConfig | None = None  # None -> dense model
    moe_every: int = 1  # 1: every layer is MoE; 2: every other layer (GShard)
    first_dense_layers: int = 0  # DeepSeek-style dense first layers
    dense_layers: tuple[int, ...] = ()  # further dense layers, for layouts the rule above cannot express (Qwen2-MoE)
    tie_embeddings: bool = False
    attn_bias: bool = False  # q/k/v projection biases (Qwen2-MoE)
    qk_norm: bool = False  # RMSNorm over the full q / k projections before RoPE (OLMoE)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        """Validate every field and resolve head_dim."""
        check_int(self, "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "ffn_hidden",
                  "moe_every")
        need(self.n_heads % self.n_kv_heads == 0,
             f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} "
             "(each key/value head serves n_heads // n_kv_heads query heads)")
        if self.head_dim is None:
            need(self.d_model % self.n_heads == 0,
                 f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                 "change one of them or set head_dim explicitly")
            self.head_dim = self.d_model // self.n_heads
        need(isinstance(self.head_dim, int) and self.head_dim >= 2 and self.head_dim % 2 == 0,
             f"ModelConfig.head_dim must be an even integer >= 2 (RoPE rotates pairs), got {self.head_dim!r}")
        check_int(self, "first_dense_layers", lo=0, hi=self.n_layers)
        need(isinstance(self.dense_layers, (list, tuple)),
             f"ModelConfig.dense_layers must be a list of layer indices, got {self.dense_layers!r}")
        bad = [i for i in self.dense_layers
               if not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.n_layers)]
        need(not bad, f"ModelConfig.dense_layers {bad} are not layer indices in [0, n_layers={self.n_layers})")
        need(len(set(self.dense_layers)) == len(self.dense_layers),
             f"ModelConfig.dense_layers {list(self.dense_layers)} lists a layer more than once")
        self.dense_layers = tuple(sorted(self.dense_layers))  # canonical, so a JSON round trip compares equal
        check_number(self, "rope_theta", lo=0, lo_open=True)
        # an eps or init scale of 1 or more is never meant (issue 12: init_std=1e20 gave inf logits, not an error)
        check_number(self, "norm_eps", "init_std", lo=0, hi=1, lo_open=True, hi_open=True)
        if self.moe is not None:
            need(isinstance(self.moe, MoEConfig),
                 f"ModelConfig.moe must be a MoEConfig (or None for a dense model), got {type(self.moe).__name__}")
            need(self.moe.d_model == self.d_model,
                 f"ModelConfig.moe.d_model={self.moe.d_model} must equal ModelConfig.d_model={self.d_model}; "
                 "the MoE layer replaces the FFN on the residual stream")

    # ---------------------------------------------------------------- structure
    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i has an MoE FFN (else a dense FFN of width ffn_hidden)."""
        if self.moe is None or i < self.first_dense_layers or i in self.dense_layers:
            return False
        return (i - self.first_dense_layers) % self.moe_every == self.moe_every - 1

    @property
    def dense_activation(self) -> str:
        """Activation of the dense FFN layers: the experts' activation, so both share one parameterisation."""
        return self.moe.activation if self.moe is not None else "swiglu"

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again; head_dim re-derived unless given)."""
        if "head_dim" not in changes and ("d_model" in changes or "n_heads" in changes):
            changes["head_dim"] = None
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- parameter counts
    def num_params(self) -> int:
        """Total parameters, computed from the config alone (matches sum(p.numel()) of MoETransformer)."""
        return self._count(active=False)

    def num_active_params(self) -> int:
        """Parameters used per token: everything except experts, plus top_k experts (and shared experts).

        For expert-choice routing top_k is the average number of experts per token (before capacity_factor).
        """
        return self._count(active=True)

    def _count(self, active: bool) -> int:
        """Sum the parameters of every module MoETransformer builds (all experts, or top_k of them)."""
        d, hd = self.d_model, self.head_dim
        assert hd is not None
        emb = self.vocab_size * d
        total = emb + (0 if self.tie_embeddings else emb) + d  # embeddings, output, final norm
        q, kv = self.n_heads * hd, self.n_kv_heads * hd
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.attn_bias else 0) + (q + kv if self.qk_norm else 0)
        for i in range(self.n_layers):
            total += 2 * d + attn  # two norms + attention
            if self.is_moe_layer(i):
                assert self.moe is not None
                total += _moe_params(self.moe, active)
            else:
                total += _ffn_params(d, self.ffn_hidden, self.dense_activation)
        return total


def _ffn_params(d: int, h: int, activation: str) -> int:
    """w_in [F, D] (F = 2H when gated) + w_out [D, H], as in moeflow.layers.FFN."""
    return (2 * h if activation in GATED else h) * d + d * h


def _moe_params(m: MoEConfig, active: bool) -> int:
    """Router + experts (all, or top_k when `active`) + shared experts, as built by moeflow.layers.MoELayer."""
    router = m.num_experts * m.d_model + (m.num_experts if m.router_bias else 0)
    if m.router == "noisy_topk":
        router += m.num_experts * m.d_model  # W_noise
    if m.router == "hierarchical":
        router += m.num_clusters * m.d_model  # cluster prototypes
    n = m.top_k if active else m.num_experts
    shared = _ffn_params(m.d_model, m.shared_d_hidden, m.activation) if m.shared_d_hidden else 0
    gate = m.d_model if (m.shared_d_hidden and m.shared_gate) else 0
    return router + n * _ffn_params(m.d_model, m.d_hidden, m.activation) + shared + gate


# ------------------------------------------------------------------------------------------- presets
def _tiny() -> ModelConfig:
    # 8 experts of hidden 256, top-2: per token 2*256 = 512 hidden units, the same as tiny-dense's FFN
    return ModelConfig(moe=MoEConfig(d_model=128, d_hidden=256, num_experts=8, top_k=2, router="topk"))


def _tiny_dense() -> ModelConfig:
    return ModelConfig(ffn_hidden=512)


def _small() -> ModelConfig:
    return ModelConfig(d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, max_seq_len=512, ffn_hidden=1024,
                       moe=MoEConfig(d_model=256, d_hidden=512, num_experts=8, top_k=2, router="topk"))


def _small_dense() -> ModelConfig:
    return ModelConfig(d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, max_seq_len=512, ffn_hidden=1024)


def _mixtral_8x7b() -> ModelConfig:
    # mistralai/Mixtral-8x7B-v0.1 config.json; 46.7B parameters, 12.9B active. Reference only: never build it on CPU.
    return ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, max_seq_len=32768,
                       rope_theta=1e6, norm_eps=1e-5, ffn_hidden=14336,
                       moe=MoEConfig(d_model=4096, d_hidden=14336, num_experts=8, top_k=2, router="topk",
                                     normalize=True))


MODEL_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": _tiny,
    "tiny-dense": _tiny_dense,
    "small": _small,
    "small-dense": _small_dense,
    "mixtral-8x7b": _mixtral_8x7b,
}
