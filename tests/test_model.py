"""MoETransformer: shapes, causality, GQA, RoPE, parameter counts, config, init, and HF architecture parity."""

from __future__ import annotations

import math

import pytest
import torch

from moeflow.config import ConfigError, MoEConfig
from moeflow.layers import FFN, MoELayer, moe_layers
from moeflow.models import MODEL_PRESETS, Attention, ModelConfig, MoETransformer, apply_rope, rope_cos_sin
from moeflow.routing import ROUTERS

D = 32


def tiny_cfg(use_moe: bool = True, **kw: object) -> ModelConfig:
    """A 2-layer model small enough for exact checks in milliseconds."""
    base: dict[str, object] = dict(vocab_size=61, d_model=D, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                                   ffn_hidden=48)
    if use_moe:
        base["moe"] = MoEConfig(d_model=D, d_hidden=24, num_experts=4, top_k=2)
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("moe", [True, False])
def test_shapes_aux_loss_and_routings(moe: bool) -> None:
    torch.manual_seed(0)
    model = MoETransformer(tiny_cfg(moe))
    ids = torch.randint(0, 61, (3, 7))
    logits = model(ids)
    assert logits.shape == (3, 7, 61) and torch.isfinite(logits).all()
    if moe:
        assert [n for n, _ in moe_layers(model)] == ["layers.0.ffn", "layers.1.ffn"]
        routings = model.routings()
        assert [r.num_tokens for r in routings] == [21, 21]  # the MoE layer saw the flattened [B*S, D] tokens
        expected = sum(m.aux_loss for _, m in moe_layers(model))
        aux = float(model.aux_loss().detach())
        assert aux == pytest.approx(float(expected.detach())) and aux > 0
        model.aux_loss().backward()  # the aux loss reaches the routers
        assert model.layers[0].ffn.router.weight.grad is not None
    else:
        assert moe_layers(model) == [] and model.routings() == [] and model.aux_loss().item() == 0.0


def test_moe_layer_placement() -> None:
    cfg = tiny_cfg(n_layers=6, moe_every=2, first_dense_layers=1)
    model = MoETransformer(cfg)
    kinds = [type(layer.ffn) for layer in model.layers]
    # i >= 1 and (i - 1) % 2 == 1  ->  layers 2 and 4
    assert kinds == [FFN, FFN, MoELayer, FFN, MoELayer, FFN]
    assert [cfg.is_moe_layer(i) for i in range(6)] == [k is MoELayer for k in kinds]


@pytest.mark.parametrize("moe", [True, False])
def test_causal_masking(moe: bool) -> None:
    torch.manual_seed(1)
    model = MoETransformer(tiny_cfg(moe)).eval()  # topk router: dropless, so routing is per token
    ids = torch.randint(0, 61, (2, 10))
    base = model(ids)
    for j in (0, 4, 9):
        changed = ids.clone()
        changed[:, j] = (changed[:, j] + 1 + torch.arange(2)) % 61
        out = model(changed)
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
        assert (out[:, j] - base[:, j]).abs().max() > 1e-4  # the changed position itself does move


def reference_attention(att: Attention, x: torch.Tensor) -> torch.Tensor:
    """Naive GQA: repeat each kv head for its query heads, explicit masked softmax."""
    b, s, _ = x.shape
    h, kv, hd = att.n_heads, att.n_kv_heads, att.head_dim
    cos, sin = rope_cos_sin(torch.arange(s), hd, 10000.0)
    q = apply_rope(att.wq(x).view(b, s, h, hd).transpose(1, 2), cos, sin)
    k = apply_rope(att.wk(x).view(b, s, kv, hd).transpose(1, 2), cos, sin)
    v = att.wv(x).view(b, s, kv, hd).transpose(1, 2)
    k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)  # query head i uses kv i // rep
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v
    return att.wo(y.transpose(1, 2).reshape(b, s, h * hd))


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_gqa_matches_naive_attention(n_kv_heads: int) -> None:
    torch.manual_seed(2)
    att = Attention(tiny_cfg(False, n_kv_heads=n_kv_heads)).double()
    x = torch.randn(2, 9, D, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(9), 8, 10000.0)
    torch.testing.assert_close(att(x, cos.double(), sin.double()), reference_attention(att, x))
    assert att.wk.weight.shape == (n_kv_heads * 8, D)


def test_rope_matches_complex_rotation() -> None:
    torch.manual_seed(3)
    hd, theta = 16, 500.0
    pos = torch.tensor([0, 1, 5, 77, 1000])
    x = torch.randn(2, 3, len(pos), hd, dtype=torch.float64)
    cos, sin = rope_cos_sin(pos, hd, theta)
    got = apply_rope(x, cos.double(), sin.double())
    # independent: pair dim i with dim i + hd/2 as one complex number and rotate it by pos * theta^(-2i/hd)
    freqs = pos.double()[:, None] * theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    z = torch.complex(x[..., : hd // 2], x[..., hd // 2:]) * torch.polar(torch.ones_like(freqs), freqs)
    want = torch.cat([z.real, z.imag], dim=-1)
    # angles are computed in fp32 (as HF does): at position 1000 their ulp is 2^-14 ~ 6e-5 radians, |x| < 5
    torch.testing.assert_close(got, want, rtol=0, atol=3e-4)
    torch.testing.assert_close(got[..., :3, :], want[..., :3, :], rtol=0, atol=1e-6)  # positions 0, 1, 5
    # rotations preserve norms, and q.k depends only on the relative position
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1))
    q, k = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)

    def dot(m: int, n: int) -> float:
        c, s = rope_cos_sin(torch.tensor([m, n]), hd, theta)
        r = apply_rope(torch.stack([q, k]), c.double(), s.double())
        return float(r[0] @ r[1])

    assert dot(3, 1) == pytest.approx(dot(12, 10), abs=1e-5)


def test_active_params_tiny_matches_tiny_dense() -> None:
    moe, dense = MODEL_PRESETS["tiny"](), MODEL_PRESETS["tiny-dense"]()
    assert moe.moe is not None and dense.moe is None
    assert abs(moe.num_active_params() / dense.num_active_params() - 1) < 0.02
    assert moe.num_params() > 3 * dense.num_params()  # 8 experts: capacity grows, compute does not
    small, small_dense = MODEL_PRESETS["small"](), MODEL_PRESETS["small-dense"]()
    assert abs(small.num_active_params() / small_dense.num_active_params() - 1) < 0.02


def test_mixtral_preset_param_counts() -> None:
    cfg = MODEL_PRESETS["mixtral-8x7b"]()  # analytic only: never instantiated
    assert cfg.num_params() == 46_702_792_704  # the published total of Mixtral-8x7B-v0.1
    assert round(cfg.num_active_params() / 1e9, 1) == 12.9  # "12.9B active parameters per token"


ROUTER_KW = {"switch": dict(top_k=1), "gshard": dict(top_k=2), "expert_choice": dict(capacity_factor=1.0),
             "hierarchical": dict(num_clusters=2), "deepseek": dict(n_group=2, topk_group=1)}


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_num_params_matches_module_for_every_router(router: str) -> None:
    moe = MoEConfig(d_model=D, d_hidden=16, num_experts=4, router=router, **ROUTER_KW.get(router, {}))
    cfg = tiny_cfg(moe=moe)
    model = MoETransformer(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kw", [
    dict(tie_embeddings=True), dict(attn_bias=True, qk_norm=True), dict(head_dim=12, n_heads=2, n_kv_heads=1),
    dict(moe_every=2, first_dense_layers=1, n_layers=5),
    dict(moe=MoEConfig(d_model=D, d_hidden=8, num_experts=6, top_k=3, shared_d_hidden=20, shared_gate=True,
                       router_bias=True, activation="gelu")),
])
def test_num_params_matches_module(kw: dict[str, object]) -> None:
    cfg = tiny_cfg(**kw)
    model = MoETransformer(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())  # parameters() dedups tied weights
    m = cfg.moe
    assert m is not None
    expert = sum(p.numel() for p in moe_layers(model)[0][1].experts.parameters()) // m.num_experts
    n_moe = len(moe_layers(model))
    assert cfg.num_params() - cfg.num_active_params() == n_moe * (m.num_experts - m.top_k) * expert


def test_init_std_and_scaled_output_projections() -> None:
    torch.manual_seed(4)
    cfg = ModelConfig(d_model=64, n_layers=8, n_heads=4, n_kv_heads=4, ffn_hidden=256,
                      moe=MoEConfig(d_model=64, d_hidden=128, num_experts=4, top_k=2), moe_every=2)
    model = MoETransformer(cfg)
    out_std = 0.02 / math.sqrt(16)
    layer_moe, layer_dense = model.layers[1], model.layers[0]
    assert isinstance(layer_moe.ffn, MoELayer) and isinstance(layer_dense.ffn, FFN)
    for w, std in [(model.tok_embeddings.weight, 0.02), (model.output.weight, 0.02),
                   (layer_dense.attention.wq.weight, 0.02), (layer_dense.attention.wo.weight, out_std),
                   (layer_dense.ffn.w_in, 0.02), (layer_dense.ffn.w_out, out_std),
                   (layer_moe.ffn.experts.w_in, 0.02), (layer_moe.ffn.experts.w_out, out_std)]:
        w = w.detach()
        assert float(w.std()) == pytest.approx(std, rel=0.1) and abs(float(w.mean())) < std / 5


def test_config_round_trip_and_presets() -> None:
    for name, make in MODEL_PRESETS.items():
        cfg = make()
        d = cfg.to_dict()
        assert ModelConfig.from_dict(d) == cfg, name
        assert d["head_dim"] == cfg.d_model // cfg.n_heads
    cfg = tiny_cfg(qk_norm=True, moe_every=2)
    back = ModelConfig.from_dict(cfg.to_dict())
    assert back == cfg and isinstance(back.moe, MoEConfig)
    assert cfg.replace(d_model=64, moe=None).head_dim == 16  # head_dim re-derived, not carried over


@pytest.mark.parametrize("kw, words", [
    (dict(moe=MoEConfig(d_model=16, d_hidden=8)), ["moe.d_model=16", "d_model=32"]),
    (dict(n_heads=4, n_kv_heads=3), ["n_kv_heads=3", "n_heads=4"]),
    (dict(n_heads=6, n_kv_heads=3), ["d_model=32", "n_heads=6"]),
    (dict(head_dim=7), ["head_dim", "even"]),
    (dict(first_dense_layers=3), ["first_dense_layers"]),
    (dict(vocab_size=0), ["vocab_size"]),
])
def test_bad_configs_name_the_field(kw: dict[str, object], words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        tiny_cfg(**kw)
    for w in words:
        assert w in str(e.value)


def test_from_dict_rejects_unknown_keys() -> None:
    d = tiny_cfg().to_dict()
    with pytest.raises(ConfigError, match="n_layer\\b.*"):
        ModelConfig.from_dict({**d, "n_layer": 3})
    d["moe"]["num_expert"] = 4
    with pytest.raises(ConfigError, match="ModelConfig.moe: num_expert"):
        ModelConfig.from_dict(d)


def test_forward_rejects_bad_inputs() -> None:
    model = MoETransformer(tiny_cfg())
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 3))


# ------------------------------------------------------------------------------------------------------------------
# Architecture parity with Hugging Face (tiny random configs built in the test: no download). Weights are copied by
# hand here; the general checkpoint loader lives in moeflow.interop.
def _randomize(module: torch.nn.Module) -> None:
    """Random weights everywhere (norms near 1), so every path (routing, biases, norms) is exercised."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.2 * noise)


def _copy_from_hf(hf: torch.nn.Module, ours: MoETransformer) -> None:
    """Copy a HF Mixtral / OLMoE / Qwen2-MoE causal LM's weights into MoETransformer, key by key."""
    with torch.no_grad():
        ours.tok_embeddings.weight.copy_(hf.model.embed_tokens.weight)
        ours.norm.weight.copy_(hf.model.norm.weight)
        ours.output.weight.copy_(hf.lm_head.weight)
        for hl, ol in zip(hf.model.layers, ours.layers):
            ha, oa = hl.self_attn, ol.attention
            for src, dst in [(ha.q_proj, oa.wq), (ha.k_proj, oa.wk), (ha.v_proj, oa.wv), (ha.o_proj, oa.wo)]:
                dst.weight.copy_(src.weight)
                if dst.bias is not None:
                    dst.bias.copy_(src.bias)
            if oa.q_norm is not None and oa.k_norm is not None:
                oa.q_norm.weight.copy_(ha.q_norm.weight)
                oa.k_norm.weight.copy_(ha.k_norm.weight)
            ol.attention_norm.weight.copy_(hl.input_layernorm.weight)
            ol.ffn_norm.weight.copy_(hl.post_attention_layernorm.weight)
            mlp, ffn = hl.mlp, ol.ffn
            if isinstance(ffn, MoELayer):
                ffn.router.weight.copy_(mlp.gate.weight)
                ffn.experts.w_in.copy_(mlp.experts.gate_up_proj)  # [E, 2H, D]: gate rows, then up rows
                ffn.experts.w_out.copy_(mlp.experts.down_proj)  # [E, D, H]
                if ffn.shared is not None:
                    se = mlp.shared_expert
                    ffn.shared.w_in.copy_(torch.cat([se.gate_proj.weight, se.up_proj.weight]))
                    ffn.shared.w_out.copy_(se.down_proj.weight)
                if ffn.shared_gate is not None:
                    ffn.shared_gate.weight.copy_(mlp.shared_expert_gate.weight)
            else:
                ffn.w_in.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
                ffn.w_out.copy_(mlp.down_proj.weight)


HF_COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False, num_experts_per_tok=2)


def _hf_case(family: str) -> tuple[torch.nn.Module, ModelConfig]:
    transformers = pytest.importorskip("transformers")
    base = dict(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64, norm_eps=1e-5)
    if family == "mixtral":
        hf_cfg = transformers.MixtralConfig(**HF_COMMON, intermediate_size=40, num_local_experts=4,
                                            rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
        cfg = ModelConfig(**base, rope_theta=5000.0,
                          moe=MoEConfig(d_model=32, d_hidden=40, num_experts=4, top_k=2, normalize=True))
        return transformers.MixtralForCausalLM(hf_cfg), cfg
    if family == "olmoe":
        hf_cfg = transformers.OlmoeConfig(**HF_COMMON, intermediate_size=24, num_experts=6, norm_topk_prob=False,
                                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        cfg = ModelConfig(**base, qk_norm=True,
                          moe=MoEConfig(d_model=32, d_hidden=24, num_experts=6, top_k=2, normalize=False))
        return transformers.OlmoeForCausalLM(hf_cfg), cfg
    # Qwen2-MoE: q/k/v biases, a sigmoid-gated shared expert, and a dense FFN every other layer (sparse step 2)
    hf_cfg = transformers.Qwen2MoeConfig(**HF_COMMON, intermediate_size=56, moe_intermediate_size=20, num_experts=4,
                                         shared_expert_intermediate_size=36, decoder_sparse_step=2,
                                         norm_topk_prob=False, qkv_bias=True,
                                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg = ModelConfig(**base, attn_bias=True, ffn_hidden=56, moe_every=2,
                      moe=MoEConfig(d_model=32, d_hidden=20, num_experts=4, top_k=2, normalize=False,
                                    shared_d_hidden=36, shared_gate=True))
    return transformers.Qwen2MoeForCausalLM(hf_cfg), cfg


@pytest.mark.hf
@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe"])
def test_logits_match_hf_causal_lm(family: str) -> None:
    hf, cfg = _hf_case(family)
    hf.eval()
    _randomize(hf)
    ours = MoETransformer(cfg).eval()
    _copy_from_hf(hf, ours)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        got = ours(ids)
    assert want.abs().max() > 1.0  # a meaningful comparison, not two near-zero tensors
    assert (got - want).abs().max() <= 1e-4
