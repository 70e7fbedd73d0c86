"""DeepSeek-V3 routing in the core: group-limited selection on s + b, weights from s, the aux-loss-free bias update.

The reference is a per-token loop written straight from the DeepSeek-V3 report (§2.1.2) in float64.
"""

from __future__ import annotations

import pytest
import torch

from moeflow import MoEConfig, MoELayer, moe_layers
from moeflow.config import ConfigError
from moeflow.models import ModelConfig, MoETransformer
from moeflow.routing import ROUTERS, build_router
from moeflow.routing.deepseek import DeepSeekRouter, group_limited_mask, update_router_biases
from moeflow.routing.log import record_routing


def reference_route(logits: torch.Tensor, bias: torch.Tensor, k: int, n_group: int, topk_group: int,
                    normalize: bool, scale: float, score_func: str) -> list[dict[int, float]]:
    """Per token: {expert: weight}, by the report's recipe, one token at a time."""
    e = logits.shape[1]
    logits, bias = logits.detach(), bias.detach()
    m = e // n_group
    out = []
    for l_t in logits:
        s = torch.sigmoid(l_t) if score_func == "sigmoid" else torch.softmax(l_t, -1)
        c = s + bias
        group_score = [sorted(c[g * m:(g + 1) * m].tolist(), reverse=True)[:2] for g in range(n_group)]
        best = sorted(range(n_group), key=lambda g: -sum(group_score[g]))[:topk_group]
        cand = [i for g in best for i in range(g * m, (g + 1) * m)]
        chosen = sorted(cand, key=lambda i: -float(c[i]))[:k]
        w = {i: float(s[i]) for i in chosen}
        z = sum(w.values()) if normalize else 1.0
        out.append({i: scale * v / z for i, v in w.items()})
    return out


@pytest.mark.parametrize("n_group,topk_group,normalize,score_func", [(4, 2, True, "sigmoid"), (1, 1, True, "sigmoid"),
                                                                     (8, 3, False, "sigmoid"), (2, 1, True, "softmax")])
def test_matches_per_token_reference(n_group: int, topk_group: int, normalize: bool, score_func: str) -> None:
    cfg = MoEConfig(d_model=12, d_hidden=8, num_experts=16, top_k=3, router="deepseek", n_group=n_group,
                    topk_group=topk_group, normalize=normalize, score_func=score_func, routed_scaling_factor=2.5)
    router = build_router(cfg).double()
    assert isinstance(router, DeepSeekRouter) and ROUTERS["deepseek"] is DeepSeekRouter
    with torch.no_grad():
        router.weight.normal_(0, 1.0)
        router.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(40, 12, dtype=torch.float64)
    r = router(x)
    ref = reference_route(r.logits_TE.double(), router.e_score_correction_bias.double(), 3, n_group, topk_group,
                          normalize, 2.5, score_func)
    for t in range(40):
        got = {int(e): float(w) for e, w in zip(r.expert_ids_N[t::40], r.weights_N.detach()[t::40])}
        assert got.keys() == ref[t].keys(), f"token {t}"
        for e in got:
            assert got[e] == pytest.approx(ref[t][e], rel=1e-6)
    assert r.probs_TE.sum(-1).double().sub(1).abs().max() < 1e-5  # a distribution, for stats and the balance loss


def test_bias_steers_selection_but_not_weights() -> None:
    cfg = MoEConfig(d_model=8, d_hidden=4, num_experts=8, top_k=2, router="deepseek", normalize=False)
    router = build_router(cfg)
    x = torch.randn(32, 8)
    with torch.no_grad():
        router.e_score_correction_bias[5] = 10.0
    r = router(x)
    assert (r.expert_ids_N[:32] == 5).all()  # the first choice of every token
    torch.testing.assert_close(r.weights_N[:32], torch.sigmoid(r.logits_TE[:, 5]))  # s_5, no +10


def test_group_mask_keeps_whole_groups() -> None:
    s = torch.tensor([[0.9, 0.1, 0.5, 0.5, 0.2, 0.0]])  # groups of 2: top-2 sums 1.0, 1.0, 0.2
    assert group_limited_mask(s, 3, 1).tolist() == [[True, True, False, False, False, False]]  # tie: lowest index
    assert group_limited_mask(s, 3, 2).tolist() == [[True, True, True, True, False, False]]


def test_bias_update_rule() -> None:
    cfg = MoEConfig(d_model=8, d_hidden=4, num_experts=4, top_k=2, router="deepseek", bias_update_rate=0.01)
    router = build_router(cfg)
    router.update_bias(torch.tensor([10, 2, 4, 0]))  # mean 4
    torch.testing.assert_close(router.e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.0, 0.01]))
    router.update_bias(torch.tensor([10, 2, 4, 0]), rate=0.1)
    torch.testing.assert_close(router.e_score_correction_bias, torch.tensor([-0.11, 0.11, 0.0, 0.11]))
    with pytest.raises(ValueError, match="shape"):
        router.update_bias(torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        router.update_bias(torch.tensor([1.0, float("nan"), 1.0, 1.0]))
    # a buffer, saved with the model, never trained by gradients
    assert "e_score_correction_bias" in router.state_dict()
    assert all(p is not router.e_score_correction_bias for p in router.parameters())


def _skewed_run(rate: float, steps: int = 120) -> list[float]:
    """max/mean expert load per step when tokens cluster on a direction the router maps to experts 0-1."""
    torch.manual_seed(0)
    e, d = 8, 16
    layer = MoELayer(MoEConfig(d_model=d, d_hidden=8, num_experts=e, top_k=2, router="deepseek", n_group=4,
                               topk_group=2, bias_update_rate=rate, aux_loss_coef=0.0))
    u = torch.randn(d)
    u = u / u.norm()
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.3)
        layer.router.weight[:2] += 3.0 * u
    history = []
    with torch.no_grad():
        for _ in range(steps):
            with record_routing() as log:
                layer(torch.randn(1024, d) * 0.5 + u)
            load = log.per_layer([layer])[0].tokens_per_expert.float()
            history.append(float(load.max() / load.mean()))
            assert update_router_biases(log) == 1
    return history


def test_aux_free_bias_balances_a_skewed_router() -> None:
    balanced, untouched = _skewed_run(rate=0.005), _skewed_run(rate=0.0)
    assert balanced[0] == untouched[0] > 3.0  # experts 0-1 take most of the 2 * 1024 assignments
    assert min(untouched[-30:]) > 3.0  # without the bias nothing changes (no gradients here)
    assert sum(balanced[-30:]) / 30 < 1.3, balanced[::10]  # perfect balance is 1 (plus sampling noise)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="divisible by n_group"):
        MoEConfig(d_model=8, d_hidden=4, num_experts=6, router="deepseek", n_group=4)
    with pytest.raises(ConfigError, match="topk_group"):
        MoEConfig(d_model=8, d_hidden=4, num_experts=8, router="deepseek", n_group=2, topk_group=3)
    with pytest.raises(ConfigError, match="exceeds the experts"):
        MoEConfig(d_model=8, d_hidden=4, num_experts=8, top_k=3, router="deepseek", n_group=4, topk_group=1)


def test_usable_in_moeflow_models() -> None:
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16,
                      moe=MoEConfig(d_model=16, d_hidden=8, num_experts=8, top_k=2, router="deepseek", n_group=4,
                                    topk_group=2, shared_d_hidden=8, routed_scaling_factor=2.0,
                                    bias_update_rate=1e-3, aux_loss_coef=1e-4))
    model = MoETransformer(cfg)
    ids = torch.randint(0, 32, (2, 8))
    with record_routing() as log:
        logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()) + log.aux_loss()
    loss.backward()
    assert all(m.router.weight.grad is not None for _, m in moe_layers(model))
    assert all(m.shared is not None for _, m in moe_layers(model))
    assert update_router_biases(log) == 2
    assert all(m.router.e_score_correction_bias.abs().sum() > 0 for _, m in moe_layers(model))
