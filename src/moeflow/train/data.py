"""Training data: a byte-level corpus (embedded default or user files) split by file, and seeded batch streams.

The embedded default is text every Python installation carries and nobody here wrote: the interpreter's standard
library `.py` sources plus `pydoc_data.topics`. It is tokenised as raw UTF-8 bytes (vocabulary 256), split into
train/validation by a hash of each file's relative path, and cached as uint8 `.npy` so later runs start instantly.

Shape legend: B = batch rows, S = sequence length, N = corpus tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from moeflow.config import Config, check_choice, check_int, check_number

# bump when the corpus recipe changes, so stale caches are not reused
CORPUS_VERSION = 1
# stdlib folders that are tests, third-party code, or generated data rather than prose-like source
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3",
              "ensurepip", "_vendor"}
TEXT_SUFFIXES_SKIPPED = {".pyc", ".pyo", ".so", ".dll", ".exe", ".png", ".gif", ".jpg", ".zip", ".gz"}


class DataError(ValueError):
    """Training data is missing, empty, binary or unreadable; the message names the file."""


@dataclass(kw_only=True)
class DataConfig(Config):
    """Where the training tokens come from and how validation is split off."""

    config_name = "data"  # errors name fields by the dotted keys `--set` takes (not annotated: not a field)

    path: str | None = None  # None: the embedded stdlib corpus; else a text file, a folder, a .bin or a .npy
    val_fraction: float = 0.05  # share of files (or of the tail, for a single file/array) held out
    max_bytes: int = 12_000_000  # cap on the embedded corpus (the stdlib is ~11 MB of .py without tests)
    max_file_bytes: int = 300_000  # embedded corpus: skip single files larger than this (generated tables)
    bin_dtype: str = "uint8"  # element type of a raw .bin file: uint8 (bytes) or uint16 (nanoGPT-style ids)
    cache_dir: str | None = None  # None: $XDG_CACHE_HOME/moeflow or ~/.cache/moeflow

    def __post_init__(self) -> None:
        """Validate the fields."""
        check_number(self, "val_fraction", lo=0, hi=1, lo_open=True, hi_open=True)
        check_choice(self, "bin_dtype", ("uint8", "uint16"))
        check_int(self, "max_bytes", "max_file_bytes")


@dataclass
class Corpus:
    """Train and validation token arrays plus a one-line description of where they came from."""

    train: Tensor  # uint8 or int32 [N_train]
    val: Tensor  # [N_val]
    source: str
    num_docs: int

    @property
    def max_token(self) -> int:
        """The largest token id in either split."""
        return int(max(self.train.max().item(), self.val.max().item()))


def _is_val(relpath: str, val_fraction: float) -> bool:
    """Deterministic per-document split: the first 8 bytes of sha1(path) as a uniform number in [0, 1)."""
    h = int.from_bytes(hashlib.sha1(relpath.encode("utf-8")).digest()[:8], "big")
    return h / 2.0**64 < val_fraction


def _split_docs(docs: list[tuple[str, bytes]], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents into train/val byte arrays by path hash (tail split if one side would be empty)."""
    sep = b"\n\n"
    train = [d + sep for p, d in docs if not _is_val(p, val_fraction)]
    val = [d + sep for p, d in docs if _is_val(p, val_fraction)]
    if not train or not val:
        # too few documents for a per-file split: hold out the tail of the concatenation instead
        return _tail_split(np.frombuffer(b"".join(d + sep for _, d in docs), dtype=np.uint8), val_fraction)
    return np.frombuffer(b"".join(train), dtype=np.uint8), np.frombuffer(b"".join(val), dtype=np.uint8)


def _tail_split(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The last `val_fraction` of a token array is validation."""
    n_val = max(1, int(len(tokens) * val_fraction))
    return tokens[:-n_val], tokens[-n_val:]


def _check_text(path: Path, raw: bytes) -> None:
    """Raise DataError unless `raw` is non-empty UTF-8 text without NUL bytes."""
    if not raw:
        raise DataError(f"{path}: file is empty; give a file with text in it")
    if b"\x00" in raw:
        raise DataError(f"{path}: contains NUL bytes, so it looks binary; pass text files, or a pre-tokenised "
                        ".bin/.npy array")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8 or "
                        "remove it from the folder") from None


def _read(path: Path) -> bytes:
    """Read a file, turning OS errors into DataError naming the file."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None


def stdlib_documents(max_bytes: int, max_file_bytes: int) -> list[tuple[str, bytes]]:
    """The interpreter's stdlib `.py` sources (sorted, tests and site-packages skipped) and pydoc topics."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[tuple[str, bytes]] = []
    total = 0
    try:
        from pydoc_data.topics import topics  # present in every CPython; its text is the language reference
        for name in sorted(topics):
            text = topics[name].encode("utf-8")
            if total + len(text) > max_bytes:
                break
            docs.append((f"pydoc_data.topics/{name}", text))
            total += len(text)
    except ImportError:
        pass
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(("test", ".")))
        for fname in sorted(filenames):
            if not fname.endswith(".py") or fname.startswith("test_"):
                continue
            path = Path(dirpath, fname)
            rel = path.relative_to(root).as_posix()
            if rel == "pydoc_data/topics.py":
                continue  # already taken from the module, without the Python dict syntax around it
            try:
                if path.stat().st_size > max_file_bytes:
                    continue
                raw = path.read_bytes()
                raw.decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue  # a stdlib file we cannot read is not the user's problem; the corpus is large enough
            if total + len(raw) > max_bytes:
                return docs
            docs.append((rel, raw))
            total += len(raw)
    return docs


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/moeflow, else ~/.cache/moeflow."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moeflow"


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    """Write an .npy via a temporary file and rename, so concurrent runs never read a half-written cache."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def load_stdlib_corpus(cfg: DataConfig) -> Corpus:
    """The embedded corpus, built once per Python version and recipe, then read from the cache."""
    key_src = json.dumps([CORPUS_VERSION, sys.version, sysconfig.get_paths()["stdlib"], cfg.max_bytes,
                          cfg.max_file_bytes, cfg.val_fraction])
    key = hashlib.sha1(key_src.encode()).hexdigest()[:10]
    ver = f"py{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    stem = cache / f"stdlib-{ver}-{key}"
    train_p, val_p, meta_p = (stem.with_name(stem.name + s) for s in (".train.npy", ".val.npy", ".json"))
    source = f"embedded corpus: Python {ver[2:]} standard library + pydoc topics"
    if train_p.exists() and val_p.exists() and meta_p.exists():
        try:
            meta = json.loads(meta_p.read_text())
            train, val = np.load(train_p), np.load(val_p)
            return Corpus(torch.from_numpy(train), torch.from_numpy(val), source + " (cached)", meta["num_docs"])
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt below
    docs = stdlib_documents(cfg.max_bytes, cfg.max_file_bytes)
    if not docs:
        raise DataError(f"found no readable .py files under {sysconfig.get_paths()['stdlib']}; pass --data FILE")
    train, val = _split_docs(docs, cfg.val_fraction)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        _atomic_save_npy(train_p, train)
        _atomic_save_npy(val_p, val)
        meta_p.write_text(json.dumps({"num_docs": len(docs), "train_bytes": len(train), "val_bytes": len(val)}))
    except OSError as e:
        print(f"note: could not cache the corpus under {cache} ({e}); it will be rebuilt next time", file=sys.stderr)
    return Corpus(torch.from_numpy(train.copy()), torch.from_numpy(val.copy()), source, len(docs))


def _array_corpus(arr: np.ndarray, path: Path, val_fraction: float) -> Corpus:
    """A pre-tokenised 1-D array, validated and tail-split."""
    if arr.ndim != 1:
        raise DataError(f"{path}: expected a 1-D token array, got shape {arr.shape}")
    if arr.size < 2:
        raise DataError(f"{path}: holds {arr.size} tokens; need a non-empty token array")
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: token array has dtype {arr.dtype}; expected an integer type (uint8/uint16/int32)")
    if arr.min() < 0:
        raise DataError(f"{path}: token array has negative ids")
    train, val = _tail_split(arr, val_fraction)
    # uint8 stays compact; wider ids become int32 (torch indexes uint16 poorly)
    dtype = np.uint8 if arr.dtype == np.uint8 else np.int32
    return Corpus(torch.from_numpy(np.array(train, dtype=dtype)), torch.from_numpy(np.array(val, dtype=dtype)),
                  f"token array {path} ({arr.dtype}, {arr.size:,} tokens)", 1)


def load_corpus(cfg: DataConfig) -> Corpus:
    """Load the configured corpus: embedded default, text file, folder of text files, .bin or .npy."""
    if cfg.path is None:
        return load_stdlib_corpus(cfg)
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; --data takes a text file, a folder of text files, "
                        "a .bin or a .npy token array")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") or part == "__pycache__"
                                   for part in p.relative_to(path).parts)
                       and p.suffix.lower() not in TEXT_SUFFIXES_SKIPPED)
        if not files:
            raise DataError(f"{path}: folder holds no files (hidden files and __pycache__ are skipped)")
        docs = []
        for p in files:
            raw = _read(p)
            if not raw:
                continue  # an empty file in a folder adds nothing; only an all-empty folder is an error
            _check_text(p, raw)
            docs.append((p.relative_to(path).as_posix(), raw))
        if not docs:
            raise DataError(f"{path}: every file in the folder is empty")
        train, val = _split_docs(docs, cfg.val_fraction)
        return Corpus(torch.from_numpy(train.copy()), torch.from_numpy(val.copy()),
                      f"folder {path} ({len(docs)} files)", len(docs))
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable .npy array ({e})") from None
        return _array_corpus(arr, path, cfg.val_fraction)
    if path.suffix == ".bin":
        raw = _read(path)
        itemsize = np.dtype(cfg.bin_dtype).itemsize
        if not raw:
            raise DataError(f"{path}: file is empty")
        if len(raw) % itemsize:
            raise DataError(f"{path}: {len(raw)} bytes is not a whole number of {cfg.bin_dtype} tokens; "
                            "set --set data.bin_dtype=uint8 or uint16 to match how it was written")
        return _array_corpus(np.frombuffer(raw, dtype=cfg.bin_dtype), path, cfg.val_fraction)
    raw = _read(path)
    _check_text(path, raw)
    train, val = _tail_split(np.frombuffer(raw, dtype=np.uint8), cfg.val_fraction)
    return Corpus(torch.from_numpy(train.copy()), torch.from_numpy(val.copy()), f"text file {path}", 1)


def encode(text: str) -> list[int]:
    """Byte-level tokenizer: UTF-8 bytes as ids 0..255."""
    return list(text.encode("utf-8"))


def decode(ids: list[int]) -> str:
    """Inverse of `encode`; invalid UTF-8 (a cut multi-byte character) is replaced, not an error."""
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def _windows(tokens: Tensor, starts_B: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Inputs and next-token targets [B, S] (int64) from windows starting at `starts_B`."""
    idx_BS = starts_B.unsqueeze(1) + torch.arange(seq_len + 1)
    w = tokens[idx_BS].long()
    return w[:, :-1], w[:, 1:]


class BatchStream:
    """Random training windows from a torch.Generator seeded by the run seed; its state is checkpointable.

    Every rank draws the same global batch and keeps its own rows, so the token stream (and the loss) does
    not depend on how many ranks share it.
    """

    def __init__(self, tokens: Tensor, batch_size: int, seq_len: int, seed: int) -> None:
        """Check that the split is long enough and seed the generator."""
        if len(tokens) < seq_len + 2:
            raise DataError(f"training split has {len(tokens)} tokens, fewer than seq_len+2={seq_len + 2}; "
                            "use more data or a smaller train.seq_len")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self, rank: int = 0, world: int = 1) -> tuple[Tensor, Tensor]:
        """The next (inputs, targets) [B/world, S] for this rank."""
        starts_B = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch_size,),
                                 generator=self.generator)
        if world > 1:
            per = self.batch_size // world
            starts_B = starts_B[rank * per:(rank + 1) * per]
        return _windows(self.tokens, starts_B, self.seq_len)

    def state_dict(self) -> dict[str, Tensor]:
        """The generator state (enough to continue the stream exactly)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore the generator state."""
        self.generator.set_state(state["generator"])


def eval_batches(tokens: Tensor, num_batches: int, batch_size: int, seq_len: int) -> list[tuple[Tensor, Tensor]]:
    """Fixed, evenly spaced validation windows, so every evaluation sees the same tokens."""
    if len(tokens) < seq_len + 2:
        raise DataError(f"validation split has {len(tokens)} tokens, fewer than seq_len+2={seq_len + 2}; "
                        "use more data, a larger data.val_fraction, or a smaller train.seq_len")
    n = num_batches * batch_size
    starts = torch.linspace(0, len(tokens) - seq_len - 1, n).long()
    return [_windows(tokens, starts[i * batch_size:(i + 1) * batch_size], seq_len) for i in range(num_batches)]
