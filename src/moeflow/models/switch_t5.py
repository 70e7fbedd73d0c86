"""Switch Transformer encoder-decoder (Fedus et al. 2021, T5 layout): every `sparse_step`-th FFN is a top-1 MoE.

T5 specifics kept exactly: RMS layer norm without mean or bias, unscaled attention logits plus a learned
relative-position bias (bucketed, computed once per stack and shared by its layers), ReLU FFNs, tied embeddings
with the decoder output scaled by d_model**-0.5 before the head. The MoE layers route top-1 with a fixed
`expert_capacity` per sequence: within each sequence, tokens past an expert's capacity (in position order) are
dropped and only the residual carries them (HF `SwitchTransformersTop1Router`).

Padding: an optional `attention_mask` [B, S_enc] (1 = real token, 0 = padding) hides the padded encoder positions as
keys, in the encoder's self-attention and the decoder's cross-attention, with HF's finite mask value (the dtype's
most negative number), so a row of all zeros attends uniformly to every position, as in HF, rather than giving NaN.
Padded positions are still computed and routed, so they take expert capacity, exactly as HF does with
router_ignore_padding_tokens=False.

Shape legend: B = batch, S = query positions, L = key positions, H = heads, Dk = d_kv, D = model dim.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeflow.config import ConfigError, MoEConfig
from moeflow.layers import FFN, MoELayer, RMSNorm
from moeflow.ops.capacity import capacity_keep
from moeflow.routing import Routing
from moeflow.routing.log import log_routing


@dataclass(kw_only=True)
class SwitchConfig:
    """Sizes and MoE placement of a Switch Transformer; layer i of a stack is sparse iff
    step > 0 and (i % step == 1 or step == 1) (HF's rule)."""

    vocab_size: int
    d_model: int
    d_kv: int
    n_heads: int
    d_ff: int
    n_encoder_layers: int
    n_decoder_layers: int
    encoder_sparse_step: int = 2
    decoder_sparse_step: int = 2
    num_experts: int = 8
    expert_capacity: int = 64  # slots per expert per sequence
    relative_buckets: int = 32
    relative_max_distance: int = 128
    norm_eps: float = 1e-6
    activation: str = "relu"
    tie_embeddings: bool = True
    router_jitter: float = 0.01
    router_bias: bool = False
    aux_loss_coef: float = 1e-3
    z_loss_coef: float = 1e-3
    decoder_start_token_id: int = 0

    def __post_init__(self) -> None:
        """Validate sizes."""
        for name in ("vocab_size", "d_model", "d_kv", "n_heads", "d_ff", "n_encoder_layers", "n_decoder_layers",
                     "num_experts", "relative_buckets", "relative_max_distance"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ConfigError(f"SwitchConfig.{name} must be a positive integer, got {v!r}")
        if self.expert_capacity < 0:
            raise ConfigError(f"SwitchConfig.expert_capacity must be >= 0, got {self.expert_capacity}")

    def moe_config(self) -> MoEConfig:
        """The MoEConfig of every sparse layer (dropless in the router; capacity applied per sequence)."""
        return MoEConfig(d_model=self.d_model, d_hidden=self.d_ff, num_experts=self.num_experts, top_k=1,
                         router="switch", activation=self.activation, jitter_eps=self.router_jitter,
                         aux_loss_coef=self.aux_loss_coef, z_loss_coef=self.z_loss_coef, router_bias=self.router_bias)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-able)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SwitchConfig":
        """Inverse of to_dict."""
        return cls(**d)


def is_sparse_layer(i: int, step: int) -> bool:
    """HF's placement of MoE layers in a stack."""
    return step > 0 and (i % step == 1 or step == 1)


def per_sequence_capacity(routing: Routing, seq_len: int, capacity: int) -> Routing:
    """The same routing with at most `capacity` tokens per expert per sequence, earlier positions first."""
    n = routing.expert_ids_N.numel()
    seq_N = routing.token_ids_N // seq_len
    kept_N = capacity_keep(routing.expert_ids_N, seq_N, torch.arange(n, device=seq_N.device), routing.routed_N,
                           routing.num_experts, routing.num_tokens // seq_len, capacity)
    return dataclasses.replace(routing, kept_N=kept_N, capacity=capacity)


class SwitchSparseMLP(MoELayer):
    """Top-1 MoE FFN with a fixed capacity per sequence; input [B, S, D]."""

    def __init__(self, cfg: MoEConfig, expert_capacity: int) -> None:
        """An MoELayer plus the per-sequence capacity."""
        super().__init__(cfg)
        self.expert_capacity = expert_capacity

    def forward(self, x: Tensor) -> Tensor:
        """route -> per-sequence capacity -> dispatch -> experts -> combine."""
        if x.dim() != 3:
            raise ValueError(f"SwitchSparseMLP expects [batch, seq, d_model], got {tuple(x.shape)}")
        x_TD = x.reshape(-1, x.shape[-1])
        routing = per_sequence_capacity(self.router(x_TD), x.shape[1], self.expert_capacity)
        x_in, plan = self.dispatcher.dispatch(x_TD, routing)
        y_TD = self.dispatcher.combine(self.experts(x_in, plan.rows), plan)
        self.last_routing = routing
        log_routing(self, routing)
        return y_TD.view(x.shape).to(x.dtype)


def check_attention_mask(attention_mask: Tensor, input_ids: Tensor) -> Tensor:
    """A validated [B, S_enc] padding mask as bool (True = real token)."""
    want = tuple(input_ids.shape)
    if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != want:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have the shape of input_ids [batch, seq] = {list(want)}, got {got}")
    if attention_mask.dtype == torch.bool:
        return attention_mask.to(input_ids.device)
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise ValueError(f"attention_mask must be bool or integer (1 = real token, 0 = padding), got "
                         f"{attention_mask.dtype}; convert it with attention_mask.bool()")
    if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token), got values "
                         f"{sorted(set(attention_mask.unique().tolist()))}")
    return attention_mask.to(input_ids.device) == 1


def relative_position_bucket(rel: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bucket of each relative position (memory - query): exact below num_buckets/2 (per side), log beyond."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


class T5Attention(nn.Module):
    """Multi-head attention without logit scaling (T5); bias/mask added to the logits."""

    def __init__(self, cfg: SwitchConfig) -> None:
        """q, k, v: D -> H*Dk; o: H*Dk -> D, no biases."""
        super().__init__()
        inner = cfg.n_heads * cfg.d_kv
        self.n_heads, self.d_kv = cfg.n_heads, cfg.d_kv
        self.wq = nn.Linear(cfg.d_model, inner, bias=False)
        self.wk = nn.Linear(cfg.d_model, inner, bias=False)
        self.wv = nn.Linear(cfg.d_model, inner, bias=False)
        self.wo = nn.Linear(inner, cfg.d_model, bias=False)

    def heads(self, x: Tensor) -> Tensor:
        """[B, S, H*Dk] -> [B, H, S, Dk]."""
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.d_kv).transpose(1, 2)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """x [B, S, D] attends to precomputed k, v [B, H, L, Dk]; bias [1|B, H, S, L] (float, -inf masks)."""
        q = self.heads(self.wq(x))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), scale=1.0)
        return self.wo(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class SwitchBlock(nn.Module):
    """Self-attention (+ cross-attention in the decoder) and a dense or sparse FFN, each pre-norm with a residual."""

    def __init__(self, cfg: SwitchConfig, sparse: bool, decoder: bool) -> None:
        """Norms, attentions and FFN."""
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = T5Attention(cfg)
        if decoder:
            self.cross_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.cross_attention = T5Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn: SwitchSparseMLP | FFN = (SwitchSparseMLP(cfg.moe_config(), cfg.expert_capacity) if sparse
                                           else FFN(cfg.d_model, cfg.d_ff, cfg.activation))

    def forward(self, x: Tensor, bias: Tensor, self_kv: tuple[Tensor, Tensor] | None = None,
                cross_kv: tuple[Tensor, Tensor] | None = None, cross_bias: Tensor | None = None) -> Tensor:
        """[B, S, D] -> [B, S, D]; self_kv overrides this call's own keys/values (decoding with a cache);
        cross_bias [B, 1, 1, L_enc] masks padded encoder keys."""
        h = self.attention_norm(x)
        if self_kv is None:
            self_kv = (self.attention.heads(self.attention.wk(h)), self.attention.heads(self.attention.wv(h)))
        x = x + self.attention(h, *self_kv, bias)
        if cross_kv is not None:
            x = x + self.cross_attention(self.cross_norm(x), *cross_kv, cross_bias)
        return x + self.ffn(self.ffn_norm(x))


class SwitchStack(nn.Module):
    """Encoder or decoder: blocks, a relative-position bias table shared by its layers, and a final norm."""

    def __init__(self, cfg: SwitchConfig, decoder: bool) -> None:
        """Blocks with HF's MoE placement."""
        super().__init__()
        self.cfg, self.decoder = cfg, decoder
        n, step = ((cfg.n_decoder_layers, cfg.decoder_sparse_step) if decoder
                   else (cfg.n_encoder_layers, cfg.encoder_sparse_step))
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)  # tied to the model's `shared` by default
        self.blocks = nn.ModuleList(SwitchBlock(cfg, is_sparse_layer(i, step), decoder) for i in range(n))
        self.rel_bias = nn.Embedding(cfg.relative_buckets, cfg.n_heads)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def position_bias(self, q_len: int, k_len: int, past: int, device: torch.device) -> Tensor:
        """[1, H, S, L] bias for queries at positions past..past+S-1 over keys 0..L-1 (causal -inf in the decoder)."""
        q_pos = torch.arange(past, past + q_len, device=device)[:, None]
        rel = torch.arange(k_len, device=device)[None, :] - q_pos
        buckets = relative_position_bucket(rel, not self.decoder, self.cfg.relative_buckets,
                                           self.cfg.relative_max_distance)
        bias = self.rel_bias(buckets).permute(2, 0, 1).unsqueeze(0).float()
        if self.decoder:
            bias = bias.masked_fill(rel > 0, float("-inf"))
        return bias

    def forward(self, h: Tensor, enc: Tensor | None = None, cache: "SwitchCache | None" = None,
                enc_keep: Tensor | None = None) -> Tensor:
        """Embedded tokens [B, S, D] -> hidden states [B, S, D] (decoder: attending to `enc` [B, S_enc, D]);
        enc_keep [B, S_enc] bool (True = real token) masks padded encoder positions as keys."""
        past = 0 if cache is None else cache.length
        bias = self.position_bias(h.shape[1], past + h.shape[1], past, h.device)
        cross_bias = None
        if enc_keep is not None:
            pad = ~enc_keep[:, None, None, :]  # [B, 1, 1, L_enc]
            # HF's finite min, not -inf: a fully padded row then softmaxes to uniform as in HF instead of NaN;
            # the compute dtype's own min so the cast in T5Attention stays finite
            low = torch.finfo(h.dtype).min
            if self.decoder:
                cross_bias = torch.zeros(pad.shape, device=h.device).masked_fill(pad, low)
            else:
                # filled, not added: HF's bias + min rounds to min in fp32 anyway, and fp16 cannot overflow
                bias = bias.masked_fill(pad, low)
        for i, block in enumerate(self.blocks):
            self_kv = cross_kv = None
            if self.decoder:
                assert enc is not None
                att, cross = block.attention, block.cross_attention
                if cache is not None:
                    n = block.attention_norm(h)
                    self_kv = cache.update_self(i, att.heads(att.wk(n)), att.heads(att.wv(n)))
                    cross_kv = cache.cross(i, lambda: (cross.heads(cross.wk(enc)), cross.heads(cross.wv(enc))))
                else:
                    cross_kv = (cross.heads(cross.wk(enc)), cross.heads(cross.wv(enc)))
            h = block(h, bias, self_kv, cross_kv, cross_bias)
        return self.norm(h)


class SwitchCache:
    """Decoder keys/values for incremental decoding: self-attention [B, H, L, Dk] per layer, cross-attention once."""

    def __init__(self, n_layers: int) -> None:
        """Empty cache."""
        self.self_kv: list[tuple[Tensor, Tensor] | None] = [None] * n_layers
        self.cross_kv: list[tuple[Tensor, Tensor] | None] = [None] * n_layers
        self.length = 0

    def update_self(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this call's keys/values and return all of them."""
        old = self.self_kv[layer]
        if old is not None:
            k, v = torch.cat([old[0], k], dim=2), torch.cat([old[1], v], dim=2)
        self.self_kv[layer] = (k, v)
        return k, v

    def cross(self, layer: int, make: Any) -> tuple[Tensor, Tensor]:
        """The encoder keys/values of a layer, computed on first use."""
        if self.cross_kv[layer] is None:
            self.cross_kv[layer] = make()
        kv = self.cross_kv[layer]
        assert kv is not None
        return kv


class SwitchTransformer(nn.Module):
    """forward(input_ids [B, S_enc], decoder_input_ids [B, S], attention_mask [B, S_enc] | None) -> logits [B, S, V]."""

    def __init__(self, cfg: SwitchConfig) -> None:
        """Shared embedding, encoder, decoder, output head (all tied to the shared embedding if cfg.tie_embeddings)."""
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = SwitchStack(cfg, decoder=False)
        self.decoder = SwitchStack(cfg, decoder=True)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # HF ties all four; untied, each stack embeds with its own table and `shared` is kept but unused
            self.encoder.embed_tokens.weight = self.decoder.embed_tokens.weight = self.shared.weight
            self.output.weight = self.shared.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """T5-style: embeddings normal(0, 1), other matrices normal(0, 1/sqrt(fan_in)), norms 1."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("router.weight"):
                continue
            elif p.dim() >= 2:
                embedding = name == "shared.weight" or name.endswith("embed_tokens.weight")
                nn.init.normal_(p, std=1.0 if embedding else p.shape[-1] ** -0.5)
        for m in self.moe_layers():
            m.router.reset_parameters()

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Encoder hidden states [B, S_enc, D]; attention_mask [B, S_enc] (1 = real token) hides padded keys."""
        keep = None if attention_mask is None else check_attention_mask(attention_mask, input_ids)
        return self.encoder(self.encoder.embed_tokens(input_ids), enc_keep=keep)

    def decode(self, decoder_input_ids: Tensor, enc: Tensor, cache: SwitchCache | None = None,
               attention_mask: Tensor | None = None) -> Tensor:
        """Logits [B, S, V] of the decoder positions given the encoder states (and the encoder's padding mask)."""
        keep = None
        if attention_mask is not None:
            keep = check_attention_mask(attention_mask, enc[..., 0])
        h = self.decoder(self.decoder.embed_tokens(decoder_input_ids), enc, cache, keep)
        if cache is not None:
            cache.length += decoder_input_ids.shape[1]
        if self.cfg.tie_embeddings:
            h = h * self.cfg.d_model ** -0.5  # T5: the tied head sees a rescaled residual stream
        return self.output(h)

    def forward(self, input_ids: Tensor, decoder_input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits [B, S, V]; attention_mask [B, S_enc] (1 = real token, 0 = padding) as in HF."""
        for name, t in (("input_ids", input_ids), ("decoder_input_ids", decoder_input_ids)):
            if t.dim() != 2 or t.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"{name} must be an integer tensor [batch, seq], got {t.dtype} {tuple(t.shape)}")
        keep = None if attention_mask is None else check_attention_mask(attention_mask, input_ids)
        return self.decode(decoder_input_ids, self.encode(input_ids, keep), attention_mask=keep)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, eos_token_id: int | None = None,
                 attention_mask: Tensor | None = None) -> Tensor:
        """Greedy decoding with a cache (each step routes its one new token per sequence, as HF's generate does).

        Returns decoder ids [B, 1 + n] starting with decoder_start_token_id; stops early once every sequence
        has produced `eos_token_id` (finished sequences are padded with it). attention_mask [B, S_enc]
        (1 = real token, 0 = padding) hides padded source positions, as HF's generate(attention_mask=...).
        """
        keep = None if attention_mask is None else check_attention_mask(attention_mask, input_ids)
        enc = self.encode(input_ids, keep)
        b = input_ids.shape[0]
        out = torch.full((b, 1), self.cfg.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
        cache = SwitchCache(len(self.decoder.blocks))
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            nxt = self.decode(out[:, -1:], enc, cache, keep)[:, -1].argmax(-1)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            out = torch.cat([out, nxt[:, None]], dim=1)
            if eos_token_id is not None and bool(done.all()):
                break
        return out

    def moe_layers(self) -> list[SwitchSparseMLP]:
        """The sparse FFNs, encoder first."""
        return [m for m in self.modules() if isinstance(m, SwitchSparseMLP)]

    def aux_loss(self) -> Tensor:
        """Sum of the sparse layers' scaled auxiliary losses from the last forward."""
        total = torch.zeros((), device=self.shared.weight.device)
        for m in self.moe_layers():
            total = total + m.aux_loss
        return total
