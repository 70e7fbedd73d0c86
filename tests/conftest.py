"""Shared test fixtures: seeded random generators, float64 helpers, tiny MoE layers.

Every test starts from `torch.manual_seed(0)` (routers draw their noise from the global generator, so results do
not depend on test order) and gets the default dtype restored afterwards. Hypothesis runs without deadlines
(the CPU is shared) and derandomized (the same examples on every run).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from hypothesis import settings

from moeflow import MoEConfig, MoELayer

settings.register_profile("moeflow", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("moeflow")


@pytest.fixture(autouse=True)
def _seeded_and_restored() -> Iterator[None]:
    """Seed the global generator; restore the default dtype and grad mode after the test."""
    torch.manual_seed(0)
    dtype, grad = torch.get_default_dtype(), torch.is_grad_enabled()
    yield
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)


@pytest.fixture
def rng() -> torch.Generator:
    """A CPU generator with a fixed seed, for test data independent of the global one."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def randn(rng: torch.Generator) -> Callable[..., torch.Tensor]:
    """`randn(*shape, dtype=torch.float64, scale=1.0)`: normal samples from the test's own generator."""
    def _randn(*shape: int, dtype: torch.dtype = torch.float64, scale: float = 1.0,
               requires_grad: bool = False) -> torch.Tensor:
        return (torch.randn(*shape, generator=rng, dtype=dtype) * scale).requires_grad_(requires_grad)
    return _randn


@pytest.fixture
def float64() -> None:
    """Make float64 the default dtype for the test (restored afterwards by the autouse fixture)."""
    torch.set_default_dtype(torch.float64)


def _make_moe(*, dtype: torch.dtype = torch.float64, seed: int = 0, router_std: float | None = 1.0,
              **fields: object) -> MoELayer:
    """A small MoELayer with seeded weights in `dtype`.

    `router_std` rescales the router weight (None keeps the library's near-uniform init): the default 1.0
    makes routing decisive, so float64 references never face near-ties.
    """
    base: dict[str, object] = {"d_model": 8, "d_hidden": 6, "num_experts": 4, "top_k": 2}
    base.update(fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = MoELayer(MoEConfig(**base)).to(dtype)
        with torch.no_grad():
            if router_std is not None:
                layer.router.weight.normal_(0.0, router_std / layer.cfg.d_model ** 0.5)
            if hasattr(layer.router, "noise_weight"):
                # the paper zero-initialises W_noise; random values exercise the softplus noise scale
                layer.router.noise_weight.normal_(0.0, 1.0 / layer.cfg.d_model ** 0.5)
    return layer


@pytest.fixture
def make_moe() -> Callable[..., MoELayer]:
    """Factory `make_moe(dtype=float64, seed=0, router_std=1.0, **MoEConfig fields)` for tiny seeded layers."""
    return _make_moe


@pytest.fixture
def assert_close64() -> Callable[..., None]:
    """`assert_close64(actual, expected, what)`: float64 comparison, 1e-10 relative / 1e-12 absolute."""
    def _check(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"{what}: {m}" if what else m)
    return _check


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread for every test: tiny shapes gain nothing from two, and on a shared CPU each parallel op
    waits for a descheduled worker (measured: a tiny Switch forward took 0.4 s on 2 threads, 0.02 s on 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
