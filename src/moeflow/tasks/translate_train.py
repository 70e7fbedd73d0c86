"""Training loop, run folder and report for the translation task.

A run folder holds `config.json` (the TranslateConfig), `metrics.jsonl` (one JSON object per log or eval line),
`checkpoint.pt` (model weights + config + step), `summary.json`, `report.md` and the routing figures
`routing_heatmap.png` / `routing_drops.png`. The loop is linear: sample, loss (+ MoE aux), step, log, eval.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeflow.analysis.routing_lang import LanguageRouting, routing_markdown
from moeflow.layers import moe_layers
from moeflow.models.seq2seq import Seq2SeqTransformer
from moeflow.ops.threads import cpu_threads
from moeflow.tasks.translate import CharVocab, TranslateConfig, TranslateData, evaluate, heldout_loss, load_data

CHECKPOINT = "checkpoint.pt"


def lr_at(cfg: TranslateConfig, step: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at the last step (steps from 1)."""
    if cfg.warmup and step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _optimizer(model: nn.Module, cfg: TranslateConfig) -> torch.optim.Optimizer:
    # NOTE: no decay on norms or on router weights (decay would pull routers back to uniform routing)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or ".router." in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))


@torch.no_grad()
def collect_language_routing(model: Seq2SeqTransformer, data: TranslateData, batches: int = 8,
                             batch_size: int = 128, seed: int = 0, training_routing: bool = True,
                             shuffle_languages: bool = False) -> dict[str, LanguageRouting]:
    """Language x expert tables per MoE layer over mixed-language held-out batches.

    With `training_routing` the layers route as in training (capacity, local groups, random routing; dropout
    off), so drops are those training sees; otherwise with the inference config (dropless by default).
    `shuffle_languages` permutes the language labels across the sentences of each batch (same batches): the MI
    of those tables is what finite samples give without any dependence, a baseline for the real MI.
    """
    layers = model.moe_ffns()
    stats = {name: LanguageRouting(data.codes, layer.moe.cfg.num_experts) for name, layer in layers}
    was_training = model.training
    model.train(training_routing)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    gen = torch.Generator().manual_seed(seed)
    perm_gen = torch.Generator().manual_seed(seed + 1)  # its own stream: the batches stay those of the real tables
    for _ in range(batches):
        idx = torch.randint(len(data.heldout), (batch_size,), generator=gen)
        src, tin, _, lang_B = data.heldout.batch(idx)
        if shuffle_languages:
            lang_B = lang_B[torch.randperm(len(lang_B), generator=perm_gen)]
        model(src, tin)
        for name, layer in layers:
            assert layer.moe.last_routing is not None and layer.last_batch_ids_N is not None
            stats[name].add(layer.moe.last_routing, lang_B[layer.last_batch_ids_N])
    model.train(was_training)
    return stats


def save_checkpoint(model: Seq2SeqTransformer, cfg: TranslateConfig, step: int, run_dir: Path) -> Path:
    """Write weights, config and step atomically (temp file, then rename)."""
    path = run_dir / CHECKPOINT
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "step": step}, tmp)
    tmp.replace(path)
    return path


def load_run(run_dir: str | Path) -> tuple[Seq2SeqTransformer, TranslateConfig, CharVocab]:
    """The trained model (eval mode), its config and vocabulary from a run folder."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no {CHECKPOINT} in {run_dir}; train one with "
                                f"`moeflow train --task translate --out {run_dir}`")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = TranslateConfig.from_dict(ckpt["config"])
    model = Seq2SeqTransformer(cfg.model)
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg, CharVocab(cfg.languages)


def train_translate(cfg: TranslateConfig, run_dir: str | Path, *, data: TranslateData | None = None,
                    log: Callable[[str], None] = print, figures: bool = True) -> dict[str, Any]:
    """Train, evaluate and write the run folder; returns the summary (also saved as summary.json).

    `cfg.cpu_limit_s` > 0 stops once the training steps have used that much CPU time (process time: all threads,
    unaffected by other processes on a shared machine); the schedule stays the one for cfg.steps.
    """
    with cpu_threads(cfg.threads or None):  # the thread count is process-wide: leave it as we found it
        return _train(cfg, Path(run_dir), data, log, figures)


def _train(cfg: TranslateConfig, run_dir: Path, data: TranslateData | None, log: Callable[[str], None],
           figures: bool) -> dict[str, Any]:
    """The body of train_translate (which owns the thread count)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    data = data or load_data(tuple(cfg.languages), cfg.max_chars, cfg.heldout_percent)
    model = Seq2SeqTransformer(cfg.model)
    opt = _optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    log(f"translate: {len(data.train_sentences)} train / {len(data.heldout_sentences)} held-out sentences x "
        f"{len(data.codes)} languages ({', '.join(data.codes)}); {model.num_params():,} params, "
        f"{model.num_params(active=True):,} active; {cfg.model.num_moe_layers()} MoE layers")
    train_s = cpu_s = tokens = 0.0
    drops: list[float] = []
    window_rates: list[float] = []
    last_eval: dict[str, Any] = {}
    step = 0
    with open(run_dir / "metrics.jsonl", "w") as metrics:
        def record(row: dict[str, Any]) -> None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

        win_tokens = win_time = 0.0
        for step in range(1, cfg.steps + 1):
            lr = lr_at(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            src, tin, tout, _ = data.sample(cfg.batch_size, gen)
            t0, c0 = time.perf_counter(), time.process_time()
            ce, aux = model.loss(src, tin, tout)
            loss = ce + aux
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step} (ce {ce.detach().item()}, aux "
                                         f"{aux.detach().item()}); "
                                         f"lower lr (now {cfg.lr}) or raise warmup")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            dt = time.perf_counter() - t0
            cpu_s += time.process_time() - c0
            n_tok = float((src != 0).sum() + (tout != 0).sum())
            train_s, tokens, win_time, win_tokens = train_s + dt, tokens + n_tok, win_time + dt, win_tokens + n_tok
            layer_drops = [float(layer.last_routing.dropped_fraction) for _, layer in moe_layers(model)
                           if layer.last_routing is not None]
            drops.append(statistics.fmean(layer_drops) if layer_drops else 0.0)
            out_of_time = cfg.cpu_limit_s > 0 and cpu_s >= cfg.cpu_limit_s
            if step % cfg.log_every == 0 or step == cfg.steps or out_of_time:
                rate = win_tokens / max(win_time, 1e-9)
                window_rates.append(rate)
                ce_v, aux_v = ce.detach().item(), aux.detach().item()
                record({"kind": "train", "step": step, "loss": ce_v + aux_v, "ce": ce_v, "aux": aux_v, "lr": lr,
                        "tokens_per_s": rate, "dropped": drops[-1], "train_s": train_s,
                        "cpu_s": cpu_s})
                log(f"step {step:>5}/{cfg.steps}  ce {ce_v:.4f}  aux {aux_v:.4f}  lr {lr:.2e}  "
                    f"{rate:,.0f} tok/s  dropped {drops[-1]:.3f}  {train_s:.0f}s ({cpu_s:.0f} CPU s)")
                win_tokens = win_time = 0.0
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps or out_of_time:
                last_eval = {"kind": "eval", "step": step,
                             "heldout_ce": heldout_loss(model, data, cfg.eval_sentences),
                             "eval": evaluate(model, data, cfg.eval_sentences)}
                record(last_eval)
                log(f"eval @ {step}: held-out ce {last_eval['heldout_ce']:.4f}  " + "  ".join(
                    f"{c} exact {v['exact']:.2f} cer {v['cer']:.3f}" for c, v in last_eval["eval"].items()))
                save_checkpoint(model, cfg, step, run_dir)
            if out_of_time:
                log(f"CPU limit {cfg.cpu_limit_s:.0f}s reached at step {step}")
                break
    routing = collect_language_routing(model, data, cfg.routing_batches, seed=cfg.seed)
    shuffled = collect_language_routing(model, data, cfg.routing_batches, seed=cfg.seed, shuffle_languages=True)
    ev = last_eval["eval"]
    summary: dict[str, Any] = {
        "steps": step, "planned_steps": cfg.steps, "train_s": train_s, "train_cpu_s": cpu_s,
        "tokens_per_s": tokens / max(train_s, 1e-9), "tokens_per_cpu_s": tokens / max(cpu_s, 1e-9),
        "tokens_per_s_median_window": statistics.median(window_rates) if window_rates else 0.0,
        "final_ce": ce.detach().item(), "heldout_ce": last_eval["heldout_ce"], "eval": ev,
        "mean_exact": statistics.fmean(v["exact"] for v in ev.values()),
        "mean_cer": statistics.fmean(v["cer"] for v in ev.values()),
        "train_dropped_fraction": statistics.fmean(drops) if drops else 0.0,
        "params": model.num_params(), "active_params": model.num_params(active=True),
        "routing": {name: {**s.summary(), "mi_shuffled_bits": shuffled[name].mutual_information()}
                    for name, s in routing.items()},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    write_report(run_dir, cfg, summary, routing, shuffled, figures=figures)
    return summary


def dominant_experts(stats: LanguageRouting, top: int = 2) -> str:
    """Text description of a layer's heat map: each language's most used experts and their shares."""
    share = stats.share_LE()
    parts = []
    for li, lang in enumerate(stats.languages):
        vals, idx = share[li].topk(min(top, stats.num_experts))
        parts.append(f"{lang}: " + ", ".join(f"e{int(i)} {100 * float(v):.0f}%" for v, i in zip(vals, idx)))
    return "; ".join(parts)


def write_report(run_dir: Path, cfg: TranslateConfig, summary: dict[str, Any],
                 routing: dict[str, LanguageRouting], shuffled: dict[str, LanguageRouting] | None = None,
                 figures: bool = True) -> Path:
    """report.md (+ PNG figures when asked and matplotlib is installed) in the run folder."""
    m = cfg.model
    moe = m.moe
    arch = ("dense" if moe is None else
            f"{moe.router} top-{moe.top_k}, {moe.num_experts} experts of hidden {moe.d_hidden}, capacity factor "
            f"{moe.capacity_factor}, {moe.num_groups} group(s), random routing {moe.random_routing}, "
            f"MoE every {m.moe_every} FFN(s) ({m.num_moe_layers()} MoE layers)")
    lines = [f"# Translation run: {run_dir.name}", "",
             f"- model: d_model {m.d_model}, {m.n_enc_layers}+{m.n_dec_layers} layers, {m.n_heads} heads, FFN hidden "
             f"{m.ffn_hidden}; {arch}",
             f"- parameters: {summary['params']:,} total, {summary['active_params']:,} active per token",
             f"- training: {summary['steps']} of {cfg.steps} steps, batch {cfg.batch_size}, lr {cfg.lr}, "
             f"{summary['train_s']:.0f} s wall / {summary['train_cpu_s']:.0f} CPU s "
             f"({cfg.threads or 'default'} threads), "
             f"{summary['tokens_per_s']:,.0f} tokens/s, mean dropped fraction "
             f"{summary['train_dropped_fraction']:.3f}",
             f"- held-out cross-entropy {summary['heldout_ce']:.4f} (teacher-forced, inference routing)", "",
             "## Held-out translation quality (greedy decoding)", "", "| language | exact match | CER | sentences |",
             "|---|---|---|---|"]
    for code, v in summary["eval"].items():
        lines.append(f"| {code} | {v['exact']:.3f} | {v['cer']:.4f} | {v['n']} |")
    lines.append(f"| mean | {summary['mean_exact']:.3f} | {summary['mean_cer']:.4f} | |")
    lines += ["", "## Routing by language", "",
              "Held-out batches with mixed languages, routed as in training (capacity, groups, random routing). "
              "Each routed assignment counts once; MI is I(language; expert) in bits; 'MI shuffled' is the MI "
              "after permuting the language labels across the sentences of each batch (same batches): the baseline of "
              "no dependence.", ""]
    lines.append(routing_markdown(routing, shuffled))
    if routing:
        lines += ["Heat map, most used experts per language:", ""]
        lines += [f"- {name}: {dominant_experts(s)}" for name, s in routing.items()]
    if routing and figures:
        try:
            from moeflow.analysis.plots_lang import plot_drops_by_language, plot_language_expert_heatmaps

            plot_language_expert_heatmaps(routing, run_dir / "routing_heatmap.png")
            plot_drops_by_language(routing, run_dir / "routing_drops.png")
            lines += ["", "![language x expert](routing_heatmap.png)", "", "![drops](routing_drops.png)"]
        except RuntimeError as e:  # matplotlib missing: the tables above carry the same numbers
            lines += ["", f"(figures skipped: {e})"]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
