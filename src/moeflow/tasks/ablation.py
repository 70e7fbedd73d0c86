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
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

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


def _train_one(job: tuple[int, str, dict[str, Any], int, str, bool, bool]) -> dict[str, Any]:
    """Train one (variant, seed) and return its row (runs in the caller or in a worker process)."""
    i, name, cfg_dict, seed, run, verbose, figures = job
    cfg = TranslateConfig.from_dict({**cfg_dict, "seed": seed})
    data = load_data(tuple(cfg.languages), cfg.max_chars, cfg.heldout_percent)  # memoised per process
    s = train_translate(cfg, run, data=data, progress=verbose, figures=figures)
    mis = [r["mi_bits"] for r in s["routing"].values()]
    return {"variant": name, "seed": seed, "exact": s["mean_exact"], "cer": s["mean_cer"],
            "heldout_ce": s["heldout_ce"], "tokens_per_s": s["tokens_per_s"], "tokens_per_cpu_s": s["tokens_per_cpu_s"],
            "dropped": s["train_dropped_fraction"], "mi_bits": sum(mis) / len(mis) if mis else None,
            "params": s["params"], "active_params": s["active_params"], "train_s": s["train_s"],
            "per_language": s["eval"], "run": run}


_MEANS = ("exact", "cer", "heldout_ce", "tokens_per_s", "tokens_per_cpu_s", "dropped", "mi_bits", "train_s")


def _aggregate(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row from a variant's runs over seeds: means (and the per-seed values) of every figure."""
    row: dict[str, Any] = {"variant": name, "seeds": [r["seed"] for r in runs], "runs": runs,
                           "params": runs[0]["params"], "active_params": runs[0]["active_params"]}
    for key in _MEANS:
        vals = [r[key] for r in runs]
        row[key] = None if any(v is None for v in vals) else statistics.fmean(vals)
        row[f"{key}_per_seed"] = vals
    return row


def run_ablation(variants: list[tuple[str, TranslateConfig]], out_dir: str | Path,
                 log: Callable[[str], None] = print, verbose: bool = False,
                 figures: bool = False, seeds: list[int] | None = None, jobs: int = 1) -> list[dict[str, Any]]:
    """Train every variant once per seed, write ablation.json / ablation.md under out_dir, return the rows.

    Rows hold the means over seeds (and each seed's value); with several seeds, variants are compared with the
    dense baseline seed by seed (same data order and initial state of the shared layers). `jobs` > 1 trains that
    many runs at once in worker processes (one CPU thread each unless the config sets threads). Each run's folder
    gets its report.md; its PNG figures only with `figures`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    first = variants[0][1]
    seeds = list(seeds) if seeds else [first.seed]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct, got {seeds}")
    if jobs < 1:
        raise ConfigError(f"jobs must be >= 1, got {jobs}")
    load_data(tuple(first.languages), first.max_chars, first.heldout_percent)  # fail early on a bad task config
    todo = []
    for i, (name, cfg) in enumerate(variants):
        d = cfg.to_dict()
        if jobs > 1 and not cfg.threads:
            d["threads"] = 1  # several runs share the cores: one thread each avoids oversubscription
        for seed in seeds:
            run = out_dir / (f"{i:02d}_{_slug(name)}" + (f"_seed{seed}" if len(seeds) > 1 else ""))
            todo.append((i, name, d, seed, str(run), verbose and jobs == 1, figures))
    log(f"{len(todo)} runs ({len(variants)} variants x {len(seeds)} seed(s)), {jobs} at a time")
    results: dict[tuple[int, int], dict[str, Any]] = {}

    def done(job: tuple[Any, ...], r: dict[str, Any]) -> None:
        results[(job[0], job[3])] = r
        log(f"[{len(results)}/{len(todo)}] {job[1]} seed {job[3]}: exact {r['exact']:.3f}  CER {r['cer']:.4f}  "
            f"held-out CE {r['heldout_ce']:.4f}  ({r['train_s']:.0f} s)")

    if jobs == 1:
        for job in todo:
            done(job, _train_one(job))
    else:
        ctx = multiprocessing.get_context("spawn")  # fork would copy this process's threads and torch state
        # a worker is a process of its own: it takes the thread count of the runs (1 unless the config sets it)
        threads = first.threads or 1
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            futures = {pool.submit(_train_one, job): job for job in todo}
            for fut in as_completed(futures):
                done(futures[fut], fut.result())
    rows = [_aggregate(name, [results[(i, s)] for s in seeds]) for i, (name, _) in enumerate(variants)]
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    for r in rows:
        if dense is not None and r is not dense and len(seeds) > 1:
            pairs = list(zip(r["cer_per_seed"], dense["cer_per_seed"]))
            r["cer_wins_vs_dense"] = f"{sum(a < b for a, b in pairs)}/{len(pairs)}"
    (out_dir / "ablation.json").write_text(json.dumps(rows, indent=2))
    (out_dir / "ablation.md").write_text(format_table(rows, markdown=True) + "\n" + format_languages(rows, True))
    return rows


def language_means(row: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per language: exact match and CER averaged over the row's seeds."""
    runs = row["runs"]
    return {lang: {m: statistics.fmean(r["per_language"][lang][m] for r in runs) for m in ("exact", "cer")}
            for lang in runs[0]["per_language"]}


def format_languages(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """Exact match / CER per language and variant (means over seeds), one column per variant."""
    means = {r["variant"]: language_means(r) for r in rows}
    langs = list(next(iter(means.values())))
    head = ["language"] + [f"{v} exact / CER" for v in means]
    body = [[lang] + [f"{m[lang]['exact']:.3f} / {m[lang]['cer']:.4f}" for m in means.values()] for lang in langs]
    return _render(head, body, markdown)


def _render(head: list[str], body: list[list[str]], markdown: bool) -> str:
    """A table as markdown, or as aligned plain text (first column left, the others right)."""
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body]) + "\n"
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" if j == 0 else f"{{:>{w}}}" for j, w in enumerate(widths))
    return "\n".join(fmt.format(*r) for r in [head, *body])


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:60]


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The ablation table (plain text or markdown); with several seeds, means and the min..max of exact and CER."""
    multi = any(len(r.get("seeds", [])) > 1 for r in rows)

    def spread(r: dict[str, Any], key: str, fmt: str) -> str:
        vals = r.get(f"{key}_per_seed", [r[key]])
        mean = format(r[key], fmt)
        return f"{mean} ({format(min(vals), fmt)}..{format(max(vals), fmt)})" if multi else mean

    head = ["variant", "exact", "CER", "held-out CE", "tokens/s", "tok/CPU-s", "dropped", "MI bits", "params", "active"]
    head += ["CER < dense"] if multi else []
    body = [[r["variant"], spread(r, "exact", ".3f"), spread(r, "cer", ".4f"), f"{r['heldout_ce']:.4f}",
             f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_cpu_s']:,.0f}", f"{r['dropped']:.3f}",
             "-" if r["mi_bits"] is None else f"{r['mi_bits']:.3f}", f"{r['params']:,}", f"{r['active_params']:,}"]
            + ([r.get("cer_wins_vs_dense", "-")] if multi else [])
            for r in rows]
    return _render(head, body, markdown)
