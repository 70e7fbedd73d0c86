"""Padded Switch Transformer sources: `attention_mask` against transformers as the oracle (fp32, <= 1e-4).

Three sources of lengths 9, 6 and 3 are padded at the end to 9 (pad id 0, real ids never 0, so HF's generate
cannot infer a different mask from the pad id). The decoder side is unpadded, so every decoder position is
compared. Padding tokens are still routed (router_ignore_padding_tokens=False, the only setting moeflow loads),
so they take expert capacity in both implementations; the `roomy` model has expert_capacity=64, more than any
sequence's length, so routing drops nothing there and a padded row equals its source run alone; the `tight`
model keeps the shared tiny config's expert_capacity=2, where pads do displace real tokens, exactly as in HF.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_hf_common import VOCAB, save_hf_model

import moeflow

pytestmark = pytest.mark.hf
transformers = pytest.importorskip("transformers")

LENGTHS = [9, 6, 3]
MAX_DIFF = 1e-4


def padded_batch(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids [3, 9] padded with 0 at the end, attention mask [3, 9] int64, decoder ids [3, 5])."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(LENGTHS), max(LENGTHS)), generator=g)
    mask = (torch.arange(max(LENGTHS))[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    dec = torch.randint(1, VOCAB, (len(LENGTHS), 5), generator=g)
    return ids * mask, mask, dec


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Any]]:
    """name -> (HF model, moeflow.load_hf of its checkpoint): `roomy` drops no token, `tight` drops many."""
    out = {}
    for name, capacity in (("roomy", 64), ("tight", 2)):
        folder: Path = tmp_path_factory.mktemp(f"switch_{name}")
        hf = save_hf_model("switch_transformers", folder, expert_capacity=capacity)
        assert hf.config.router_ignore_padding_tokens is False
        out[name] = (hf, moeflow.load_hf(folder))
    return out


def hf_padded_logits(hf: Any, ids: torch.Tensor, mask: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
    """transformers' logits with the encoder padding mask."""
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, asserting equal shapes."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", ["roomy", "tight"])
def test_padded_logits_match_transformers(name: str, models: dict) -> None:
    hf, ours = models[name]
    ids, mask, dec = padded_batch()
    want = hf_padded_logits(hf, ids, mask, dec)
    with torch.no_grad():
        got = ours(ids, dec, attention_mask=mask)
        unmasked = ours(ids, dec)
    assert max_diff(got, want) <= MAX_DIFF, f"{name}: max |diff| {max_diff(got, want):.2e}"
    # the mask must matter here, else the parity above proves nothing about it
    assert max_diff(unmasked, want) > 1e-2
    dropped = max(float(m.last_routing.dropped_fraction) for _, m in moeflow.moe_layers(ours))
    assert (dropped == 0.0) if name == "roomy" else (dropped > 0.1), dropped


def test_padded_rows_equal_sources_alone(models: dict) -> None:
    """Each padded row's logits equal its source run alone, unpadded. This holds only because the `roomy` model's
    expert_capacity (64) exceeds every sequence length, so routing drops nothing and pads cannot take a real
    token's slot; with a tight capacity they can (pads are routed, as in HF) and the rows would differ."""
    _, ours = models["roomy"]
    ids, mask, dec = padded_batch()
    with torch.no_grad():
        batch = ours(ids, dec, attention_mask=mask)
        for i, n in enumerate(LENGTHS):
            alone = ours(ids[i:i + 1, :n], dec[i:i + 1])
            assert max_diff(batch[i:i + 1], alone) <= MAX_DIFF, f"row {i}: {max_diff(batch[i:i + 1], alone):.2e}"


@pytest.mark.parametrize("name", ["roomy", "tight"])
def test_padded_greedy_generation_matches_transformers(name: str, models: dict) -> None:
    hf, ours = models[name]
    ids, mask, _ = padded_batch(seed=7)
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, num_beams=1)
    got = ours.generate(ids, 6, attention_mask=mask)
    assert torch.equal(got, want), f"{name}:\n{got}\n{want}"
    if name == "roomy":  # no drops, so each row also generates what its source alone does
        for i, n in enumerate(LENGTHS):
            assert torch.equal(got[i:i + 1], ours.generate(ids[i:i + 1, :n], 6)), f"row {i}"


def test_mask_dtypes_agree_and_all_ones_is_no_mask(models: dict) -> None:
    _, ours = models["tight"]
    ids, mask, dec = padded_batch()
    with torch.no_grad():
        ref = ours(ids, dec, attention_mask=mask)
        for m in (mask.bool(), mask.int(), mask.to(torch.uint8)):
            assert torch.equal(ours(ids, dec, attention_mask=m), ref), m.dtype
        ones = torch.ones_like(mask)
        assert torch.equal(ours(ids, dec, attention_mask=ones), ours(ids, dec))


def test_fully_padded_row_matches_transformers(models: dict) -> None:
    """HF masks with the dtype's finite minimum, so an all-zero row attends uniformly (finite, no NaN); we match."""
    hf, ours = models["roomy"]
    ids, mask, dec = padded_batch()
    mask[2] = 0
    want = hf_padded_logits(hf, ids, mask, dec)
    with torch.no_grad():
        got = ours(ids, dec, attention_mask=mask)
    assert bool(want.isfinite().all()) and bool(got.isfinite().all())
    assert max_diff(got, want) <= MAX_DIFF, f"max |diff| {max_diff(got, want):.2e}"


@pytest.mark.parametrize("bad,match", [
    (torch.ones(3, 8, dtype=torch.long), r"\[3, 9\].*\(3, 8\)"),
    (torch.ones(9, 3, dtype=torch.long), r"\[3, 9\].*\(9, 3\)"),
    (torch.ones(3, 1, 9, dtype=torch.long), r"\[3, 9\].*\(3, 1, 9\)"),
    (torch.ones(9, dtype=torch.long), r"\[3, 9\].*\(9,\)"),
    ([[1] * 9] * 3, r"\[3, 9\].*list"),
    (torch.ones(3, 9), r"bool or integer.*float32"),
    (torch.full((3, 9), 2), r"only 0 \(padding\) and 1.*\[2\]"),
])
def test_bad_masks_raise(bad: Any, match: str, models: dict) -> None:
    _, ours = models["roomy"]
    ids, _, dec = padded_batch()
    with pytest.raises(ValueError, match=match):
        ours(ids, dec, attention_mask=bad)
    with pytest.raises(ValueError, match=match):
        ours.generate(ids, 2, attention_mask=bad)
