"""Expert-parallel MoELayer on 2 and 4 gloo ranks == the single-process layer on the same global batch (fp64).

Each rank computes the single-process reference itself (same seed, same global batch, num_groups = world so
that routing groups coincide with the ranks' local batches), then runs the EP layer on its slice and compares:
output, every aux loss term (mean over ranks), every parameter gradient after the reference reduction `reference_reduce` (expert
gradients against the rank's slice of the reference), and the input gradient (ep_workers.parity_worker).
Cases: dropless top-k with a shared expert, all tokens to one expert (zero splits), Switch with capacity
(padded and variable splits), GShard top-2 with capacity, expert choice, hierarchical. The spawns are the
session fixtures of conftest.py; the tests below only read their results.
"""

from __future__ import annotations

import pytest
from ep_workers import CASES, T_LOCAL

pytestmark = pytest.mark.distributed


def _check(results: list[dict], key: tuple) -> None:
    """Every difference of every rank below fp64 tolerance; the case must exercise what it claims."""
    for rank, res in enumerate(results):
        diffs = res["parity"][key]
        for what, v in diffs.items():
            if what in ("dropped_ref", "min_split", "sent_rows"):
                continue
            assert v < 1e-10, f"rank {rank} {key}: {what} differs by {v:.3g}"
        if key[0].startswith(("switch", "gshard")):
            assert diffs["dropped_ref"] > 0, "capacity case dropped nothing: the test would not exercise drops"
        if key[0] == "skewed_zero_splits" and key[1] > 1 and rank % key[1]:  # ep_rank > 0 holds no expert 0
            assert diffs["min_split"] == 0, "skewed case should leave some rank with zero received rows"
        if key[0] == "hierarchical_dedup" and key[1] > 1:  # one cluster = one rank: each token sent once
            assert diffs["sent_rows"] == T_LOCAL, diffs


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("ep", [2, 1])
def test_layer_matches_single_process_world2(world2: list[dict], case: str, ep: int) -> None:
    """2 ranks: EP=2 and EP=1 reproduce the single-process layer (output, losses, all gradients)."""
    _check(world2, (case, ep))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("ep", [4, 2])
def test_layer_matches_single_process_world4(world4: list[dict], case: str, ep: int) -> None:
    """4 ranks: EP=4 and EP=2 with 2 expert replicas reproduce the single-process layer."""
    _check(world4, (case, ep))


@pytest.mark.parametrize("fixture", ["world2", "world4"])
def test_all_to_all_uneven_and_zero_splits(fixture: str, request: pytest.FixtureRequest) -> None:
    """The autograd all-to-all delivers the right rows forward and routes their gradients back."""
    results = request.getfixturevalue(fixture)
    world = len(results)
    for rank, res in enumerate(results):
        d = res["parity"][("a2a", world)]
        assert d["a2a_fwd"] == 0 and d["a2a_bwd"] == 0, f"rank {rank}: {d}"
