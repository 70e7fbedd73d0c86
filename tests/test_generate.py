"""KV-cache decoding equals full-prefix decoding; sampling filters and reproducibility; generate's errors."""

from __future__ import annotations

import math

import pytest
import torch

from moeflow.config import MoEConfig
from moeflow.layers import moe_layers
from moeflow.models import ModelConfig, MoETransformer, filter_logits, generate, sample_next
from moeflow.routing import ROUTERS

D = 32

# Dropless routers: each token's experts depend on its own activations only, so caching cannot change them.
DROPLESS = {
    "topk": dict(router="topk"),
    "topk-groups": dict(router="topk", num_groups=2),  # groups split the flattened batch; routing stays per token
    "switch": dict(router="switch", top_k=1, capacity_factor=None),
    "noisy_topk": dict(router="noisy_topk"),  # noise is off in eval
    "deepseek": dict(router="deepseek", n_group=2, topk_group=1, shared_d_hidden=16),
    "dense": None,
}


def make_model(moe_kw: dict[str, object] | None, seed: int = 0, **kw: object) -> MoETransformer:
    """A small random model in eval mode; the router scale is raised so that routing depends on the input."""
    torch.manual_seed(seed)
    moe = None if moe_kw is None else MoEConfig(d_model=D, d_hidden=24, num_experts=4, **moe_kw)  # type: ignore
    base: dict[str, object] = dict(vocab_size=53, d_model=D, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=40,
                                   ffn_hidden=48, moe=moe, init_std=0.1)
    base.update(kw)
    model = MoETransformer(ModelConfig(**base))  # type: ignore[arg-type]
    with torch.no_grad():
        for _, m in moe_layers(model):
            m.router.weight.normal_(std=0.5)
    return model.eval()


def routers_available(name: str) -> pytest.MarkDecorator:
    """Skip a case whose router is not registered in this checkout."""
    kw = DROPLESS[name]
    router = None if kw is None else kw["router"]
    return pytest.mark.skipif(router is not None and router not in ROUTERS, reason=f"router {router!r} not built")


@pytest.mark.parametrize("name", [pytest.param(n, marks=routers_available(n)) for n in DROPLESS])
def test_cached_logits_equal_full_prefix_step_by_step(name: str) -> None:
    model = make_model(DROPLESS[name])
    ids = torch.randint(0, 53, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)  # [B, 14, V], no cache
        cache = model.new_cache(2, max_len=20)
        chunks = [model(ids[:, :5], cache)]  # prefill 5
        chunks.append(model(ids[:, 5:8], cache))  # a 3-token chunk onto a non-empty cache (offset causal mask)
        for t in range(8, 14):  # then one token per step
            chunks.append(model(ids[:, t:t + 1], cache))
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [pytest.param(n, marks=routers_available(n)) for n in ("topk", "deepseek", "dense")])
def test_greedy_generation_cache_equals_no_cache(name: str) -> None:
    model = make_model(DROPLESS[name], seed=3)
    prompt = torch.randint(0, 53, (3, 6), generator=torch.Generator().manual_seed(2))
    with_cache = generate(model, prompt, 20, temperature=0.0, use_cache=True)
    without = generate(model, prompt, 20, temperature=0.0, use_cache=False)
    assert with_cache.shape == (3, 26) and torch.equal(with_cache[:, :6], prompt)
    assert torch.equal(with_cache, without)
    assert len(set(with_cache[:, 6:].flatten().tolist())) > 3  # not a degenerate constant continuation


def test_capacity_router_decodes_with_per_call_capacity() -> None:
    # Documented behaviour (llama.py docstring): capacity is counted over the tokens of each call, so a cached
    # decoding step with B sequences routes T = B tokens with capacity ceil(cf * k * B / E).
    model = make_model(dict(router="switch", top_k=1, capacity_factor=1.0))
    prompt = torch.randint(0, 53, (3, 5))
    cache = model.new_cache(3)
    with torch.no_grad():
        model(prompt, cache)
        r = model.routings()[0]
        assert (r.num_tokens, r.capacity) == (15, math.ceil(1.0 * 1 * 15 / 4))
        model(prompt[:, :1], cache)
        r = model.routings()[0]
        assert (r.num_tokens, r.capacity) == (3, 1)
    out = generate(model, prompt, 4, temperature=0.0)
    assert out.shape == (3, 9)


def test_sampling_is_reproducible_with_a_generator() -> None:
    model = make_model(DROPLESS["topk"])
    prompt = torch.randint(0, 53, (2, 4))

    def run(seed: int, **kw: object) -> torch.Tensor:
        return generate(model, prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(run(7, use_cache=False), a)  # same logits, same random stream -> same tokens
    assert torch.equal(run(5, top_k=3, top_p=0.9), run(5, top_k=3, top_p=0.9))


def test_top_k_and_top_p_filter_hand_example() -> None:
    probs = torch.tensor([[0.10, 0.50, 0.05, 0.20, 0.15]])  # sorted: 1 (.5), 3 (.2), 4 (.15), 0 (.1), 2 (.05)
    logits = probs.log()

    def kept(**kw: object) -> list[int]:
        return torch.isfinite(filter_logits(logits, **kw))[0].nonzero().flatten().tolist()  # type: ignore[arg-type]

    assert kept(top_k=2) == [1, 3]
    assert kept(top_k=1) == [1]
    assert kept(top_k=10) == [0, 1, 2, 3, 4]
    assert kept(top_p=0.5) == [1]  # 0.5 alone reaches 0.5
    assert kept(top_p=0.6) == [1, 3]  # 0.5 < 0.6 <= 0.7
    assert kept(top_p=0.8) == [1, 3, 4]  # 0.7 < 0.8 <= 0.85
    assert kept(top_p=1.0) == [0, 1, 2, 3, 4]
    assert kept(top_k=2, top_p=0.9) == [1, 3]
    assert kept(top_p=0.01) == [1]  # the most likely token always survives
    kept_logits = filter_logits(logits, top_k=2)[0]
    assert torch.equal(kept_logits[[1, 3]], logits[0, [1, 3]])  # survivors keep their values


def test_sample_next_distribution_and_greedy() -> None:
    logits = torch.tensor([[0.10, 0.50, 0.05, 0.20, 0.15]]).log().repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_k=2, generator=g)
    assert set(draws.tolist()) == {1, 3}
    frac = (draws == 1).float().mean().item()
    assert abs(frac - 0.5 / 0.7) < 0.03  # renormalised over the two survivors; 4000 draws: std ~ 0.007
    assert torch.equal(sample_next(logits[:3], temperature=0.0), torch.tensor([1, 1, 1]))
    # a low temperature sharpens towards the argmax
    cold = sample_next(logits, temperature=0.05, generator=g)
    assert (cold == 1).float().mean().item() > 0.99


def test_eos_pads_finished_sequences_and_stops_early() -> None:
    model = make_model(DROPLESS["topk"])
    prompt = torch.randint(0, 53, (2, 4), generator=torch.Generator().manual_seed(4))
    greedy = generate(model, prompt, 10, temperature=0.0)
    eos = int(greedy[0, 6])  # the token sequence 0 emits at its 3rd step
    out = generate(model, prompt, 10, temperature=0.0, eos_id=eos)
    ends = []
    for row in range(2):
        hit = (greedy[row, 4:] == eos).nonzero()
        end = 4 + int(hit[0]) + 1 if len(hit) else greedy.shape[1]  # greedy is deterministic: same tokens up to eos
        ends.append(end)
        assert torch.equal(out[row, :end], greedy[row, :end])
        assert (out[row, end:] == eos).all()  # padded after its end
    assert out.shape[1] == max(ends)  # stops once every sequence has ended
    assert ends[0] == 7


def test_generate_errors_and_mode() -> None:
    model = make_model(DROPLESS["topk"]).train()
    prompt = torch.zeros(1, 30, dtype=torch.long)
    with pytest.raises(ValueError, match="max_seq_len=40.*at most 10 new tokens"):
        generate(model, prompt, 11)
    assert generate(model, prompt, 10, temperature=0.0).shape == (1, 40)
    assert model.training  # eval during generation, mode restored afterwards
    cache = model.new_cache(1, max_len=4)
    with pytest.raises(ValueError, match="cache holds 4 positions"):
        model(torch.zeros(1, 5, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="batch size"):
        model(torch.zeros(2, 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="temperature"):
        sample_next(torch.zeros(1, 5), temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(torch.zeros(1, 5), top_p=1.5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_positions_computed_per_step(use_cache: bool) -> None:
    model = make_model(DROPLESS["topk"])
    seen: list[int] = []
    model.tok_embeddings.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].shape[1]))
    generate(model, torch.zeros(2, 5, dtype=torch.long), 6, temperature=0.0, use_cache=use_cache)
    # with the cache: prefill once, then one position per new token (the last token is never fed back)
    assert seen == ([5, 1, 1, 1, 1, 1] if use_cache else [5, 6, 7, 8, 9, 10])


def test_bfloat16_model_decodes_with_a_bfloat16_cache() -> None:
    model = make_model(None, seed=5)
    ids = torch.randint(0, 53, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(ids)
        model.to(torch.bfloat16)
        cache = model.new_cache(2)
        assert cache.k.dtype == torch.bfloat16
        got = torch.cat([model(ids[:, :4], cache), model(ids[:, 4:], cache)], dim=1)
    assert got.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits: a few 1e-2 of absolute error on logits of size ~ref.abs().max()
    assert (got.float() - ref).abs().max() < 0.03 * ref.abs().max()


def test_generate_leaves_the_thread_count_alone_and_sizes_decode_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Library code never changes torch's thread count (the CLI sets it once); `decode_is_serial` says which
    cached decode steps are small enough for one thread, by the tuning record's threshold."""
    from moeflow.models.generate import decode_is_serial
    from moeflow.ops.tuning import cpu_tuning
    model = make_model({"router": "topk", "top_k": 2})
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    before = torch.get_num_threads()
    seen: list[int] = []
    forward = model.forward

    def spy(*args: object, **kw: object) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return forward(*args, **kw)

    monkeypatch.setattr(model, "forward", spy)
    generate(model, prompt, 6, temperature=0.0)
    assert set(seen) == {before} and torch.get_num_threads() == before
    assert decode_is_serial(model, 1) and decode_is_serial(model, 8)
    with cpu_tuning(serial_decode_macs=0):
        assert not decode_is_serial(model, 1)


def test_slide_past_max_seq_len_drops_the_oldest_context() -> None:
    """slide=True: longer than max_seq_len (40) works, cached == uncached, and each window is re-encoded from 0."""
    model = make_model(DROPLESS["topk"])
    prompt = torch.randint(0, 53, (2, 30), generator=torch.Generator().manual_seed(2))
    cached = generate(model, prompt, 45, temperature=0.0, slide=True)
    uncached = generate(model, prompt, 45, temperature=0.0, use_cache=False, slide=True)
    assert cached.shape == (2, 75) and torch.equal(cached, uncached)
    assert torch.equal(cached[:, :40], generate(model, prompt, 10, temperature=0.0))  # no slide while it fits
    # the full 40-token context gives token 40; token 41 follows the newest max_seq_len // 2 = 20 tokens alone,
    # re-encoded from position 0
    with torch.no_grad():
        assert torch.equal(cached[:, 40], model(cached[:, :40])[:, -1].argmax(-1))
        assert torch.equal(cached[:, 41], model(cached[:, 21:41])[:, -1].argmax(-1))
    long_prompt = torch.randint(0, 53, (1, 50), generator=torch.Generator().manual_seed(3))
    out = generate(model, long_prompt, 3, temperature=0.0, slide=True)  # a prompt longer than the context
    with torch.no_grad():
        assert int(out[0, 50]) == int(model(long_prompt[:, 30:])[:, -1].argmax(-1))


def test_on_token_streams_each_new_token() -> None:
    model = make_model(DROPLESS["topk"])
    prompt = torch.randint(0, 53, (2, 5), generator=torch.Generator().manual_seed(4))
    seen: list[torch.Tensor] = []
    out = generate(model, prompt, 7, temperature=0.0, on_token=seen.append)
    assert torch.equal(torch.stack(seen, dim=1), out[:, 5:])
