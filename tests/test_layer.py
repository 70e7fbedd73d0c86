"""MoELayer against the plain reference MoE of tests/reference.py, in float64: outputs, routing and gradients.

Deterministic routers (and random ones in eval mode) are compared end to end: the reference routes from the
layer's parameters with its own code. Random routers in training are compared twice: from the layer's own
Routing record (robust to how the noise is drawn), and end to end with the noise replayed from the same seed.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import reference as ref
from moeflow import FFN, MoEConfig, MoELayer

T, D = 12, 8

# (id, MoEConfig fields, whether some assignment must be dropped for the case to test what it claims)
EVAL_CASES = [
    ("topk-norm-dropless", dict(router="topk", top_k=2, normalize=True), False),
    ("topk-raw-cap-position", dict(router="topk", top_k=2, normalize=False, capacity_factor=0.75), True),
    ("topk3-cap-probs-groups", dict(router="topk", top_k=3, capacity_factor=0.6, drop_policy="probs",
                                    num_groups=2, activation="gelu"), True),
    ("topk1-relu-shared", dict(router="topk", top_k=1, activation="relu", shared_d_hidden=5,
                               shared_gate=True), False),
    ("switch-cap-groups", dict(router="switch", top_k=1, capacity_factor=1.0, num_groups=2), True),
    ("switch-cap-probs", dict(router="switch", top_k=1, capacity_factor=0.5, drop_policy="probs",
                              activation="silu", router_bias=True), True),
    ("gshard-cap", dict(router="gshard", top_k=2, capacity_factor=1.0), True),
    ("gshard-cap-probs-groups", dict(router="gshard", top_k=2, capacity_factor=0.5, drop_policy="probs",
                                     num_groups=3, activation="geglu"), True),
    ("noisy-eval", dict(router="noisy_topk", top_k=2), False),
    ("noisy-eval-groups-cap", dict(router="noisy_topk", top_k=3, num_groups=2, capacity_factor=0.8), True),
    ("expert-choice", dict(router="expert_choice", top_k=2), False),
    ("expert-choice-groups", dict(router="expert_choice", top_k=1, capacity_factor=1.5, num_groups=2,
                                  z_loss_coef=1e-3, min_capacity=3), False),
]


def _grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """d loss / d tensors, zeros where a tensor is unused (the graph is kept: references may share it)."""
    return list(torch.autograd.grad(loss, tensors, allow_unused=True, materialize_grads=True, retain_graph=True))


def _params(layer: MoELayer) -> dict[str, torch.Tensor]:
    """Every parameter of the layer by name."""
    return dict(layer.named_parameters())


def _kept(assignments: list[ref.Assignment]) -> set[tuple[int, int]]:
    """(token, expert) pairs that survive capacity."""
    return {(a.token, a.expert) for a in assignments if a.kept}


def _kept_from_routing(routing) -> set[tuple[int, int]]:
    """(token, expert) pairs the layer kept."""
    t, e = routing.token_ids_N[routing.kept_N], routing.expert_ids_N[routing.kept_N]
    return set(zip(t.tolist(), e.tolist()))


def _compare_with_reference(layer: MoELayer, x: torch.Tensor, noise: ref.Noise | None, assert_close64) -> None:
    """Forward, aux loss, kept assignments and gradients w.r.t. x and every parameter, layer vs reference."""
    names, params = zip(*_params(layer).items())
    r = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(7))
    y = layer(x)
    aux = layer.aux_loss
    got = _grads((y * r).sum() + aux, [x, *params])
    y_ref, aux_ref, assignments = ref.reference_layer(layer, x, noise)
    want = _grads((y_ref * r).sum() + aux_ref, [x, *params])
    assert _kept_from_routing(layer.last_routing) == _kept(assignments)
    assert_close64(y, y_ref, "output")
    assert_close64(aux, aux_ref.reshape(aux.shape), "aux loss")
    for name, g, w in zip(("x", *names), got, want):
        assert_close64(g, w, f"grad of {name}")


@pytest.mark.parametrize("fields, must_drop", [c[1:] for c in EVAL_CASES], ids=[c[0] for c in EVAL_CASES])
def test_layer_matches_reference_in_eval(fields, must_drop, make_moe, randn, assert_close64) -> None:
    """Every router, eval mode: output, aux loss, kept set and all gradients equal the reference."""
    layer = make_moe(**fields).eval()
    x = randn(T, D, requires_grad=True)
    _compare_with_reference(layer, x, None, assert_close64)
    routing = layer.last_routing
    assert bool((routing.kept_N != routing.routed_N).any()) == must_drop


def _replayed_noise(layer: MoELayer, seed: int, t: int) -> ref.Noise:
    """The draws a training forward makes right after `torch.manual_seed(seed)`, in the order the routers make
    them: Switch's jitter U(1-eps, 1+eps) over [T, D]; noisy top-k's N(0, 1) over [T, E]; GShard's U(0, 1) over
    [T]. If a router changes how it draws, this replay (not the semantics) needs updating; the from-record test
    below still holds."""
    cfg = layer.cfg
    torch.manual_seed(seed)
    noise = ref.Noise()
    if cfg.jitter_eps:
        noise.jitter_TD = torch.empty(t, cfg.d_model, dtype=torch.float64).uniform_(1 - cfg.jitter_eps,
                                                                                    1 + cfg.jitter_eps)
    if cfg.router == "noisy_topk":
        noise.eps_TE = torch.randn(t, cfg.num_experts, dtype=torch.float64)
    if cfg.router == "gshard" and cfg.random_routing:
        noise.u_T = torch.rand(t, dtype=torch.float64)
    return noise


TRAIN_CASES = [
    ("switch-jitter", dict(router="switch", top_k=1, capacity_factor=1.0, jitter_eps=0.3)),
    ("gshard-random", dict(router="gshard", top_k=2, capacity_factor=1.0)),
    ("gshard-random-groups-probs", dict(router="gshard", top_k=2, capacity_factor=0.75, num_groups=2,
                                        drop_policy="probs")),
    ("noisy", dict(router="noisy_topk", top_k=2)),
    ("noisy-groups-cap", dict(router="noisy_topk", top_k=1, num_groups=3, capacity_factor=1.0)),
]


@pytest.mark.parametrize("fields", [c[1] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_layer_matches_reference_in_training_with_replayed_noise(fields, make_moe, randn, assert_close64) -> None:
    """Random routers in training, noise replayed from the seed: everything equals the reference, including the
    gradient of the noise projection (noisy top-k) and of the jittered router input (Switch)."""
    layer = make_moe(**fields).train()
    x = randn(T, D, requires_grad=True)
    noise = _replayed_noise(layer, seed=5, t=T)
    torch.manual_seed(5)
    _compare_with_reference(layer, x, noise, assert_close64)


@pytest.mark.parametrize("fields", [c[1] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_layer_matches_reference_built_from_its_routing_record(fields, make_moe, randn, assert_close64) -> None:
    """Training mode: given the layer's own routing record, the per-token reference gives the same output and the
    same gradients for x, the router and the experts (checks dispatch, experts and combine, forward and back)."""
    layer = make_moe(**fields).train()
    x = randn(T, D, requires_grad=True)
    y = layer(x)
    rt = layer.last_routing
    assignments = [ref.Assignment(int(t), int(e), w, 0, bool(r), bool(k)) for t, e, w, r, k in
                   zip(rt.token_ids_N, rt.expert_ids_N, rt.weights_N, rt.routed_N, rt.kept_N)]
    y_ref = ref.moe_forward(x, assignments, layer.experts.w_in, layer.experts.w_out, layer.cfg.activation)
    r = torch.randn(T, D, dtype=torch.float64)
    wrt = [x, layer.router.weight, layer.experts.w_in, layer.experts.w_out]
    assert_close64(y, y_ref, "output")
    for name, g, w in zip(("x", "router", "w_in", "w_out"), _grads((y * r).sum(), wrt), _grads((y_ref * r).sum(), wrt)):
        assert_close64(g, w, f"grad of {name}")


@pytest.mark.parametrize("router, k", [("topk", 2), ("gshard", 2), ("switch", 1), ("noisy_topk", 2)])
def test_fully_dropped_tokens_output_exactly_zero(router, k, make_moe, randn) -> None:
    """A token whose every assignment was dropped gets exactly 0 from the layer and no gradient through it."""
    layer = make_moe(router=router, top_k=k, capacity_factor=0.25, num_experts=4).eval()
    x = randn(T, D, requires_grad=True)
    y = layer(x)
    rt = layer.last_routing
    kept_T = torch.zeros(T, dtype=torch.bool).index_fill_(0, rt.token_ids_N[rt.kept_N], True)
    assert (~kept_T).any(), "capacity 0.25 must leave some token with nothing kept"
    assert torch.equal(y[~kept_T], torch.zeros_like(y[~kept_T]))
    assert (y[kept_T].abs().sum(-1) > 0).all()
    (gx,) = torch.autograd.grad(y.sum(), [x])
    assert torch.equal(gx[~kept_T], torch.zeros_like(gx[~kept_T]))
    assert float(rt.tokens_fully_dropped) == pytest.approx(float((~kept_T).double().mean()))


def test_gradients_reach_router_and_used_experts_only(make_moe, randn) -> None:
    """Used experts and the router get non-zero gradients; an expert no token chose gets exactly zero."""
    layer = make_moe(router="topk", top_k=2, num_experts=5, router_bias=True)
    with torch.no_grad():
        layer.router.bias[3] = -1e3  # expert 3 never makes anyone's top 2
    x = randn(T, D, requires_grad=True)
    y = layer(x)
    (y.square().sum() + layer.aux_loss).backward()
    used = layer.last_routing.tokens_per_expert
    assert used[3] == 0 and (used[[0, 1, 2, 4]] > 0).all()
    for w in (layer.experts.w_in.grad, layer.experts.w_out.grad):
        assert torch.equal(w[3], torch.zeros_like(w[3]))
        assert all(w[e].abs().sum() > 0 for e in (0, 1, 2, 4))
    assert layer.router.weight.grad.abs().sum() > 0 and torch.isfinite(layer.router.weight.grad).all()
    assert x.grad.abs().sum(-1).gt(0).all()


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "relu", "gelu", "silu"])
@pytest.mark.parametrize("router", ["topk", "switch"])
def test_one_expert_top1_dropless_equals_dense_ffn(activation, router, make_moe, randn, assert_close64) -> None:
    """megablocks' check: E = 1, k = 1, no capacity is the dense FFN with the same weights (forward and grads)."""
    layer = make_moe(router=router, num_experts=1, top_k=1, activation=activation, jitter_eps=0.0)
    ffn = FFN(D, 6, activation).double()
    with torch.no_grad():
        ffn.w_in.copy_(layer.experts.w_in[0])
        ffn.w_out.copy_(layer.experts.w_out[0])
    x = randn(3, 5, D, requires_grad=True)
    y, y_dense = layer(x), ffn(x)
    assert_close64(y, y_dense, "output")
    gl = _grads(y.sum(), [x, layer.experts.w_in, layer.experts.w_out])
    gd = _grads(y_dense.sum(), [x, ffn.w_in, ffn.w_out])
    assert_close64(gl[0], gd[0], "grad x")
    assert_close64(gl[1][0], gd[1], "grad w_in")
    assert_close64(gl[2][0], gd[2], "grad w_out")


def test_batched_input_equals_flattened_tokens(make_moe, randn) -> None:
    """[B, S, D] input is routed as B*S tokens and returned in the same shape."""
    layer = make_moe(router="topk", capacity_factor=1.0, num_groups=2)
    x = randn(2, 6, D)
    assert torch.equal(layer(x), layer(x.reshape(12, D)).reshape(2, 6, D))


def test_no_grad_gives_the_same_output(make_moe, randn) -> None:
    """Under torch.no_grad the output is the same and carries no graph."""
    layer = make_moe(router="gshard", capacity_factor=1.0).eval()
    x = randn(T, D)
    y = layer(x)
    with torch.no_grad():
        y_ng = layer(x)
    assert y_ng.grad_fn is None and not layer.aux_loss.requires_grad
    assert torch.equal(y, y_ng)


@pytest.mark.parametrize("router, k", [("topk", 2), ("switch", 1), ("gshard", 2), ("noisy_topk", 2),
                                       ("expert_choice", 2)])
def test_bf16_autocast_keeps_router_fp32_and_stays_close(router, k, make_moe, randn) -> None:
    """Under CPU bf16 autocast the router logits stay fp32 (same routing), and the output is within bf16 error
    of the fp32 run."""
    layer = make_moe(router=router, top_k=k, dtype=torch.float32, capacity_factor=1.0).eval()
    x = randn(32, D, dtype=torch.float32)
    y32 = layer(x)
    kept32 = _kept_from_routing(layer.last_routing)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x)
    rt = layer.last_routing
    assert rt.logits_TE.dtype == torch.float32 and rt.probs_TE.dtype == torch.float32
    assert _kept_from_routing(rt) == kept32
    assert y16.dtype == torch.float32 and torch.isfinite(y16).all()
    rel = (y16 - y32).norm() / y32.norm()
    assert 0 < rel < 2e-2, f"bf16 relative error {rel:.3g}"


def _compiled_matches_eager(backend: str) -> None:
    """One tiny layer: compiled forward and backward equal eager."""
    torch._dynamo.reset()
    cfg = MoEConfig(d_model=8, d_hidden=16, num_experts=4, top_k=2, capacity_factor=1.0)
    layer = MoELayer(cfg).eval()
    x = torch.randn(16, 8, requires_grad=True)
    y = layer(x)
    (gx,) = torch.autograd.grad(y.square().sum(), [x])
    yc = torch.compile(layer, backend=backend)(x)
    (gxc,) = torch.autograd.grad(yc.square().sum(), [x])
    torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gxc, gx, rtol=1e-5, atol=1e-6)


def test_torch_compile_aot_eager() -> None:
    """torch.compile traces the layer (graph breaks at the data-dependent splits are expected) and agrees with eager;
    aot_eager runs dynamo and AOTAutograd without codegen, so this stays fast."""
    _compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor(request: pytest.FixtureRequest) -> None:
    """The same with inductor's generated C++. It takes 35-60 s on 2 shared cores (a dozen graphs between the
    breaks), so it runs only when asked for: `pytest -m slow`."""
    expr = request.config.getoption("markexpr") or ""
    if "slow" not in expr or "not slow" in expr:
        pytest.skip("inductor compile is slow on CPU; run with -m slow")
    _compiled_matches_eager("inductor")


@pytest.mark.parametrize("router, k", [("topk", 2), ("switch", 1), ("gshard", 2), ("noisy_topk", 2),
                                       ("expert_choice", 2)])
@pytest.mark.parametrize("groups", [1, 2])
def test_zero_tokens(router, k, groups, make_moe) -> None:
    """No tokens: an empty output, finite zero losses, and a backward that runs."""
    layer = make_moe(router=router, top_k=k, capacity_factor=1.0, num_groups=groups)
    x = torch.zeros(0, D, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, D)
    assert layer.aux_loss.item() == 0.0 and all(v.item() == 0.0 for v in layer.last_routing.losses.values())
    stats = layer.last_routing.stats()
    assert stats["tokens_per_expert"] == [0] * 4 and stats["dropped_fraction"] == 0.0 and stats["entropy"] == 0.0
    (y.sum() + layer.aux_loss).backward()


def test_all_tokens_to_one_expert(make_moe, randn, assert_close64) -> None:
    """Every token prefers expert 0: dropless keeps all; with capacity C only the first C tokens keep expert 0."""
    x = randn(T, D)
    for cf, kept in [(None, T), (1.0, 3)]:  # C = ceil(1.0 * 1 * 12 / 4) = 3
        layer = make_moe(router="switch", top_k=1, capacity_factor=cf, router_bias=True).eval()
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
        y = layer(x)
        rt = layer.last_routing
        assert rt.tokens_per_expert.tolist() == [kept, 0, 0, 0]
        assert rt.kept_N.tolist() == [t < kept for t in range(T)]
        assert float(rt.dropped_fraction) == pytest.approx(1 - kept / T)
        y_ref, _, _ = ref.reference_layer(layer, x)
        assert_close64(y, y_ref)


def test_wrong_input_width_is_a_clear_error(make_moe) -> None:
    """An input whose last dimension is not d_model names d_model and the shape it got."""
    layer = make_moe()
    with pytest.raises(ValueError, match=r"d_model=8.*\(3, 5\)"):
        layer(torch.zeros(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.zeros((), dtype=torch.float64))


def test_groups_not_dividing_tokens_is_a_clear_error(make_moe) -> None:
    """num_groups must divide the token count; the message says so."""
    for router, k in [("topk", 2), ("expert_choice", 2)]:
        layer = make_moe(router=router, top_k=k, num_groups=5)
        with pytest.raises(ValueError, match="num_groups=5 must divide the number of tokens"):
            layer(torch.zeros(12, D, dtype=torch.float64))


@pytest.mark.parametrize("router, k", [("topk", 2), ("switch", 1), ("gshard", 2), ("noisy_topk", 2),
                                       ("expert_choice", 2)])
@pytest.mark.parametrize("training", [False, True])
def test_nan_input_is_a_clear_error(router, k, training, make_moe, randn) -> None:
    """Chosen behaviour: a NaN/inf input token raises FloatingPointError naming how many tokens are bad, instead of
    routing arbitrarily (and taking capacity from healthy tokens)."""
    layer = make_moe(router=router, top_k=k, capacity_factor=1.0).train(training)
    x = randn(T, D)
    x[4, 2] = float("nan")
    x[7, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="2 of 12 tokens.*2 input tokens contain NaN/inf"):
        layer(x)
    with torch.no_grad():
        layer.router.weight[1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="router weights"):
        layer(randn(T, D))


def test_aux_loss_is_zero_before_the_first_forward(make_moe) -> None:
    """aux_loss exists (as 0) before any forward, so a training loop can always add it."""
    assert float(make_moe().aux_loss) == 0.0


def test_deepcopy_and_pickle_after_a_forward_drop_the_routing_record(make_moe, randn) -> None:
    """last_routing holds non-leaf tensors of the last graph: copies leave it out and compute the same outputs."""

    moe = make_moe(router="topk", top_k=2)
    x = randn(T, D)
    moe(x).sum().backward()
    assert moe.last_routing is not None
    clone = copy.deepcopy(moe)
    assert clone.last_routing is None and moe.last_routing is not None
    torch.testing.assert_close(clone(x), moe(x), rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(moe, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.last_routing is None
    torch.testing.assert_close(loaded(x), moe(x), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_logits_finite_catches_any_single_bad_logit(bad) -> None:
    """The finite check (and the EP health flag) catch one NaN, +inf or -inf anywhere, and pass finite or empty
    logits."""
    from moeflow.routing.base import logits_finite, non_finite_flag
    logits = torch.randn(64, 8)
    assert logits_finite(logits) and logits_finite(torch.zeros(0, 8))
    assert non_finite_flag(logits).tolist() == [0] == non_finite_flag(torch.zeros(0, 8)).tolist()
    logits[37, 5] = bad
    assert not logits_finite(logits) and non_finite_flag(logits).tolist() == [1]
    logits[38, 5] = -bad  # +inf and -inf together sum to NaN: still caught
    assert not logits_finite(logits)
