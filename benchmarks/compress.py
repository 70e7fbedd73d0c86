"""Expert compression on trained runs: quality vs parameter ratio for every method, training-free and after a short
fine-tune, the forward time of a compressed layer vs the original, and (translation) whether experts serving the
same output alphabet come out most similar.

    python benchmarks/compress.py --run runs/tiny --translate-run runs/translate --finetune 100 --out runs/compress-bench
    python benchmarks/compress.py --quick      # trains two tiny runs itself (tests/test_benchmarks_smoke.py style)

Every method starts from a fresh copy of the trained model; calibration (S^f, usage) uses training batches, quality
the run's validation data: bits/byte for the LM, teacher-forced bits/char and greedy CER for translation. The row at
ratio 1.0 is the original model, fine-tuned for the same steps in the "+ft" column (what fine-tuning alone buys).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP barriers stall on shared cores

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from moeflow.compress.model import METHODS, CompressError, calibrate, compress_model, layer_similarities  # noqa: E402
from moeflow.layers import moe_layers  # noqa: E402
from moeflow.tasks.compress_run import LoadedRun, calibration_batches, finetune, load_any_run  # noqa: E402


def sweep(run: LoadedRun, methods: list[str], ratios: list[float], steps: int, lr: float, calib: int, cer: bool,
          log: Any) -> tuple[list[dict[str, Any]], list]:
    """One row per (method, ratio): quality training-free and after `steps` of fine-tuning."""
    base = run.fresh_model()
    cal = calibrate(base, calibration_batches(run, calib), run.forward)
    sims = layer_similarities(base, cal)
    rows = []
    q0 = run.quality(base, cer)
    row0: dict[str, Any] = {"method": "original", "ratio": 1.0, "free": q0}
    if steps:
        m = run.fresh_model()
        finetune(run, m, steps, lr)
        row0["ft"] = run.quality(m, cer)
    rows.append(row0)
    print(f"  original: {_q(row0)}", file=log, flush=True)
    for method in methods:
        for ratio in ratios:
            m = run.fresh_model()
            t0 = time.perf_counter()
            try:
                info = compress_model(m, sims, method, ratio)
            except CompressError as e:
                print(f"  {method} @ {ratio}: skipped ({e})", file=log, flush=True)
                continue
            row = {"method": method, "ratio": info.ratio, "target": ratio, "free": run.quality(m, cer),
                   "rank": next(iter(info.layouts.values())).rank,
                   "groups": next(iter(info.layouts.values())).num_groups, "fit_s": time.perf_counter() - t0}
            if steps:
                finetune(run, m, steps, lr)
                row["ft"] = run.quality(m, cer)
            rows.append(row)
            print(f"  {method} @ {ratio} (actual {info.ratio:.3f}, G={row['groups']}, r={row['rank']}): {_q(row)}",
                  file=log, flush=True)
    return rows, sims


def _q(row: dict[str, Any]) -> str:
    return " | ".join(f"{k}: " + ", ".join(f"{n} {v:.4f}" for n, v in row[k].items()) for k in ("free", "ft")
                      if k in row)


def table(rows: list[dict[str, Any]], key: str, ratios: list[float]) -> str:
    """Markdown: methods down, target ratios across; each cell 'training-free / fine-tuned'."""
    head = "| method | 1.0 | " + " | ".join(f"{r:g}" for r in ratios) + " |"
    lines = [head, "|" + "---|" * (len(ratios) + 2)]
    orig = rows[0]
    cell0 = f"{orig['free'][key]:.3f}" + (f" / {orig['ft'][key]:.3f}" if "ft" in orig else "")
    for method in dict.fromkeys(r["method"] for r in rows[1:]):
        cells = []
        for ratio in ratios:
            hit = [r for r in rows if r["method"] == method and r.get("target") == ratio]
            if not hit:
                cells.append("-")
                continue
            r = hit[0]
            cells.append(f"{r['free'][key]:.3f}" + (f" / {r['ft'][key]:.3f}" if "ft" in r else ""))
        lines.append(f"| {method} | {cell0} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def winners(rows: list[dict[str, Any]], key: str, ratios: list[float]) -> list[str]:
    """Which method has the lowest `key` at each ratio, training-free and fine-tuned (the random control included)."""
    out = []
    for ratio in ratios:
        for col in ("free", "ft"):
            cand = [(r[col][key], r["method"]) for r in rows[1:] if r.get("target") == ratio and col in r]
            if cand:
                v, m = min(cand)
                out.append(f"ratio {ratio:g}, {'training-free' if col == 'free' else 'fine-tuned'}: {m} ({v:.3f})")
    return out


@torch.no_grad()
def forward_times(run: LoadedRun, methods: list[str], ratio: float, tokens: int, repeats: int) -> list[str]:
    """Median forward time of one MoE layer's experts on routed rows: original vs each method at `ratio`."""
    base = run.fresh_model()
    cal = calibrate(base, calibration_batches(run, 2), run.forward)
    sims = layer_similarities(base, cal)
    name, layer = moe_layers(base)[0]
    torch.manual_seed(0)
    x = torch.randn(tokens, layer.cfg.d_model)
    routing = layer.router(x)
    x_in, plan = layer.dispatcher.dispatch(x, routing)
    candidates = [("original", layer.experts)]
    for method in methods:
        m = run.fresh_model()
        try:
            compress_model(m, [s for s in sims if s.name == name], method, ratio)  # only the timed layer
        except CompressError:
            continue
        candidates.append((method, dict(moe_layers(m))[name].experts))
    times: dict[str, list[float]] = {n: [] for n, _ in candidates}
    for _ in range(repeats):  # interleaved: load changes on a shared machine hit every variant alike
        for n, ex in candidates:
            t0 = time.perf_counter()
            ex(x_in, plan.rows)
            times[n].append(time.perf_counter() - t0)
    ref = statistics.median(times["original"])
    return [f"| {n} | {1e3 * statistics.median(t):.2f} | {statistics.median(t) / ref:.2f} |" for n, t in times.items()]


def compare_clustering(run: LoadedRun, ratio: float, calib: int, seeds: int = 3) -> list[str]:
    """base-lowrank at `ratio` with each clustering: mean within-group S, relative weight error, quality."""
    from moeflow.analysis.similarity import within_similarity
    from moeflow.compress.model import _dense_experts

    base = run.fresh_model()
    cal = calibrate(base, calibration_batches(run, calib), run.forward)
    sims = layer_similarities(base, cal)
    dense = {n: _dense_experts(layer) for n, layer in moe_layers(base)}
    lines = ["| clustering | seed | mean within-group S | relative weight error | val bits | fit s |",
             "|---|---|---|---|---|---|"]
    for cluster in ("agglomerative", "kmedoids", "random"):
        for seed in range(seeds if cluster != "agglomerative" else 1):
            m = run.fresh_model()
            t0 = time.perf_counter()
            method = "random" if cluster == "random" else "base-lowrank"
            info = compress_model(m, sims, method, ratio, cluster=cluster, seed=seed)
            fit_s = time.perf_counter() - t0
            within = statistics.fmean(within_similarity(s.s, info.layouts[s.name].group_E) for s in sims)
            num = den = 0.0
            for n, layer in moe_layers(m):
                # the fit permuted hidden units (alignment): compare each expert up to a hidden-unit matching
                num += _fit_error(layer.experts, dense[n])
                den += float(dense[n][0].square().sum() + dense[n][1].square().sum())
            q = run.quality(m, cer=False)["val_bpb"]
            lines.append(f"| {cluster} | {seed} | {within:.3f} | {(num / den) ** 0.5:.3f} | {q:.4f} | {fit_s:.1f} |")
    return lines


def _fit_error(experts: Any, dense: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Squared Frobenius distance between fitted and original experts, up to each expert's hidden permutation."""
    from moeflow.compress.fit import hidden_features, match_hidden_units, split_projections

    w_in, w_out = experts.dense_weights()
    act = experts.activation
    fitted = split_projections(w_in, w_out, act)
    orig = split_projections(dense[0], dense[1], act)
    total = 0.0
    for e in range(w_in.shape[0]):
        a, b = hidden_features(fitted, e), hidden_features(orig, e)
        perm = match_hidden_units(a, b)
        total += float((a - b[perm]).square().sum())
    return total


def language_finding(run: LoadedRun, sims: list, batches: int = 4) -> list[str]:
    """Per layer: the dominant expert of each language, and where the cip / rcp experts' pair ranks on S^f, S^w, S."""
    from moeflow.tasks.translate_train import collect_language_routing

    model = run.fresh_model()
    stats = collect_language_routing(model, run.task.data, batches, seed=run.cfg.seed, training_routing=False)
    by_layer = {id(layer): name for name, layer in moe_layers(model)}
    sim_by_name = {s.name: s for s in sims}
    lines = []
    for ffn_name, ffn in model.moe_ffns():
        share = stats[ffn_name].share_LE()  # [L, E], rows sum to 1
        langs = stats[ffn_name].languages
        dom = {lang: int(share[i].argmax()) for i, lang in enumerate(langs)}
        s = sim_by_name[by_layer[id(ffn.moe)]]
        e = s.s.shape[0]
        # experts' language profiles: which experts serve the same languages (cosine of share columns)
        prof = torch.nn.functional.normalize(share.t().double(), dim=1)
        prof_sim = prof @ prof.t()
        iu = torch.triu_indices(e, e, 1)
        corr = {k: float(torch.corrcoef(torch.stack([prof_sim[iu[0], iu[1]], m[iu[0], iu[1]]]))[0, 1])
                for k, m in (("S^f", s.s_f), ("S^w", s.s_w), ("S", s.s))}
        line = f"- `{ffn_name}`: dominant expert per language " + ", ".join(f"{k} e{v}" for k, v in dom.items())
        if "cip" in dom and "rcp" in dom:
            a, b = dom["cip"], dom["rcp"]
            if a == b:
                line += f"; cip and rcp share expert e{a}"
            else:
                ranks = {}
                for k, m in (("S^f", s.s_f), ("S^w", s.s_w), ("S", s.s)):
                    vals = m[iu[0], iu[1]]
                    ranks[k] = 1 + int((vals > m[a, b]).sum())
                line += (f"; pair (cip e{a}, rcp e{b}) ranks " + ", ".join(f"{k} #{v}" for k, v in ranks.items())
                         + f" of {iu.shape[1]} pairs")
        line += "; corr(language-profile similarity, S^f / S^w / S) = " + " / ".join(
            f"{corr[k]:.2f}" for k in ("S^f", "S^w", "S"))
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the sweep(s) and print the tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", help="trained LM run folder")
    p.add_argument("--translate-run", help="trained translation run folder")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--ratios", default="0.75,0.5,0.25")
    p.add_argument("--finetune", type=int, default=100, help="fine-tune steps per method and ratio (0: none)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--ft-batch", type=int, help="LM: fine-tune batch size (default: the run's train.batch_size)")
    p.add_argument("--eval-sentences", type=int, help="translation: held-out sentences per language to score "
                                                       "(default: the run's eval_sentences)")
    p.add_argument("--no-cer", action="store_true", help="translation: skip greedy-decoding CER")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--time-tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--clusterings", action="store_true",
                   help="only compare the clustering methods for base-lowrank at ratio 0.5 and exit")
    p.add_argument("--out", help="folder for results.json, table.md and the plots")
    p.add_argument("--quick", action="store_true", help="train tiny runs in a temp folder and sweep them briefly")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    ratios = [float(r) for r in args.ratios.split(",")]
    runs: list[tuple[str, str]] = []
    if args.quick:
        runs = _quick_runs()
        args.finetune, args.calib_batches, args.repeats, args.time_tokens = 2, 1, 2, 256
    if args.run:
        runs.append(("lm", args.run))
    if args.translate_run:
        runs.append(("translate", args.translate_run))
    if not runs:
        print("pass --run and/or --translate-run (or --quick)", file=sys.stderr)
        return 2
    if args.clusterings:
        for kind, path in runs:
            print(f"## {kind}: {path}: clustering for base-lowrank at ratio 0.5 (load {os.getloadavg()})")
            print("\n".join(compare_clustering(load_any_run(path), 0.5, args.calib_batches)))
        return 0
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"load_average_start": os.getloadavg(), "finetune_steps": args.finetune}
    md: list[str] = []
    for kind, path in runs:
        run = load_any_run(path)
        if kind == "lm" and args.ft_batch:
            run.cfg = run.cfg.replace(train=run.cfg.train.replace(batch_size=args.ft_batch))
        if kind == "translate" and args.eval_sentences:
            run.cfg = run.cfg.replace(eval_sentences=args.eval_sentences)
        print(f"## {kind}: {path} (step {run.step}), fine-tune {args.finetune} steps", flush=True)
        ft_note = (f" of batch {run.cfg.train.batch_size}x{run.cfg.train.seq_len}" if kind == "lm"
                   else f" of batch {run.cfg.batch_size}")
        rows, sims = sweep(run, methods, ratios, args.finetune, args.lr, args.calib_batches,
                           cer=kind == "translate" and not args.no_cer, log=sys.stdout)
        results[kind] = rows
        key = "val_bpb"
        md += [f"## {kind}: {path} (step {run.step})", "",
               f"validation {'bits/byte' if kind == 'lm' else 'bits/char (teacher-forced)'}, "
               f"training-free / after {args.finetune} fine-tune steps{ft_note} (lr {args.lr})", "",
               table(rows, key, ratios), ""]
        md += ["Lowest at each ratio: " + "; ".join(winners(rows, key, ratios)), ""]
        if kind == "translate" and "cer" in rows[0]["free"]:
            md += ["CER (greedy), training-free / fine-tuned", "", table(rows, "cer", ratios), "",
                   "Lowest CER: " + "; ".join(winners(rows, "cer", ratios)), ""]
        if kind == "translate":
            md += ["Language x expert vs similarity:", "", *language_finding(run, sims), ""]
        md += ["Forward time of layer 0's experts (no grad, "
               f"{args.time_tokens} tokens, {args.threads} thread(s), median of {args.repeats}), ratio 0.5:", "",
               "| experts | ms | vs original |", "|---|---|---|",
               *forward_times(run, methods, 0.5, args.time_tokens, args.repeats), ""]
        if out:
            _plot(rows, key, out / f"{kind}_quality.png", kind)
    results["load_average_end"] = os.getloadavg()
    md.append(f"load average (1, 5, 15 min) at start {results['load_average_start']}, "
              f"at end {results['load_average_end']}")
    text = "\n".join(md)
    print(text)
    if out:
        (out / "table.md").write_text(text + "\n")
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _plot(rows: list[dict[str, Any]], key: str, path: Path, kind: str) -> None:
    from moeflow.analysis.plots import have_matplotlib

    if not have_matplotlib():
        return
    from moeflow.analysis.plots_similarity import plot_quality_vs_ratio

    curves: dict[str, tuple[list[float], list[float]]] = {}
    orig = rows[0]
    for method in dict.fromkeys(r["method"] for r in rows[1:]):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: -r["ratio"])
        curves[method] = ([1.0] + [r["ratio"] for r in mine], [orig["free"][key]] + [r["free"][key] for r in mine])
        if "ft" in orig:
            curves[method + " +ft"] = ([1.0] + [r["ratio"] for r in mine],
                                       [orig["ft"][key]] + [r["ft"][key] for r in mine])
    plot_quality_vs_ratio(curves, path, "validation bits/byte" if kind == "lm" else "validation bits/char",
                          f"{kind}: quality vs expert parameter ratio (dashed: training-free)")


def _quick_runs() -> list[tuple[str, str]]:
    import inspect
    import tempfile

    from moeflow.cli import main as cli

    tmp = Path(tempfile.mkdtemp(prefix="compress-bench-"))
    data = tmp / "data.txt"
    data.write_text(inspect.getsource(json) * 3)
    tiny = ["--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2", "--set",
            "model.n_kv_heads=1", "--set", "model.ffn_hidden=64", "--set", "model.moe.d_hidden=32", "--set",
            "model.moe.num_experts=4", "--set", "train.batch_size=4", "--set", "train.seq_len=16", "--set",
            "train.eval_batches=2", "--set", "train.warmup=2"]
    assert cli(["train", "--data", str(data), "--out", str(tmp), "--name", "lm", "--max-steps", "4", "--quiet",
                *tiny]) == 0
    assert cli(["train", "--task", "translate", "--preset", "tiny", "--max-steps", "4", "--set", "eval_sentences=2",
                "--out", str(tmp), "--name", "tr", "--quiet"]) == 0
    return [("lm", str(tmp / "lm")), ("translate", str(tmp / "tr"))]


if __name__ == "__main__":
    sys.exit(main())
