"""Routing statistics: per-layer expert load, drops, entropy and losses from Routing records, and their summaries.

Shape legend: L = MoE layers, E = experts, S = logged steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeflow.routing import Routing


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (a line torn by a kill mid-write is skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def layer_stats(routings: list[Routing]) -> list[dict[str, Any]]:
    """One plain-Python dict per MoE layer: tokens_per_expert, dropped_fraction, entropy, and each loss.

    All layers' numbers are gathered into one tensor first, so logging costs a single device sync.
    """
    if not routings:
        return []
    counts_LE = [r.tokens_per_expert.float() for r in routings]
    scalars = [torch.stack([r.dropped_fraction.float(), r.entropy.float(),
                            *[v.detach().float() for v in r.losses.values()]]) for r in routings]
    flat = torch.cat([torch.cat([c, s]) for c, s in zip(counts_LE, scalars)]).cpu().tolist()
    out, pos = [], 0
    for r, c in zip(routings, counts_LE):
        e = c.numel()
        rec: dict[str, Any] = {"tokens_per_expert": [int(v) for v in flat[pos:pos + e]],
                               "dropped_fraction": flat[pos + e], "entropy": flat[pos + e + 1]}
        pos += e + 2
        rec["losses"] = {name: flat[pos + i] for i, name in enumerate(r.losses)}
        pos += len(r.losses)
        out.append(rec)
    return out


def load_imbalance(tokens_per_expert: list[int] | np.ndarray) -> float:
    """max / mean tokens per expert: 1.0 is perfect balance, E means one expert took everything."""
    t = np.asarray(tokens_per_expert, dtype=np.float64)
    mean = t.mean() if t.size else 0.0
    return float(t.max() / mean) if mean > 0 else float("nan")


def summarize_layers(layers: list[dict[str, Any]]) -> dict[str, float]:
    """Across layers: mean dropped fraction, worst max/mean load, mean entropy (for a progress line)."""
    if not layers:
        return {}
    return {"dropped": float(np.mean([lay["dropped_fraction"] for lay in layers])),
            "imbalance": max(load_imbalance(lay["tokens_per_expert"]) for lay in layers),
            "entropy": float(np.mean([lay["entropy"] for lay in layers]))}


def load_matrices(records: list[dict[str, Any]]) -> tuple[np.ndarray, list[np.ndarray]]:
    """From train records: the steps [S] and, per MoE layer, the share of tokens per expert [S, E]."""
    recs = [r for r in records if r.get("kind") == "train" and r.get("layers")]
    steps = np.array([r["step"] for r in recs], dtype=np.int64)
    if not recs:
        return steps, []
    n_layers = len(recs[0]["layers"])
    mats = []
    for li in range(n_layers):
        counts_SE = np.array([r["layers"][li]["tokens_per_expert"] for r in recs], dtype=np.float64)
        mats.append(counts_SE / np.maximum(counts_SE.sum(axis=1, keepdims=True), 1.0))
    return steps, mats


def series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one scalar over the records of one kind; missing or null values are NaN."""
    recs = [r for r in records if r.get("kind") == kind]
    steps = np.array([r["step"] for r in recs], dtype=np.int64)
    vals = np.array([np.nan if r.get(key) is None else r[key] for r in recs], dtype=np.float64)
    return steps, vals


def layer_series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps [S], values [S, L]) of one per-layer scalar (e.g. dropped_fraction, entropy) from train records."""
    recs = [r for r in records if r.get("kind") == "train" and r.get("layers")]
    steps = np.array([r["step"] for r in recs], dtype=np.int64)
    vals = np.array([[lay[key] for lay in r["layers"]] for r in recs], dtype=np.float64)
    return steps, vals.reshape(len(recs), -1)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (window clipped at the start), NaNs ignored."""
    if window <= 1 or values.size == 0:
        return values
    v = np.where(np.isfinite(values), values, 0.0)
    n = np.isfinite(values).astype(np.float64)
    cv, cn = np.cumsum(v), np.cumsum(n)
    cv[window:] = cv[window:] - cv[:-window]
    cn[window:] = cn[window:] - cn[:-window]
    with np.errstate(invalid="ignore", divide="ignore"):
        return cv / cn
