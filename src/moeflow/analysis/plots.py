"""Training figures (matplotlib with the Agg backend, imported lazily): loss curves, expert load, drops.

Every function takes plain arrays (see moeflow.analysis.stats), writes one PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moeflow.analysis.stats import smooth


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported (plots are an optional extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("plots need matplotlib: pip install 'moeflow[plot]'") from e
    matplotlib.use("Agg")  # files only: never open a window
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write the figure as a PNG, free it, and return the path."""
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


def plot_loss(train_steps: np.ndarray, train_loss: np.ndarray, val_steps: np.ndarray, val_loss: np.ndarray,
              path: str | Path, title: str = "loss") -> Path:
    """Training loss (raw and smoothed) and validation loss against step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if train_steps.size:
        ax.plot(train_steps, train_loss, color="tab:blue", alpha=0.25, lw=0.8)
        ax.plot(train_steps, smooth(train_loss, max(1, train_steps.size // 50)), color="tab:blue", label="train")
    if val_steps.size:
        ax.plot(val_steps, val_loss, "o-", color="tab:orange", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def _bin_steps(steps: np.ndarray, shares: list[np.ndarray], max_columns: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Average consecutive steps into at most `max_columns` bins (single-step loads are noisy)."""
    if steps.size <= max_columns:
        return steps, shares
    edges = np.linspace(0, steps.size, max_columns + 1).astype(int)
    binned_steps = np.array([steps[b - 1] for b in edges[1:]])
    return binned_steps, [np.stack([s[a:b].mean(axis=0) for a, b in zip(edges[:-1], edges[1:])]) for s in shares]


def plot_expert_load(steps: np.ndarray, shares: list[np.ndarray], path: str | Path, max_columns: int = 100) -> Path:
    """One heat map per MoE layer: steps (x) by experts (y), colour = share of the layer's kept assignments.

    Runs longer than `max_columns` logged steps are averaged into that many bins.
    """
    if not shares:
        raise ValueError("no MoE layers to plot")
    plt = _pyplot()
    n = len(shares)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 2.6 * rows), squeeze=False)
    steps, shares = _bin_steps(steps, shares, max_columns)
    vmax = max(float(s.max()) for s in shares if s.size) if any(s.size for s in shares) else 1.0
    for i, share_SE in enumerate(shares):
        ax = axes[i // cols][i % cols]
        e = share_SE.shape[1]
        extent = (float(steps[0]), float(steps[-1]), -0.5, e - 0.5) if steps.size else None
        im = ax.imshow(share_SE.T, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis",
                       vmin=0.0, vmax=vmax, extent=extent)
        ax.set_title(f"MoE layer {i}: share of tokens per expert (uniform = {1 / e:.3f})", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        ax.set_yticks(range(0, e, _tick_stride(e)))  # every expert labelled (matplotlib's default skips odd ones)
        fig.colorbar(im, ax=ax, fraction=0.04)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def _tick_stride(n: int, max_ticks: int = 32) -> int:
    """Label every one of `n` rows while they stay legible, else every k-th."""
    return max(1, -(-n // max_ticks))


def plot_layer_lines(steps: np.ndarray, values_SL: np.ndarray, path: str | Path, ylabel: str, title: str,
                     all_zero_note: str | None = None) -> Path:
    """One smoothed line per MoE layer (e.g. dropped-token fraction or router entropy over training).

    With `all_zero_note`, values that are all exactly zero (a dropless run's drops) are shown as that note instead
    of overlapping flat lines on a meaningless axis.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.set_xlabel("step")
    ax.set_title(title)
    if all_zero_note is not None and not np.any(values_SL):
        ax.text(0.5, 0.5, all_zero_note, transform=ax.transAxes, ha="center", va="center", fontsize=12)
        ax.set_yticks([])
        if steps.size:
            ax.set_xlim(float(steps[0]), float(steps[-1]) if steps[-1] > steps[0] else float(steps[0]) + 1)
        fig.tight_layout()
        return save_figure(fig, path)
    window = max(1, steps.size // 50)
    for li in range(values_SL.shape[1]):
        ax.plot(steps, smooth(values_SL[:, li], window), label=f"layer {li}", lw=1.2)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if values_SL.shape[1] <= 12:
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)
