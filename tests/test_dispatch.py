"""The dispatch plan: kept assignments permuted into expert-contiguous rows, and summed back per token.

Round trip (Megatron's check): gather the plan's rows, identity experts, sum them back with all weights 1 gives
every token back once per kept assignment, so k * x when dropless. Integer-valued inputs make the sums exact.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeflow import LocalDispatcher, MoEConfig, build_router
from moeflow.dispatch import plan_dispatch
from moeflow.ops.tuning import cpu_tuning


def _route(router: str, k: int, e: int, t: int, seed: int = 0, **fields: object):
    """A Routing for t random tokens (d_model 5) from a seeded router in training mode, plus the tokens."""
    torch.manual_seed(seed)
    cfg = MoEConfig(d_model=5, d_hidden=4, num_experts=e, top_k=k, router=router, **fields)
    x = torch.randint(-8, 9, (t, 5)).double()
    return build_router(cfg).double().train()(x), x


def _kept_per_token(routing) -> torch.Tensor:
    """How many kept assignments each token has, [T] float64."""
    return torch.bincount(routing.token_ids_N[routing.kept_N], minlength=routing.num_tokens).double()


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_round_trip_with_unit_weights_returns_the_input(k) -> None:
    """Dropless top-k with weights 1 and identity experts: combine(dispatch(x)) = k * x exactly, every row is
    its token's input, rows are grouped by expert in ascending order, and each expert sees its rows in
    assignment order."""
    routing, x = _route("topk", k, 4, 20)
    routing = dataclasses.replace(routing, weights_N=torch.ones_like(routing.weights_N))
    plan = plan_dispatch(routing)
    x_RD = plan.gather(x)
    assert x_RD.shape == (k * 20, 5)
    assert torch.equal(x_RD, x[plan.token_ids_R])
    assert torch.equal(plan.scatter_sum(x_RD, plan.weights_R), k * x)
    expert_R = routing.expert_ids_N[plan.assignment_R]
    assert bool((expert_R[1:] >= expert_R[:-1]).all())
    assert plan.counts_E.tolist() == plan.splits == torch.bincount(routing.expert_ids_N, minlength=4).tolist()
    for e in range(4):
        block = plan.assignment_R[expert_R == e]
        assert bool((block[1:] > block[:-1]).all())


@given(router_k=st.sampled_from([("topk", 1), ("topk", 2), ("topk", 3), ("switch", 1), ("gshard", 2),
                                 ("noisy_topk", 2), ("expert_choice", 1), ("expert_choice", 2)]),
       e=st.integers(3, 6), groups=st.integers(1, 3), tg=st.integers(0, 7),
       cf=st.sampled_from([None, 0.3, 0.75, 1.0, 2.0]), unit=st.booleans(), seed=st.integers(0, 999))
@settings(max_examples=40)
def test_round_trip_property(router_k, e, groups, tg, cf, unit, seed) -> None:
    """Any router, capacity and grouping: with identity experts, combine(dispatch(x)) = (sum of the token's kept
    weights) * x; rows are exactly the kept assignments; dropped ones add nothing."""
    router, k = router_k
    routing, x = _route(router, k, e, groups * tg, seed, num_groups=groups, capacity_factor=cf)
    if unit:
        routing = dataclasses.replace(routing, weights_N=torch.ones_like(routing.weights_N))
    plan = plan_dispatch(routing)
    x_RD = plan.gather(x)
    assert x_RD.shape[0] == int(routing.kept_N.sum()) == sum(plan.splits)
    assert bool(routing.kept_N[plan.assignment_R].all())
    w_T = torch.zeros(groups * tg, dtype=torch.float64).index_add_(
        0, routing.token_ids_N[routing.kept_N], routing.weights_N[routing.kept_N])
    y = plan.scatter_sum(x_RD, plan.weights_R)
    if unit:
        assert torch.equal(y, _kept_per_token(routing)[:, None] * x)
    else:
        torch.testing.assert_close(y, w_T[:, None] * x, rtol=1e-12, atol=1e-12)


def test_combine_gradients_go_to_kept_rows_and_weights_only() -> None:
    """d sum(combine) / d x_t = sum of t's kept weights; d / d w_n = sum(x_t) if kept, exactly 0 if dropped."""
    routing, x = _route("topk", 2, 4, 16, capacity_factor=0.5)
    assert not bool(routing.kept_N.all())
    w = routing.weights_N.detach().clone().requires_grad_(True)
    x = x.clone().requires_grad_(True)
    routing = dataclasses.replace(routing, weights_N=w)
    plan = plan_dispatch(routing)
    x_RD = plan.gather(x)
    gx, gw = torch.autograd.grad(plan.scatter_sum(x_RD, plan.weights_R).sum(), [x, w])
    w_T = torch.zeros(16, dtype=torch.float64).index_add_(0, routing.token_ids_N[routing.kept_N],
                                                          w.detach()[routing.kept_N])
    torch.testing.assert_close(gx, w_T[:, None].expand(16, 5), rtol=1e-12, atol=1e-12)
    expected_gw = torch.where(routing.kept_N, x.detach().sum(-1)[routing.token_ids_N], torch.zeros_like(w))
    assert torch.equal(gw, expected_gw)


def test_expert_choice_tokens_can_get_zero_or_many_experts() -> None:
    """Expert choice: rows come from the experts' picks, so a token may be taken 0..E times; combine adds them."""
    routing, x = _route("expert_choice", 1, 4, 8)
    per_token = _kept_per_token(routing)
    assert per_token.sum() == 4 * 2 and (per_token == 0).any() and (per_token > 1).any()
    routing = dataclasses.replace(routing, weights_N=torch.ones_like(routing.weights_N))
    plan = plan_dispatch(routing)
    x_RD = plan.gather(x)
    assert torch.equal(plan.scatter_sum(x_RD, plan.weights_R), per_token[:, None] * x)


def test_empty_routing_dispatches_nothing() -> None:
    """Zero tokens: zero rows, zero counts, an empty [0, D] combine."""
    routing, x = _route("topk", 2, 4, 0)
    plan = plan_dispatch(routing)
    x_RD = plan.gather(x)
    assert x_RD.shape == (0, 5) and plan.splits == [0, 0, 0, 0]
    assert plan.scatter_sum(x_RD, plan.weights_R).shape == (0, 5)


@given(router_k=st.sampled_from([("topk", 1), ("topk", 2), ("topk", 3), ("topk", 4), ("gshard", 2),
                                 ("expert_choice", 2)]),
       cf=st.sampled_from([None, 0.5, 1.0]), seed=st.integers(0, 999))
@settings(max_examples=30, deadline=None)
def test_combine_and_dispatch_backward_equal_a_serial_scatter_add_bitwise(router_k, cf, seed) -> None:
    """The gather-sums (combine, and the gradient of the dispatch gather) add each token's rows in ascending row
    order, so on random fp32 rows they equal a serial index_add over rows bit for bit, drops and all. (The
    embedding_bag path: at these sizes TokenRows.sum would otherwise take index_add itself.)"""
    with cpu_tuning(bag_min_elems=0):
        _check_sums_bitwise(router_k, cf, seed)


def _check_sums_bitwise(router_k: tuple[str, int], cf: float | None, seed: int) -> None:
    """The body of the test above."""
    router, k = router_k
    routing, _ = _route(router, k, 5, 24, seed, capacity_factor=cf)
    routing = dataclasses.replace(routing, weights_N=routing.weights_N.float())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 7, generator=gen).requires_grad_(True)
    plan = plan_dispatch(routing)
    x_RD = plan.gather(x)
    y_RD = torch.randn(x_RD.shape, generator=gen)
    serial = torch.zeros(24, 7).index_add_(0, plan.token_ids_R, y_RD)
    assert torch.equal(plan.scatter_sum(y_RD), serial)
    w_R = plan.weights_R.float()
    assert torch.equal(plan.scatter_sum(y_RD, plan.weights_R), torch.zeros(24, 7).index_add_(0, plan.token_ids_R, y_RD * w_R[:, None]))
    (gx,) = torch.autograd.grad(x_RD, x, y_RD)
    assert torch.equal(gx, serial)


def test_local_dispatcher_hands_the_experts_token_major_input_and_a_plan_to_sum_it() -> None:
    """The contract: x passes through, the plan's rows name the token map and the combine weights, and combine
    returns the experts' [T, D] as it is; NaN logits are refused before any expert runs."""
    routing, x = _route("topk", 2, 4, 12, capacity_factor=0.5)
    d = LocalDispatcher()
    x_in, plan = d.dispatch(x, routing)
    assert x_in is x
    rows = plan.rows
    assert rows.splits == plan.splits and rows.num_rows == int(routing.kept_N.sum())
    assert torch.equal(rows.tokens.token_ids_R, plan.token_ids_R) and torch.equal(rows.weights_R, plan.weights_R)
    y = torch.randn(12, 5, dtype=torch.float64)
    assert d.combine(y, plan) is y
    bad = dataclasses.replace(routing, logits_TE=routing.logits_TE.clone().index_fill_(0, torch.tensor([3]), float("nan")))
    with pytest.raises(FloatingPointError, match="1 of 12 tokens have non-finite router logits"):
        d.dispatch(x, bad)
