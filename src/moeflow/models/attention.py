"""Rotary position embeddings, grouped-query attention, and the preallocated KV cache.

Shape legend: B = batch, S = new positions in this call, L = key positions attended (cache.length + S),
H = query heads, K = key/value heads (GQA: H % K == 0), Dh = head dim, D = model dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeflow.layers import RMSNorm
from moeflow.models.config import ModelConfig


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """fp32 cos and sin [S, Dh] for the given integer positions, in HF Llama's half-split layout.

    Recomputed per forward (S x Dh/2 products) rather than cached in a buffer so that `model.to(bfloat16)`
    cannot round the angles: at position 10^4 a bf16 angle is off by tens of radians.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [S, Dh/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [S, Dh]: frequency i drives dims i and i + Dh/2
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim (HF `rotate_half`)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, heads, S, Dh] by the angles of its positions; fp32 math, result in x's dtype."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class KVCache:
    """Preallocated keys and values for every layer: k, v [n_layers, B, K, max_len, Dh].

    `length` is the number of positions already written; the model writes a call's S new positions at
    [length, length + S) in every layer, then advances `length` once, after the last layer.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        """Allocate zeroed key/value buffers."""
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def batch_size(self) -> int:
        """B."""
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        """Positions the cache can hold."""
        return self.k.shape[3]

    def update(self, layer: int, k_BKSD: Tensor, v_BKSD: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new positions at [length, length + S) and return all keys/values so far [B, K, L, Dh]."""
        start, end = self.length, self.length + k_BKSD.shape[2]
        self.k[layer, :, :, start:end] = k_BKSD
        self.v[layer, :, :, start:end] = v_BKSD
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self) -> None:
        """Forget every position (buffers are reused, not reallocated)."""
        self.length = 0


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE; Llama names wq/wk/wv/wo (+ OLMoE q_norm/k_norm)."""

    def __init__(self, cfg: ModelConfig) -> None:
        """Projections D -> H*Dh (q) and D -> K*Dh (k, v), output H*Dh -> D."""
        super().__init__()
        hd = cfg.head_dim
        assert hd is not None
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=cfg.attn_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.attn_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.attn_bias)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)
        # OLMoE normalises the whole projection (all heads together), before the heads are split and rotated
        self.q_norm = RMSNorm(cfg.n_heads * hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.n_kv_heads * hd, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """x [B, S, D] -> [B, S, D]; with a cache, attend to its first cache.length positions too."""
        b, s, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)  # [B, S, H*Dh], [B, S, K*Dh] x2
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, Dh]
        k = k.view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, S, Dh]
        v = v.view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)  # [B, K, L, Dh]
        gqa = self.n_kv_heads != self.n_heads
        if past == 0 or s == 1:
            # no past: plain causal; one new query: it may see every cached key, so no mask at all
            y = F.scaled_dot_product_attention(q, k, v, is_causal=(past == 0 and s > 1), enable_gqa=gqa)
        else:
            # chunk appended to a non-empty cache: query i sits at position past + i (SDPA's is_causal would
            # align the mask top-left, i.e. as if the queries started at position 0)
            mask = torch.ones(s, past + s, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))  # [B, S, D]
