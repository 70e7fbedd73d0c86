"""Figures for language x expert routing (matplotlib, imported lazily with the Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeflow.analysis.plots import _pyplot, save_figure
from moeflow.analysis.routing_lang import LanguageRouting


def plot_language_expert_heatmaps(stats: dict[str, LanguageRouting], path: str | Path) -> Path:
    """One heat map per MoE layer: rows = languages, columns = experts, colour = share of the language's routed
    assignments (each row sums to 1), with I(language; expert) in the title. Writes a PNG and returns its path."""
    if not stats:
        raise ValueError("no MoE layers to plot")
    plt = _pyplot()
    n = len(stats)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 0.5 * len(next(iter(stats.values())).languages) * rows
                                                    + 1.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (name, s) in zip(axes.flat, stats.items()):
        share = s.share_LE().numpy()
        im = ax.imshow(share, cmap="viridis", vmin=0.0, vmax=max(float(share.max()), 1e-9), aspect="auto")
        ax.set_xticks(range(s.num_experts), [f"e{i}" for i in range(s.num_experts)])
        ax.set_yticks(range(len(s.languages)), s.languages)
        for (li, ei), v in zip(((i, j) for i in range(share.shape[0]) for j in range(share.shape[1])), share.flat):
            ax.text(ei, li, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 0.6 * share.max() else "black")
        ax.set_title(f"{name}: I(lang; expert) = {s.mutual_information():.2f} bits "
                     f"({100 * s.normalized_mi():.0f}% of H(E))", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle("share of each language's routed tokens per expert (%)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_drops_by_language(stats: dict[str, LanguageRouting], path: str | Path) -> Path:
    """Grouped bars: dropped-assignment fraction per language (groups) and MoE layer (bars). Writes a PNG."""
    if not stats:
        raise ValueError("no MoE layers to plot")
    plt = _pyplot()
    layers = list(stats)
    langs = stats[layers[0]].languages
    width = 0.8 / len(layers)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(langs), 3.2))
    if not any(any(stats[name].dropped_by_language()) for name in layers):
        # zero-height bars on a -0.04..0.04 axis say nothing: say it in words
        ax.text(0.5, 0.5, "no drops (every routed assignment was kept)", transform=ax.transAxes, ha="center",
                va="center", fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("capacity drops by language", fontsize=9)
        fig.tight_layout()
        return save_figure(fig, path)
    for j, name in enumerate(layers):
        drops = stats[name].dropped_by_language()
        ax.bar([i + j * width for i in range(len(langs))], drops, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(langs))], langs)
    ax.set_ylabel("dropped fraction")
    ax.set_title("capacity drops by language (routed assignments not kept)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
