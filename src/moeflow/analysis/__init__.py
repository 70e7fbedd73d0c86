"""Analysis of runs: routing statistics (stats), matplotlib figures (plots, lazy), and the run report (report)."""

from moeflow.analysis.stats import layer_stats, load_imbalance, load_matrices, summarize_layers

__all__ = ["layer_stats", "load_imbalance", "load_matrices", "summarize_layers"]
