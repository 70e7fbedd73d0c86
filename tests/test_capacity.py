"""Expert capacity: the formula, the keep mask (op level), and every token-choice router's drops.

Semantics (DESIGN.md §3): per routing group and per expert, C = max(ceil(cf * k * T_g / E), min_capacity) slots.
"position": earlier tokens win, and every first choice comes before any second choice; "probs": larger combine
weight wins. An assignment the router did not route (GShard's skipped second choice) never takes a slot.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import reference as ref
from moeflow import MoEConfig, MoELayer
from moeflow.config import expert_capacity
from moeflow.ops.capacity import capacity_keep
from moeflow.routing import build_router


@given(cf_cents=st.integers(1, 400), k=st.integers(1, 4), tokens=st.integers(0, 300), e=st.integers(4, 16),
       min_cap=st.integers(0, 6))
@settings(max_examples=60)
@example(cf_cents=110, k=2, tokens=200, e=8, min_cap=0)  # float arithmetic would give 56
def test_capacity_formula_is_exact(cf_cents, k, tokens, e, min_cap) -> None:
    """cfg.capacity(T_g) = max(ceil(cf * k * T_g / E), min_capacity) in exact arithmetic on the decimal cf."""
    cfg = MoEConfig(d_model=4, d_hidden=4, num_experts=e, top_k=k, capacity_factor=cf_cents / 100,
                    min_capacity=min_cap)
    assert cfg.capacity(tokens) == max(math.ceil(Fraction(cf_cents, 100) * k * tokens / e), min_cap)


def test_capacity_formula_edge_values() -> None:
    """Float products must not round the ceiling up: 1.1 * 2 * 200 / 8 = 55.00000000000001 in floats, C = 55."""
    assert expert_capacity(1.1, 2, 200, 8) == 55
    assert expert_capacity(1.1, 1, 100, 10) == 11
    assert expert_capacity(0.7, 3, 10, 21) == 1
    assert expert_capacity(1.25, 2, 8, 4) == 5
    assert expert_capacity(1.0, 1, 0, 4) == 0 and expert_capacity(1.0, 1, 0, 4, min_capacity=2) == 2
    assert MoEConfig(d_model=4, d_hidden=4).capacity(100) is None  # dropless


def _reference_keep(expert, group, priority, active, num_experts, cap) -> list[bool]:
    """Walk assignments by (priority, index); each (group, expert) bucket takes its first `cap` active ones."""
    used: dict[tuple[int, int], int] = {}
    keep = [False] * len(expert)
    for n in sorted(range(len(expert)), key=lambda n: (priority[n], n)):
        if active[n]:
            key = (group[n], expert[n])
            keep[n] = used.get(key, 0) < cap
            used[key] = used.get(key, 0) + 1
    return keep


@st.composite
def keep_problems(draw):
    """Random assignments: experts, groups, priorities with ties, an active mask and a capacity."""
    n = draw(st.integers(0, 40))
    e, g = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    ints = lambda hi: st.lists(st.integers(0, hi), min_size=n, max_size=n)  # noqa: E731
    return (draw(ints(e - 1)), draw(ints(g - 1)), draw(ints(6)), draw(st.lists(st.booleans(), min_size=n,
                                                                                  max_size=n)),
            e, g, draw(st.integers(0, 6)))


@given(keep_problems())
@settings(max_examples=80)
def test_capacity_keep_matches_reference(problem) -> None:
    """The sort-based keep mask equals the per-assignment loop, ties broken by assignment index."""
    expert, group, priority, active, e, g, cap = problem
    keep = capacity_keep(torch.tensor(expert, dtype=torch.long), torch.tensor(group, dtype=torch.long),
                         torch.tensor(priority, dtype=torch.float32), torch.tensor(active, dtype=torch.bool),
                         e, g, cap)
    assert keep.tolist() == _reference_keep(expert, group, priority, active, e, cap)


def test_capacity_keep_small_example() -> None:
    """Expert 0 has priorities [3, 1, 2] and C = 2: the priority-1 and -2 assignments win; an inactive one never
    takes a slot even with the best priority; capacity 0 keeps nothing."""
    expert = torch.tensor([0, 0, 0, 1, 1])
    group = torch.zeros(5, dtype=torch.long)
    priority = torch.tensor([3.0, 1.0, 2.0, 0.0, 5.0])
    active = torch.tensor([True, True, True, False, True])
    assert capacity_keep(expert, group, priority, active, 2, 1, 2).tolist() == [False, True, True, False, True]
    assert capacity_keep(expert, group, priority, active, 2, 1, 0).tolist() == [False] * 5
    empty = torch.zeros(0, dtype=torch.long)
    assert capacity_keep(empty, empty, empty.float(), empty.bool(), 2, 1, 3).numel() == 0


ROUTER_K = st.sampled_from([("switch", 1), ("gshard", 2), ("topk", 1), ("topk", 2), ("topk", 3),
                            ("noisy_topk", 2)])


@given(router_k=ROUTER_K, e=st.integers(3, 6), groups=st.integers(1, 3), tg=st.integers(1, 8),
       cf_tenths=st.integers(1, 20), policy=st.sampled_from(["position", "probs"]), training=st.booleans(),
       seed=st.integers(0, 2 ** 16))
@settings(max_examples=60)
def test_routers_never_exceed_capacity(router_k, e, groups, tg, cf_tenths, policy, training, seed) -> None:
    """For every token-choice router, per group and per expert: kept <= C, kept = min(C, routed), dropped
    assignments were routed, and which ones are kept follows the policy (the reference walk)."""
    router, k = router_k
    t, cf = groups * tg, cf_tenths / 10
    torch.manual_seed(seed)
    cfg = MoEConfig(d_model=6, d_hidden=4, num_experts=e, top_k=k, router=router, capacity_factor=cf,
                    drop_policy=policy, num_groups=groups)
    rt = MoELayer(cfg).double().train(training).router(torch.randn(t, 6, dtype=torch.float64) * 3)
    cap = ref.capacity(cf, k, tg, e)
    assert rt.capacity == cap
    assert not bool((rt.kept_N & ~rt.routed_N).any())
    group_N = rt.token_ids_N // tg
    for bucket in range(groups * e):
        in_bucket = (group_N * e + rt.expert_ids_N) == bucket
        routed, kept = int((in_bucket & rt.routed_N).sum()), int((in_bucket & rt.kept_N).sum())
        assert kept == min(cap, routed)
    assignments = [ref.Assignment(int(tok), int(ex), w, n // t, bool(r)) for n, (tok, ex, w, r) in
                   enumerate(zip(rt.token_ids_N, rt.expert_ids_N, rt.weights_N.detach(), rt.routed_N))]
    ref.apply_capacity(assignments, cap, policy, t, groups)
    assert rt.kept_N.tolist() == [a.kept for a in assignments]


@pytest.mark.parametrize("router, k", [("topk", 2), ("switch", 1), ("gshard", 2)])
def test_enough_capacity_changes_nothing(router, k, make_moe, randn) -> None:
    """With C >= k * T_g (cf = E) nothing is dropped and the output equals the dropless layer's exactly."""
    x = randn(16, 8)
    dropless = make_moe(router=router, top_k=k).eval()
    capped = make_moe(router=router, top_k=k, capacity_factor=4.0).eval()
    assert torch.equal(dropless(x), capped(x))
    assert bool(capped.last_routing.kept_N.all()) and capped.last_routing.capacity == k * 16


def test_min_capacity_raises_small_capacities(make_moe, randn) -> None:
    """min_capacity lifts C when ceil(cf * k * T_g / E) is smaller."""
    layer = make_moe(router="switch", top_k=1, capacity_factor=0.1, min_capacity=3)
    layer(randn(12, 8))
    assert layer.last_routing.capacity == 3
    assert (layer.last_routing.tokens_per_expert <= 3).all()


def test_capacity_smaller_than_needed_drops_the_excess(make_moe, randn) -> None:
    """cf = 0.15 with 24 tokens over 4 experts, top-2: C = ceil(1.8) = 2 rows per expert, the rest dropped."""
    layer = make_moe(router="topk", top_k=2, capacity_factor=0.15)
    layer(randn(24, 8))
    rt = layer.last_routing
    assert rt.capacity == 2 and rt.tokens_per_expert.tolist() == [2, 2, 2, 2]
    assert rt.dropped_fraction.item() == pytest.approx(1 - 8 / 48)


def _twin(cfg: MoEConfig, old: MoEConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Routers for two configs with the same weights."""
    new_r, old_r = build_router(cfg), build_router(old)
    old_r.load_state_dict(new_r.state_dict())
    return new_r, old_r


def test_capacity_per_sequence_equals_dropless_routing_then_capacity_per_sequence() -> None:
    """expert_capacity + group_by_sequence (the Switch preset) keep exactly what the old SwitchSparseMLP kept:
    route dropless, then at most C tokens per expert within each sequence, earlier positions first."""
    torch.manual_seed(0)
    b, s, d, e, c = 3, 10, 8, 4, 2
    cfg = MoEConfig(d_model=d, d_hidden=4, num_experts=e, top_k=1, router="switch", jitter_eps=0.0,
                    expert_capacity=c, group_by_sequence=True)
    new_r, old_r = _twin(cfg, cfg.replace(expert_capacity=None, group_by_sequence=False))
    x = torch.randn(b * s, d)
    new, old = new_r(x, seq_len=s), old_r(x)
    n = old.expert_ids_N.numel()
    kept_old = capacity_keep(old.expert_ids_N, old.token_ids_N // s, torch.arange(n), old.routed_N, e, b, c)
    assert not bool(kept_old.all())  # the capacity really binds
    assert torch.equal(new.kept_N, kept_old) and new.capacity == c
    assert torch.equal(new.expert_ids_N, old.expert_ids_N) and torch.equal(new.weights_N, old.weights_N)
    for i in range(b):  # each sequence routes as if it were alone
        alone = new_r(x[i * s:(i + 1) * s], seq_len=s)
        assert torch.equal(alone.kept_N, new.kept_N[i * s:(i + 1) * s])
    layer = MoELayer(cfg)  # the layer passes the S of its [B, S, D] input
    layer.router.load_state_dict(new_r.state_dict())
    layer(x.view(b, s, d))
    assert layer.last_routing is not None and torch.equal(layer.last_routing.kept_N, kept_old)
    with pytest.raises(ValueError, match=r"group_by_sequence .* needs inputs \[batch, seq, 8\]"):
        layer(x)


def test_eval_capacity_and_groups_come_from_the_config_in_eval_mode() -> None:
    """eval_capacity_factor / eval_num_groups give in eval what the old per-call config swap of MoEFFN gave
    (capacity_factor and num_groups replaced), and leave training routing as it was."""
    cfg = MoEConfig(d_model=8, d_hidden=4, num_experts=4, top_k=2, router="gshard", capacity_factor=0.5,
                    num_groups=2, eval_capacity_factor=0.75, eval_num_groups=1)
    plain = cfg.replace(eval_capacity_factor="train", eval_num_groups=None)
    x = torch.randn(12, 8)
    for training, old in ((True, plain), (False, plain.replace(capacity_factor=0.75, num_groups=1))):
        new_r, old_r = _twin(cfg, old)
        new_r.train(training), old_r.train(training)
        torch.manual_seed(1)
        a = new_r(x)
        torch.manual_seed(1)
        b = old_r(x)
        assert a.capacity == b.capacity == (2 if training else 5) and not bool(a.kept_N[a.routed_N].all())
        for name in ("expert_ids_N", "weights_N", "routed_N", "kept_N"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (training, name)
    dropless = build_router(cfg.replace(eval_capacity_factor=None)).eval()(x)
    assert dropless.capacity is None and torch.equal(dropless.kept_N, dropless.routed_N)
