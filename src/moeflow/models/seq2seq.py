"""GShard-style encoder-decoder Transformer: pre-norm, RoPE self-attention, cross-attention, MoE every `moe_every` FFNs.

Lepikhin et al. 2020 (GShard) put a top-2 MoE on every other FFN of both stacks; Fedus et al. 2021 (Switch) use
top-1. Both come from this one class by the `moe` config; `dense_counterpart(cfg)` gives the dense baseline with
the same active parameters per token. Decoding (greedy, beam) lives in `seq2seq_decode.py`.

Shape legend: B = batch, S = source positions, T = target positions, L = key positions, D = model dim,
H = heads, Dh = head dim, V = vocabulary, N = tokens routed through an MoE layer (non-padding).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeflow.config import ACTIVATIONS, Config, ConfigError, MoEConfig, check_choice, check_int, check_number, need
from moeflow.layers import FFN, MoELayer, RMSNorm, moe_layers
from moeflow.models.attention import apply_rope, rope_cos_sin
from moeflow.models.moe_mixin import MoEOutputs


@dataclass(kw_only=True)
class Seq2SeqConfig(Config):
    """Sizes of the encoder-decoder and which FFNs are MoE layers.

    FFN i of a stack (counting from 0) is an MoE layer iff `moe` is set and `i % moe_every == moe_every - 1`
    (GShard: moe_every=2). At inference the MoE layers use `eval_capacity_factor` (None = dropless) with one
    routing group, so decoding one token at a time routes exactly as decoding the whole prefix.
    """

    vocab_size: int
    d_model: int = 128
    n_heads: int = 4
    n_enc_layers: int = 2
    n_dec_layers: int = 2
    ffn_hidden: int = 256  # hidden size of the dense FFNs
    activation: str = "swiglu"  # of the dense FFNs (the experts use moe.activation)
    moe: MoEConfig | None = None  # None: dense model
    moe_every: int = 2
    eval_capacity_factor: float | None = None
    tie_embeddings: bool = True  # output projection = the (shared source/target) embedding matrix
    rope_theta: float = 10000.0
    dropout: float = 0.0
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        """Validate sizes and the MoE settings."""
        check_int(self, "vocab_size", "d_model", "n_heads", "n_enc_layers", "n_dec_layers", "ffn_hidden", "moe_every")
        need(self.d_model % self.n_heads == 0 and (self.d_model // self.n_heads) % 2 == 0,
             f"Seq2SeqConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads} into an even "
             "head dim (RoPE rotates pairs)")
        check_choice(self, "activation", ACTIVATIONS)
        check_number(self, "dropout", hi=1, hi_open=True)
        check_number(self, "rope_theta", lo=0, lo_open=True)
        check_number(self, "eval_capacity_factor", lo=0, lo_open=True, none="dropless")
        ids = (self.pad_id, self.bos_id, self.eos_id)
        need(len(set(ids)) == 3 and all(isinstance(i, int) and 0 <= i < self.vocab_size for i in ids),
             f"pad/bos/eos ids {ids} must be distinct and below vocab_size={self.vocab_size}")
        if self.moe is not None:
            need(isinstance(self.moe, MoEConfig), f"Seq2SeqConfig.moe must be a MoEConfig or None, "
                                                  f"got {type(self.moe).__name__}")
            need(self.moe.d_model == self.d_model, f"Seq2SeqConfig.moe.d_model={self.moe.d_model} must equal "
                                                   f"d_model={self.d_model}")
            need(self.moe.expert_capacity is None and not self.moe.group_by_sequence,
                 "Seq2SeqConfig.moe: the MoE layers route the batch's non-padding tokens as one sequence; set "
                 "capacity_factor and num_groups, not expert_capacity or group_by_sequence")
            need(self.num_moe_layers() > 0, f"moe_every={self.moe_every} exceeds both stacks' depths "
                                            f"({self.n_enc_layers}, {self.n_dec_layers}): no FFN would be MoE")

    def layer_moe(self) -> MoEConfig:
        """The MoE layers' config: `moe` with this model's inference capacity and one routing group at inference."""
        assert self.moe is not None
        return self.moe.replace(eval_capacity_factor=self.eval_capacity_factor, eval_num_groups=1)

    def is_moe(self, i: int) -> bool:
        """Whether FFN i of a stack is an MoE layer."""
        return self.moe is not None and i % self.moe_every == self.moe_every - 1

    def num_moe_layers(self) -> int:
        """MoE layers over both stacks."""
        return sum(self.is_moe(i) for i in range(self.n_enc_layers)) + \
            sum(self.is_moe(i) for i in range(self.n_dec_layers))


def dense_counterpart(cfg: Seq2SeqConfig) -> Seq2SeqConfig:
    """The dense model with the same active parameters per token: each MoE layer becomes an FFN of hidden
    top_k * expert hidden (the router's E*D weights are the only difference)."""
    if cfg.moe is None:
        return cfg
    hidden = cfg.moe.top_k * cfg.moe.d_hidden
    if cfg.moe.activation != cfg.activation or (cfg.moe_every > 1 and hidden != cfg.ffn_hidden):
        raise ConfigError(f"no dense model of equal active size: MoE layers have {cfg.moe.top_k} x {cfg.moe.d_hidden}"
                          f" {cfg.moe.activation} units but dense FFNs {cfg.ffn_hidden} {cfg.activation}; make "
                          "ffn_hidden == top_k * moe.d_hidden with the same activation, or use moe_every=1")
    return cfg.replace(moe=None, ffn_hidden=hidden)


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions; optional causal mask and growing KV cache."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        """q, k, v, o projections without bias."""
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d_model, d_model, bias=False) for _ in range(4))

    def forward(self, x_BSD: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None, causal: bool = False,
                cache: list[Tensor] | None = None) -> Tensor:
        """mask: bool, broadcastable to [B, H, S, L], True = may attend. With `cache` ([] or [k, v]) the new
        keys/values are appended to it and the queries see every cached position (decoding: no mask needed)."""
        b, s, _ = x_BSD.shape
        q, k, v = (w(x_BSD).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
                   for w in (self.wq, self.wk, self.wv))  # [B, H, S, Dh]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            if cache:
                if s > 1:
                    raise ValueError("cached self-attention takes one new position per call after the first")
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))


class CrossAttention(nn.Module):
    """Decoder-to-encoder attention (no positions: the encoder output already carries them)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        """q, k, v, o projections without bias."""
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d_model, d_model, bias=False) for _ in range(4))

    def kv(self, memory_BLD: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the encoder output [B, H, L, Dh]: computed once per source when decoding."""
        b, n, _ = memory_BLD.shape
        return tuple(w(memory_BLD).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
                     for w in (self.wk, self.wv))  # type: ignore[return-value]

    def forward(self, x_BTD: Tensor, k: Tensor, v: Tensor, mask_B11L: Tensor) -> Tensor:
        """Attend from the decoder positions to the non-padding source positions."""
        b, t, _ = x_BTD.shape
        q = self.wq(x_BTD).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B11L)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class MoEFFN(nn.Module):
    """An MoELayer that routes only the non-padding tokens; its config gives training and inference capacity.

    NOTE: with a capacity, training-time routing is not causal: a later token's first choice can take the slot of
    an earlier token's second choice (GShard and Switch decoders share this); inference is dropless by default, so
    decoding is causal and one-token-at-a-time decoding routes exactly as the full prefix.

    Padding never enters the router, so it takes no expert capacity and cannot change real tokens' outputs. With
    local groups the N routed tokens are topped up with < G zero rows to a multiple of G; they come after every real
    first choice (slot-major order) but can still take second-choice slots in the last group, and their number
    depends only on N, so padding still cannot matter. The routed tokens are the non-padding positions in row-major
    order (rows >= N of the Routing record are the top-up rows).
    """

    def __init__(self, cfg: MoEConfig) -> None:
        """Wrap one MoELayer built from `cfg` (Seq2SeqConfig.layer_moe(): the inference capacity is in it)."""
        super().__init__()
        self.moe = MoELayer(cfg)

    def forward(self, x_BSD: Tensor, token_mask_BS: Tensor | None) -> Tensor:
        """[B, S, D] -> [B, S, D]; zero at padding positions."""
        b, s, d = x_BSD.shape
        x_flat = x_BSD.reshape(b * s, d)
        if token_mask_BS is None:
            idx_N = None
            x_ND = x_flat
        else:
            idx_N = token_mask_BS.reshape(-1).nonzero().squeeze(1)
            x_ND = x_flat.index_select(0, idx_N)
        n = x_ND.shape[0]
        extra = (-n) % self.moe.cfg.groups(self.training)
        if extra:
            x_ND = torch.cat([x_ND, x_ND.new_zeros(extra, d)])
        y_ND = self.moe(x_ND)[:n]
        if idx_N is None:
            return y_ND.view(b, s, d)
        return torch.zeros_like(x_flat).index_copy(0, idx_N, y_ND).view(b, s, d)


class _Block(nn.Module):
    """One pre-norm layer: self-attention, (decoder only) cross-attention, FFN or MoE FFN, each residual."""

    def __init__(self, cfg: Seq2SeqConfig, moe: bool, cross: bool) -> None:
        """Norms, attentions and the FFN of one layer."""
        super().__init__()
        d = cfg.d_model
        self.self_norm, self.self_attn = RMSNorm(d), SelfAttention(d, cfg.n_heads)
        self.cross_norm = RMSNorm(d) if cross else None
        self.cross_attn = CrossAttention(d, cfg.n_heads) if cross else None
        self.ffn_norm = RMSNorm(d)
        assert cfg.moe is not None or not moe
        self.ffn: nn.Module = MoEFFN(cfg.layer_moe()) if moe else FFN(d, cfg.ffn_hidden, cfg.activation)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, self_mask: Tensor | None, causal: bool,
                token_mask: Tensor | None, cross_kv: tuple[Tensor, Tensor] | None = None,
                cross_mask: Tensor | None = None, cache: list[Tensor] | None = None) -> Tensor:
        """x [B, S, D] -> [B, S, D]."""
        x = x + self.drop(self.self_attn(self.self_norm(x), cos, sin, self_mask, causal, cache))
        if self.cross_attn is not None and self.cross_norm is not None:
            assert cross_kv is not None and cross_mask is not None
            x = x + self.drop(self.cross_attn(self.cross_norm(x), cross_kv[0], cross_kv[1], cross_mask))
        h = self.ffn_norm(x)
        h = self.ffn(h, token_mask) if isinstance(self.ffn, MoEFFN) else self.ffn(h)
        return x + self.drop(h)


@dataclass
class DecodeState:
    """What incremental decoding keeps between steps: cross-attention K/V (computed once) and the growing
    self-attention caches, one [k, v] list per decoder layer."""

    cross_kv: list[tuple[Tensor, Tensor]]
    cross_mask_B11L: Tensor
    self_kv: list[list[Tensor]] = field(default_factory=list)
    position: int = 0

    def reorder(self, rows_B: Tensor) -> None:
        """Keep batch rows `rows_B` (beam search: each surviving beam's parent), in every cache."""
        self.cross_kv = [(k.index_select(0, rows_B), v.index_select(0, rows_B)) for k, v in self.cross_kv]
        self.cross_mask_B11L = self.cross_mask_B11L.index_select(0, rows_B)
        self.self_kv = [[t.index_select(0, rows_B) for t in kv] for kv in self.self_kv]


class Seq2SeqTransformer(MoEOutputs, nn.Module):
    """Encoder-decoder with a shared source/target embedding; MoE FFNs where `cfg.is_moe(i)`."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        """Build both stacks from the config."""
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=cfg.d_model ** -0.5)
        self.encoder = nn.ModuleList(_Block(cfg, cfg.is_moe(i), cross=False) for i in range(cfg.n_enc_layers))
        self.decoder = nn.ModuleList(_Block(cfg, cfg.is_moe(i), cross=True) for i in range(cfg.n_dec_layers))
        self.enc_norm, self.dec_norm = RMSNorm(cfg.d_model), RMSNorm(cfg.d_model)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def _rope(self, start: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        pos = torch.arange(start, start + length, device=device)
        return rope_cos_sin(pos, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_theta)

    def _check_tokens(self, ids: Tensor, name: str) -> None:
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be an integer tensor [batch, length], got {ids.dtype} {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"{name} holds token ids outside [0, {self.cfg.vocab_size}): "
                             f"min {int(ids.min())}, max {int(ids.max())}")

    def encode(self, src_BS: Tensor) -> Tensor:
        """Encoder output [B, S, D]; padding (pad_id) positions are masked as keys and skipped by MoE layers."""
        self._check_tokens(src_BS, "src")
        keep_BS = src_BS != self.cfg.pad_id
        if not bool(keep_BS[:, 0].all()):
            raise ValueError("every source row must start with a real token (padding goes at the end)")
        cos, sin = self._rope(0, src_BS.shape[1], src_BS.device)
        mask_B11S = keep_BS[:, None, None, :]
        x = self.drop(self.embed(src_BS))
        for block in self.encoder:
            x = block(x, cos, sin, mask_B11S, False, keep_BS)
        return self.enc_norm(x)

    def _logits(self, h_BTD: Tensor) -> Tensor:
        h = self.dec_norm(h_BTD)
        return F.linear(h, self.embed.weight) if self.lm_head is None else self.lm_head(h)

    def decode(self, tgt_in_BT: Tensor, memory_BSD: Tensor, src_BS: Tensor) -> Tensor:
        """Teacher-forced decoder logits [B, T, V] (causal self-attention over the whole prefix)."""
        self._check_tokens(tgt_in_BT, "tgt_in")
        cross_mask = (src_BS != self.cfg.pad_id)[:, None, None, :]
        keep_BT = tgt_in_BT != self.cfg.pad_id
        cos, sin = self._rope(0, tgt_in_BT.shape[1], tgt_in_BT.device)
        x = self.drop(self.embed(tgt_in_BT))
        for block in self.decoder:
            x = block(x, cos, sin, None, True, keep_BT, block.cross_attn.kv(memory_BSD), cross_mask)
        return self._logits(x)

    def forward(self, src_BS: Tensor, tgt_in_BT: Tensor) -> Tensor:
        """Teacher-forced logits [B, T, V]."""
        return self.decode(tgt_in_BT, self.encode(src_BS), src_BS)

    def init_state(self, memory_BSD: Tensor, src_BS: Tensor) -> DecodeState:
        """Cross-attention K/V of every decoder layer, computed once for the whole decode."""
        kv = [block.cross_attn.kv(memory_BSD) for block in self.decoder]
        return DecodeState(kv, (src_BS != self.cfg.pad_id)[:, None, None, :],
                           [[] for _ in self.decoder], 0)

    def step(self, tokens_B1: Tensor, state: DecodeState) -> Tensor:
        """Logits [B, V] of the next position after feeding one token per row; appends to the caches."""
        cos, sin = self._rope(state.position, 1, tokens_B1.device)
        x = self.embed(tokens_B1)
        for block, kv, cache in zip(self.decoder, state.cross_kv, state.self_kv):
            x = block(x, cos, sin, None, False, None, kv, state.cross_mask_B11L, cache)
        state.position += 1
        return self._logits(x)[:, -1]

    def loss(self, src_BS: Tensor, tgt_in_BT: Tensor, tgt_out_BT: Tensor) -> tuple[Tensor, Tensor]:
        """(token-mean cross-entropy over non-padding targets, summed scaled MoE aux losses)."""
        logits = self(src_BS, tgt_in_BT)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt_out_BT.reshape(-1),
                             ignore_index=self.cfg.pad_id)
        return ce, self.aux_loss()

    def moe_ffns(self) -> list[tuple[str, MoEFFN]]:
        """(name, wrapper) of every MoE FFN, encoder first: names like 'enc.1', 'dec.1' (their MoELayer is `.moe`)."""
        out = []
        for prefix, stack in (("enc", self.encoder), ("dec", self.decoder)):
            for i, block in enumerate(stack):
                if isinstance(block.ffn, MoEFFN):
                    out.append((f"{prefix}.{i}", block.ffn))
        return out

    def num_params(self, active: bool = False) -> int:
        """Parameters (all, or those used per token: experts counted top_k / num_experts times)."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            for _, layer in moe_layers(self):
                cfg = layer.cfg
                expert = sum(p.numel() for p in layer.experts.parameters())
                total -= expert - expert * cfg.top_k // cfg.num_experts
        return total

