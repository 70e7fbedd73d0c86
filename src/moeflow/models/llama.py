"""A Llama/Mixtral-style decoder-only language model whose FFNs are MoE layers (or dense FFNs).

Block: h = x + attention(attention_norm(x)); out = h + ffn(ffn_norm(h)), pre-norm RMSNorm, RoPE, GQA.
Module names follow Llama/gpt-fast (tok_embeddings, layers[i].attention.wq, ..., norm, output) so that
checkpoint conversion in moeflow.interop is a table of renames.

MoE layers get the flattened [B*S, D] tokens: routing groups (MoEConfig.num_groups) split that flattened
batch into contiguous chunks (num_groups = B gives one group per sequence in a full forward; a cached
decoding step has T = B tokens, so num_groups must divide B there).

KV-cache decoding and MoE: a dropless router (capacity_factor=None: topk, switch, noisy_topk in eval,
deepseek-style) routes each token from its own activations alone, so decoding with the cache gives the
same logits as re-running the full prefix (tested). A router with a capacity couples the tokens of one
call, in eval as in training: capacity is ceil(cf * k * T / E) for the T tokens of *that call*
(T = B * S on a full forward, T = B per cached decoding step), and which assignments are dropped depends
on the other tokens, later positions included (slot-major priority puts every first choice before any
second choice; expert choice lets experts pick among all positions). Such a model is therefore not
strictly causal, and cached and uncached decoding can drop different assignments: both run, neither is
wrong by the router's own rules, but they are not equal. For exact autoregressive decoding, evaluate
with capacity_factor=None.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moeflow.layers import FFN, MoELayer, RMSNorm
from moeflow.models.attention import Attention, KVCache, rope_cos_sin
from moeflow.models.config import ModelConfig
from moeflow.models.moe_mixin import MoEOutputs


class Block(nn.Module):
    """One pre-norm transformer block; `ffn` is an MoELayer or a dense FFN."""

    def __init__(self, cfg: ModelConfig, layer_id: int, attention: nn.Module | None = None,
                 dense_activation: str | None = None) -> None:
        """Norms, attention (GQA unless another module is given, e.g. DeepSeek's MLA) and the FFN chosen by
        cfg.is_moe_layer(layer_id)."""
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg) if attention is None else attention
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        act = dense_activation or cfg.dense_activation
        self.ffn: MoELayer | FFN = (MoELayer(cfg.moe) if cfg.is_moe_layer(layer_id) and cfg.moe is not None
                                    else FFN(cfg.d_model, cfg.ffn_hidden, act))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: object | None) -> Tensor:
        """[B, S, D] -> [B, S, D] (cache: a KVCache, or the attention module's own cache type)."""
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, self.layer_id)
        return h + self.ffn(self.ffn_norm(h))  # MoELayer flattens [B, S, D] to [B*S, D] itself


class MoETransformer(MoEOutputs, nn.Module):
    """Token ids [B, S] -> next-token logits [B, S, V].

    `activation_checkpointing = True` (off by default) recomputes each block in backward instead of keeping its
    activations (torch.utils.checkpoint, non-reentrant, RNG state preserved: the recompute routes exactly as the
    forward did). Read routing statistics and aux losses with `record_routing()` around the forward, not from
    `last_routing` / `aux_loss()`, which the recompute overwrites.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        """Build embeddings, cfg.n_layers blocks, final norm and output head, then initialise."""
        super().__init__()
        assert cfg.head_dim is not None  # resolved by ModelConfig.__post_init__
        self.cfg, self.head_dim = cfg, cfg.head_dim
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, init_std) everywhere; output projections (attention wo, FFN/expert w_out) scaled by 1/sqrt(2L).

        Each of the 2L residual branches adds its output to the stream; with independent branches the
        stream's variance grows with their sum, so shrinking each branch's last projection by 1/sqrt(2L)
        keeps the residual stream at O(1) variance at init whatever the depth (GPT-2, Radford et al. 2019).
        Routers keep their own small init (near-uniform routing at the start); norms start at 1.
        """
        std, out_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, std=std)
        for layer in self.layers:
            att = layer.attention
            for lin in (att.wq, att.wk, att.wv):
                nn.init.normal_(lin.weight, std=std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            nn.init.normal_(att.wo.weight, std=out_std)
            ffn = layer.ffn
            if isinstance(ffn, MoELayer):
                dense = [ffn.experts] + ([ffn.shared] if ffn.shared is not None else [])
                if ffn.shared_gate is not None:
                    nn.init.normal_(ffn.shared_gate.weight, std=std)
            else:
                dense = [ffn]
            for m in dense:
                nn.init.normal_(m.w_in, std=std)
                nn.init.normal_(m.w_out, std=out_std)
            for norm in (layer.attention_norm, layer.ffn_norm, att.q_norm, att.k_norm):
                if norm is not None:
                    nn.init.ones_(norm.weight)
        nn.init.ones_(self.norm.weight)

    def forward(self, input_ids: Tensor, cache: KVCache | None = None) -> Tensor:
        """Logits [B, S, V]; with a cache, the ids continue the cached positions and the cache advances by S."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        b, s = input_ids.shape
        start = 0 if cache is None else cache.length
        if cache is not None:
            if cache.batch_size != b:
                raise ValueError(f"cache was made for batch size {cache.batch_size}, input has batch size {b}")
            if start + s > cache.max_len:
                raise ValueError(f"cache holds {cache.max_len} positions, {start} used; cannot append {s} more "
                                 "(make it with new_cache(batch_size, max_len=...) large enough)")
        if start + s > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {start + s} exceed max_seq_len={self.cfg.max_seq_len}; "
                             "shorten the input or raise ModelConfig.max_seq_len")
        positions = torch.arange(start, start + s, device=input_ids.device)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.cfg.rope_theta)  # [S, Dh]
        h = self.tok_embeddings(input_ids)  # [B, S, D]
        recompute = self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for layer in self.layers:
            h = checkpoint(layer, h, cos, sin, None, use_reentrant=False) if recompute else layer(h, cos, sin, cache)
        if cache is not None:
            cache.length += s
        return self.output(self.norm(h))  # [B, S, V]

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_len` (default max_seq_len) positions."""
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= self.cfg.max_seq_len:
            raise ValueError(f"cache max_len must be in [1, max_seq_len={self.cfg.max_seq_len}], got {max_len}")
        p = self.tok_embeddings.weight
        return KVCache(self.cfg.n_layers, batch_size, self.cfg.n_kv_heads, max_len, self.head_dim,
                       dtype or p.dtype, p.device)

