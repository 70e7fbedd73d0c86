"""Ablation of the translation MoE over moe_every, capacity_factor, num_groups and random routing.

By default one factor at a time around the base config (plus the dense model of equal active parameters), or the
full grid with `grid=True`. Every variant trains with the same data, seed, steps and schedule; the table reports
held-out exact match and CER (mean over languages), training tokens/s, mean dropped fraction during training, and
the mean I(language; expert) over MoE layers. Throughput is given per wall second and per CPU second of the
training steps; on a shared machine only the latter is comparable between variants.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moeflow.config import ConfigError
from moeflow.models.seq2seq import dense_counterpart
from moeflow.tasks.translate import TranslateConfig, load_data
from moeflow.tasks.translate_train import train_translate

DEFAULT_AXES: dict[str, list[Any]] = {
    "moe_every": [1, 2],
    "capacity_factor": [0.5, 1.0, 2.0],
    "num_groups": [1, 4],
    "random_routing": [True, False],
}
_MOE_FIELDS = ("capacity_factor", "num_groups", "random_routing")


def with_setting(cfg: TranslateConfig, axis: str, value: Any) -> TranslateConfig:
    """The config with one ablation axis set (moe_every on the model, the others on its MoE config)."""
    if cfg.model.moe is None:
        raise ConfigError("the ablation base must be an MoE model (model.moe is None)")
    if axis == "moe_every":
        model = cfg.model.replace(moe_every=int(value))
    elif axis in _MOE_FIELDS:
        model = cfg.model.replace(moe=cfg.model.moe.replace(**{axis: value}))
    else:
        raise ConfigError(f"unknown ablation axis {axis!r}; choose from moe_every, {', '.join(_MOE_FIELDS)}")
    return TranslateConfig.from_dict({**cfg.to_dict(), "model": model.to_dict()})


def current(cfg: TranslateConfig, axis: str) -> Any:
    """The base config's value on an axis."""
    assert cfg.model.moe is not None
    return cfg.model.moe_every if axis == "moe_every" else getattr(cfg.model.moe, axis)


def parse_axis(text: str) -> tuple[str, list[Any]]:
    """'capacity_factor=0.5,1,2' -> ('capacity_factor', [0.5, 1.0, 2.0]); 'none' means dropless."""
    name, sep, raw = text.partition("=")
    if not sep or not raw:
        raise ConfigError(f"--axis {text!r} must look like name=v1,v2 (e.g. capacity_factor=0.5,1,2)")
    conv: dict[str, Callable[[str], Any]] = {
        "moe_every": int, "num_groups": int,
        "capacity_factor": lambda v: None if v.lower() in ("none", "dropless") else float(v),
        "random_routing": lambda v: {"true": True, "on": True, "1": True, "false": False, "off": False,
                                     "0": False}[v.lower()],
    }
    if name not in conv:
        raise ConfigError(f"unknown ablation axis {name!r}; choose from {', '.join(conv)}")
    try:
        return name, [conv[name](v.strip()) for v in raw.split(",")]
    except (ValueError, KeyError):
        raise ConfigError(f"--axis {text!r}: a value is not valid for {name}") from None


def ablation_variants(base: TranslateConfig, axes: dict[str, list[Any]], grid: bool = False,
                      dense: bool = True) -> list[tuple[str, TranslateConfig]]:
    """Named configs: 'base', then one per differing axis value (or every grid point), then 'dense'."""
    out: list[tuple[str, TranslateConfig]] = []
    if grid:
        names = list(axes)
        for values in itertools.product(*(axes[n] for n in names)):
            cfg = base
            for n, v in zip(names, values):
                cfg = with_setting(cfg, n, v)
            out.append((",".join(f"{n}={v}" for n, v in zip(names, values)), cfg))
    else:
        out.append(("base", base))
        for name, values in axes.items():
            for v in values:
                if v != current(base, name):
                    out.append((f"{name}={v}", with_setting(base, name, v)))
    if dense:
        d = dense_counterpart(base.model)
        out.append(("dense", TranslateConfig.from_dict({**base.to_dict(), "model": d.to_dict()})))
    return out


def run_ablation(variants: list[tuple[str, TranslateConfig]], out_dir: str | Path,
                 log: Callable[[str], None] = print, verbose: bool = False,
                 figures: bool = False) -> list[dict[str, Any]]:
    """Train every variant (shared data), write ablation.json / ablation.md under out_dir, return the rows.

    Each variant's run folder gets its report.md; its PNG figures only with `figures`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    first = variants[0][1]
    data = load_data(tuple(first.languages), first.max_chars, first.heldout_percent)
    rows = []
    for i, (name, cfg) in enumerate(variants):
        log(f"[{i + 1}/{len(variants)}] {name}")
        run = out_dir / f"{i:02d}_{_slug(name)}"
        s = train_translate(cfg, run, data=data, log=log if verbose else (lambda _: None),
                            figures=figures)
        mis = [r["mi_bits"] for r in s["routing"].values()]
        rows.append({"variant": name, "exact": s["mean_exact"], "cer": s["mean_cer"], "heldout_ce": s["heldout_ce"],
                     "tokens_per_s": s["tokens_per_s"],
                     "tokens_per_cpu_s": s["tokens_per_cpu_s"], "dropped": s["train_dropped_fraction"],
                     "mi_bits": sum(mis) / len(mis) if mis else None, "params": s["params"],
                     "active_params": s["active_params"], "train_s": s["train_s"],
                     "per_language": s["eval"], "run": str(run)})
        log("  " + format_table(rows[-1:]).splitlines()[-1])
    (out_dir / "ablation.json").write_text(json.dumps(rows, indent=2))
    (out_dir / "ablation.md").write_text(format_table(rows, markdown=True))
    return rows


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:60]


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The ablation table (plain text or markdown)."""
    head = ["variant", "exact", "CER", "held-out CE", "tokens/s", "tok/CPU-s", "dropped", "MI bits", "params", "active"]
    body = [[r["variant"], f"{r['exact']:.3f}", f"{r['cer']:.4f}", f"{r['heldout_ce']:.4f}",
             f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_cpu_s']:,.0f}", f"{r['dropped']:.3f}",
             "-" if r["mi_bits"] is None else f"{r['mi_bits']:.3f}", f"{r['params']:,}", f"{r['active_params']:,}"]
            for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body]) + "\n"
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" if j == 0 else f"{{:>{w}}}" for j, w in enumerate(widths))
    return "\n".join(fmt.format(*r) for r in [head, *body])
