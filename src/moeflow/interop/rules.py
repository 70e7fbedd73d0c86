"""Declarative key rules between Hugging Face checkpoints and moeflow parameters, one table per architecture.

A `Rule` pairs an HF key template with a moeflow parameter template. `{i}` (layer), `{s}` (stack) are shared
fields; `{e}` appears in the HF key only and indexes the first dimension of a stacked moeflow tensor [E, ...];
`part` takes the first ("gate") or second ("up") half of the rows of a gated input projection, whose rows are
stored gate-then-up in moeflow. The same table drives loading (HF key -> slice to fill) and saving (moeflow
parameter -> HF keys), so the two directions cannot drift apart.

HF names are those `save_pretrained` writes in transformers 5.x (per-expert keys; the legacy layout that
checkpoints on the Hub use), e.g. Mixtral's `block_sparse_moe.experts.{e}.w1.weight`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class Rule:
    """One HF key template <-> one moeflow parameter template (optionally one expert / one half of it)."""

    hf: str
    ours: str
    part: str | None = None  # "gate" | "up": rows [:H] | [H:] of a gated w_in


@dataclass(frozen=True)
class Slot:
    """Where one HF tensor lives in the moeflow model: a parameter, optionally one expert and one half."""

    name: str
    expert: int | None = None
    part: str | None = None


_FIELD = {"i": r"\d+", "e": r"\d+", "s": r"[a-z]+"}


def _regex(template: str) -> re.Pattern[str]:
    """Template with {field}s -> anchored regex with named groups."""
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out += re.escape(template[pos:m.start()]) + f"(?P<{m.group(1)}>{_FIELD[m.group(1)]})"
        pos = m.end()
    return re.compile(out + re.escape(template[pos:]) + "$")


# ------------------------------------------------------------------------------------ Llama-family decoders
def _decoder_outer() -> list[Rule]:
    return [
        Rule("model.embed_tokens.weight", "tok_embeddings.weight"),
        Rule("model.norm.weight", "norm.weight"),
        Rule("lm_head.weight", "output.weight"),
        Rule("model.layers.{i}.input_layernorm.weight", "layers.{i}.attention_norm.weight"),
        Rule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    ]


def _gqa() -> list[Rule]:
    rules = []
    for hf, ours in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
        for kind in ("weight", "bias"):
            rules.append(Rule(f"model.layers.{{i}}.self_attn.{hf}.{kind}", f"layers.{{i}}.attention.{ours}.{kind}"))
    for n in ("q_norm", "k_norm"):
        rules.append(Rule(f"model.layers.{{i}}.self_attn.{n}.weight", f"layers.{{i}}.attention.{n}.weight"))
    return rules


def _swiglu(hf_prefix: str, ours_prefix: str, gate: str = "gate_proj", up: str = "up_proj",
            down: str = "down_proj") -> list[Rule]:
    """gate/up/down projections of one gated FFN (or of expert {e} when the prefix has {e})."""
    return [Rule(f"{hf_prefix}.{gate}.weight", f"{ours_prefix}.w_in", "gate"),
            Rule(f"{hf_prefix}.{up}.weight", f"{ours_prefix}.w_in", "up"),
            Rule(f"{hf_prefix}.{down}.weight", f"{ours_prefix}.w_out")]


_DENSE = _swiglu("model.layers.{i}.mlp", "layers.{i}.ffn")

MIXTRAL = [*_decoder_outer(), *_gqa(),
           Rule("model.layers.{i}.block_sparse_moe.gate.weight", "layers.{i}.ffn.router.weight"),
           *_swiglu("model.layers.{i}.block_sparse_moe.experts.{e}", "layers.{i}.ffn.experts", "w1", "w3", "w2"),
           *_DENSE]

OLMOE = [*_decoder_outer(), *_gqa(),
         Rule("model.layers.{i}.mlp.gate.weight", "layers.{i}.ffn.router.weight"),
         *_swiglu("model.layers.{i}.mlp.experts.{e}", "layers.{i}.ffn.experts"),
         *_DENSE]

QWEN2_MOE = [*OLMOE,
             *_swiglu("model.layers.{i}.mlp.shared_expert", "layers.{i}.ffn.shared"),
             Rule("model.layers.{i}.mlp.shared_expert_gate.weight", "layers.{i}.ffn.shared_gate.weight")]

DEEPSEEK_V3 = [*_decoder_outer(),
               Rule("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attention.wq.weight"),
               Rule("model.layers.{i}.self_attn.q_a_proj.weight", "layers.{i}.attention.wq_a.weight"),
               Rule("model.layers.{i}.self_attn.q_a_proj.bias", "layers.{i}.attention.wq_a.bias"),
               Rule("model.layers.{i}.self_attn.q_a_layernorm.weight", "layers.{i}.attention.q_norm.weight"),
               Rule("model.layers.{i}.self_attn.q_b_proj.weight", "layers.{i}.attention.wq_b.weight"),
               Rule("model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight", "layers.{i}.attention.wkv_a.weight"),
               Rule("model.layers.{i}.self_attn.kv_a_proj_with_mqa.bias", "layers.{i}.attention.wkv_a.bias"),
               Rule("model.layers.{i}.self_attn.kv_a_layernorm.weight", "layers.{i}.attention.kv_norm.weight"),
               Rule("model.layers.{i}.self_attn.kv_b_proj.weight", "layers.{i}.attention.wkv_b.weight"),
               Rule("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attention.wo.weight"),
               Rule("model.layers.{i}.self_attn.o_proj.bias", "layers.{i}.attention.wo.bias"),
               Rule("model.layers.{i}.mlp.gate.weight", "layers.{i}.ffn.router.weight"),
               Rule("model.layers.{i}.mlp.gate.e_score_correction_bias",
                    "layers.{i}.ffn.router.e_score_correction_bias"),
               *_swiglu("model.layers.{i}.mlp.experts.{e}", "layers.{i}.ffn.experts"),
               *_swiglu("model.layers.{i}.mlp.shared_experts", "layers.{i}.ffn.shared"),
               *_DENSE]


# ------------------------------------------------------------------------------------ Switch Transformers
def _switch_stack(stack: str, ff: int) -> list[Rule]:
    """One stack; the FFN sub-layer index is 1 in the encoder and 2 in the decoder (after cross-attention)."""
    hb, ob = f"{stack}.block.{{i}}.layer", f"{stack}.blocks.{{i}}"
    rules = [Rule(f"{stack}.embed_tokens.weight", f"{stack}.embed_tokens.weight"),  # only when untied
             Rule(f"{stack}.final_layer_norm.weight", f"{stack}.norm.weight"),
             Rule(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", f"{stack}.rel_bias.weight"),
             Rule(f"{hb}.0.layer_norm.weight", f"{ob}.attention_norm.weight"),
             Rule(f"{hb}.{ff}.layer_norm.weight", f"{ob}.ffn_norm.weight"),
             Rule(f"{hb}.{ff}.mlp.wi.weight", f"{ob}.ffn.w_in"),
             Rule(f"{hb}.{ff}.mlp.wo.weight", f"{ob}.ffn.w_out"),
             Rule(f"{hb}.{ff}.mlp.router.classifier.weight", f"{ob}.ffn.router.weight"),
             Rule(f"{hb}.{ff}.mlp.router.classifier.bias", f"{ob}.ffn.router.bias"),
             Rule(f"{hb}.{ff}.mlp.experts.expert_{{e}}.wi.weight", f"{ob}.ffn.experts.w_in"),
             Rule(f"{hb}.{ff}.mlp.experts.expert_{{e}}.wo.weight", f"{ob}.ffn.experts.w_out")]
    attn = [("0.SelfAttention", "attention")] + ([("1.EncDecAttention", "cross_attention")] if ff == 2 else [])
    for hf_att, ours_att in attn:
        for w in "qkvo":
            rules.append(Rule(f"{hb}.{hf_att}.{w}.weight", f"{ob}.{ours_att}.w{w}.weight"))
    if ff == 2:
        rules.append(Rule(f"{hb}.1.layer_norm.weight", f"{ob}.cross_norm.weight"))
    return rules


SWITCH = [Rule("shared.weight", "shared.weight"), Rule("lm_head.weight", "output.weight"),
          *_switch_stack("encoder", 1), *_switch_stack("decoder", 2)]

RULES: dict[str, list[Rule]] = {"mixtral": MIXTRAL, "qwen2_moe": QWEN2_MOE, "olmoe": OLMOE,
                                "deepseek_v3": DEEPSEEK_V3, "switch_transformers": SWITCH}

# keys some checkpoints carry that a model does not need: cached rotary tables, copies of the shared embedding
# in a tied Switch model (untied, those keys are expected and loaded); DeepSeek's multi-token-prediction layers
# are recognised in check_keys, which knows the layer count
IGNORED = [re.compile(p) for p in (r".*rotary_emb\.inv_freq$", r"^(encoder|decoder)\.embed_tokens\.weight$")]


# ------------------------------------------------------------------------------------ plans
def unique_state(model: nn.Module) -> dict[str, Tensor]:
    """state_dict entries in order, each tensor once (a tied output head is skipped: its key is not saved)."""
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t
    return out


def plan(model: nn.Module, arch: str) -> dict[str, Slot]:
    """Every HF key the model's weights map to, in the model's parameter order, with its slot.

    Raises if a moeflow tensor has no rule (it could be neither loaded nor exported).
    """
    rules = [(r, _regex(r.ours)) for r in RULES[arch]]
    out: dict[str, Slot] = {}
    for name, t in unique_state(model).items():
        hits = [(r, m) for r, rx in rules if (m := rx.match(name))]
        if not hits:
            raise KeyError(f"no {arch} checkpoint key maps to moeflow tensor {name!r}; this model has a part the "
                           f"Hugging Face {arch} architecture does not have")
        for r, m in hits:
            fields = m.groupdict()
            if "{e}" in r.hf:
                for e in range(t.shape[0]):
                    out[r.hf.format(e=e, **fields)] = Slot(name, e, r.part)
            else:
                out[r.hf.format(**fields)] = Slot(name, None, r.part)
    return out


def slot_view(t: Tensor, slot: Slot) -> Tensor:
    """The part of tensor `t` that one HF tensor fills (a view: copying into it writes the parameter)."""
    if slot.expert is not None:
        t = t[slot.expert]
    if slot.part is not None:
        h = t.shape[0] // 2
        t = t[:h] if slot.part == "gate" else t[h:]
    return t


def check_keys(expected: dict[str, Slot], found: set[str], arch: str, where: str, n_layers: int) -> None:
    """Raise naming the missing tensors (and any key no rule explains); DeepSeek MTP layers are allowed extras."""
    missing = [k for k in expected if k not in found]
    extra = sorted(k for k in found - set(expected) if not any(p.match(k) for p in IGNORED)
                   and not _is_mtp_layer(k, arch, n_layers))
    msgs = []
    if missing:
        msgs.append(f"{len(missing)} tensor(s) the {arch} model needs are missing from {where}: "
                    f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if extra:
        msgs.append(f"{len(extra)} tensor(s) in {where} match no {arch} rule (a different architecture or a "
                    f"config.json that does not match the weights?): {', '.join(extra[:8])}"
                    f"{' ...' if len(extra) > 8 else ''}")
    if msgs:
        raise KeyError("; ".join(msgs))


def _is_mtp_layer(key: str, arch: str, n_layers: int) -> bool:
    """DeepSeek-V3 checkpoints append multi-token-prediction layers after the last decoder layer; moeflow skips them."""
    m = re.match(r"model\.layers\.(\d+)\.", key)
    return arch == "deepseek_v3" and m is not None and int(m.group(1)) >= n_layers


__all__ = ["Rule", "Slot", "RULES", "IGNORED", "plan", "slot_view", "check_keys", "unique_state"]
