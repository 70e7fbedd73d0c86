"""`moeflow convert SRC DST`: Hugging Face folder <-> moeflow model folder (or a training run -> HF folder).

SRC may be an HF folder (config.json + *.safetensors), a moeflow model folder (moeflow.json + model.safetensors,
as written by this command), or a training run folder / checkpoint.pt written by `moeflow train`. DST is written
as a moeflow folder (`--to moeflow`, the default for an HF source) or an HF folder (`--to hf`, the default for the
other sources) that `transformers` loads with from_pretrained.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

from moeflow.interop.hf import MOEFLOW_CONFIG, load_hf, load_moeflow, save_hf, save_moeflow
from moeflow.interop.hf_config import ARCHS, DTYPES

_SIZE_UNITS = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `convert` subcommand."""
    p = sub.add_parser("convert", help="convert between Hugging Face and moeflow checkpoints",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="HF folder, moeflow folder, or training run folder / checkpoint.pt")
    p.add_argument("dst", type=Path, help="output folder (created)")
    p.add_argument("--to", choices=("moeflow", "hf"), default=None,
                   help="output format (default: moeflow for an HF source, hf otherwise)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="cast the weights (default: keep)")
    p.add_argument("--arch", choices=ARCHS, default=None,
                   help="HF architecture to write (default: the source's, or the one the model matches)")
    p.add_argument("--max-shard-size", type=_shard_bytes, default="4GB",
                   help="largest HF shard, e.g. 500MB (default 4GB)")
    p.add_argument("--force", action="store_true",
                   help="write into DST even if it is not empty or is SRC itself (files of the same names are "
                        "replaced; nothing else is deleted)")
    p.set_defaults(func=run)


def _shard_bytes(text: str) -> int:
    """'500MB' -> bytes (a positive size: a number of bytes, or KB/MB/GB)."""
    t = text.strip().upper()
    number, mult = t, 1
    for unit, m in _SIZE_UNITS.items():
        if t.endswith(unit):
            number, mult = t[: -len(unit)], m
            break
    try:
        value = int(float(number) * mult)
    except (ValueError, OverflowError):
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size like 500MB, 4GB or 1000000, got {text!r}")
    return value


def _load_training_run(src: Path) -> nn.Module:
    """A MoETransformer from a `moeflow train` checkpoint (its config's `model` section + its weights)."""
    from moeflow.models import ModelConfig, MoETransformer
    from moeflow.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(src)
    model_cfg = (ckpt.get("config") or {}).get("model")
    if not isinstance(model_cfg, dict):
        raise ValueError(f"{src}: the checkpoint's config has no 'model' section")
    model = MoETransformer(ModelConfig.from_dict(model_cfg))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def load_any(src: Path) -> tuple[nn.Module, str]:
    """(model, source kind) from an HF folder, a moeflow folder or a training checkpoint."""
    if (src / MOEFLOW_CONFIG).is_file():
        return load_moeflow(src), "moeflow"
    if (src / "config.json").is_file() and any(src.glob("*.safetensors")):
        return load_hf(src), "hf"
    if src.suffix == ".pt" or (src / "checkpoint.pt").is_file():
        return _load_training_run(src), "train"
    raise FileNotFoundError(f"{src}: not an HF folder (config.json + *.safetensors), a moeflow folder "
                            f"({MOEFLOW_CONFIG}) or a training run (checkpoint.pt)")


def run(args: argparse.Namespace) -> int:
    """Load, optionally cast, save; print what was done."""
    from moeflow.train.checkpoint import CheckpointError

    t0 = time.perf_counter()
    _check_destination(args.src, args.dst, args.force)
    try:
        model, kind = load_any(args.src)
    except (FileNotFoundError, KeyError, ValueError, CheckpointError) as e:
        print(f"moeflow convert: {e}", file=sys.stderr)
        return 2
    to = args.to or ("moeflow" if kind == "hf" else "hf")
    dtype = DTYPES[args.dtype] if args.dtype else None
    if dtype is not None:
        model = _cast(model, dtype)
    written, others = _save_beside(model, args.dst, lambda folder: save_hf(
        model, folder, arch=args.arch, dtype=dtype, max_shard_bytes=args.max_shard_size) if to == "hf"
        else save_moeflow(model, folder))
    if others:
        print(f"note: {args.dst} also holds {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}, not "
              "written by this conversion (kept); a loader may pick them up, remove them if they are stale",
              file=sys.stderr)
    n = sum(p.numel() for p in model.parameters())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{kind} {args.src} -> {to} {args.dst}: {type(model).__name__}, {n / 1e6:.2f}M parameters, "
          f"{time.perf_counter() - t0:.1f}s, peak RSS {peak_mb:.0f} MB")
    return 0


def _check_destination(src: Path, dst: Path, force: bool) -> None:
    """Refuse (without --force) to write into SRC's own folder or into a folder that already holds files."""
    from moeflow.config import ConfigError

    src_dir = src.parent if src.is_file() else src
    if dst.exists() and not dst.is_dir():
        raise ConfigError(f"{dst} exists and is not a folder; DST is the folder to write")
    if force:
        return
    if dst.exists() and src_dir.exists() and dst.resolve() == src_dir.resolve():
        raise ConfigError(f"{dst} is the source folder itself: converting there would replace its config.json "
                          "(a training run could no longer --resume); pick another DST (or --force)")
    if dst.is_dir() and any(dst.iterdir()):
        raise ConfigError(f"{dst} already exists and is not empty; pick a new or empty folder (or --force to "
                          "replace the files this conversion writes, keeping the others)")


def _save_beside(model: nn.Module, dst: Path, save: object) -> tuple[list[str], list[str]]:
    """Save into a fresh folder next to DST, then move each file into DST (replacing only the same names).

    A failure midway (a full disk, an interrupt) leaves DST as it was, and nothing already in DST is deleted.
    Returns (files written, other model files that were already there).
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.parent / f".{dst.name}.converting.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # ours: named by this process id
    try:
        save(staging)  # type: ignore[operator]
        dst.mkdir(exist_ok=True)
        written = sorted(f.name for f in staging.iterdir())
        for name in written:
            os.replace(staging / name, dst / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    others = sorted(f.name for f in dst.iterdir() if f.name not in written
                    and (f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json")))
    return written, others


def _cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast parameters, keeping selection-bias buffers in fp32 (as HF does)."""
    model.to(dtype)  # in place: the module keeps hf_config / hf_arch
    for m in model.modules():
        for name, b in m._buffers.items():
            if b is not None and b.is_floating_point():
                m._buffers[name] = b.float()
    return model
