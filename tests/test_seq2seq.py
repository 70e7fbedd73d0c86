"""Encoder-decoder: padding masks, decoder causality, cached vs uncached decoding, beam search, parameter counts."""

from __future__ import annotations

import pytest
import torch

from moeflow.config import ConfigError, MoEConfig
from moeflow.layers import moe_layers
from moeflow.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer, dense_counterpart
from moeflow.models.seq2seq_decode import beam_search, greedy_decode

V = 23




def make(router: str = "gshard", cf: float | None = 1.0, groups: int = 1, moe_every: int = 1, tie: bool = True,
         seed: int = 0) -> Seq2SeqTransformer:
    torch.manual_seed(seed)
    k = 1 if router == "switch" else 2
    moe = MoEConfig(d_model=32, d_hidden=16, num_experts=4, top_k=k, router=router, capacity_factor=cf,
                    num_groups=groups)
    cfg = Seq2SeqConfig(vocab_size=V, d_model=32, n_heads=4, n_enc_layers=2, n_dec_layers=2, ffn_hidden=32, moe=moe,
                        moe_every=moe_every, tie_embeddings=tie)
    return Seq2SeqTransformer(cfg).double()


def tokens(b: int, n: int, seed: int, lengths: list[int] | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, V, (b, n), generator=g)
    for i, n_i in enumerate(lengths or []):
        x[i, n_i:] = 0
    return x


@pytest.mark.parametrize("groups", [1, 2])
def test_encoder_padding_does_not_change_real_positions_in_training(groups: int) -> None:
    # training mode: capacity drops, local groups and random routing all active; extra padding must not matter
    model = make(cf=1.0, groups=groups).train()
    src = tokens(3, 9, 0, lengths=[9, 5, 7])
    padded = torch.cat([src, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    torch.manual_seed(1)
    a = model.encode(src)
    torch.manual_seed(1)
    b = model.encode(padded)
    mask = src != 0
    torch.testing.assert_close(a[mask], b[:, :9][mask], rtol=1e-12, atol=1e-12)
    assert float(moe_layers(model)[0][1].last_routing.dropped_fraction) > 0  # capacity is really binding


def test_encoder_row_is_independent_of_other_rows_at_inference() -> None:
    model = make(cf=1.0).eval()  # inference: dropless, so one row's routing cannot depend on the batch
    src = tokens(3, 8, 1, lengths=[8, 3, 6])
    full = model.encode(src)
    alone = model.encode(src[1:2, :3])
    torch.testing.assert_close(full[1, :3], alone[0], rtol=1e-12, atol=1e-12)


def test_cross_attention_ignores_source_padding() -> None:
    model = make().eval()
    src = tokens(2, 6, 2, lengths=[6, 4])
    tgt = tokens(2, 5, 3)
    tgt[:, 0] = 1
    a = model(src, tgt)
    b = model(torch.cat([src, torch.zeros(2, 3, dtype=torch.long)], 1), tgt)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_decoder_is_causal() -> None:
    model = make().eval()
    src, tgt = tokens(2, 6, 4), tokens(2, 7, 5)
    logits = model(src, tgt)
    for j in (1, 4, 6):
        changed = tgt.clone()
        changed[:, j] = (changed[:, j] + 1 - 3) % (V - 3) + 3
        other = model(src, changed)
        torch.testing.assert_close(other[:, :j], logits[:, :j], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(other[:, j:], logits[:, j:])


@pytest.mark.parametrize("router,tie", [("gshard", True), ("switch", False)])
def test_cached_step_logits_equal_full_decoder(router: str, tie: bool) -> None:
    model = make(router=router, tie=tie, cf=1.25).eval()
    src = tokens(3, 7, 6, lengths=[7, 4, 5])
    tgt = tokens(3, 6, 7)
    tgt[:, 0] = 1
    full = model(src, tgt)
    state = model.init_state(model.encode(src), src)
    steps = torch.stack([model.step(tgt[:, t:t + 1], state) for t in range(tgt.shape[1])], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-10, atol=1e-10)


def test_greedy_cached_equals_uncached_and_beam1_equals_greedy() -> None:
    model = make(cf=1.0, groups=2).eval()
    src = tokens(4, 8, 8, lengths=[8, 2, 5, 7])
    cached = greedy_decode(model, src, 12)
    uncached = greedy_decode(model, src, 12, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(beam_search(model, src, 1, 12), cached)


def test_beam_search_with_full_width_finds_the_best_two_token_output() -> None:
    model = make(seed=3).eval()
    src = tokens(3, 6, 9)

    def logprob(out: torch.Tensor) -> torch.Tensor:
        """log p of each row up to and including its eos (padding after eos costs nothing)."""
        tin = torch.cat([torch.ones(3, 1, dtype=torch.long), out[:, :-1]], 1)
        lp = torch.log_softmax(model(src, tin), -1).gather(-1, out[..., None])[..., 0]
        return (lp * (out != 0)).sum(1)

    # K = V keeps every one-token prefix, so after 2 steps the best beam is the exact optimum over all outputs
    # of at most 2 tokens, greedy's included
    greedy = greedy_decode(model, src, 2)
    beam = beam_search(model, src, V, 2, length_penalty=0.0)
    assert bool((logprob(beam) >= logprob(greedy) - 1e-9).all())
    assert bool((logprob(beam) > logprob(greedy) + 1e-6).any()) or torch.equal(beam, greedy)


def test_decoding_in_training_mode_is_refused() -> None:
    model = make().train()
    with pytest.raises(ValueError, match="model.eval"):
        greedy_decode(model, tokens(1, 4, 0), 3)


def test_dense_counterpart_has_equal_active_parameters() -> None:
    moe_model = make(moe_every=2)
    cfg = moe_model.cfg
    dense = Seq2SeqTransformer(dense_counterpart(cfg))
    router_params = sum(layer.router.weight.numel() for _, layer in moe_layers(moe_model))
    assert moe_model.num_params(active=True) == dense.num_params() + router_params
    assert moe_model.num_params() > moe_model.num_params(active=True)
    assert [n for n, _ in moe_model.moe_ffns()] == ["enc.1", "dec.1"]
    assert [n for n, _ in moe_layers(moe_model)] == ["encoder.1.ffn.moe", "decoder.1.ffn.moe"]


def test_untied_embeddings_add_an_output_matrix() -> None:
    assert make(tie=False).num_params() - make(tie=True).num_params() == V * 32


def test_training_step_reaches_experts_and_routers() -> None:
    model = make(cf=1.0, groups=2).train()
    src, tgt = tokens(4, 6, 10, lengths=[6, 6, 3, 5]), tokens(4, 5, 11)
    ce, aux = model.loss(src, tgt, tokens(4, 5, 12))
    (ce + aux).backward()
    for _, layer in moe_layers(model):
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
        assert layer.experts.w_in.grad.abs().sum() > 0
    assert 0 < float(aux.detach()) < 1


def test_config_errors_are_explicit() -> None:
    moe = MoEConfig(d_model=16, d_hidden=8, num_experts=4, top_k=2, router="gshard")
    with pytest.raises(ConfigError, match="must equal d_model"):
        Seq2SeqConfig(vocab_size=10, d_model=32, moe=moe)
    with pytest.raises(ConfigError, match="no FFN would be MoE"):
        Seq2SeqConfig(vocab_size=10, d_model=16, moe=moe, moe_every=3)
    with pytest.raises(ConfigError, match="equal active"):
        dense_counterpart(Seq2SeqConfig(vocab_size=10, d_model=16, ffn_hidden=64, moe=moe, moe_every=2))
    model = make()
    with pytest.raises(ValueError, match="outside"):
        model.encode(torch.tensor([[3, 99]]))
    with pytest.raises(ValueError, match="start with a real token"):
        model.encode(torch.tensor([[0, 3]]))
