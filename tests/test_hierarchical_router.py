"""Hierarchical routing (routing/hierarchical.py) against a per-token fp64 reference written from its docstring."""

from __future__ import annotations

import pytest
import torch

from moeflow import ConfigError, MoEConfig, MoELayer
from moeflow.routing import HierarchicalRouter


def _router(e: int = 8, g: int = 4, k: int = 2, normalize: bool = True, **kw: object) -> HierarchicalRouter:
    """A seeded fp64 router with decisive (not near-uniform) gates."""
    torch.manual_seed(3)
    cfg = MoEConfig(d_model=6, d_hidden=4, num_experts=e, top_k=k, router="hierarchical", num_clusters=g,
                    normalize=normalize, **kw)
    r = HierarchicalRouter(cfg).double()
    with torch.no_grad():
        r.weight.normal_(0, 1)
        r.cluster_weight.normal_(0, 1)
    return r


def _reference(r: HierarchicalRouter, x: torch.Tensor) -> dict:
    """Per-token loop: cluster argmax, within-cluster softmax top-k, weights, joint probs, both losses."""
    e, g, k = r.num_experts, r.num_clusters, r.top_k
    m = e // g
    t = x.shape[0]
    experts, weights, joint = [], [], torch.zeros(t, e, dtype=x.dtype)
    f_c, q_sum = torch.zeros(g, dtype=x.dtype), torch.zeros(g, dtype=x.dtype)
    n_e, p_sum = torch.zeros(e, dtype=x.dtype), torch.zeros(e, dtype=x.dtype)
    for i in range(t):
        q = torch.softmax(r.cluster_weight @ x[i], 0)
        logits = r.weight @ x[i]
        c = int(q.argmax())
        p = torch.softmax(logits[c * m:(c + 1) * m], 0)
        top = sorted(range(m), key=lambda j: -float(p[j]))[:k]
        w = p[top] / p[top].sum() if r.cfg.normalize else p[top]
        experts.append([c * m + j for j in top])
        weights.append(q[c] * w)
        for cc in range(g):
            joint[i, cc * m:(cc + 1) * m] = q[cc] * torch.softmax(logits[cc * m:(cc + 1) * m], 0)
        f_c[c] += 1
        q_sum += q
        p_sum[c * m:(c + 1) * m] += p
        for j in top:
            n_e[c * m + j] += 1
    cluster_loss = g * ((f_c / t) * (q_sum / t)).sum()
    p_mean = p_sum / f_c.repeat_interleave(m).clamp_min(1)
    expert_loss = m * ((n_e / (k * t)) * p_mean).sum()
    return {"experts": torch.tensor(experts), "weights": torch.stack(weights), "joint": joint,
            "cluster_balance": cluster_loss, "load_balance": expert_loss}


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("e,g,k", [(8, 4, 2), (8, 2, 3), (6, 3, 1)])
def test_matches_per_token_reference(e: int, g: int, k: int, normalize: bool) -> None:
    """Experts, weights, joint probabilities and both balance losses equal the loop reference (fp64)."""
    r = _router(e, g, k, normalize)
    x = torch.randn(20, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    routing = r(x)
    with torch.no_grad():
        ref = _reference(r, x)
    experts_TK = routing.expert_ids_N.view(k, -1).t()
    weights_TK = routing.weights_N.view(k, -1).t()
    assert torch.equal(experts_TK, ref["experts"])
    torch.testing.assert_close(weights_TK, ref["weights"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(routing.probs_TE, ref["joint"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(routing.probs_TE.sum(-1), torch.ones(20, dtype=torch.float64))
    for name in ("cluster_balance", "load_balance"):
        torch.testing.assert_close(routing.losses[name], ref[name], rtol=1e-12, atol=1e-14)
    expected_aux = r.cfg.aux_loss_coef * (ref["cluster_balance"] + ref["load_balance"])
    torch.testing.assert_close(routing.aux_loss, expected_aux, rtol=1e-12, atol=1e-14)


def test_each_token_stays_in_one_cluster_and_groups_average() -> None:
    """All k choices of a token share a cluster; with num_groups=2 the losses are the mean of the two halves."""
    r2 = _router(num_groups=2)
    x = torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    routing = r2(x)
    clusters = (routing.expert_ids_N.view(2, -1) // 2)
    assert torch.equal(clusters[0], clusters[1])
    r1 = _router(num_groups=1)
    halves = [r1(x[:8]).losses, r1(x[8:]).losses]
    for name in ("cluster_balance", "load_balance"):
        torch.testing.assert_close(routing.losses[name], (halves[0][name] + halves[1][name]) / 2)


def test_losses_are_one_at_perfect_balance() -> None:
    """Tokens spread evenly over clusters and experts with uniform gates: both losses are exactly 1."""
    r = _router(e=4, g=2, k=1)
    with torch.no_grad():
        r.weight.zero_()
        r.cluster_weight.zero_()
    q_TG = torch.full((4, 2), 0.5, dtype=torch.float64)
    p_TGM = torch.full((4, 2, 2), 0.5, dtype=torch.float64)
    cluster_T = torch.tensor([0, 0, 1, 1])
    experts_TK = torch.tensor([[0], [1], [2], [3]])
    losses = r._balance_losses(q_TG, cluster_T, p_TGM, experts_TK, torch.zeros(4, dtype=torch.long), 1)
    assert float(losses["cluster_balance"]) == pytest.approx(1.0)
    assert float(losses["load_balance"]) == pytest.approx(1.0)
    # everything on expert 0 of cluster 0, and the gates agree (0.9): each loss = 0.9 x its number of choices
    q_skew = torch.tensor([[0.9, 0.1]] * 4, dtype=torch.float64)
    p_skew = torch.tensor([[[0.9, 0.1], [0.5, 0.5]]] * 4, dtype=torch.float64)
    zeros = torch.zeros(4, dtype=torch.long)
    skewed = r._balance_losses(q_skew, zeros, p_skew, zeros.view(4, 1), zeros, 1)
    assert float(skewed["cluster_balance"]) == pytest.approx(1.8)
    assert float(skewed["load_balance"]) == pytest.approx(1.8)


def test_task_loss_trains_both_gates() -> None:
    """Inside an MoELayer the prototypes and the expert gate both get gradients from the output alone."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=6, d_hidden=4, num_experts=8, top_k=2, router="hierarchical",
                               num_clusters=4, aux_loss_coef=0.0)).double()
    layer(torch.randn(10, 6, dtype=torch.float64)).square().sum().backward()
    assert layer.router.cluster_weight.grad.abs().sum() > 0
    assert layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kw,msg", [(dict(num_experts=6, num_clusters=4), "divisible by num_clusters"),
                                    (dict(num_experts=8, num_clusters=4, top_k=3), "experts of one cluster")])
def test_config_validation(kw: dict, msg: str) -> None:
    """Clusters must split the experts evenly and hold at least top_k experts."""
    with pytest.raises(ConfigError, match=msg):
        MoEConfig(d_model=6, d_hidden=4, router="hierarchical", **{"top_k": 2, **kw})
