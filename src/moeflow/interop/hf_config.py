"""Config mapping between Hugging Face `config.json` dicts and moeflow model configs, both directions.

Only this module knows HF field names (`num_local_experts` -> `num_experts`, `num_experts_per_tok` -> `top_k`, ...).
A field whose value moeflow cannot reproduce exactly (yarn RoPE, clip_qkv, a gated Switch FFN, ...) is an error
naming the field, never a silent approximation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moeflow.config import ConfigError, MoEConfig
from moeflow.models.config import ModelConfig
from moeflow.models.deepseek import YARN_KEYS, DeepSeekConfig, DeepSeekV3
from moeflow.models.llama import MoETransformer
from moeflow.models.switch_t5 import SwitchConfig, SwitchTransformer

HF_CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
              "deepseek_v3": "DeepseekV3ForCausalLM",
              "switch_transformers": "SwitchTransformersForConditionalGeneration"}
ARCHS = tuple(HF_CLASSES)
AnyConfig = ModelConfig | DeepSeekConfig | SwitchConfig
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def arch_of(hf: dict[str, Any]) -> str:
    """The architecture key of an HF config dict (its model_type), or an error listing the supported ones."""
    arch = hf.get("model_type")
    if arch not in HF_CLASSES:
        names = hf.get("architectures") or []
        raise ConfigError(f"unsupported architecture model_type={arch!r} {names}; moeflow.load_hf supports "
                          f"{', '.join(ARCHS)}")
    return arch


def hf_dtype(hf: dict[str, Any]) -> torch.dtype:
    """The dtype the checkpoint was saved in (`dtype` in transformers 5, `torch_dtype` before), default fp32."""
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ConfigError(f"config.json dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _rope(hf: dict[str, Any], default: float, yarn_ok: bool = False) -> tuple[float, dict[str, Any] | None]:
    """(RoPE base, YaRN parameters or None) from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`
    (before); RoPE variants moeflow does not implement are rejected."""
    rp = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = rp.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    theta = float(rp.get("rope_theta", hf.get("rope_theta", default)))
    if kind == "yarn" and yarn_ok:
        yarn = {k: v for k, v in {**scaling, **rp}.items() if k in YARN_KEYS}
        if yarn.get("factor") is None:  # HF: extend from the original context to max_position_embeddings
            yarn["factor"] = hf["max_position_embeddings"] / yarn["original_max_position_embeddings"]
        return theta, yarn
    _need(kind == "default", f"config.json asks for RoPE type {kind!r}; moeflow implements the default RoPE"
                             f"{' and YaRN' if yarn_ok else ''} here, so logits would differ")
    return theta, None


def _rope_theta(hf: dict[str, Any], default: float) -> float:
    """RoPE base of a model with plain RoPE."""
    return _rope(hf, default)[0]


def _max_len(hf: dict[str, Any], windowed: bool) -> int:
    """max_position_embeddings, capped at a sliding window: below the window, windowed attention is full attention."""
    n = int(hf.get("max_position_embeddings", 4096))
    window = hf.get("sliding_window")
    return min(n, int(window)) if windowed and window else n


def _llama_family(arch: str, hf: dict[str, Any]) -> ModelConfig:
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    _need(hf.get("hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')!r}: moeflow's experts are SwiGLU "
                                                  "(silu); other activations are not supported")
    n_layers = hf["num_hidden_layers"]
    common = dict(vocab_size=hf["vocab_size"], d_model=d, n_layers=n_layers, n_heads=heads,
                  n_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or d // heads,
                  norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                  init_std=hf.get("initializer_range", 0.02), ffn_hidden=hf["intermediate_size"])
    moe = dict(d_model=d, num_experts=hf.get("num_local_experts") or hf.get("num_experts"),
               top_k=hf["num_experts_per_tok"], router="topk", aux_loss_coef=hf.get("router_aux_loss_coef", 0.01))
    if arch == "mixtral":
        return ModelConfig(**common, max_seq_len=_max_len(hf, True), rope_theta=_rope_theta(hf, 1e6),
                           moe=MoEConfig(**moe, d_hidden=hf["intermediate_size"], normalize=True,
                                         jitter_eps=hf.get("router_jitter_noise") or 0.0))
    if arch == "olmoe":
        _need(hf.get("clip_qkv") is None, f"OLMoE clip_qkv={hf.get('clip_qkv')} is not supported")
        _need(not hf.get("attention_bias", False), "OLMoE attention_bias=True is not supported (moeflow's output "
                                                   "projection has no bias)")
        return ModelConfig(**common, max_seq_len=_max_len(hf, False), rope_theta=_rope_theta(hf, 1e4), qk_norm=True,
                           moe=MoEConfig(**moe, d_hidden=hf["intermediate_size"],
                                         normalize=bool(hf.get("norm_topk_prob", False))))
    # qwen2_moe: MoE on layers with (i + 1) % decoder_sparse_step == 0 outside mlp_only_layers
    step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
    _need(isinstance(step, int) and step >= 1, f"decoder_sparse_step={step!r} must be a positive integer")
    moe_layers = [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]
    fdl, every, extra_dense = _layout(moe_layers, n_layers)
    shared = hf.get("shared_expert_intermediate_size") or 0
    return ModelConfig(**common, max_seq_len=_max_len(hf, bool(hf.get("use_sliding_window"))),
                       rope_theta=_rope_theta(hf, 1e4), attn_bias=bool(hf.get("qkv_bias", True)),
                       first_dense_layers=fdl, moe_every=every, dense_layers=extra_dense,
                       moe=MoEConfig(**moe, d_hidden=hf["moe_intermediate_size"], shared_d_hidden=shared,
                                     shared_gate=shared > 0, normalize=bool(hf.get("norm_topk_prob", False))))


def _layout(moe_layers: list[int], n_layers: int) -> tuple[int, int, tuple[int, ...]]:
    """(first_dense_layers, moe_every, dense_layers) giving exactly this set of MoE layers, with as few
    `dense_layers` exceptions as possible (none when the layout is 'first k dense, then every n-th')."""
    want = set(moe_layers)
    best: tuple[int, int, tuple[int, ...]] | None = None
    for fdl in range(n_layers + 1):
        for every in range(1, n_layers + 1):
            rule = set(range(fdl + every - 1, n_layers, every))
            if want <= rule and (best is None or len(rule - want) < len(best[2])):
                best = fdl, every, tuple(sorted(rule - want))
                if not best[2]:
                    return best
    assert best is not None  # fdl=0, every=1 makes every layer MoE, a superset of any layout
    return best


def _deepseek(hf: dict[str, Any]) -> DeepSeekConfig:
    heads = hf["num_attention_heads"]
    _need((hf.get("num_key_value_heads") or heads) == heads, "DeepSeek-V3 MLA needs num_key_value_heads == "
                                                              "num_attention_heads")
    _need(hf.get("hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')!r} is not supported")
    _need(hf.get("scoring_func", "sigmoid") == "sigmoid", f"scoring_func={hf.get('scoring_func')!r}: DeepSeek-V3 "
                                                         "routing in HF is sigmoid")
    _need(hf.get("moe_layer_freq", 1) == 1, "moe_layer_freq != 1 is not supported")
    inter = hf["moe_intermediate_size"]
    theta, yarn = _rope(hf, 1e4, yarn_ok=True)
    moe = MoEConfig(d_model=hf["hidden_size"], d_hidden=inter, num_experts=hf["n_routed_experts"],
                    top_k=hf["num_experts_per_tok"], router="deepseek", score_func="sigmoid",
                    n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
                    routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                    normalize=bool(hf.get("norm_topk_prob", True)), shared_d_hidden=inter * (hf.get("n_shared_experts")
                                                                                           or 0),
                    # DeepSeek-V3 paper: sequence-wise balance loss alpha = 1e-4, bias update speed gamma = 1e-3
                    aux_loss_coef=1e-4, bias_update_rate=1e-3)
    return DeepSeekConfig(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                          n_heads=heads, q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
                          qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
                          v_head_dim=hf["v_head_dim"], max_seq_len=_max_len(hf, False),
                          rope_theta=theta, rope_scaling=yarn, rope_interleave=bool(hf.get("rope_interleave", True)),
                          norm_eps=hf.get("rms_norm_eps", 1e-6), ffn_hidden=hf["intermediate_size"], moe=moe,
                          first_dense_layers=hf.get("first_k_dense_replace") or 0,
                          tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                          attn_bias=bool(hf.get("attention_bias", False)), init_std=hf.get("initializer_range", 0.02))


def _switch(hf: dict[str, Any]) -> SwitchConfig:
    n_enc = hf["num_layers"]
    n_dec = hf.get("num_decoder_layers") or n_enc
    act = hf.get("dense_act_fn", "relu")
    _need(act in ("relu", "gelu"), f"Switch dense_act_fn={act!r} is not supported (relu or gelu)")
    _need(not hf.get("router_ignore_padding_tokens", False), "router_ignore_padding_tokens=True is not supported")

    def step(n: int, sparse: int) -> int:  # HF recomputes the step from the sparse-layer count, so do we
        return n // sparse if sparse > 0 else n

    return SwitchConfig(vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], n_heads=hf["num_heads"],
                        d_ff=hf["d_ff"], n_encoder_layers=n_enc, n_decoder_layers=n_dec,
                        encoder_sparse_step=step(n_enc, hf.get("num_sparse_encoder_layers", 3)),
                        decoder_sparse_step=step(n_dec, hf.get("num_sparse_decoder_layers", 3)),
                        num_experts=hf["num_experts"], expert_capacity=hf["expert_capacity"],
                        relative_buckets=hf.get("relative_attention_num_buckets", 32),
                        relative_max_distance=hf.get("relative_attention_max_distance", 128),
                        norm_eps=hf.get("layer_norm_epsilon", 1e-6), activation=act,
                        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                        router_jitter=float(hf.get("router_jitter_noise", 0.01)),
                        router_bias=bool(hf.get("router_bias", False)),
                        aux_loss_coef=hf.get("router_aux_loss_coef", 1e-3), z_loss_coef=hf.get("router_z_loss_coef", 1e-3),
                        decoder_start_token_id=int(hf.get("decoder_start_token_id") or hf.get("pad_token_id") or 0))


def config_from_hf(hf: dict[str, Any]) -> tuple[str, AnyConfig]:
    """(arch, moeflow config) for an HF config dict."""
    arch = arch_of(hf)
    if arch == "deepseek_v3":
        return arch, _deepseek(hf)
    if arch == "switch_transformers":
        return arch, _switch(hf)
    return arch, _llama_family(arch, hf)


def build_model(arch: str, cfg: AnyConfig) -> nn.Module:
    """The moeflow model class for an architecture, built from its config."""
    if arch == "deepseek_v3":
        assert isinstance(cfg, DeepSeekConfig)
        return DeepSeekV3(cfg)
    if arch == "switch_transformers":
        assert isinstance(cfg, SwitchConfig)
        return SwitchTransformer(cfg)
    assert isinstance(cfg, ModelConfig)
    return MoETransformer(cfg)


def config_dict(cfg: AnyConfig) -> dict[str, Any]:
    """JSON-able dict of a moeflow config."""
    return cfg.to_dict()


def config_from_dict(arch: str, d: dict[str, Any]) -> AnyConfig:
    """Inverse of config_dict for the architecture's config class."""
    cls = {"deepseek_v3": DeepSeekConfig, "switch_transformers": SwitchConfig}.get(arch, ModelConfig)
    return cls.from_dict(d)


# ------------------------------------------------------------------------------------ moeflow -> HF
def _problems(arch: str, cfg: AnyConfig) -> list[str]:
    """Why `cfg` cannot be written as an HF `arch` model (empty: it can, exactly)."""
    want = {"deepseek_v3": DeepSeekConfig, "switch_transformers": SwitchConfig}.get(arch, ModelConfig)
    if not isinstance(cfg, want):
        return [f"a {type(cfg).__name__} model cannot be saved as {arch}"]
    if isinstance(cfg, SwitchConfig):
        return [] if cfg.activation in ("relu", "gelu") else [f"activation {cfg.activation!r}"]
    moe = cfg.moe
    if moe is None:
        return ["a dense model (moe=None) has no MoE architecture in HF"]
    out = []
    router = "deepseek" if arch == "deepseek_v3" else "topk"
    checks = [(moe.router == router, f"router {moe.router!r} (HF {arch} routes with {router!r})"),
              (moe.activation == "swiglu", f"expert activation {moe.activation!r} (HF uses SwiGLU)"),
              (moe.capacity_factor is None, "a capacity factor (HF routing is dropless)"),
              (not moe.router_bias, "a router bias")]
    if isinstance(cfg, DeepSeekConfig):
        checks += [(moe.score_func == "sigmoid", f"score_func {moe.score_func!r}"),
                   (moe.shared_d_hidden > 0 and moe.shared_d_hidden % moe.d_hidden == 0,
                    f"shared_d_hidden={moe.shared_d_hidden} (HF needs n_shared_experts * moe_intermediate_size > 0)"),
                   (cfg.latent_norm_eps == 1e-6, "latent_norm_eps != 1e-6")]
    else:
        shared = moe.shared_d_hidden > 0
        all_moe = all(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
        checks += [(cfg.dense_activation == "swiglu", "dense activation is not SwiGLU")]
        if arch == "mixtral":
            checks += [(moe.normalize, "normalize=False (Mixtral renormalises the top-k weights)"),
                       (not shared, "shared experts"), (not cfg.qk_norm, "qk_norm"), (not cfg.attn_bias, "attn_bias"),
                       (all_moe, "dense layers")]
        elif arch == "olmoe":
            checks += [(cfg.qk_norm, "no qk_norm (OLMoE normalises q and k)"), (not shared, "shared experts"),
                       (not cfg.attn_bias, "attn_bias"), (all_moe, "dense layers")]
        else:
            checks += [(shared and moe.shared_gate, "no gated shared expert (Qwen2-MoE always has one)"),
                       (not cfg.qk_norm, "qk_norm")]
    out += [msg for ok, msg in checks if not ok]
    return out


def arch_of_model(model: nn.Module) -> str:
    """The HF architecture a moeflow model can be saved as exactly (first match), or an error saying why none fits."""
    if isinstance(model, DeepSeekV3):
        candidates = ["deepseek_v3"]
    elif isinstance(model, SwitchTransformer):
        candidates = ["switch_transformers"]
    elif isinstance(model, MoETransformer):
        candidates = ["mixtral", "olmoe", "qwen2_moe"]
    else:
        raise ConfigError(f"{type(model).__name__} is not a model moeflow can save in HF format")
    reasons = {a: _problems(a, model.cfg) for a in candidates}
    for a, why in reasons.items():
        if not why:
            return a
    raise ConfigError("this model matches no HF architecture exactly: "
                      + "; ".join(f"{a}: {', '.join(w)}" for a, w in reasons.items()))


def _sparse_count(n_layers: int, step: int) -> int:
    """num_sparse_*_layers such that HF's `n_layers // count` (or n_layers for 0) gives back `step`."""
    for count in range(n_layers + 1):
        if (n_layers // count if count else n_layers) == step:
            return count
    raise ConfigError(f"sparse step {step} over {n_layers} layers cannot be written as HF num_sparse_*_layers")


def config_to_hf(arch: str, cfg: AnyConfig, base: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """HF config.json dict for `cfg`; fields of `base` (the config it was loaded from) that moeflow does not model
    (token ids, generation settings) are kept."""
    why = _problems(arch, cfg)
    if why:
        raise ConfigError(f"cannot save as {arch}: {', '.join(why)}")
    out = {k: v for k, v in (base or {}).items()
           if k not in ("rope_theta", "rope_scaling", "torch_dtype", "transformers_version", "_name_or_path")}
    out.update(architectures=[HF_CLASSES[arch]], model_type=arch,
               dtype={v: k for k, v in DTYPES.items()}[dtype], vocab_size=cfg.vocab_size)
    if isinstance(cfg, SwitchConfig):
        out.update(d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_heads=cfg.n_heads,
                   num_layers=cfg.n_encoder_layers, num_decoder_layers=cfg.n_decoder_layers,
                   num_sparse_encoder_layers=_sparse_count(cfg.n_encoder_layers, cfg.encoder_sparse_step),
                   num_sparse_decoder_layers=_sparse_count(cfg.n_decoder_layers, cfg.decoder_sparse_step),
                   encoder_sparse_step=cfg.encoder_sparse_step, decoder_sparse_step=cfg.decoder_sparse_step,
                   num_experts=cfg.num_experts, expert_capacity=cfg.expert_capacity, router_bias=cfg.router_bias,
                   router_jitter_noise=cfg.router_jitter, relative_attention_num_buckets=cfg.relative_buckets,
                   relative_attention_max_distance=cfg.relative_max_distance, layer_norm_epsilon=cfg.norm_eps,
                   dense_act_fn=cfg.activation, tie_word_embeddings=cfg.tie_embeddings,
                   router_aux_loss_coef=cfg.aux_loss_coef, router_z_loss_coef=cfg.z_loss_coef,
                   decoder_start_token_id=cfg.decoder_start_token_id, is_encoder_decoder=True,
                   router_ignore_padding_tokens=False)
        out.setdefault("pad_token_id", cfg.decoder_start_token_id)
        return out
    moe = cfg.moe
    assert moe is not None
    base_len = _max_len(base, arch != "olmoe") if base and "max_position_embeddings" in base else None
    if base_len != cfg.max_seq_len:
        out.update(max_position_embeddings=cfg.max_seq_len, sliding_window=None, use_sliding_window=False)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if isinstance(cfg, DeepSeekConfig) and cfg.rope_scaling:
        rope = {**cfg.rope_scaling, "rope_type": "yarn", "rope_theta": cfg.rope_theta}
    out.update(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
               rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
               hidden_act="silu", rope_parameters=rope, num_experts_per_tok=moe.top_k,
               intermediate_size=cfg.ffn_hidden, norm_topk_prob=bool(moe.normalize))
    if isinstance(cfg, DeepSeekConfig):
        out.update(num_key_value_heads=cfg.n_heads, n_routed_experts=moe.num_experts, moe_intermediate_size=moe.d_hidden,
                   n_shared_experts=moe.shared_d_hidden // moe.d_hidden, routed_scaling_factor=moe.routed_scaling_factor,
                   n_group=moe.n_group, topk_group=moe.topk_group, first_k_dense_replace=cfg.first_dense_layers,
                   q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                   qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                   rope_interleave=cfg.rope_interleave, attention_bias=cfg.attn_bias,
                   num_nextn_predict_layers=0)  # moeflow keeps no multi-token-prediction layers
        return out
    out.update(num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, router_aux_loss_coef=moe.aux_loss_coef)
    if arch == "mixtral":
        out.update(num_local_experts=moe.num_experts, intermediate_size=moe.d_hidden,
                   router_jitter_noise=moe.jitter_eps)
    elif arch == "olmoe":
        out.update(num_experts=moe.num_experts, intermediate_size=moe.d_hidden, clip_qkv=None, attention_bias=False)
    else:
        # decoder_sparse_step=1 with the dense layers listed writes any layout exactly
        out.update(num_experts=moe.num_experts, moe_intermediate_size=moe.d_hidden,
                   shared_expert_intermediate_size=moe.shared_d_hidden, qkv_bias=cfg.attn_bias, decoder_sparse_step=1,
                   mlp_only_layers=[i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)])
    return out
