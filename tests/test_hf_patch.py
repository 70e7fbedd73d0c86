"""patch_hf: a live transformers model whose MoE blocks run through moeflow gives the same outputs, losses,
router logits and gradients, trains the parameters save_pretrained writes, and generates the same tokens."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_hf_common import ARCHS, hf_model, token_batch  # noqa: F401

import moeflow
from moeflow.ops.rows import ExpertRows
from moeflow.interop.patch import PatchedMoE

pytestmark = pytest.mark.hf
transformers = pytest.importorskip("transformers")


def trainable(arch: str) -> torch.nn.Module:
    """A tiny HF model in train mode with dropout and jitter off (both random, so incomparable run to run)."""
    model = hf_model(arch, router_jitter_noise=0.0, dropout_rate=0.0, attention_dropout=0.0)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.train()


def loss_and_grads(model: torch.nn.Module, arch: str) -> tuple[object, dict[str, torch.Tensor]]:
    """One forward with labels and router logits (HF adds its aux losses), backward; the output and all grads."""
    ids, _ = token_batch(arch)
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_matches_outputs_router_logits_and_grads(arch: str) -> None:
    ref = trainable(arch)
    patched = copy.deepcopy(ref)
    before = {id(p) for p in patched.parameters()}
    moeflow.patch_hf(patched)
    n_blocks = sum(isinstance(m, PatchedMoE) for m in patched.modules())
    # Qwen2 / DeepSeek have a dense first layer; Switch one sparse layer per stack
    assert n_blocks == {"mixtral": 2, "qwen2_moe": 1, "olmoe": 2, "deepseek_v3": 1, "switch_transformers": 2}[arch]
    assert {id(p) for p in patched.parameters()} == before  # aliased, not copied
    assert list(patched.state_dict()) == list(ref.state_dict())  # save_pretrained keys unchanged

    out_ref, g_ref = loss_and_grads(ref, arch)
    out_p, g_p = loss_and_grads(patched, arch)
    torch.testing.assert_close(out_p.logits, out_ref.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_p.loss, out_ref.loss, rtol=0, atol=1e-6)
    logits_key = "encoder_router_logits" if arch == "switch_transformers" else "router_logits"
    r_ref, r_p = getattr(out_ref, logits_key), getattr(out_p, logits_key)
    assert len(r_p) == len(r_ref) >= 1  # transformers' capture hooks still see the router
    for a, b in zip(r_p, r_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert g_p.keys() == g_ref.keys() and len(g_p) == len(list(ref.parameters()))
    for name in g_ref:
        torch.testing.assert_close(g_p[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    routing = next(m for m in patched.modules() if isinstance(m, PatchedMoE)).last_routing
    assert routing is not None and int(routing.tokens_per_expert.sum()) > 0


def test_unfused_activation_path() -> None:
    # tanh-GELU is not one of moeflow's fused activations: HF's own module runs between two grouped matmuls
    ref = hf_model("mixtral", hidden_act="gelu_pytorch_tanh").train()
    patched = moeflow.patch_hf(copy.deepcopy(ref))
    assert next(m for m in patched.modules() if isinstance(m, PatchedMoE)).fused_activation() is None
    out_ref, g_ref = loss_and_grads(ref, "mixtral")
    out_p, g_p = loss_and_grads(patched, "mixtral")
    torch.testing.assert_close(out_p.logits, out_ref.logits, rtol=0, atol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g_p[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_training_updates_what_save_pretrained_writes(tmp_path: Path) -> None:
    model = moeflow.patch_hf(trainable("mixtral"))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    w_before = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    loss_and_grads(model, "mixtral")
    opt.step()
    assert not torch.equal(model.model.layers[0].mlp.experts.gate_up_proj, w_before)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # plain, unpatched
    ids, _ = token_batch("mixtral")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["deepseek_v3", "switch_transformers"])
def test_patched_generation_matches(arch: str) -> None:
    ref = hf_model(arch)
    patched = moeflow.patch_hf(copy.deepcopy(ref))
    ids, _ = token_batch(arch, seed=5)
    with torch.no_grad():
        assert torch.equal(patched.generate(ids[:, :5], max_new_tokens=4, do_sample=False),
                           ref.generate(ids[:, :5], max_new_tokens=4, do_sample=False))


def test_deepseek_bias_update_on_patched_block() -> None:
    model = moeflow.patch_hf(hf_model("deepseek_v3"))
    block = model.model.layers[1].mlp
    ids, _ = token_batch("deepseek_v3")
    with torch.no_grad():
        model(ids)
    load = block.last_routing.tokens_per_expert.float()
    bias = block.gate.e_score_correction_bias.clone()
    block.update_bias(rate=0.01)
    torch.testing.assert_close(block.gate.e_score_correction_bias, bias + 0.01 * torch.sign(load.mean() - load))


def test_patch_refuses_models_without_moe() -> None:
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                                   num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(TypeError, match="no supported MoE block"):
        moeflow.patch_hf(dense)


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_run_experts_token_major_equals_gather_experts_combine(act: str) -> None:
    """run_experts on the token-major plan (fused for silu; gather, HF activation, combine for tanh-GELU) == the
    three steps: gather the rows, run them unweighted, weight and sum them per token."""
    model = moeflow.patch_hf(hf_model("mixtral", hidden_act=act).train())
    block = next(m for m in model.modules() if isinstance(m, PatchedMoE))
    x = torch.randn(10, model.config.hidden_size, requires_grad=True)
    routing = block.route(x.view(1, 10, -1))
    x_in, plan = block.dispatcher.dispatch(x, routing)
    fused = block.dispatcher.combine(block.run_experts(x_in, plan.rows), plan)
    y_RD = block.run_experts(plan.gather(x), ExpertRows(plan.splits, plan.counts_E))
    steps = plan.scatter_sum(y_RD, plan.weights_R)
    torch.testing.assert_close(fused, steps, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(fused)
    (gx_fused,) = torch.autograd.grad(fused, x, g, retain_graph=True)  # the two share the router's graph
    torch.testing.assert_close(gx_fused, torch.autograd.grad(steps, x, g)[0], rtol=1e-5, atol=1e-6)
