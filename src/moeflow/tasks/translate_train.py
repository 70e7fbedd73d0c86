"""The translation task on the one training loop: `TranslateTask` (batches, loss, evaluation, report) for
`moeflow.train.Trainer`, and the run report.

A run folder holds `config.json` (the TranslateConfig, plus the preset), `metrics.jsonl` (one JSON object per step
or evaluation, as for language-model runs), `checkpoint.pt` (weights, optimizer, RNG and data-stream state:
`--resume` continues bit for bit), `summary.json`, `report.md` and the routing figures `routing_heatmap.png` /
`routing_drops.png`. Greedy-decoding quality (exact match, CER) and the language x expert tables are measured once,
at the end, on the logical (unsharded) model; the periodic evaluation is the teacher-forced held-out loss, which
every expert-parallel rank computes with the same forwards.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeflow.analysis.routing_lang import LanguageRouting, routing_markdown
from moeflow.analysis.stats import read_records
from moeflow.compress.model import apply_layouts
from moeflow.models.seq2seq import Seq2SeqTransformer
from moeflow.routing.log import record_routing
from moeflow.tasks.translate import CharVocab, TranslateConfig, TranslateData, evaluate, heldout_loss, load_data
from moeflow.train.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from moeflow.train.sharded_checkpoint import DCP_NAME
from moeflow.train.trainer import ParallelHooks, Trainer, TrainResult

CHECKPOINT = CHECKPOINT_NAME


@dataclass
class TranslateBatch:
    """This rank's rows of one global batch, with the global counts the loss and tokens/s need."""

    src: Tensor  # [B/world, S]
    tgt_in: Tensor  # [B/world, T]
    tgt_out: Tensor  # [B/world, T]
    target_tokens: int  # non-padding targets of the GLOBAL batch
    tokens: int  # non-padding source + target tokens of the global batch
    world: int


class TranslateTask:
    """Random mixed-language training pairs, token-mean cross-entropy, held-out loss; report with routing tables."""

    resumable = frozenset({"steps", "log_every", "cpu_limit_s"})  # the schedule may grow; logging may change
    device = "cpu"  # the embedded corpus and the decoders run on the CPU

    def __init__(self, cfg: TranslateConfig, data: TranslateData | None = None, figures: bool = True) -> None:
        """The (memoised) tokenised corpus and a batch generator seeded by the run seed."""
        self.cfg = self.train = cfg
        self.data = data or load_data(tuple(cfg.languages), cfg.max_chars, cfg.heldout_percent)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.figures = figures

    def build_model(self) -> Seq2SeqTransformer:
        """The encoder-decoder, initialised from the run seed (every rank builds the same one)."""
        torch.manual_seed(self.cfg.seed)
        return Seq2SeqTransformer(self.cfg.model)

    def config_dict(self) -> dict[str, Any]:
        """The TranslateConfig as a dict."""
        return self.cfg.to_dict()

    def next_batch(self, rank: int, world: int) -> TranslateBatch:
        """Every rank draws the same global batch and keeps its contiguous share of the rows."""
        pairs = self.data.train
        idx = torch.randint(len(pairs), (self.cfg.batch_size,), generator=self.generator)
        target_tokens = int((pairs.tgt_out[idx] != 0).sum())
        tokens = target_tokens + int((pairs.src[idx] != 0).sum())
        if world > 1:
            per = len(idx) // world
            idx = idx[rank * per:(rank + 1) * per]
        src, tin, tout, _ = pairs.batch(idx)
        return TranslateBatch(src, tin, tout, target_tokens, tokens, world)

    def tokens(self, batch: TranslateBatch) -> int:
        """Non-padding source and target tokens of the global batch."""
        return batch.tokens

    def loss(self, model: nn.Module, batch: TranslateBatch) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy summed over this rank's targets / (global targets / world): the mean over ranks is then
        the token mean of the global batch, whatever each rank's share of padding."""
        logits = model(batch.src, batch.tgt_in)
        ce_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch.tgt_out.reshape(-1),
                                 ignore_index=self.cfg.model.pad_id, reduction="sum")
        return ce_sum * (batch.world / batch.target_tokens), {}

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Teacher-forced held-out cross-entropy (inference routing) over eval_sentences per language."""
        return {"val_loss": heldout_loss(model, self.data, self.cfg.eval_sentences)}  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Any]:
        """The batch generator."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the batch generator."""
        self.generator.set_state(state["generator"])

    def report(self, model: nn.Module, result: TrainResult, run_dir: Path) -> dict[str, Any]:
        """Greedy-decoding quality per language, language x expert tables (and their shuffled baseline), the
        training figures from metrics.jsonl: summary.json and report.md."""
        assert isinstance(model, Seq2SeqTransformer)
        cfg, data = self.cfg, self.data
        ev = evaluate(model, data, cfg.eval_sentences)
        routing = collect_language_routing(model, data, cfg.routing_batches, seed=cfg.seed)
        shuffled = collect_language_routing(model, data, cfg.routing_batches, seed=cfg.seed, shuffle_languages=True)
        train = [r for r in read_records(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
        drops = [statistics.fmean(lay["dropped_fraction"] for lay in r["layers"]) for r in train if r["layers"]]
        summary: dict[str, Any] = {
            "steps": result.step, "planned_steps": cfg.steps, "train_s": result.elapsed_s,
            "train_cpu_s": result.cpu_s, "tokens_per_s": result.tokens_per_s,
            "tokens_per_cpu_s": result.tokens_per_cpu_s, "final_ce": train[-1]["ce"] if train else None,
            "heldout_ce": result.val_loss, "eval": ev,
            "mean_exact": statistics.fmean(v["exact"] for v in ev.values()),
            "mean_cer": statistics.fmean(v["cer"] for v in ev.values()),
            "train_dropped_fraction": statistics.fmean(drops) if drops else 0.0,
            "params": model.num_params(), "active_params": model.num_params(active=True),
            "routing": {name: {**s.summary(), "mi_shuffled_bits": shuffled[name].mutual_information()}
                        for name, s in routing.items()},
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        write_report(run_dir, cfg, summary, routing, shuffled, figures=self.figures)
        return summary


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
    blocks = model.moe_ffns()
    stats = {name: LanguageRouting(data.codes, ffn.moe.cfg.num_experts) for name, ffn in blocks}
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
        with record_routing() as log:
            model(src, tin)
        for name, ffn in blocks:
            # an MoE FFN routes the non-padding positions in row-major order (see MoEFFN)
            keep_BS = (src if name.startswith("enc.") else tin) != model.cfg.pad_id
            batch_ids_N = keep_BS.reshape(-1).nonzero().squeeze(1) // keep_BS.shape[1]
            stats[name].add(log.routings(ffn.moe)[0], lang_B[batch_ids_N])
    model.train(was_training)
    return stats


def load_run(run_dir: str | Path) -> tuple[Seq2SeqTransformer, TranslateConfig, CharVocab]:
    """The trained model (eval mode), its config and vocabulary from a run folder."""
    path = Path(run_dir) / CHECKPOINT
    if (Path(run_dir) / DCP_NAME).is_dir():  # written under torchrun: the newer of it and checkpoint.pt
        ckpt = load_checkpoint(run_dir)
    elif not path.is_file():
        raise FileNotFoundError(f"no {CHECKPOINT} in {run_dir}; train one with "
                                f"`moeflow train --task translate --out {Path(run_dir).parent} --name "
                                f"{Path(run_dir).name}`")
    else:
        # a plain load, not load_checkpoint: run folders from before the one Trainer hold {model, config, step}
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for truncated or foreign files
            raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}); it may be truncated or "
                                  "from another program") from None
    cfg = TranslateConfig.from_dict(ckpt["config"])
    model = Seq2SeqTransformer(cfg.model)
    if ckpt.get("extra", {}).get("compression"):  # a `moeflow compress` run: its experts are CompressedExperts
        apply_layouts(model, ckpt["extra"]["compression"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg, CharVocab(cfg.languages)


def translate_trainer(cfg: TranslateConfig, run_dir: str | Path, *, data: TranslateData | None = None,
                      figures: bool = True, hooks: ParallelHooks | None = None, resume: bool = False,
                      progress: bool = True, stream: TextIO | None = None) -> Trainer:
    """The Trainer for a translation run: TranslateTask, the seeded Seq2SeqTransformer, and the one loop."""
    task = TranslateTask(cfg, data, figures)
    return Trainer(task.build_model(), task, run_dir, resume=resume, hooks=hooks, progress=progress, stream=stream)


def train_translate(cfg: TranslateConfig, run_dir: str | Path, *, data: TranslateData | None = None,
                    progress: bool = True, figures: bool = True, preset: str | None = None) -> dict[str, Any]:
    """Train a fresh run in one process, then write its report; returns the summary (also in summary.json).

    `cfg.cpu_limit_s` > 0 stops once the training steps have used that much CPU time (process time: all threads,
    unaffected by other processes on a shared machine); the schedule stays the one for cfg.steps. The thread
    count is the caller's (the CLI sets it from cfg.threads).
    """
    trainer = translate_trainer(cfg, run_dir, data=data, figures=figures, progress=progress)
    trainer.write_config(preset)
    result = trainer.run(cpu_limit_s=cfg.cpu_limit_s)
    return trainer.task.report(trainer.model, result, trainer.run_dir)


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
