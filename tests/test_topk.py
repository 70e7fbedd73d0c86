"""ops.top_k: the routers' top-k, a max loop on CPU for k <= 2, must equal torch.topk."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeflow.ops.topk as topk_mod
from moeflow.ops.topk import top_k


@pytest.fixture(autouse=True)
def _loop_at_every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The small shapes below would take torch.topk itself; test the max loop on them."""
    monkeypatch.setattr(topk_mod, "_MIN_LOOP_ELEMS", 0)


@given(t=st.integers(0, 40), e=st.integers(2, 70), k=st.integers(1, 4), seed=st.integers(0, 10_000),
       dtype=st.sampled_from([torch.float32, torch.float64]))
@settings(max_examples=60, deadline=None)
def test_top_k_equals_torch_topk(t, e, k, seed, dtype) -> None:
    """Values, indices and the gradient equal torch.topk's (distinct values, so the order is unique)."""
    k = min(k, e)
    x = torch.randperm(t * e, generator=torch.Generator().manual_seed(seed)).to(dtype).view(t, e)
    x = (x / max(t * e, 1)).requires_grad_(True)
    v, i = top_k(x, k)
    rv, ri = torch.topk(x, k, dim=-1)
    assert torch.equal(i, ri) and torch.equal(v, rv) and i.dtype == torch.int64
    g = torch.randn(t, k, dtype=dtype)
    assert torch.equal(torch.autograd.grad(v, x, g)[0], torch.autograd.grad(rv, x, g)[0])


def test_top_k_rows_with_minus_inf_ties_and_nan() -> None:
    """-inf everywhere but the winner still gives two distinct indices; ties go to the lower index; NaN wins."""
    inf = float("inf")
    x = torch.tensor([[5.0, -inf, -inf], [-inf, -inf, 3.0], [2.0, 2.0, 1.0], [float("nan"), 1.0, 2.0]])
    v, i = top_k(x, 2)
    assert i.tolist() == [[0, 1], [2, 0], [0, 1], [0, 2]]
    assert v[:3].tolist() == [[5.0, -inf], [3.0, -inf], [2.0, 2.0]] and v[3, 1] == 2.0 and v[3, 0].isnan()


def test_top_k_rejects_k_out_of_range_and_allows_zero() -> None:
    """k larger than the row is a clear error, not a silent clamp; k = 0 gives empty results, as torch.topk does."""
    with pytest.raises(ValueError, match="k=5 must be in"):
        top_k(torch.zeros(3, 4), 5)
    v, i = top_k(torch.randn(3, 4), 0)
    assert v.shape == i.shape == (3, 0)


def test_top_k_at_router_size_uses_the_loop_and_equals_topk(monkeypatch: pytest.MonkeyPatch) -> None:
    """At the real threshold: a [4096, 64] softmax takes the loop (torch.topk is not called) and agrees with it."""
    monkeypatch.undo()
    p = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0)).softmax(-1)
    ref = torch.topk(p, 2, dim=-1)
    monkeypatch.setattr(torch, "topk", lambda *a, **k: pytest.fail("torch.topk was called"))
    v, i = top_k(p, 2)
    assert torch.equal(v, ref.values) and torch.equal(i, ref.indices)
