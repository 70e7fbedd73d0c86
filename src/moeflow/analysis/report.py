"""The run report: report.md with loss curves, per-layer expert load over training and dropped tokens.

Reads only files of the run folder (config.json, metrics.jsonl, summary.json if present), so a report can be
re-rendered at any time, also for a run still in progress or one that stopped on a NaN.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from moeflow.analysis import plots
from moeflow.analysis.stats import layer_series, load_imbalance, load_matrices, read_records, series
from moeflow.models.config import ModelConfig

REPORT_NAME = "report.md"


def _fmt(x: Any, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def _model_line(cfg: dict[str, Any]) -> tuple[str, int | None, int | None]:
    """A one-line description of the model and its total/active parameter counts."""
    try:
        mc = ModelConfig.from_dict(cfg["model"])
    except Exception:  # an old or hand-edited config.json should not stop the report
        return "model (config not readable)", None, None
    moe = mc.moe
    kind = (f"MoE: {moe.num_experts} experts, top-{moe.top_k}, router {moe.router}, capacity factor "
            f"{moe.capacity_factor if moe.capacity_factor is not None else 'none (dropless)'}") if moe else "dense"
    line = (f"{mc.n_layers} layers, d_model {mc.d_model}, {mc.n_heads} heads ({mc.n_kv_heads} kv), "
            f"vocab {mc.vocab_size}; {kind}")
    return line, mc.num_params(), mc.num_active_params()


def write_report(run_dir: str | Path) -> Path:
    """Render report.md (and PNGs when matplotlib is available) for a run folder; returns the report path."""
    run = Path(run_dir)
    cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    records = read_records(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    model_line, n_params, n_active = _model_line(cfg) if cfg else ("-", None, None)
    tsteps, tloss = series(records, "train", "loss")
    vsteps, vloss = series(records, "eval", "val_loss")
    lsteps, shares = load_matrices(records)
    train = [r for r in records if r.get("kind") == "train"]
    diverged = [r for r in records if r.get("kind") == "diverged"]

    lines = [f"# moeflow run `{run.name}`", ""]
    if diverged:
        lines += [f"**Stopped: {diverged[-1]['message']}**", ""]
    rate = float(np.median([r["tokens_per_s"] for r in train if r.get("tokens_per_s")])) if train else None
    cpu_rate = (float(np.median([r["tokens_per_cpu_s"] for r in train if r.get("tokens_per_cpu_s")]))
                if train and train[-1].get("tokens_per_cpu_s") else None)
    tokens = sum(int(r.get("tokens", 0)) for r in train)
    last_n = max(1, min(20, len(tloss)))
    rows = [("preset", summary.get("preset") or cfg.get("preset") or "custom"),
            ("model", model_line),
            ("parameters (total / active per token)",
             f"{n_params:,} / {n_active:,}" if n_params is not None and n_active is not None else "-"),
            ("data", summary.get("data_source", (cfg.get("data") or {}).get("path") or "embedded stdlib corpus")),
            ("steps", f"{int(tsteps[-1]) if tsteps.size else 0} of {(cfg.get('train') or {}).get('steps', '?')}"),
            ("tokens seen", f"{tokens:,}"),
            ("training wall time", f"{summary['elapsed_s']:.0f} s" if "elapsed_s" in summary else
             (f"{train[-1]['elapsed_s']:.0f} s" if train and "elapsed_s" in train[-1] else "-")),
            ("median tokens/s (per CPU-second of the process)",
             f"{_fmt(rate, ',.0f')} ({_fmt(cpu_rate, ',.0f')})"),
            (f"train loss (mean of last {last_n} steps)", _fmt(float(np.nanmean(tloss[-last_n:])) if tloss.size
                                                              else None)),
            ("final validation loss (nats/byte)", _fmt(float(vloss[-1]) if vloss.size else None)),
            ("final validation bits per byte", _fmt(float(vloss[-1]) / math.log(2) if vloss.size else None))]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]

    figures: list[tuple[str, str]] = []
    if plots.have_matplotlib():
        if tsteps.size:
            plots.plot_loss(tsteps, tloss, vsteps, vloss, run / "loss.png", title=f"{run.name}: loss")
            figures.append(("Loss", "loss.png"))
        if shares:
            plots.plot_expert_load(lsteps, shares, run / "expert_load.png")
            figures.append(("Expert load over training (one panel per MoE layer)", "expert_load.png"))
            dsteps, dropped_SL = layer_series(records, "dropped_fraction")
            dropless = ((cfg.get("model") or {}).get("moe") or {}).get("capacity_factor", 0) is None
            plots.plot_layer_lines(dsteps, dropped_SL, run / "dropped.png", "dropped fraction",
                                   "dropped-token fraction (capacity overflow)",
                                   all_zero_note="dropless: no drops" if dropless else
                                   "no drops: no expert reached its capacity")
            figures.append(("Dropped-token fraction over training", "dropped.png"))
            esteps, ent_SL = layer_series(records, "entropy")
            plots.plot_layer_lines(esteps, ent_SL, run / "entropy.png", "entropy (nats)", "router entropy")
            figures.append(("Router entropy over training", "entropy.png"))
    else:
        lines += ["_matplotlib is not installed, so this report has no plots (pip install 'moeflow[plot]' and "
                  "re-render with `moeflow train --report-only RUN_DIR`)._", ""]
    for title, fname in figures:
        lines += [f"## {title}", "", f"![{title}]({fname})", ""]

    if shares:
        lines += ["## Routing at the end of training", "",
                  "Averages over the last 10% of logged steps. max/mean load 1.00 is perfect balance.", "",
                  "| MoE layer | max/mean load | least-used expert share | dropped fraction | entropy (nats) |",
                  "|---|---|---|---|---|"]
        tail = max(1, len(train) // 10)
        _, dropped_SL = layer_series(records, "dropped_fraction")
        _, ent_SL = layer_series(records, "entropy")
        for li, share_SE in enumerate(shares):
            mean_share = share_SE[-tail:].mean(axis=0)
            lines.append(f"| {li} | {load_imbalance(mean_share):.2f} | {mean_share.min():.3f} | "
                         f"{dropped_SL[-tail:, li].mean():.4f} | {ent_SL[-tail:, li].mean():.3f} |")
        lines.append("")
    if vsteps.size:
        lines += ["## Validation", "", "| step | loss (nats/byte) | bits per byte |", "|---|---|---|"]
        lines += [f"| {s} | {v:.4f} | {v / math.log(2):.4f} |" for s, v in zip(vsteps.tolist(), vloss.tolist())]
        lines.append("")
    path = run / REPORT_NAME
    path.write_text("\n".join(lines))
    return path
