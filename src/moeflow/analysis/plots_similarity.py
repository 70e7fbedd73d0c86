"""Figures for expert similarity and compression (matplotlib, imported lazily with the Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from moeflow.analysis.plots import _pyplot, save_figure


def plot_similarity_heatmaps(layers: Sequence[tuple[str, Tensor, Tensor, Tensor]], path: str | Path) -> Path:
    """One row per MoE layer (name, S^w, S^f, S): three expert x expert heat maps on a shared [-1, 1] scale."""
    if not layers:
        raise ValueError("no MoE layers to plot")
    plt = _pyplot()
    fig, axes = plt.subplots(len(layers), 3, figsize=(10.5, 3.2 * len(layers)), squeeze=False)
    im = None
    for row, (name, *mats) in zip(axes, layers):
        for ax, title, m in zip(row, ("S^w (weights)", "S^f (router-logit centroids)", "S (fused)"), mats):
            im = ax.imshow(m.float().numpy(), cmap="RdBu_r", vmin=-1.0, vmax=1.0)
            ax.set_title(f"{name}: {title}", fontsize=8)
            ax.set_xticks(range(m.shape[0]))
            ax.set_yticks(range(m.shape[0]))
            ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=axes, fraction=0.02, pad=0.02)
    return save_figure(fig, path, dpi=100)


def plot_quality_vs_ratio(curves: dict[str, tuple[list[float], list[float]]], path: str | Path, ylabel: str,
                          title: str) -> Path:
    """One line per method: quality (e.g. bits/byte) against the kept parameter ratio."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods = list(dict.fromkeys(n.removesuffix(" +ft") for n in curves))
    colours = plt.get_cmap("tab10")
    for name, (xs, ys) in curves.items():
        # one colour per method: dashed training-free, solid fine-tuned
        ax.plot(xs, ys, marker="o", label=name, color=colours(methods.index(name.removesuffix(" +ft")) % 10),
                linestyle="-" if name.endswith(" +ft") else "--")
    ax.set_xlabel("expert parameter ratio (compressed / original)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_recluster_history(history: list[dict[str, Any]], path: str | Path) -> Path:
    """Group membership of each expert over the re-clustering checks (one panel per layer) and load CV^2."""
    plt = _pyplot()
    names = list(history[0]["layers"]) if history else []
    if not names:
        raise ValueError("no re-clustered layers to plot")
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(3.6 * (len(names) + 1), 3.2), squeeze=False)
    steps = [h["step"] for h in history]
    for ax, name in zip(axes[0], names):
        groups = [[float(g) for g in h["layers"][name]["groups"]] for h in history]
        ax.imshow(list(map(list, zip(*groups))), aspect="auto", cmap="tab10", interpolation="nearest",
                  extent=(steps[0] - 0.5, steps[-1] + 0.5, len(groups[0]) - 0.5, -0.5))
        ax.set_title(f"{name}: group of each expert", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
    ax = axes[0][-1]
    for name in names:
        ax.plot(steps, [h["layers"][name]["load_cv2"] for h in history], marker="o", label=name)
    ax.set_title("expert-load variance (CV^2)", fontsize=8)
    ax.set_xlabel("step")
    ax.legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
