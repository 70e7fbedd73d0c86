"""Greedy and beam-search decoding for `Seq2SeqTransformer`, with a KV cache.

The encoder runs once; each decoder layer's cross-attention keys/values are computed once from its output
(`DecodeState.cross_kv`) and the self-attention caches grow by one position per step. `use_cache=False` re-runs
the decoder over the whole prefix at every step: the reference the cached path is tested against.

Shape legend: B = batch, K = beams, S = source positions, V = vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moeflow.models.seq2seq import Seq2SeqTransformer


def _check(model: Seq2SeqTransformer, max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if model.training:
        raise ValueError("decode with model.eval(): training mode applies capacity drops and random routing")


@torch.no_grad()
def greedy_decode(model: Seq2SeqTransformer, src_BS: Tensor, max_new_tokens: int, use_cache: bool = True) -> Tensor:
    """Argmax decoding: generated ids [B, <= max_new_tokens], each row ending at its eos (padding after)."""
    _check(model, max_new_tokens)
    cfg = model.cfg
    memory = model.encode(src_BS)
    b = src_BS.shape[0]
    tokens = torch.full((b, 1), cfg.bos_id, dtype=torch.long, device=src_BS.device)
    finished = torch.zeros(b, dtype=torch.bool, device=src_BS.device)
    state = model.init_state(memory, src_BS) if use_cache else None
    for _ in range(max_new_tokens):
        if state is not None:
            logits_BV = model.step(tokens[:, -1:], state)
        else:
            logits_BV = model.decode(tokens, memory, src_BS)[:, -1]
        nxt = torch.where(finished, torch.full_like(finished, cfg.pad_id, dtype=torch.long), logits_BV.argmax(-1))
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        finished |= nxt == cfg.eos_id
        if bool(finished.all()):
            break
    return tokens[:, 1:]


@torch.no_grad()
def beam_search(model: Seq2SeqTransformer, src_BS: Tensor, beam_size: int, max_new_tokens: int,
                length_penalty: float = 1.0) -> Tensor:
    """Beam search: the best hypothesis per row [B, <= max_new_tokens] by log p / length**length_penalty.

    A finished beam stays in the beam and can only extend with padding at no cost, so K live slots always hold
    the K best prefixes; with K = 1 this is greedy decoding.
    """
    _check(model, max_new_tokens)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    cfg = model.cfg
    b, k, dev = src_BS.shape[0], beam_size, src_BS.device
    src_rep = src_BS.repeat_interleave(k, dim=0)  # [B*K, S]: row b*K + j is beam j of source b
    state = model.init_state(model.encode(src_BS).repeat_interleave(k, dim=0), src_rep)
    tokens = torch.full((b * k, 1), cfg.bos_id, dtype=torch.long, device=dev)
    scores_BK = torch.zeros(b, k, device=dev)
    scores_BK[:, 1:] = float("-inf")  # all beams start identical: keep one so the first step yields K distinct
    finished = torch.zeros(b * k, dtype=torch.bool, device=dev)
    lengths = torch.zeros(b * k, device=dev)
    for _ in range(max_new_tokens):
        logp = torch.log_softmax(model.step(tokens[:, -1:], state).float(), dim=-1)  # [B*K, V]
        v = logp.shape[-1]
        logp[finished] = float("-inf")
        logp[finished, cfg.pad_id] = 0.0
        cand_BX = (scores_BK.reshape(-1, 1) + logp).view(b, k * v)
        scores_BK, idx_BK = cand_BX.topk(k, dim=-1)
        parent = (torch.arange(b, device=dev)[:, None] * k + idx_BK // v).reshape(-1)
        nxt = (idx_BK % v).reshape(-1)
        was_finished = finished.index_select(0, parent)
        tokens = torch.cat([tokens.index_select(0, parent), nxt[:, None]], dim=1)
        lengths = lengths.index_select(0, parent) + (~was_finished).float()
        finished = was_finished | (nxt == cfg.eos_id)
        state.reorder(parent)
        if bool(finished.all()):
            break
    norm_BK = scores_BK / lengths.view(b, k).clamp_min(1.0) ** length_penalty
    best = torch.arange(b, device=dev) * k + norm_BK.argmax(-1)
    return tokens.index_select(0, best)[:, 1:]
