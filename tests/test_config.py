"""Configs: validation errors name the field at fault and its range; router defaults resolve to each paper's values;
every config class round-trips through a dict and rejects an unknown key, at any depth, by its name."""

from __future__ import annotations

import pytest

from moeflow import ROUTERS, ConfigError, MoEConfig, build_router
from moeflow.config import ROUTER_NAMES

BASE = {"d_model": 8, "d_hidden": 16}

# (bad fields, a regex the message must match: the field name and, where useful, the fix)
INVALID = [
    (dict(top_k=9, num_experts=8), r"top_k=9 exceeds num_experts=8"),
    (dict(capacity_factor=0.0), r"capacity_factor must be a finite number > 0 \(or None for dropless\)"),
    (dict(capacity_factor=-1.25), r"capacity_factor must be a finite number > 0 \(or None for dropless\)"),
    (dict(capacity_factor=float("nan")), r"capacity_factor must be a finite number > 0 \(or None for dropless\)"),
    (dict(capacity_factor=float("inf")), r"capacity_factor must be a finite number > 0 \(or None for dropless\)"),
    (dict(capacity_factor="1.0"), r"capacity_factor must be a finite number > 0 \(or None for dropless\)"),
    (dict(capacity_factor=True), r"capacity_factor must be a finite number > 0 \(or None for dropless\)"),
    (dict(router="mixtral"), r"router='mixtral' is unknown; choose one of .*topk"),
    (dict(router="switch", top_k=2), r"router='switch'.*set top_k=1"),
    (dict(router="gshard", top_k=1), r"router='gshard'.*set top_k=2"),
    (dict(activation="tanh"), r"activation='tanh' is unknown"),
    (dict(drop_policy="random"), r"drop_policy='random' is unknown; choose one of position, probs"),
    (dict(expert_impl="cuda"), r"expert_impl='cuda' is unknown"),
    (dict(d_model=0), r"d_model must be a positive integer"),
    (dict(d_hidden=2.5), r"d_hidden must be a positive integer"),
    (dict(num_experts=0, top_k=1), r"num_experts must be a positive integer"),
    (dict(top_k=0), r"top_k must be a positive integer"),
    (dict(top_k=True), r"top_k must be a positive integer"),
    (dict(num_groups=0), r"num_groups must be a positive integer"),
    (dict(min_capacity=-1), r"min_capacity must be an integer >= 0"),
    (dict(min_capacity=1.5), r"min_capacity must be an integer >= 0"),
    (dict(aux_loss_coef=-0.1), r"aux_loss_coef must be a finite number >= 0"),
    (dict(aux_loss_coef=float("nan")), r"aux_loss_coef must be a finite number >= 0"),
    (dict(importance_coef=-1.0), r"importance_coef must be a finite number >= 0"),
    (dict(load_coef=float("inf")), r"load_coef must be a finite number >= 0"),
    (dict(z_loss_coef=-1e-3), r"z_loss_coef must be a finite number >= 0"),
    (dict(jitter_eps=1.0), r"jitter_eps must be in \[0, 1\)"),
    (dict(jitter_eps=-0.1), r"jitter_eps must be in \[0, 1\)"),
    (dict(score_func="relu"), r"score_func must be 'softmax' or 'sigmoid'"),
    (dict(shared_d_hidden=-4), r"shared_d_hidden must be an integer >= 0"),
]


@pytest.mark.parametrize("fields, message", INVALID, ids=[m.split()[0].strip("r'\\") for _, m in INVALID])
def test_invalid_values_raise_config_error_naming_the_field(fields, message) -> None:
    """Each bad value raises ConfigError (a ValueError) whose message names the field."""
    with pytest.raises(ConfigError, match=message):
        MoEConfig(**{**BASE, **fields})
    assert issubclass(ConfigError, ValueError)


def test_unknown_field_and_positional_arguments_are_rejected() -> None:
    """The dataclass is keyword-only and has no catch-all: a typo is an error, not a silently ignored option."""
    with pytest.raises(TypeError, match="capacity_fact"):
        MoEConfig(**BASE, capacity_fact=1.0)
    with pytest.raises(TypeError):
        MoEConfig(8, 16)  # type: ignore[misc]


def test_replace_validates_again() -> None:
    """cfg.replace(...) returns a validated copy and leaves the original alone."""
    cfg = MoEConfig(**BASE, top_k=2)
    assert cfg.replace(top_k=1).top_k == 1 and cfg.top_k == 2
    with pytest.raises(ConfigError, match="top_k=99 exceeds"):
        cfg.replace(top_k=99)


@pytest.mark.parametrize("router, k, jitter, z, normalize", [
    ("topk", 2, 0.0, 0.0, True),
    ("switch", 1, 1e-2, 1e-3, False),
    ("gshard", 2, 0.0, 0.0, True),
    ("noisy_topk", 2, 0.0, 0.0, False),
    ("expert_choice", 2, 0.0, 0.0, False),
])
def test_router_defaults_follow_the_papers(router, k, jitter, z, normalize) -> None:
    """Fields left as None resolve per router: Switch gets jitter 1e-2 and z-loss 1e-3; Mixtral-style top-k and
    GShard renormalise; explicit values are kept."""
    cfg = MoEConfig(**BASE, router=router, top_k=k)
    assert (cfg.jitter_eps, cfg.z_loss_coef, cfg.normalize) == (jitter, z, normalize)
    assert cfg.capacity_factor is None and cfg.drop_policy == "position" and cfg.num_groups == 1
    explicit = MoEConfig(**BASE, router=router, top_k=k, jitter_eps=0.5, z_loss_coef=0.25, normalize=False)
    assert (explicit.jitter_eps, explicit.z_loss_coef, explicit.normalize) == (0.5, 0.25, False)


def test_every_accepted_router_name_can_be_built() -> None:
    """The names MoEConfig accepts and the ROUTERS registry agree, so a valid config always builds a router."""
    assert set(ROUTER_NAMES) == set(ROUTERS)
    for name in ("topk", "switch", "gshard", "noisy_topk", "expert_choice"):
        k = 1 if name == "switch" else 2
        router = build_router(MoEConfig(**BASE, router=name, top_k=k))
        assert isinstance(router, ROUTERS[name]) and tuple(router.weight.shape) == (8, 8)


# ------------------------------------------------------------------------------------------- every config class
def _config_instances() -> dict[str, object]:
    """One valid instance of every config class, nested ones included."""
    from moeflow.models import MODEL_PRESETS
    from moeflow.models.deepseek import DeepSeekConfig
    from moeflow.models.seq2seq import Seq2SeqConfig
    from moeflow.models.switch_t5 import SwitchConfig
    from moeflow.tasks.translate import translate_preset
    from moeflow.train.config import DataConfig, TrainConfig, get_preset

    moe = MoEConfig(d_model=16, d_hidden=8, num_experts=4, top_k=2, router="deepseek")
    return {
        "MoEConfig": MoEConfig(**BASE),
        "ModelConfig": MODEL_PRESETS["tiny"](),
        "DeepSeekConfig": DeepSeekConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, kv_lora_rank=8,
                                         qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, ffn_hidden=32,
                                         first_dense_layers=1, moe=moe),
        "Seq2SeqConfig": Seq2SeqConfig(vocab_size=20, d_model=16, n_heads=2, moe=moe.replace(router="topk")),
        "SwitchConfig": SwitchConfig(vocab_size=20, d_model=8, d_kv=4, n_heads=2, d_ff=16, n_encoder_layers=2,
                                     n_decoder_layers=2),
        "TranslateConfig": translate_preset("tiny"),
        "RunConfig": get_preset("tiny"),
        "TrainConfig": TrainConfig(),
        "DataConfig": DataConfig(),
    }


CONFIGS = _config_instances()
# (class, dotted path of a nested config inside it, a real key there): the typo must be reported at its place
NESTED = [("ModelConfig", "moe", "top_k"), ("DeepSeekConfig", "moe", "n_group"), ("Seq2SeqConfig", "moe", "top_k"),
          ("TranslateConfig", "model", "moe_every"), ("TranslateConfig", "model.moe", "capacity_factor"),
          ("RunConfig", "model.moe", "num_experts"), ("RunConfig", "train", "warmup"),
          ("RunConfig", "data", "val_fraction")]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_config_round_trips_and_rejects_an_unknown_key_by_name(name: str) -> None:
    """to_dict is JSON-able and from_dict inverts it; an unknown key fails with its name, the class and the
    closest real key (a typo is never silently ignored)."""
    import json

    cfg = CONFIGS[name]
    d = cfg.to_dict()
    assert type(cfg).from_dict(json.loads(json.dumps(d))) == cfg
    real = next(iter(d))
    typo = real[:-1]  # e.g. vocab_siz
    with pytest.raises(ConfigError, match=rf"unknown key\(s\) in {name}: {typo} \(did you mean {real}\b"):
        type(cfg).from_dict({**d, typo: 1})
    with pytest.raises(ConfigError, match=rf"unknown key\(s\) in {name}: zzz_not_a_field; known keys: "):
        type(cfg).from_dict({**d, "zzz_not_a_field": 1})


@pytest.mark.parametrize("name, path, real", NESTED, ids=[f"{n}.{p}" for n, p, _ in NESTED])
def test_nested_unknown_keys_are_named_at_their_dotted_place(name: str, path: str, real: str) -> None:
    cfg = CONFIGS[name]
    d = cfg.to_dict()
    node = d
    for part in path.split("."):
        node = node[part]
    node[real + "s_"] = 1
    with pytest.raises(ConfigError, match=rf"unknown key\(s\) in {name}\.{path}: {real}s_ \(did you mean {real}\b"):
        type(cfg).from_dict(d)


def test_from_dict_names_missing_fields_and_non_mappings() -> None:
    from moeflow.models import ModelConfig

    d = CONFIGS["ModelConfig"].to_dict()
    del d["moe"]["d_hidden"]
    with pytest.raises(ConfigError, match=r"incomplete config: ModelConfig\.moe is missing required field\(s\) "
                                          r"d_hidden"):
        ModelConfig.from_dict(d)
    with pytest.raises(ConfigError, match=r"ModelConfig\.moe must be a mapping of MoEConfig fields, got int"):
        ModelConfig.from_dict({**d, "moe": 3})
    with pytest.raises(ConfigError, match=r"MoEConfig must be a mapping of field names to values, got list"):
        MoEConfig.from_dict([1, 2])


# (config, bad fields, the message: the field, its range or choices, and the value)
RANGES = [
    ("ModelConfig", dict(init_std=1e20), r"ModelConfig\.init_std must be in \(0, 1\), got 1e\+20"),
    ("ModelConfig", dict(norm_eps=0.0), r"ModelConfig\.norm_eps must be in \(0, 1\), got 0\.0"),
    ("ModelConfig", dict(first_dense_layers=9), r"ModelConfig\.first_dense_layers must be an integer in \[0, 4\]"),
    ("ModelConfig", dict(rope_theta=-1.0), r"ModelConfig\.rope_theta must be a finite number > 0, got -1\.0"),
    ("DeepSeekConfig", dict(init_std=float("nan")), r"DeepSeekConfig\.init_std must be in \(0, 1\), got nan"),
    ("DeepSeekConfig", dict(q_lora_rank=0), r"q_lora_rank must be a positive integer \(or None for one query"),
    ("SwitchConfig", dict(expert_capacity=-1), r"SwitchConfig\.expert_capacity must be an integer >= 0, got -1"),
    ("SwitchConfig", dict(activation="tanh"), r"SwitchConfig\.activation='tanh' is unknown; choose one of swiglu"),
    ("SwitchConfig", dict(router_jitter=1.0), r"SwitchConfig\.router_jitter must be in \[0, 1\), got 1\.0"),
    ("Seq2SeqConfig", dict(dropout=1.0), r"Seq2SeqConfig\.dropout must be in \[0, 1\), got 1\.0"),
    ("Seq2SeqConfig", dict(moe=MoEConfig(d_model=16, d_hidden=8, num_experts=4, top_k=1, expert_capacity=2)),
     r"Seq2SeqConfig\.moe: the MoE layers route the batch's non-padding tokens .* not expert_capacity"),
    ("Seq2SeqConfig", dict(eval_capacity_factor=0), r"eval_capacity_factor must be a finite number > 0 "
                                                    r"\(or None for dropless\), got 0"),
    ("TrainConfig", dict(lr=0.0), r"train\.lr must be a finite number > 0, got 0\.0"),
    ("TrainConfig", dict(beta2=1.0), r"train\.beta2 must be in \[0, 1\), got 1\.0"),
    ("TrainConfig", dict(min_lr_ratio=2.0), r"train\.min_lr_ratio must be in \[0, 1\], got 2\.0"),
    ("TrainConfig", dict(warmup=-1), r"train\.warmup must be an integer >= 0, got -1"),
    ("DataConfig", dict(bin_dtype="int8"), r"data\.bin_dtype='int8' is unknown; choose one of uint8, uint16"),
    ("TranslateConfig", dict(heldout_percent=100), r"TranslateConfig\.heldout_percent must be an integer in \[1, 99\]"),
    ("MoEConfig", dict(router="topkk"), r"router='topkk' is unknown; choose one of .* \(did you mean topk\?\)"),
    ("MoEConfig", dict(expert_capacity=4, capacity_factor=1.0), r"expert_capacity=4 fixes the capacity"),
    ("MoEConfig", dict(group_by_sequence=True, num_groups=2), r"group_by_sequence .* leave num_groups=1"),
    ("MoEConfig", dict(eval_capacity_factor="same"), r"eval_capacity_factor must be a finite number > 0 \(or None for "
                                                     r"dropless, or 'train' for capacity_factor\), got 'same'"),
    ("MoEConfig", dict(eval_num_groups=0), r"eval_num_groups must be a positive integer \(or None for num_groups\)"),
]


@pytest.mark.parametrize("name, fields, message", RANGES, ids=[f"{n}.{next(iter(f))}" for n, f, _ in RANGES])
def test_validators_name_the_field_its_range_and_the_value(name: str, fields: dict, message: str) -> None:
    """Every config validates with the same helpers, so every message reads the same way."""
    with pytest.raises(ConfigError, match=message):
        CONFIGS[name].replace(**fields)  # type: ignore[attr-defined]
