"""`moeflow compress` behind the CLI: load a trained run (LM or translation), calibrate on training batches,
compress its experts, optionally fine-tune, evaluate, and write a NEW run folder that eval / generate / translate
load (the checkpoint's extra["compression"] names each layer's Layout; see moeflow.compress.model.apply_layouts).

A compressed run folder holds checkpoint.pt, config.json (the source's, with the router bias on when experts were
pruned), compression.json (layouts, parameter counts, bytes, ratio, quality before and after), similarity.json
and report.md with the similarity heat maps.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeflow.compress.model import (CompressError, CompressionInfo, LayerSimilarity, calibrate, compress_model,
                                    layer_similarities)
from moeflow.compress.recluster import Reclusterer
from moeflow.layers import moe_layers
from moeflow.routing.log import record_routing
from moeflow.train.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_checkpoint

LN2 = math.log(2.0)


@dataclass
class LoadedRun:
    """A trained run ready to calibrate, score and fine-tune, whatever its task."""

    kind: str  # "lm" | "translate"
    model: nn.Module
    cfg: Any
    task: Any  # LMTask | TranslateTask (next_batch, loss)
    step: int
    config_json: dict[str, Any]
    state: dict[str, Any]  # the trained weights, for fresh copies

    def fresh_model(self) -> nn.Module:
        """A new copy of the trained (uncompressed) model, in eval mode."""
        if self.kind == "lm":
            from moeflow.models import MoETransformer

            model: nn.Module = MoETransformer(self.cfg.model)
        else:
            from moeflow.models.seq2seq import Seq2SeqTransformer

            model = Seq2SeqTransformer(self.cfg.model)
        model.load_state_dict(self.state)
        return model.eval()

    def forward(self, model: nn.Module, batch: Any) -> Any:
        """One forward on a batch of this task (what calibration runs)."""
        if self.kind == "lm":
            return model(batch[0])
        return model(batch.src, batch.tgt_in)

    def quality(self, model: nn.Module, cer: bool = True) -> dict[str, float]:
        """Validation bits per byte (LM) or per character (translation, teacher-forced), and CER."""
        model.eval()
        with torch.no_grad():
            if self.kind == "lm":
                return {"val_bpb": float(self.task.evaluate(model)["val_bpb"])}
            from moeflow.tasks.translate import evaluate, heldout_loss

            out = {"val_bpb": heldout_loss(model, self.task.data, self.cfg.eval_sentences) / LN2}
            if cer:
                ev = evaluate(model, self.task.data, self.cfg.eval_sentences)
                out["cer"] = statistics.fmean(v["cer"] for v in ev.values())
            return out


def load_any_run(run_dir: str | Path) -> LoadedRun:
    """The trained model of an LM or translation run folder, with its task (for batches and scores)."""
    run_dir = Path(run_dir)
    ckpt = load_checkpoint(run_dir / CHECKPOINT_NAME)
    cfg_path = run_dir / "config.json"
    config_json = json.loads(cfg_path.read_text()) if cfg_path.is_file() else dict(ckpt["config"])
    if "languages" in ckpt["config"]:
        from moeflow.tasks.translate_train import TranslateTask, load_run

        model, cfg, _ = load_run(run_dir)
        kind, task = "translate", TranslateTask(cfg, figures=False)
    else:
        from moeflow.train.lm import LMTask, model_from_run

        model, cfg, _ = model_from_run(run_dir)
        kind, task = "lm", LMTask(cfg)
    if not moe_layers(model):
        raise CompressError(f"{run_dir} is a dense run (no MoE layer): there are no experts to compress; "
                            "train an MoE preset (e.g. --preset tiny)")
    if ckpt.get("extra", {}).get("compression"):
        raise CompressError(f"{run_dir} is already a compressed run; compress its source run instead")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return LoadedRun(kind, model, cfg, task, int(ckpt.get("step", 0)), config_json, state)


def calibration_batches(run: LoadedRun, n: int, seed: int = 1234) -> list[Any]:
    """n training batches drawn from a generator of their own (never the validation data)."""
    if run.kind == "lm":
        from moeflow.train.data import BatchStream

        tc = run.cfg.train
        stream = BatchStream(run.task.corpus.train, tc.batch_size, tc.seq_len, seed)
        return [stream.next_batch(0, 1) for _ in range(n)]
    run.task.generator.manual_seed(seed)
    return [run.task.next_batch(0, 1) for _ in range(n)]


def finetune(run: LoadedRun, model: nn.Module, steps: int, lr: float, seed: int = 0,
             reclusterer: Reclusterer | None = None) -> list[float]:
    """A short fine-tune of the whole compressed model: AdamW, constant lr after 10% warmup, grad clip 1.

    With a `reclusterer`, experts are re-grouped every `reclusterer.every` steps (projected, never re-initialised);
    the optimizer is rebuilt then, keeping the moments of every parameter that survived.
    """
    torch.manual_seed(seed)
    if run.kind == "lm":
        from moeflow.train.data import BatchStream

        tc = run.cfg.train
        stream = BatchStream(run.task.corpus.train, tc.batch_size, tc.seq_len, seed + 1)
        next_batch = lambda: stream.next_batch(0, 1)  # noqa: E731
    else:
        run.task.generator.manual_seed(seed + 1)
        next_batch = lambda: run.task.next_batch(0, 1)  # noqa: E731
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    losses = []
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warm)
        with record_routing() as log:
            loss, _ = run.task.loss(model, next_batch())
        total = loss + log.aux_loss(loss.device)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if reclusterer is not None and reclusterer.step(model, step + 1, log):
            old = {id(p): opt.state[p] for p in params if p in opt.state}
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            for p in params:
                if id(p) in old:
                    opt.state[p] = old[id(p)]
    model.eval()
    return losses


def check_out_dir(out: Path) -> None:
    """The output folder must be new or empty: compress never overwrites a run."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CompressError(f"{out} already exists and is not empty; pick a new --out (compress never overwrites)")


def save_compressed(run: LoadedRun, model: nn.Module, info: CompressionInfo, out: Path, record: dict[str, Any],
                    sims: list[LayerSimilarity], step: int) -> None:
    """Write the new run folder: checkpoint, config.json, compression.json, similarity.json, report.md."""
    out.mkdir(parents=True, exist_ok=True)
    config = dict(run.cfg.to_dict())
    config_json = json.loads(json.dumps(run.config_json))
    if any(g < 0 for lay in info.layouts.values() for g in lay.group_E):
        # pruned experts are hidden by a router bias: the saved config must build the router with one
        config["model"]["moe"]["router_bias"] = True
        config_json["model"]["moe"]["router_bias"] = True
    save_checkpoint(out / CHECKPOINT_NAME, model_state=model.state_dict(), optimizer_state={}, step=step,
                    data_state={}, config=config,
                    extra={"compression": {n: lay.to_dict() for n, lay in info.layouts.items()}})
    (out / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    (out / "compression.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "similarity.json").write_text(json.dumps(similarity_dict(sims), indent=2) + "\n")
    write_similarity_report(out, sims, record)
    from moeflow.analysis.plots import have_matplotlib

    if record.get("recluster_history") and have_matplotlib():
        from moeflow.analysis.plots_similarity import plot_recluster_history

        plot_recluster_history(record["recluster_history"], out / "recluster.png")


def similarity_dict(sims: list[LayerSimilarity]) -> dict[str, Any]:
    """S^w, S^f, S and calibration counts per layer as nested lists."""
    return {s.name: {"s_w": s.s_w.tolist(), "s_f": s.s_f.tolist(), "s": s.s.tolist(),
                     "tokens": s.tokens_E.tolist(), "usage": s.usage_E.tolist()} for s in sims}


def write_similarity_report(out: Path, sims: list[LayerSimilarity], record: dict[str, Any] | None = None) -> Path:
    """report.md with the heat maps (similarity.png) and, for a compressed run, what was done."""
    from moeflow.analysis.plots import have_matplotlib

    lines = ["# Expert similarity" + (" and compression" if record else ""), ""]
    if record:
        lines += [f"source run: `{record['source']}`, method `{record['method']}`, target ratio {record['target']}",
                  f"expert parameters {record['params_before']:,} -> {record['params_after']:,} "
                  f"(ratio {record['ratio']:.4f}); bytes with FP16 bases + INT4 residuals "
                  f"{record['bytes_after_fp16_int4']:,.0f}", ""]
        for key in ("quality_before", "quality_after", "quality_finetuned"):
            if record.get(key):
                lines.append(f"- {key}: " + ", ".join(f"{k} {v:.4f}" for k, v in record[key].items()))
        lines.append("")
    lines += ["Per MoE layer: structural S^w (cosine of the flattened expert weights), functional S^f (cosine of "
              "the experts' mean router-logit vectors over the calibration tokens) and fused S.", ""]
    for s in sims:
        off = s.s - torch.eye(s.s.shape[0], dtype=s.s.dtype)
        i, j = divmod(int(off.argmax()), s.s.shape[0])
        lines.append(f"- `{s.name}`: most similar pair ({i}, {j}) S={float(s.s[i, j]):.3f}; mean off-diagonal "
                     f"S^w {_offdiag(s.s_w):.3f}, S^f {_offdiag(s.s_f):.3f}")
    if have_matplotlib():
        from moeflow.analysis.plots_similarity import plot_similarity_heatmaps

        plot_similarity_heatmaps([(s.name, s.s_w, s.s_f, s.s) for s in sims], out / "similarity.png")
        lines += ["", "![similarity](similarity.png)"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _offdiag(s: torch.Tensor) -> float:
    e = s.shape[0]
    return float((s.sum() - s.diagonal().sum()) / max(1, e * e - e))


def check_options(method: str, ratio: float, rank: int | None = None, groups: int | None = None,
                  alpha: float = 0.5, calib_batches: int = 1, cluster: str = "kmedoids") -> None:
    """Refuse bad options before any work (loading and scoring a run takes a while)."""
    from moeflow.analysis.similarity import CLUSTER_METHODS
    from moeflow.compress.model import METHODS

    if method not in METHODS:
        raise CompressError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not 0.0 < ratio < 1.0:
        raise CompressError(f"--ratio must lie strictly between 0 and 1 (the kept share of expert parameters), "
                            f"got {ratio}")
    if rank is not None and rank < 1:
        raise CompressError(f"--rank must be >= 1, got {rank}")
    if groups is not None and groups < 1:
        raise CompressError(f"--groups must be >= 1, got {groups}")
    if not 0.0 <= alpha <= 1.0:
        raise CompressError(f"--alpha must lie in [0, 1] (S = alpha*S^w + (1-alpha)*S^f), got {alpha}")
    if calib_batches < 1:
        raise CompressError(f"--calib-batches must be >= 1, got {calib_batches}")
    if cluster not in CLUSTER_METHODS:
        raise CompressError(f"unknown clustering {cluster!r}; choose one of {', '.join(CLUSTER_METHODS)}")


def compress_run(run_dir: str | Path, method: str, ratio: float, out: str | Path | None = None, *,
                 finetune_steps: int = 0, lr: float = 5e-4, groups: int | None = None, rank: int | None = None,
                 alpha: float = 0.5, cluster: str = "kmedoids", calib_batches: int = 8, seed: int = 0,
                 cer: bool = True, save: bool = True, recluster_every: int = 0) -> dict[str, Any]:
    """Compress a run's experts; returns the record written to compression.json (and the folder, if saved)."""
    check_options(method, ratio, rank, groups, alpha, calib_batches, cluster)
    out_dir = Path(out) if out is not None else Path(run_dir).parent / f"{Path(run_dir).name}-{method}-{ratio:g}"
    if save:
        check_out_dir(out_dir)
    if finetune_steps < 0 or recluster_every < 0:
        raise CompressError(f"--finetune and --recluster-every must be >= 0 steps, got {finetune_steps} and "
                            f"{recluster_every}")
    run = load_any_run(run_dir)
    quality_before = run.quality(run.model, cer)
    cal = calibrate(run.model, calibration_batches(run, calib_batches, seed + 1234), run.forward)
    sims = layer_similarities(run.model, cal, alpha)
    model = run.model
    info = compress_model(model, sims, method, ratio, groups, rank, cluster, seed)
    t0 = time.perf_counter()
    quality_after = run.quality(model, cer)
    record: dict[str, Any] = {"source": str(run_dir), "kind": run.kind, "method": method, "target": ratio,
                              "cluster": cluster, "alpha": alpha, **info.to_dict(),
                              "quality_before": quality_before, "quality_after": quality_after,
                              "eval_s": time.perf_counter() - t0, "finetune_steps": finetune_steps}
    if recluster_every and not finetune_steps:
        raise CompressError("--recluster-every needs --finetune STEPS (re-clustering happens during training)")
    if finetune_steps:
        rc = Reclusterer(recluster_every, alpha, method=cluster, seed=seed) if recluster_every else None
        losses = finetune(run, model, finetune_steps, lr, seed, rc)
        record["finetune_loss"] = [losses[0], losses[-1]]
        record["quality_finetuned"] = run.quality(model, cer)
        if rc is not None:
            record["recluster_history"] = rc.history
            info.layouts = {n: m.experts.layout for n, m in moe_layers(model) if n in info.layouts}
    if save:
        save_compressed(run, model, info, out_dir, record, sims, run.step + finetune_steps)
        record["out"] = str(out_dir)
    return record


def similarity_only(run_dir: str | Path, out: str | Path, alpha: float = 0.5, calib_batches: int = 8,
                    seed: int = 0) -> Path:
    """Measure S^w, S^f and S of a run into a NEW folder (similarity.json, similarity.png, report.md)."""
    out_dir = Path(out)
    check_options("svd", 0.5, alpha=alpha, calib_batches=calib_batches)
    check_out_dir(out_dir)
    run = load_any_run(run_dir)
    cal = calibrate(run.model, calibration_batches(run, calib_batches, seed + 1234), run.forward)
    sims = layer_similarities(run.model, cal, alpha)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "similarity.json").write_text(json.dumps(similarity_dict(sims), indent=2) + "\n")
    return write_similarity_report(out_dir, sims)


__all__ = ["LoadedRun", "similarity_only", "load_any_run", "calibration_batches", "finetune", "compress_run",
           "check_out_dir",
           "write_similarity_report", "similarity_dict"]
