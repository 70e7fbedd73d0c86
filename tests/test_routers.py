"""Routers: combine weights, routing decisions and losses, on hand-worked examples and against references.

The explicit examples use T = 4 tokens, E = 3 experts and router probabilities chosen by hand,
    P = [[0.70, 0.20, 0.10],      t0: first e0, second e1
         [0.50, 0.30, 0.20],      t1: first e0, second e1
         [0.60, 0.10, 0.30],      t2: first e0, second e2
         [0.25, 0.15, 0.60]]      t3: first e2, second e0
realised exactly by x = I_4 and a router weight whose logits are l = log P + c with per-token shifts
c = [1, 2, 0, -1] (softmax ignores c; logsumexp(l) = c, so the z-loss is mean(c^2) = 1.5).
Mean probabilities P_e = [2.05, 0.75, 1.20] / 4 = [0.5125, 0.1875, 0.3].
"""

from __future__ import annotations

import math

import pytest
import torch

import reference as ref
from moeflow import MoEConfig, MoELayer, build_router

P = torch.tensor([[0.70, 0.20, 0.10], [0.50, 0.30, 0.20], [0.60, 0.10, 0.30], [0.25, 0.15, 0.60]],
                 dtype=torch.float64)
SHIFT = torch.tensor([1.0, 2.0, 0.0, -1.0], dtype=torch.float64)
X = torch.eye(4, dtype=torch.float64)


def example_router(**fields: object):
    """A router over the hand-worked example: router(X) has logits log P + c."""
    base: dict[str, object] = {"d_model": 4, "d_hidden": 4, "num_experts": 3, "top_k": 2}
    base.update(fields)
    router = build_router(MoEConfig(**base)).double().eval()
    with torch.no_grad():
        router.weight.copy_((P.log() + SHIFT[:, None]).t())
    return router


def assignments(routing) -> list[tuple[int, int, float, bool]]:
    """(token, expert, weight, kept) of every routed assignment, sorted by token then expert."""
    rows = zip(routing.token_ids_N.tolist(), routing.expert_ids_N.tolist(), routing.weights_N.tolist(),
               routing.kept_N.tolist(), routing.routed_N.tolist())
    return sorted((t, e, w, k) for t, e, w, k, r in rows if r)


def assert_assignments(routing, expected: list[tuple[int, int, float, bool]]) -> None:
    """The routed assignments are exactly `expected` (weights to 1e-12)."""
    got = assignments(routing)
    assert [(t, e, k) for t, e, _, k in got] == [(t, e, k) for t, e, _, k in expected]
    for (_, _, w, _), (_, _, w_exp, _) in zip(got, expected):
        assert w == pytest.approx(w_exp, abs=1e-12)


# ---------------------------------------------------------------- combine weights and decisions


def test_topk_normalized_weights_and_position_policy() -> None:
    """Mixtral: weights p / (p1 + p2). Capacity ceil(0.3 * 2 * 4 / 3) = 1 with the position policy: every first
    choice goes before any second choice, so t3's first choice (e2) beats t2's earlier second choice (e2)."""
    routing = example_router(router="topk", normalize=True, capacity_factor=0.3)(X)
    assert routing.capacity == 1
    assert_assignments(routing, [
        (0, 0, 0.7 / 0.9, True), (0, 1, 0.2 / 0.9, True),
        (1, 0, 0.5 / 0.8, False), (1, 1, 0.3 / 0.8, False),
        (2, 0, 0.6 / 0.9, False), (2, 2, 0.3 / 0.9, False),
        (3, 0, 0.25 / 0.85, False), (3, 2, 0.6 / 0.85, True)])


def test_topk_normalized_weights_and_probs_policy() -> None:
    """The probs policy keeps the larger weight: e1 takes t1's 0.375 over t0's 0.222 although t0 comes first."""
    routing = example_router(router="topk", normalize=True, capacity_factor=0.3, drop_policy="probs")(X)
    assert_assignments(routing, [
        (0, 0, 0.7 / 0.9, True), (0, 1, 0.2 / 0.9, False),
        (1, 0, 0.5 / 0.8, False), (1, 1, 0.3 / 0.8, True),
        (2, 0, 0.6 / 0.9, False), (2, 2, 0.3 / 0.9, False),
        (3, 0, 0.25 / 0.85, False), (3, 2, 0.6 / 0.85, True)])


def test_topk_raw_weights_dropless() -> None:
    """Qwen2-MoE / OLMoE (normalize=False): the raw probabilities; dropless keeps everything."""
    routing = example_router(router="topk", normalize=False)(X)
    assert routing.capacity is None
    assert_assignments(routing, [(0, 0, 0.7, True), (0, 1, 0.2, True), (1, 0, 0.5, True), (1, 1, 0.3, True),
                                 (2, 0, 0.6, True), (2, 2, 0.3, True), (3, 0, 0.25, True), (3, 2, 0.6, True)])
    # load balance over both choices: counts [4, 2, 2] / 8, so 3 * (0.5 * 0.5125 + 0.25 * 0.1875 + 0.25 * 0.3)
    assert routing.losses["load_balance"].item() == pytest.approx(1.134375, abs=1e-12)


@pytest.mark.parametrize("policy, kept", [("position", [True, True, False, True]),
                                          ("probs", [True, False, True, True])])
def test_switch_raw_argmax_weight_and_drop_policies(policy, kept) -> None:
    """Switch: weight = the argmax probability (not renormalised). C = ceil(1 * 1 * 4 / 3) = 2 and e0 is everyone's
    choice but t3's: position keeps t0, t1; probs keeps the 0.7 and 0.6 tokens (t0, t2)."""
    routing = example_router(router="switch", top_k=1, capacity_factor=1.0, drop_policy=policy)(X)
    assert routing.capacity == 2
    assert_assignments(routing, [(0, 0, 0.7, kept[0]), (1, 0, 0.5, kept[1]), (2, 0, 0.6, kept[2]),
                                 (3, 2, 0.6, kept[3])])
    assert routing.tokens_per_expert.tolist() == [2, 0, 1]
    assert routing.dropped_fraction.item() == pytest.approx(0.25)


def test_switch_losses_by_hand() -> None:
    """load_balance = E * sum f_e P_e = 3 * (3/4 * 0.5125 + 0 * 0.1875 + 1/4 * 0.3) = 1.378125;
    z_loss = mean(c^2) = (1 + 4 + 0 + 1) / 4 = 1.5; aux = 1e-2 * 1.378125 + 1e-3 * 1.5."""
    routing = example_router(router="switch", top_k=1, capacity_factor=1.0)(X)
    assert routing.losses["load_balance"].item() == pytest.approx(1.378125, abs=1e-12)
    assert routing.losses["z_loss"].item() == pytest.approx(1.5, abs=1e-12)
    assert routing.aux_loss.item() == pytest.approx(0.01528125, abs=1e-12)
    # router entropy: mean over tokens of -sum p log p
    h = -sum(p * math.log(p) for row in P.tolist() for p in row) / 4
    assert routing.entropy.item() == pytest.approx(h, abs=1e-12)


def test_switch_local_groups_by_hand() -> None:
    """G = 2 groups {t0, t1}, {t2, t3}: capacity per group ceil(1 * 1 * 2 / 3) = 1, so t1 (not t2, as with one
    group) is dropped. Loss per group: g0 f = [1, 0, 0], P = [0.6, 0.25, 0.15] -> 3 * 0.6 = 1.8;
    g1 f = [1/2, 0, 1/2], P = [0.425, 0.125, 0.45] -> 3 * (0.2125 + 0.225) = 1.3125; mean 1.55625."""
    routing = example_router(router="switch", top_k=1, capacity_factor=1.0, num_groups=2)(X)
    assert routing.capacity == 1
    assert routing.kept_N.tolist() == [True, False, True, True]
    assert routing.losses["load_balance"].item() == pytest.approx(1.55625, abs=1e-12)


def test_gshard_renormalized_gates_capacity_and_aux_by_hand() -> None:
    """GShard (eval, both choices kept): g1, g2 = p / (p1 + p2). C = ceil(1 * 2 * 4 / 3) = 3: e0's three first
    choices fill it, so t3's second choice (e0) is dropped. Aux = E * sum (c_e / T) m_e with first-choice counts
    c = [3, 0, 1]: 3 * (3/4 * 0.5125 + 1/4 * 0.3) = 1.378125."""
    routing = example_router(router="gshard", capacity_factor=1.0)(X)
    assert routing.capacity == 3
    assert_assignments(routing, [
        (0, 0, 7 / 9, True), (0, 1, 2 / 9, True), (1, 0, 5 / 8, True), (1, 1, 3 / 8, True),
        (2, 0, 2 / 3, True), (2, 2, 1 / 3, True), (3, 0, 5 / 17, False), (3, 2, 12 / 17, True)])
    assert routing.losses["load_balance"].item() == pytest.approx(1.378125, abs=1e-12)
    assert routing.aux_loss.item() == pytest.approx(1e-2 * 1.378125, abs=1e-12)


def test_gshard_local_groups_by_hand() -> None:
    """G = 2: C = ceil(1 * 2 * 2 / 3) = 2 per group and nothing is dropped. Aux per group: g0 c = [2, 0, 0],
    m = [0.6, 0.25, 0.15] -> 1.8; g1 c = [1, 0, 1], m = [0.425, 0.125, 0.45] -> 1.3125; mean 1.55625."""
    routing = example_router(router="gshard", capacity_factor=1.0, num_groups=2)(X)
    assert routing.capacity == 2 and bool(routing.kept_N.all())
    assert routing.losses["load_balance"].item() == pytest.approx(1.55625, abs=1e-12)


def test_expert_choice_takes_top_c_tokens_with_weight_p() -> None:
    """Each expert takes its C = ceil(1 * 1 * 4 / 3) = 2 most probable tokens; weight p[t, e]."""
    routing = example_router(router="expert_choice", top_k=1)(X)
    assert routing.capacity == 2
    assert_assignments(routing, [(0, 0, 0.7, True), (0, 1, 0.2, True), (1, 1, 0.3, True), (2, 0, 0.6, True),
                                 (2, 2, 0.3, True), (3, 2, 0.6, True)])
    assert routing.tokens_per_expert.tolist() == [2, 2, 2]


def test_noisy_topk_eval_is_softmax_over_the_kept_logits() -> None:
    """Without noise (eval), softmax over the two kept logits = the renormalised top-2 probabilities."""
    routing = example_router(router="noisy_topk")(X)
    assert_assignments(routing, [
        (0, 0, 7 / 9, True), (0, 1, 2 / 9, True), (1, 0, 5 / 8, True), (1, 1, 3 / 8, True),
        (2, 0, 2 / 3, True), (2, 2, 1 / 3, True), (3, 0, 5 / 17, True), (3, 2, 12 / 17, True)])


@pytest.mark.parametrize("k, e, groups", [(2, 4, 1), (1, 5, 2), (3, 4, 1)])
def test_noisy_topk_training_weights_and_losses_match_shazeer(k, e, groups, make_moe, randn) -> None:
    """Training with the noise replayed from the seed: the chosen experts are the top-k of H = l + eps *
    (softplus(x W_noise) + 1e-2), the weights a softmax over those k, and the importance and load losses (with
    their gradients w.r.t. W_g and W_noise) equal a direct implementation of eq. (6)-(10)."""
    t = 16
    router = make_moe(router="noisy_topk", top_k=k, num_experts=e, num_groups=groups).router.train()
    x = randn(t, 8)
    torch.manual_seed(11)
    eps = torch.randn(t, e, dtype=torch.float64)
    torch.manual_seed(11)
    routing = router(x)
    logits = x @ router.weight.t()
    std = torch.nn.functional.softplus(x @ router.noise_weight.t()) + 1e-2
    h = logits + eps * std
    want = ref.route_noisy(h, k)
    got_pairs = list(zip(routing.token_ids_N.tolist(), routing.expert_ids_N.tolist()))
    assert sorted(got_pairs) == sorted((a.token, a.expert) for a in want)
    w_ref = {(a.token, a.expert): a.weight.item() for a in want}
    for pair, w in zip(got_pairs, routing.weights_N.tolist()):
        assert w == pytest.approx(w_ref[pair], abs=1e-12)
    imp, load = ref.shazeer_losses(logits, h, std, k, groups)
    torch.testing.assert_close(routing.losses["importance"], imp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(routing.losses["load"], load, rtol=1e-10, atol=1e-12)
    wrt = [router.weight, router.noise_weight]
    got = torch.autograd.grad(routing.losses["importance"] + routing.losses["load"], wrt)
    expected = torch.autograd.grad(imp + load, wrt)
    for g, w in zip(got, expected):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert routing.aux_loss.item() == pytest.approx(1e-2 * (imp.item() + load.item()), rel=1e-10)


def test_gshard_training_gates_and_random_routing_match_reference(make_moe, randn) -> None:
    """Training, the uniform draw replayed: routed second choices are exactly those with 2 * g2 > u."""
    t = 64
    router = make_moe(router="gshard", num_experts=6).router.train()
    x = randn(t, 8)
    torch.manual_seed(3)
    u = torch.rand(t, dtype=torch.float64)
    torch.manual_seed(3)
    routing = router(x)
    want = ref.route_gshard(ref.probs(x @ router.weight.t()), u)
    got = list(zip(routing.token_ids_N.tolist(), routing.expert_ids_N.tolist(), routing.routed_N.tolist()))
    assert sorted(got) == sorted((a.token, a.expert, a.routed) for a in want)
    assert 0 < sum(not a.routed for a in want) < t  # the draw did skip some second choices, not all


def test_gshard_second_choice_keep_rate_is_min_1_2g2(make_moe, randn) -> None:
    """Statistical: over 20000 tokens the second choice is kept with probability min(1, 2 * g2). The count of kept
    second choices is a sum of independent Bernoulli(p_t); accept within 4.5 binomial standard errors, separately
    for the lower and upper half of g2 (a rule that ignores g2, or uses g2 instead of 2 * g2, fails)."""
    t = 20000
    router = make_moe(router="gshard", num_experts=8, d_model=16).router.train()
    x = randn(t, 16)
    with torch.no_grad():
        routing = router(x)
    g2 = routing.weights_N[t:]
    kept = routing.routed_N[t:].double()
    p = torch.clamp(2 * g2, max=1.0)
    order = torch.argsort(g2)
    for half in (order[: t // 2], order[t // 2:]):
        expected, se = p[half].sum(), (p[half] * (1 - p[half])).sum().sqrt()
        z = (kept[half].sum() - expected) / se
        assert abs(z) < 4.5, f"kept {kept[half].sum():.0f} vs expected {expected:.0f} (z = {z:.2f})"
    assert kept.mean() < 0.95  # the test is not vacuous: a large share of second choices is skipped


def test_gshard_eval_keeps_both_unless_configured(make_moe, randn) -> None:
    """In eval, random routing is off unless eval_random_routing=True."""
    x = randn(200, 8)
    assert bool(make_moe(router="gshard").router.eval()(x).routed_N.all())
    assert not bool(make_moe(router="gshard", eval_random_routing=True).router.eval()(x).routed_N.all())
    assert bool(make_moe(router="gshard", random_routing=False).router.train()(x).routed_N.all())


def test_switch_jitter_only_in_training(make_moe, randn) -> None:
    """Switch's multiplicative jitter changes the logits in training only, by at most eps relative per input."""
    router = make_moe(router="switch", top_k=1, jitter_eps=0.1).router
    x = randn(32, 8)
    clean = x @ router.weight.t()
    torch.testing.assert_close(router.eval()(x).logits_TE, clean, rtol=1e-12, atol=1e-12)
    torch.manual_seed(1)
    jitter = torch.empty(32, 8, dtype=torch.float64).uniform_(0.9, 1.1)
    torch.manual_seed(1)
    noisy = router.train()(x).logits_TE
    torch.testing.assert_close(noisy, (x * jitter) @ router.weight.t(), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(noisy, clean)


# ---------------------------------------------------------------- properties of every router


@pytest.mark.parametrize("fields", [dict(router="topk", normalize=True), dict(router="topk", normalize=False),
                                    dict(router="switch", top_k=1), dict(router="gshard"),
                                    dict(router="noisy_topk"), dict(router="expert_choice")],
                         ids=["topk-norm", "topk-raw", "switch", "gshard", "noisy", "expert-choice"])
def test_router_weight_properties(fields, make_moe, randn) -> None:
    """Weights are probabilities; per-token sums are 1 where the router renormalises, else at most 1."""
    layer = make_moe(**fields).train()
    r = layer.router(randn(24, 8))
    w = r.weights_N
    assert ((w > 0) & (w <= 1)).all()
    if r.top_k:
        w_KT = w.view(r.top_k, -1)
        total = w_KT.sum(0)
        if fields["router"] in ("gshard", "noisy_topk") or fields.get("normalize"):
            torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)
            assert (w_KT[0] >= w_KT[-1]).all()  # slot 0 is the first choice
        else:
            assert (total <= 1 + 1e-12).all()
    if fields["router"] == "switch":
        torch.testing.assert_close(w, r.probs_TE.max(-1).values, rtol=0, atol=0)
    if fields["router"] == "expert_choice":
        torch.testing.assert_close(w, r.probs_TE[r.token_ids_N, r.expert_ids_N], rtol=0, atol=0)


def test_router_runs_in_fp32_for_bf16_and_fp64_for_fp64(make_moe, randn) -> None:
    """Logits are at least fp32: bf16 inputs are upcast, fp64 inputs are not cast down."""
    router = make_moe(dtype=torch.float32).router
    assert router(randn(4, 8, dtype=torch.bfloat16)).logits_TE.dtype == torch.float32
    router64 = make_moe().router
    assert router64(randn(4, 8)).logits_TE.dtype == torch.float64


@pytest.mark.parametrize("fields", [dict(router="switch", top_k=1, jitter_eps=0.2), dict(router="gshard"),
                                    dict(router="noisy_topk")], ids=["switch-jitter", "gshard", "noisy"])
def test_seeded_runs_are_reproducible(fields, randn) -> None:
    """Same seed: identical weights, then identical routing and output in training (noise included); another seed
    for the forward alone changes the routing, so the noise is really drawn."""
    def build(seed: int) -> MoELayer:
        torch.manual_seed(seed)
        return MoELayer(MoEConfig(**{"d_model": 8, "d_hidden": 6, "num_experts": 4, "top_k": 2, **fields})).train()

    def run(layer: MoELayer, seed: int) -> tuple[torch.Tensor, ...]:
        torch.manual_seed(seed)
        y = layer(x)
        return y, layer.last_routing.weights_N, layer.last_routing.routed_N

    x = randn(32, 8, dtype=torch.float32)
    layer, twin = build(0), build(0)
    assert all(torch.equal(p, q) for p, q in zip(layer.parameters(), twin.parameters()))
    a, b, c = run(layer, 5), run(twin, 5), run(layer, 6)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[1], c[1]) or not torch.equal(a[2], c[2])
