"""Grouped linear and grouped MLP: every implementation equals plain per-expert matmuls under autograd.

float64 throughout, except `torch._grouped_mm` (fp32/bf16 only; its CPU backward is broken in torch 2.13, which is
why the loop autograd Function exists). Splits include experts with zero rows, in the middle and at the end.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import moeflow.ops.tuning as tuning_mod
from moeflow import GroupedExperts
from reference import activation as activate
from moeflow.ops.grouped import grouped_linear, resolve_impl
from moeflow.ops.grouped_mlp import GradBuffers, grouped_mlp
from moeflow.ops.rows import ExpertRows, TokenRows

SPLITS = [3, 0, 5, 1, 0]
ACTIVATIONS = ["swiglu", "geglu", "relu", "gelu", "silu"]


def _set_chunk(monkeypatch, elems: int) -> None:
    """Chunk the experts' rows every `elems` pre-activation elements for this test."""
    monkeypatch.setattr(tuning_mod, "_current", tuning_mod.CpuTuning(chunk_elems=elems))


def _leaf(*shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A random leaf tensor that requires grad."""
    return torch.randn(*shape, dtype=dtype).requires_grad_(True)


def _blocks(splits: list[int]) -> list[slice]:
    """The row slice of each expert."""
    starts = [sum(splits[:e]) for e in range(len(splits))]
    return [slice(s, s + n) for s, n in zip(starts, splits)]


def _reference_linear(x: torch.Tensor, w: torch.Tensor, splits: list[int]) -> torch.Tensor:
    """Per-expert matmuls and a cat: what grouped_linear must equal."""
    return torch.cat([x[rows] @ w[e].t() for e, rows in enumerate(_blocks(splits))])


def _reference_mlp(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, splits: list[int],
                   activation: str) -> torch.Tensor:
    """Per-expert FFNs through plain autograd: what grouped_mlp must equal."""
    return torch.cat([activate(x[rows] @ w_in[e].t(), activation) @ w_out[e].t()
                      for e, rows in enumerate(_blocks(splits))])


def _grads(y: torch.Tensor, inputs: list[torch.Tensor], g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Vector-Jacobian product of y with g, w.r.t. inputs."""
    return torch.autograd.grad(y, inputs, g)


@pytest.mark.parametrize("impl", ["loop", "bmm"])
def test_grouped_linear_matches_per_expert_matmuls(impl) -> None:
    """Forward and both gradients equal the reference; experts without rows get exactly zero weight gradient."""
    x, w = _leaf(sum(SPLITS), 4), _leaf(len(SPLITS), 6, 4)
    counts = torch.tensor(SPLITS)
    y = grouped_linear(x, w, counts, SPLITS, impl)
    ref = _reference_linear(x, w, SPLITS)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    for got, want in zip(_grads(y, [x, w], g), _grads(ref, [x, w], g)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    gw = _grads(grouped_linear(x, w, counts, SPLITS, impl), [w], g)[0]
    assert torch.equal(gw[1], torch.zeros_like(gw[1])) and torch.equal(gw[4], torch.zeros_like(gw[4]))


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm needs torch >= 2.8")
def test_grouped_mm_forward_matches_loop_on_cpu() -> None:
    """torch._grouped_mm (forward only on CPU) equals the loop in fp32, zero-row experts included."""
    x, w = torch.randn(sum(SPLITS), 8), torch.randn(len(SPLITS), 16, 8)
    counts = torch.tensor(SPLITS)
    with torch.no_grad():
        y_mm = grouped_linear(x, w, counts, SPLITS, "grouped_mm")
        y_loop = grouped_linear(x, w, counts, SPLITS, "loop")
        y_bmm = grouped_linear(x, w, counts, SPLITS, "bmm")
    ref = _reference_linear(x.double(), w.double(), SPLITS).float()
    for y in (y_mm, y_loop, y_bmm):
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_auto_means_loop_on_cpu_and_bad_input_is_named() -> None:
    """"auto" resolves to the loop on CPU; a feature mismatch or an unknown impl is a clear error."""
    x, w = torch.randn(4, 3), torch.randn(2, 5, 3)
    assert resolve_impl(x, w, "auto") == "loop"
    with pytest.raises(ValueError, match="rows have 4 features"):
        grouped_linear(torch.randn(4, 4), w, torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="unknown impl 'fast'"):
        grouped_linear(x, w, torch.tensor([2, 2]), impl="fast")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("chunk_elems", [1 << 22, 40])
def test_grouped_mlp_matches_per_expert_ffns(activation, chunk_elems, monkeypatch) -> None:
    """Fused MLP == per-expert FFNs, forward and all three gradients; tiny chunks split every block into several
    pieces, so the per-chunk weight-gradient accumulation is exercised too."""
    _set_chunk(monkeypatch, chunk_elems)
    h = 3
    f = 2 * h if activation in ("swiglu", "geglu") else h
    x, w_in, w_out = _leaf(sum(SPLITS), 4), _leaf(len(SPLITS), f, 4), _leaf(len(SPLITS), 4, h)
    y = grouped_mlp(x, w_in, w_out, SPLITS, activation)
    ref = _reference_mlp(x, w_in, w_out, SPLITS, activation)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    got, want = _grads(y, [x, w_in, w_out], g), _grads(ref, [x, w_in, w_out], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not got[1][1].any() and not got[2][4].any()  # experts 1 and 4 have no rows


def test_grouped_mlp_passes_gradcheck(monkeypatch) -> None:
    """torch's finite-difference check on the fused backward (chunked, with an empty expert)."""
    _set_chunk(monkeypatch, 12)
    splits = [2, 0, 3]
    x, w_in, w_out = _leaf(5, 3), _leaf(3, 4, 3), _leaf(3, 3, 2)
    assert torch.autograd.gradcheck(lambda a, b, c: grouped_mlp(a, b, c, splits, "swiglu"), (x, w_in, w_out))


def test_grouped_mlp_without_grad_gives_the_same_output() -> None:
    """Under no_grad nothing is saved, and the result is bit-identical."""
    x, w_in, w_out = _leaf(9, 4), _leaf(5, 6, 4), _leaf(5, 4, 3)
    y = grouped_mlp(x, w_in, w_out, SPLITS)
    with torch.no_grad():
        y_ng = grouped_mlp(x, w_in, w_out, SPLITS)
    assert y_ng.grad_fn is None and torch.equal(y, y_ng)


def test_grouped_mlp_rejects_bad_input() -> None:
    """Splits that do not cover the rows, mismatched weights and unknown activations name the problem."""
    x, w_in, w_out = torch.randn(9, 4), torch.randn(5, 6, 4), torch.randn(5, 4, 3)
    with pytest.raises(ValueError, match="sum to the number of rows"):
        grouped_mlp(x, w_in, w_out, [1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="shapes do not fit"):
        grouped_mlp(x, w_in, w_out, SPLITS, "relu")
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        grouped_mlp(x, w_in, w_out, SPLITS, "tanh")


def test_grouped_mlp_under_bf16_autocast_stays_close() -> None:
    """CPU bf16 autocast runs the fused op in bf16 and stays within bf16 error of fp32; grads reach fp32 weights."""
    x, w_in, w_out = torch.randn(64, 16), _leaf(4, 32, 16, dtype=torch.float32), _leaf(4, 16, 16, dtype=torch.float32)
    splits = [20, 0, 30, 14]
    ref = grouped_mlp(x, w_in, w_out, splits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_mlp(x, w_in, w_out, splits)
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).norm() / ref.norm() < 2e-2
    y.float().sum().backward()
    assert w_in.grad is not None and w_in.grad.dtype == torch.float32 and torch.isfinite(w_in.grad).all()


def test_grouped_experts_impls_agree() -> None:
    """GroupedExperts gives the same output and gradients with the fused loop and the padded bmm."""
    torch.manual_seed(0)
    fused = GroupedExperts(5, 4, 3, "swiglu", impl="loop").double()
    padded = copy.deepcopy(fused)
    padded.impl = "bmm"
    x = torch.randn(sum(SPLITS), 4, dtype=torch.float64)
    counts = torch.tensor(SPLITS)
    outs = []
    for m in (fused, padded):
        y = m(x, ExpertRows(SPLITS, counts))
        y.square().sum().backward()
        outs.append((y, m.w_in.grad, m.w_out.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_grad_buffers_reuse_memory_but_never_overwrite_a_live_gradient() -> None:
    """After zero_grad(set_to_none=True) the next gradient reuses the same memory; a gradient the caller still
    holds, gradient accumulation and torch.autograd.grad results are never overwritten."""
    torch.manual_seed(0)
    experts = GroupedExperts(3, 4, 5, "swiglu").double()
    x, counts, splits = torch.randn(7, 4, dtype=torch.float64), torch.tensor([3, 0, 4]), [3, 0, 4]

    def backward() -> torch.Tensor:
        experts(x, ExpertRows(splits, counts)).square().sum().backward()
        return experts.w_in.grad

    kept = backward()
    expected = kept.clone()
    experts.zero_grad(set_to_none=True)
    again = backward()
    assert again.data_ptr() != kept.data_ptr() and torch.equal(kept, expected) and torch.equal(again, expected)
    ptr = again.data_ptr()
    del kept, again
    experts.zero_grad(set_to_none=True)
    assert backward().data_ptr() == ptr  # memory reused: nothing else held it
    torch.testing.assert_close(backward(), 2 * expected, rtol=1e-12, atol=0)  # accumulation
    experts.zero_grad(set_to_none=True)
    loss = experts(x, ExpertRows(splits, counts)).square().sum()
    (g1,) = torch.autograd.grad(loss, [experts.w_in], retain_graph=True)
    (g2,) = torch.autograd.grad(loss, [experts.w_in])
    assert g1.data_ptr() != g2.data_ptr() and torch.equal(g1, expected) and torch.equal(g2, expected)
    assert len(copy.deepcopy(experts).grad_buffers._bufs) == 0
    assert len(pickle.loads(pickle.dumps(experts)).grad_buffers._bufs) == 0


def test_grad_buffers_follow_shape_and_dtype() -> None:
    """A buffer is only reused for a weight of the same shape and dtype."""
    buffers = GradBuffers()
    a = buffers.empty_like("w", torch.empty(2, 3))
    ptr = a.data_ptr()
    del a
    assert buffers.empty_like("w", torch.empty(2, 3)).data_ptr() == ptr
    b = buffers.empty_like("w", torch.empty(3, 2, dtype=torch.float64))
    assert b.shape == (3, 2) and b.dtype == torch.float64


def _token_rows(num_tokens: int, splits: list[int], seed: int) -> TokenRows:
    """A random token <-> row map: each row reads a random token (some tokens have none, some several)."""
    gen = torch.Generator().manual_seed(seed)
    return TokenRows.from_token_ids(torch.randint(0, num_tokens, (sum(splits),), generator=gen), num_tokens)


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
@pytest.mark.parametrize("chunk_elems", [1 << 22, 40])
@pytest.mark.parametrize("weighted", [False, True])
def test_grouped_mlp_with_tokens_gathers_and_sums_rows(activation, chunk_elems, weighted, monkeypatch) -> None:
    """tokens= fuses dispatch and combine: == sum over each token's rows of w_r * FFN_e(x[t_r]), with the gradients
    of x (summed over a token's rows), the weights and the row weights (float64, zero-row experts and tokens)."""
    _set_chunk(monkeypatch, chunk_elems)
    tokens = _token_rows(7, SPLITS, seed=3)
    assert (torch.bincount(tokens.token_ids_R, minlength=7) == 0).any()  # a token without rows
    h = 3
    f = 2 * h if activation == "swiglu" else h
    x, w_in, w_out = _leaf(7, 4), _leaf(len(SPLITS), f, 4), _leaf(len(SPLITS), 4, h)
    w = _leaf(sum(SPLITS)) if weighted else None
    y = grouped_mlp(x, w_in, w_out, SPLITS, activation, row_weights=w, tokens=tokens)
    rows = _reference_mlp(x[tokens.token_ids_R], w_in, w_out, SPLITS, activation)
    if weighted:
        rows = rows * w[:, None]
    ref = torch.zeros(7, 4, dtype=torch.float64).index_add(0, tokens.token_ids_R, rows)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    leaves = [x, w_in, w_out] + ([w] if weighted else [])
    g = torch.randn_like(ref)
    for a, b in zip(_grads(y, leaves, g), _grads(ref, leaves, g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_grouped_mlp_with_tokens_passes_gradcheck_and_rejects_row_major_x(monkeypatch) -> None:
    """Finite differences through gather, chunked experts and sum; x must then be token-major [T, D]."""
    _set_chunk(monkeypatch, 12)
    splits = [2, 0, 3]
    tokens = _token_rows(4, splits, seed=1)
    x, w_in, w_out, w = _leaf(4, 3), _leaf(3, 4, 3), _leaf(3, 3, 2), _leaf(5)
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: grouped_mlp(a, b, c, splits, "swiglu", row_weights=d, tokens=tokens), (x, w_in, w_out, w))
    with pytest.raises(ValueError, match=r"token-major \[T=4, D\]"):
        grouped_mlp(_leaf(5, 3), w_in, w_out, splits, tokens=tokens)


def test_grouped_experts_with_tokens_agree_across_impls() -> None:
    """GroupedExperts(x, ExpertRows(tokens=...)): the fused loop and the gather / bmm / combine fallback give the
    same [T, D]; without tokens both return the weighted rows [R, D]."""
    tokens = _token_rows(6, SPLITS, seed=5)
    experts = GroupedExperts(len(SPLITS), 4, 3).double()
    x, w = torch.randn(6, 4, dtype=torch.float64), torch.rand(sum(SPLITS), dtype=torch.float64)
    counts = torch.tensor(SPLITS)
    by_token, by_row = ExpertRows(SPLITS, counts, tokens, w), ExpertRows(SPLITS, counts, None, w)
    x_RD = x[tokens.token_ids_R]
    fused, rows = experts(x, by_token), experts(x_RD, by_row)
    assert fused.shape == (6, 4) and rows.shape == (sum(SPLITS), 4)
    experts.impl = "bmm"
    torch.testing.assert_close(experts(x, by_token), fused, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(experts(x_RD, by_row), rows, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.zeros(6, 4, dtype=torch.float64).index_add(0, tokens.token_ids_R, rows), fused,
                               rtol=1e-12, atol=1e-12)
