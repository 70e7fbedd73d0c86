"""Qwen2-MoE layer layouts beyond 'first k dense, then every n-th' (ModelConfig.dense_layers): load with logits
parity, export back exactly; and ModelConfig's validation of dense_layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_hf_common import hf_logits, ours_logits, save_hf_model, token_batch

import moeflow
from moeflow.config import ConfigError, MoEConfig
from moeflow.interop.hf_config import _layout, config_from_hf
from moeflow.models import ModelConfig, MoETransformer

pytestmark = pytest.mark.hf

# (num_hidden_layers, decoder_sparse_step, mlp_only_layers) -> layers HF makes MoE, and the moeflow config for it
LAYOUTS = [
    ((4, 1, [1]), [0, 2, 3], (0, 1, (1,))),  # one dense layer in the middle
    ((6, 2, [3]), [1, 5], (0, 2, (3,))),  # every other layer, minus one
    ((5, 1, [0, 2, 3]), [1, 4], (1, 1, (2, 3))),  # no rule fits: the one needing the fewest exceptions
    ((4, 1, [0]), [1, 2, 3], (1, 1, ())),  # expressible by the rule: no exceptions
]


@pytest.mark.parametrize("layout,moe_layers,expected", LAYOUTS)
def test_layout_mapping_is_exact_and_minimal(layout: tuple, moe_layers: list[int], expected: tuple) -> None:
    n, step, dense = layout
    assert _layout(moe_layers, n) == expected
    fdl, every, extra = expected
    cfg = ModelConfig(n_layers=n, first_dense_layers=fdl, moe_every=every, dense_layers=extra,
                      moe=MoEConfig(d_model=128, d_hidden=16, num_experts=4, top_k=2))
    assert [i for i in range(n) if cfg.is_moe_layer(i)] == moe_layers
    assert moe_layers == [i for i in range(n) if i not in dense and (i + 1) % step == 0]  # HF's rule, as a check


@pytest.mark.parametrize("layers,step,mlp_only", [(4, 1, [1]), (6, 2, [3])])
def test_qwen2_layout_loads_and_round_trips(layers: int, step: int, mlp_only: list[int], tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = save_hf_model("qwen2_moe", tmp_path / "hf", num_hidden_layers=layers, decoder_sparse_step=step,
                       mlp_only_layers=mlp_only, layer_types=["full_attention"] * layers)
    hf_moe = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "gate")]
    ours = moeflow.load_hf(tmp_path / "hf")
    assert ours.cfg.dense_layers  # the layout needs the exceptions
    assert [i for i, layer in enumerate(ours.layers) if isinstance(layer.ffn, moeflow.MoELayer)] == hf_moe
    ids, _ = token_batch("qwen2_moe")
    want = hf_logits(hf, ids)
    assert (ours_logits(ours, ids) - want).abs().max().item() <= 1e-4
    moeflow.save_hf(ours, tmp_path / "back")
    saved = json.loads((tmp_path / "back" / "config.json").read_text())
    assert saved["decoder_sparse_step"] == 1
    assert saved["mlp_only_layers"] == [i for i in range(layers) if i not in hf_moe]
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.equal(hf_logits(back.eval(), ids), want)
    assert config_from_hf(saved)[1] == ours.cfg  # and it loads back as the same moeflow config


def test_dense_layers_refused_by_mixtral_export(tmp_path: Path) -> None:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64,
                      dense_layers=[1], moe=MoEConfig(d_model=32, d_hidden=16, num_experts=4, top_k=2))
    with pytest.raises(ConfigError, match="mixtral: .*dense layers"):
        moeflow.save_hf(MoETransformer(cfg), tmp_path, arch="mixtral")


def test_model_config_dense_layers() -> None:
    moe = MoEConfig(d_model=32, d_hidden=16, num_experts=4, top_k=2)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=5, n_heads=4, n_kv_heads=2, ffn_hidden=24, moe=moe,
                      moe_every=2, dense_layers=[3, 0])
    assert cfg.dense_layers == (0, 3)  # canonical: sorted tuple
    assert [cfg.is_moe_layer(i) for i in range(5)] == [False, True, False, False, False]
    model = MoETransformer(cfg)
    assert [isinstance(layer.ffn, moeflow.MoELayer) for layer in model.layers] == [False, True, False, False, False]
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "dense_layers"}).dense_layers == ()
    for bad, msg in [([5], r"dense_layers \[5\] are not layer indices in \[0, n_layers=5\)"),
                     ([-1, 2], r"dense_layers \[-1\] are not layer indices"),
                     ([True], r"dense_layers \[True\] are not layer indices"),
                     (["1"], r"dense_layers \['1'\] are not layer indices"),
                     ([1, 2, 1], r"dense_layers \[1, 2, 1\] lists a layer more than once"),
                     (3, "dense_layers must be a list of layer indices, got 3")]:
        with pytest.raises(ConfigError, match=msg):
            cfg.replace(dense_layers=bad)
    with pytest.raises(ConfigError, match="not layer indices"):
        cfg.replace(n_layers=3)  # layer 3 no longer exists
