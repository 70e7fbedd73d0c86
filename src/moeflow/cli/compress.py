"""`moeflow compress`: compress a trained run's experts into a NEW run folder, or only measure their similarity.

    moeflow compress --run runs/tiny --method base-lowrank --ratio 0.5               # -> runs/tiny-base-lowrank-0.5
    moeflow compress --run runs/tiny --method prune --ratio 0.5 --finetune 100 --out runs/tiny-prune
    moeflow compress --run runs/translate --similarity-only --out runs/translate-sim  # heat maps, similarity.json
"""

from __future__ import annotations

import argparse

from moeflow.config import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `compress` subcommand."""
    from moeflow.analysis.similarity import CLUSTER_METHODS
    from moeflow.compress.model import METHODS

    p = sub.add_parser("compress", help="compress a run's experts (base + low-rank, merge, SVD, prune) into a new run")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="trained run folder (LM or translation)")
    p.add_argument("--method", metavar="M", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--ratio", type=float, metavar="R",
                   help="target share of expert parameters kept, strictly between 0 and 1")
    p.add_argument("--finetune", type=int, default=0, metavar="STEPS", help="fine-tune steps after compressing")
    p.add_argument("--lr", type=float, default=5e-4, help="fine-tune learning rate (default 5e-4)")
    p.add_argument("--out", metavar="DIR", help="new run folder (default RUN_DIR-METHOD-RATIO); must not exist or "
                                                "be empty")
    p.add_argument("--groups", type=int, help="groups per layer for base-lowrank/random (default floor(R*E/2))")
    p.add_argument("--rank", type=int, help="residual rank (default: the largest that fits the ratio)")
    p.add_argument("--alpha", type=float, default=0.5, help="S = alpha*S^w + (1-alpha)*S^f (default 0.5)")
    p.add_argument("--cluster", default="kmedoids", choices=CLUSTER_METHODS,
                   help="clustering for base-lowrank (default kmedoids: measured best, docs/compression.md)")
    p.add_argument("--calib-batches", type=int, default=8, help="training batches for S^f and usage (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed for clustering restarts, random groups, fine-tune")
    p.add_argument("--recluster-every", type=int, default=0, metavar="T",
                   help="during --finetune, re-group base-lowrank experts every T steps (projected, logged)")
    p.add_argument("--no-cer", action="store_true", help="translation: skip greedy-decoding CER (faster)")
    p.add_argument("--similarity-only", action="store_true",
                   help="only write the similarity heat maps and similarity.json to --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Compress (or measure) and print parameters, bytes, ratio vs the seed's formula, and quality."""
    from moeflow.tasks.compress_run import compress_run, similarity_only

    # errors are typed (ConfigError / CompressError, CheckpointError, OSError): moeflow.cli.main prints them
    if args.similarity_only:
        if not args.out:
            raise ConfigError("--similarity-only needs --out DIR (a new folder for the heat maps)")
        path = similarity_only(args.run, args.out, args.alpha, args.calib_batches, args.seed)
        print(f"similarity of {args.run}: {path}")
        return 0
    if args.method is None or args.ratio is None:
        raise ConfigError("--method and --ratio are required (or pass --similarity-only)")
    rec = compress_run(args.run, args.method, args.ratio, args.out, finetune_steps=args.finetune, lr=args.lr,
                       groups=args.groups, rank=args.rank, alpha=args.alpha, cluster=args.cluster,
                       calib_batches=args.calib_batches, seed=args.seed, cer=not args.no_cer,
                       recluster_every=args.recluster_every)
    print(format_record(rec))
    return 0


def format_record(rec: dict) -> str:
    """The lines `moeflow compress` prints."""
    lay = next(iter(rec["layouts"].values()))
    kept = sum(1 for g in lay["group_E"] if g >= 0)
    lines = [f"{rec['source']} -> {rec.get('out', '(not saved)')}: {rec['method']} at target ratio {rec['target']}",
             f"  layer 0 layout: {max(lay['group_E']) + 1} groups, {kept}/{len(lay['group_E'])} experts kept, "
             f"rank {lay['rank']}, base {lay['base']}, shared V {lay['shared_v']}",
             f"  expert parameters {rec['params_before']:,} -> {rec['params_after']:,}: ratio {rec['ratio']:.4f} "
             f"(x{rec['params_before'] / rec['params_after']:.2f} smaller)",
             f"  bytes: fp32 {4 * rec['params_before']:,} -> fp32 {4 * rec['params_after']:,}, "
             f"FP16 bases + INT4 residuals {rec['bytes_after_fp16_int4']:,.0f}"]
    if rec.get("seed_formula"):
        lines.append(f"  per-group factor: computed x{rec['per_group_factor']:.3f}, seed formula "
                     f"K*sum(OI)/sum(OI + K*r*(O+I)) x{rec['seed_formula']:.3f}")
    for key in ("quality_before", "quality_after", "quality_finetuned"):
        if rec.get(key):
            lines.append(f"  {key.replace('_', ' ')}: " + ", ".join(f"{k} {v:.4f}" for k, v in rec[key].items()))
    if rec.get("recluster_history"):
        changes = sum(lay["changed"] for h in rec["recluster_history"] for lay in h["layers"].values())
        lines.append(f"  re-clustering: {len(rec['recluster_history'])} checks, {changes} layer regroupings "
                     "(recluster.png)")
    return "\n".join(lines)
