"""Autoregressive generation: greedy or sampled (temperature, top-k, top-p), with or without the KV cache."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from moeflow.models.llama import MoETransformer
from moeflow.ops.tuning import tuning


def _active_params(model: MoETransformer) -> int:
    """Parameters one token passes through (all of them where the config cannot tell, e.g. DeepSeek-V3)."""
    count = getattr(model.cfg, "num_active_params", None)
    return count() if callable(count) else sum(p.numel() for p in model.parameters())


def decode_is_serial(model: MoETransformer, batch: int) -> bool:
    """Whether a cached decode step of this model and batch is small enough to run faster on one CPU thread.

    A step is a hundred or so tiny ops, and split over threads each one pays a fork/join, plus a wake-up from sleep
    under OMP_WAIT_POLICY=PASSIVE. Measured, 'tiny' preset (1.05M active), batch 1, 64 new tokens after a 64-token
    prompt, 2 cores: 638 ms on 2 threads (PASSIVE), 287 ms (ACTIVE), 243 ms on 1 thread. The caller (the CLI) sets
    the thread count; generate() never changes it.
    """
    return batch * _active_params(model) <= tuning().serial_decode_macs


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to -inf every logit outside the top_k largest and outside the nucleus of mass top_p; [B, V] -> [B, V].

    The nucleus is the smallest set of most-likely tokens whose probability reaches top_p (Holtzman et al. 2020);
    the most likely token is always kept. Ties at the k-th value are all kept.
    """
    if top_k is not None:
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        if top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = mass_before >= top_p  # already reached top_p without this token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Next token per row of logits [B, V] -> [B]; temperature 0 is greedy (argmax)."""
    if logits.dim() != 2:
        raise ValueError(f"sample_next expects logits [batch, vocab], got {tuple(logits.shape)}")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(model: MoETransformer, prompt_ids: Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None, eos_id: int | None = None, slide: bool = False,
             on_token: Callable[[Tensor], None] | None = None) -> Tensor:
    """Continue each prompt [B, S] by up to max_new_tokens tokens: returns [B, S + new].

    With `use_cache`, the prompt is prefilled once and each new token costs one position; without, the full
    prefix is re-run every step. Runs in eval mode (restored afterwards). With `eos_id`, a sequence that emitted
    it is padded with eos_id and generation stops early once every sequence has.

    The context is at most `max_seq_len` tokens. Past that, `slide=False` raises ValueError; `slide=True` drops
    the oldest tokens: when the window is full, the newest `max_seq_len // 2` are re-encoded from position 0 and
    generation continues (cached and uncached decoding see the same windows).

    `on_token`, if given, is called with each new token [B] as soon as it is sampled (to stream the output).
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be [batch, seq] with seq >= 1, got {tuple(prompt_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    b, s = prompt_ids.shape
    limit = model.cfg.max_seq_len
    if s + max_new_tokens > limit and not slide:
        raise ValueError(f"prompt length {s} + max_new_tokens {max_new_tokens} = {s + max_new_tokens} exceeds "
                         f"max_seq_len={limit}; shorten the prompt or ask for at most {limit - s} new tokens")
    if max_new_tokens == 0:
        return prompt_ids
    keep = max(1, limit // 2)  # tokens kept when the window slides: one re-encode per limit - keep new tokens
    start = 0 if s <= limit else s - keep  # the context is ids[:, start:]
    was_training = model.training
    model.eval()
    try:
        cache_len = min(limit, s + max_new_tokens)
        cache = model.new_cache(b, max_len=cache_len) if use_cache else None
        ids = prompt_ids
        finished = torch.zeros(b, dtype=torch.bool, device=prompt_ids.device)
        logits = model(ids[:, start:], cache)[:, -1]  # prefill: [B, V]
        for step in range(max_new_tokens):
            if step > 0 and ids.shape[1] - start > limit:  # the newest token does not fit: slide the window
                start = ids.shape[1] - keep
                cache = model.new_cache(b, max_len=limit) if use_cache else None
                logits = model(ids[:, start:], cache)[:, -1]
            elif step > 0:
                logits = (model(ids[:, -1:], cache) if cache is not None else model(ids[:, start:]))[:, -1]
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
                finished = finished | (nxt == eos_id)
            ids = torch.cat([ids, nxt[:, None].to(ids.dtype)], dim=1)
            if on_token is not None:
                on_token(nxt)
            if eos_id is not None and bool(finished.all()):
                break
        return ids
    finally:
        model.train(was_training)
