"""Figure for `moeflow plan`: the predicted step time of each layout, stacked by term (matplotlib, lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeflow.analysis.plots import _pyplot, save_figure


def plot_breakdown(labels: list[str], terms: dict[str, list[float]], steps: list[float], path: str | Path,
                   title: str = "") -> Path:
    """Horizontal stacked bars, one per layout (fastest on top): seconds per step in each term."""
    plt = _pyplot()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(9, 0.45 * n + 1.6))
    left = [0.0] * n
    y = list(range(n))[::-1]
    for name, vals in terms.items():
        if not any(v > 0 for v in vals):
            continue
        ax.barh(y, vals, left=left, label=name)
        left = [a + b for a, b in zip(left, vals)]
    for yi, s in zip(y, steps):
        ax.plot([s], [yi], "k|", markersize=14)  # the step time (overlap can make it shorter than the stack)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("seconds per step (| = predicted step, after overlap)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, out)
