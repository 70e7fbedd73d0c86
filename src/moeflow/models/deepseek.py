"""DeepSeek-V3 decoder: multi-head latent attention (MLA), dense first layers, then MoE layers with the
"deepseek" router (sigmoid, group-limited, aux-loss-free bias) and shared experts. No multi-token prediction.

MLA (DeepSeek-V2 §2.1, arXiv:2405.04434): keys and values are up-projected from a small latent
c_kv = RMSNorm(x . W_kv_a[:r]) shared by all heads, plus one rotary key k_rot shared by all heads; queries come
from a low-rank path x -> RMSNorm(x . W_q_a) -> W_q_b (or one projection when q_lora_rank is None). Each head's
query/key is [nope | rope]; only the rope part is rotated. The KV cache stores the latent and k_rot only.

Shape legend: B = batch, S = new positions, L = key positions (cache.length + S), H = heads, D = model dim,
R = kv_lora_rank, P = qk_rope_head_dim, N = qk_nope_head_dim, V = v_head_dim.
Names follow DeepSeek's reference inference code (wq_a, q_norm, wq_b, wkv_a, kv_norm, wkv_b, wo).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeflow.config import Config, MoEConfig, check_int, check_number, need
from moeflow.layers import RMSNorm, moe_layers
from moeflow.models.attention import rope_cos_sin, rotate_half
from moeflow.routing.deepseek import update_router_biases
from moeflow.routing.log import RoutingLog
from moeflow.models.moe_mixin import MoEOutputs
from moeflow.models.llama import Block


@dataclass(kw_only=True)
class DeepSeekConfig(Config):
    """Sizes of a DeepSeek-V3 style decoder; layer i is MoE iff `moe` is set and i >= first_dense_layers."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    q_lora_rank: int | None = None  # None: queries from one projection D -> H*(N+P)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_interleave: bool = True  # rotary pairs are (x0, x1), (x2, x3), ... as in DeepSeek's checkpoints
    # YaRN context extension (DeepSeek-V3: factor 40 over 4096 positions); None = plain RoPE. Keys as in HF:
    # factor, original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim, attention_factor, truncate
    rope_scaling: dict[str, Any] | None = None
    norm_eps: float = 1e-6
    latent_norm_eps: float = 1e-6  # eps of q_norm / kv_norm (HF uses the RMSNorm default, not rms_norm_eps)
    ffn_hidden: int = 18432  # dense layers' hidden size
    moe: MoEConfig | None = None
    first_dense_layers: int = 3
    tie_embeddings: bool = False
    attn_bias: bool = False  # bias on wq_a, wkv_a and wo (HF attention_bias)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        """Validate sizes."""
        check_int(self, "vocab_size", "d_model", "n_layers", "n_heads", "kv_lora_rank", "qk_nope_head_dim",
                  "qk_rope_head_dim", "v_head_dim", "max_seq_len", "ffn_hidden")
        check_int(self, "q_lora_rank", none="one query projection")
        need(self.qk_rope_head_dim % 2 == 0, f"DeepSeekConfig.qk_rope_head_dim must be even (RoPE rotates pairs), "
                                             f"got {self.qk_rope_head_dim}")
        check_int(self, "first_dense_layers", lo=0, hi=self.n_layers)
        check_number(self, "rope_theta", lo=0, lo_open=True)
        check_number(self, "norm_eps", "latent_norm_eps", "init_std", lo=0, hi=1, lo_open=True, hi_open=True)
        if self.rope_scaling is not None:
            need(isinstance(self.rope_scaling, dict) and not set(self.rope_scaling) - YARN_KEYS
                 and "factor" in self.rope_scaling and "original_max_position_embeddings" in self.rope_scaling,
                 f"DeepSeekConfig.rope_scaling must be YaRN parameters with factor and "
                 f"original_max_position_embeddings (known keys: {', '.join(sorted(YARN_KEYS))}); "
                 f"got {self.rope_scaling}")
        if self.moe is not None:
            need(isinstance(self.moe, MoEConfig),
                 f"DeepSeekConfig.moe must be a MoEConfig or None, got {type(self.moe).__name__}")
            need(self.moe.d_model == self.d_model,
                 f"DeepSeekConfig.moe.d_model={self.moe.d_model} must equal d_model={self.d_model}")

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i has an MoE FFN."""
        return self.moe is not None and i >= self.first_dense_layers


YARN_KEYS = {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate"}


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 when not extending)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(dim: int, base: float, p: dict[str, Any]) -> tuple[Tensor, float]:
    """YaRN (Peng et al. 2023, arXiv:2309.00071) frequencies and cos/sin factor, as HF computes them.

    Dimensions rotating fewer than beta_slow times over the original context are interpolated (divided by
    `factor`), those rotating more than beta_fast times are kept, with a linear ramp between.
    """
    factor, orig = float(p["factor"]), p["original_max_position_embeddings"]
    att = p.get("attention_factor")
    if att is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        att = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    keep = 1 - ramp  # 1: extrapolate (original frequency), 0: interpolate
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep, float(att)


def rope_tables(positions: Tensor, dim: int, theta: float, scaling: dict[str, Any] | None) -> tuple[Tensor, Tensor]:
    """fp32 cos, sin [S, dim] in HF's half-split layout: plain RoPE, or YaRN-scaled."""
    if not scaling:
        return rope_cos_sin(positions, dim, theta)
    inv_freq, att = yarn_inv_freq(dim, theta, scaling)
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * att, emb.sin() * att


def rope_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x0, x1), (x2, x3), ... and return them de-interleaved [evens' | odds'] (HF's layout).

    q and k both come out in the same permuted layout, so their dot products equal the interleaved rotation's.
    """
    xf = x.float()
    c, s = cos[..., : cos.shape[-1] // 2], sin[..., : sin.shape[-1] // 2]
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def rope_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Llama's half-split rotation, fp32 math."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class MLACache:
    """Per-layer latent cache: c_kv and k_rot [n_layers, B, max_len, R + P]; `length` positions are filled."""

    def __init__(self, n_layers: int, batch_size: int, max_len: int, width: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        """Allocate zeroed latent buffers."""
        self.latent = torch.zeros(n_layers, batch_size, max_len, width, dtype=dtype, device=device)
        self.length = 0

    @property
    def batch_size(self) -> int:
        """B."""
        return self.latent.shape[1]

    @property
    def max_len(self) -> int:
        """Positions the cache can hold."""
        return self.latent.shape[2]

    def update(self, layer: int, latent_BSW: Tensor) -> Tensor:
        """Write positions [length, length + S) and return all latents so far [B, L, R + P]."""
        end = self.length + latent_BSW.shape[1]
        self.latent[layer, :, self.length:end] = latent_BSW
        return self.latent[layer, :, :end]

    def reset(self) -> None:
        """Forget every position."""
        self.length = 0


class MLAttention(nn.Module):
    """Multi-head latent attention, causal."""

    def __init__(self, cfg: DeepSeekConfig) -> None:
        """Low-rank query path (or one projection), latent KV path, output projection."""
        super().__init__()
        self.cfg = cfg
        h, n, p, v = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        if cfg.q_lora_rank is None:
            self.wq = nn.Linear(cfg.d_model, h * (n + p), bias=False)
        else:
            self.wq_a = nn.Linear(cfg.d_model, cfg.q_lora_rank, bias=cfg.attn_bias)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.latent_norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, h * (n + p), bias=False)
        self.wkv_a = nn.Linear(cfg.d_model, cfg.kv_lora_rank + p, bias=cfg.attn_bias)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.latent_norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, h * (n + v), bias=False)
        self.wo = nn.Linear(h * v, cfg.d_model, bias=cfg.attn_bias)
        self.scale = (n + p) ** -0.5
        m_all = (cfg.rope_scaling or {}).get("mscale_all_dim")
        if m_all:  # YaRN also sharpens the attention logits (DeepSeek-V2/V3: mscale^2 on the softmax scale)
            self.scale *= yarn_mscale(float(cfg.rope_scaling["factor"]), m_all) ** 2  # type: ignore[index]

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: MLACache | None = None, layer: int = 0) -> Tensor:
        """x [B, S, D] -> [B, S, D]."""
        cfg = self.cfg
        b, s, _ = x.shape
        h, n, p, v, r = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        rope = rope_interleaved if cfg.rope_interleave else rope_half
        q = self.wq(x) if cfg.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(b, s, h, n + p).transpose(1, 2)  # [B, H, S, N+P]
        q = torch.cat([q[..., :n], rope(q[..., n:], cos, sin)], dim=-1)
        kv = self.wkv_a(x)  # [B, S, R+P]
        k_rot = rope(kv[..., r:].unsqueeze(1), cos, sin).squeeze(1)  # one rotary key shared by all heads
        latent = torch.cat([self.kv_norm(kv[..., :r]), k_rot], dim=-1)  # [B, S, R+P]
        past = 0
        if cache is not None:
            past = cache.length
            latent = cache.update(layer, latent)  # [B, L, R+P]
        big_l = latent.shape[1]
        kv_up = self.wkv_b(latent[..., :r]).view(b, big_l, h, n + v).transpose(1, 2)  # [B, H, L, N+V]
        k = torch.cat([kv_up[..., :n], latent[..., r:].unsqueeze(1).expand(b, h, big_l, p)], dim=-1)
        val = kv_up[..., n:]
        if past == 0 or s == 1:
            y = F.scaled_dot_product_attention(q, k, val, is_causal=(past == 0 and s > 1), scale=self.scale)
        else:
            mask = torch.ones(s, past + s, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, val, attn_mask=mask, scale=self.scale)
        return self.wo(y.transpose(1, 2).reshape(b, s, h * v))


def deepseek_block(cfg: DeepSeekConfig, layer_id: int) -> Block:
    """The shared pre-norm block with multi-head latent attention and SwiGLU dense FFNs."""
    return Block(cfg, layer_id, attention=MLAttention(cfg), dense_activation="swiglu")  # type: ignore[arg-type]


class DeepSeekV3(MoEOutputs, nn.Module):
    """Token ids [B, S] -> logits [B, S, V]; same outer names as MoETransformer (tok_embeddings, layers, norm, output)."""

    def __init__(self, cfg: DeepSeekConfig) -> None:
        """Build embeddings, blocks, final norm and head, then initialise."""
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(deepseek_block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, init_std) for every matrix, zeros for biases, ones for norms; routers keep their own init."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("router.weight"):
                continue
            if p.dim() >= 2:
                nn.init.normal_(p, std=std)
            elif name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)
        for _, m in moe_layers(self):
            m.router.reset_parameters()

    def forward(self, input_ids: Tensor, cache: MLACache | None = None) -> Tensor:
        """Logits [B, S, V]; with a cache, the ids continue the cached positions and the cache advances by S."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        b, s = input_ids.shape
        start = 0 if cache is None else cache.length
        if cache is not None and (cache.batch_size != b or start + s > cache.max_len):
            raise ValueError(f"cache (batch {cache.batch_size}, {cache.max_len} positions, {start} used) cannot "
                             f"take a batch of {b} x {s} more positions; make a new one with new_cache()")
        if start + s > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {start + s} exceed max_seq_len={self.cfg.max_seq_len}")
        positions = torch.arange(start, start + s, device=input_ids.device)
        cos, sin = rope_tables(positions, self.cfg.qk_rope_head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
        h = self.tok_embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, cache)
        if cache is not None:
            cache.length += s
        return self.output(self.norm(h))

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> MLACache:
        """An empty latent cache for `batch_size` sequences of up to `max_len` positions."""
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= self.cfg.max_seq_len:
            raise ValueError(f"cache max_len must be in [1, max_seq_len={self.cfg.max_seq_len}], got {max_len}")
        p = self.tok_embeddings.weight
        return MLACache(self.cfg.n_layers, batch_size, max_len, self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim,
                        dtype or p.dtype, p.device)


    def update_router_biases(self, log: RoutingLog) -> int:
        """Aux-loss-free balancing step (call after optimizer.step()): each router nudges its bias from the load
        recorded in `log` (`with record_routing() as log: model(ids)`); returns how many routers were updated."""
        return update_router_biases(log)
