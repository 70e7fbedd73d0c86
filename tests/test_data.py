"""Training data: text/folder/.bin/.npy loading, clear errors, the file-hash split, the embedded corpus, batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moeflow.config import ConfigError
from moeflow.train.data import (BatchStream, DataConfig, DataError, _is_val, decode, encode, eval_batches,
                                load_corpus)


def _cfg(path: Path | str | None, **kw: object) -> DataConfig:
    return DataConfig(path=None if path is None else str(path), **kw)  # type: ignore[arg-type]


def test_text_file_is_bytes_with_tail_split(tmp_path: Path) -> None:
    text = "héllo wörld\n" * 500
    f = tmp_path / "a.txt"
    f.write_text(text, encoding="utf-8")
    c = load_corpus(_cfg(f, val_fraction=0.1))
    raw = text.encode("utf-8")
    assert c.train.dtype == torch.uint8
    assert bytes(c.train.tolist()) + bytes(c.val.tolist()) == raw
    assert len(c.val) == int(len(raw) * 0.1)


def test_folder_split_is_by_file_hash_and_deterministic(tmp_path: Path) -> None:
    names = [f"sub/f{i:02d}.txt" if i % 3 else f"f{i:02d}.py" for i in range(40)]
    for n in names:
        p = tmp_path / n
        p.parent.mkdir(exist_ok=True)
        p.write_text(f"<{n}>\n" + "x = 1\n" * 20)
    (tmp_path / ".hidden").write_text("secret\x00")  # hidden files are skipped, so its NUL is never seen
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "f.txt").write_text("cache")
    cfg = _cfg(tmp_path, val_fraction=0.25)
    a, b = load_corpus(cfg), load_corpus(cfg)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.num_docs == 40
    val_text, train_text = decode(a.val.tolist()), decode(a.train.tolist())
    expect_val = {n for n in sorted(names) if _is_val(n, 0.25)}
    assert 0 < len(expect_val) < 40
    for n in names:
        assert (f"<{n}>" in val_text) == (n in expect_val)
        assert (f"<{n}>" in train_text) == (n not in expect_val)
    assert "cache" not in train_text + val_text


def test_hash_split_fraction_is_roughly_right() -> None:
    frac = np.mean([_is_val(f"dir/file_{i}.py", 0.1) for i in range(4000)])
    assert 0.08 < frac < 0.12


def test_bin_uint8_and_uint16(tmp_path: Path) -> None:
    ids8 = np.arange(1000, dtype=np.uint8)
    (tmp_path / "a.bin").write_bytes(ids8.tobytes())
    c = load_corpus(_cfg(tmp_path / "a.bin", val_fraction=0.2))
    assert torch.equal(torch.cat([c.train, c.val]), torch.from_numpy(ids8))
    ids16 = (np.arange(1000) * 37 % 5000).astype(np.uint16)
    (tmp_path / "b.bin").write_bytes(ids16.tobytes())
    c = load_corpus(_cfg(tmp_path / "b.bin", bin_dtype="uint16"))
    assert c.train.dtype == torch.int32 and c.max_token == int(ids16.max())
    assert torch.equal(torch.cat([c.train, c.val]), torch.from_numpy(ids16.astype(np.int32)))
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match=r"odd\.bin.*whole number of uint16"):
        load_corpus(_cfg(tmp_path / "odd.bin", bin_dtype="uint16"))


def test_npy_arrays_and_their_errors(tmp_path: Path) -> None:
    ids = np.arange(500, dtype=np.int64) % 300
    np.save(tmp_path / "a.npy", ids)
    c = load_corpus(_cfg(tmp_path / "a.npy"))
    assert torch.equal(torch.cat([c.train, c.val]).long(), torch.from_numpy(ids))
    np.save(tmp_path / "two_d.npy", ids.reshape(10, 50))
    with pytest.raises(DataError, match=r"two_d\.npy.*1-D"):
        load_corpus(_cfg(tmp_path / "two_d.npy"))
    np.save(tmp_path / "floats.npy", ids.astype(np.float32))
    with pytest.raises(DataError, match=r"floats\.npy.*integer"):
        load_corpus(_cfg(tmp_path / "floats.npy"))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match=r"junk\.npy"):
        load_corpus(_cfg(tmp_path / "junk.npy"))


@pytest.mark.parametrize("content, match", [
    (b"", "empty"),
    (b"text\x00more", "NUL bytes"),
    (b"caf\xe9 latin-1", "not valid UTF-8"),
])
def test_bad_text_files_name_the_file(tmp_path: Path, content: bytes, match: str) -> None:
    f = tmp_path / "bad_input.txt"
    f.write_bytes(content)
    with pytest.raises(DataError, match=rf"bad_input\.txt.*{match}"):
        load_corpus(_cfg(f))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "good.txt").write_text("fine text\n" * 10)
    (folder / "bad_input.txt").write_bytes(content)
    if content:  # an empty file inside a folder is skipped, only binary/undecodable ones are errors
        with pytest.raises(DataError, match=rf"bad_input\.txt.*{match}"):
            load_corpus(_cfg(folder))
    else:
        assert load_corpus(_cfg(folder)).num_docs == 1


def test_missing_and_empty_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.txt: no such file"):
        load_corpus(_cfg(tmp_path / "nope.txt"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="empty_dir.*no files"):
        load_corpus(_cfg(tmp_path / "empty_dir"))
    with pytest.raises(ConfigError, match=r"data\.val_fraction must be in \(0, 1\), got 1\.5"):
        DataConfig(val_fraction=1.5)  # a config field: ConfigError, like every config's


def test_embedded_corpus_is_cached_and_deterministic(tmp_path: Path) -> None:
    cfg = _cfg(None, max_bytes=1_000_000, cache_dir=str(tmp_path / "c1"))
    first = load_corpus(cfg)
    assert "standard library" in first.source and "cached" not in first.source
    assert 700_000 < len(first.train) + len(first.val) <= 1_000_000 + 2 * first.num_docs and len(first.val) > 0
    again = load_corpus(cfg)
    assert "(cached)" in again.source
    other = load_corpus(_cfg(None, max_bytes=1_000_000, cache_dir=str(tmp_path / "c2")))
    assert torch.equal(first.train, again.train) and torch.equal(first.train, other.train)
    assert torch.equal(first.val, other.val)
    assert list(map(str, (tmp_path / "c1").iterdir())) and not list((tmp_path / "c1").glob("*.tmp"))
    text = decode(torch.cat([first.train, first.val]).tolist())
    assert "Assignment statements" in text  # pydoc topics
    assert "\nimport " in text and "\ndef " in text and "\x00" not in text  # stdlib sources


def test_batch_stream_is_seeded_and_resumable() -> None:
    tokens = torch.arange(5000) % 251
    a, b = BatchStream(tokens, 4, 16, seed=7), BatchStream(tokens, 4, 16, seed=7)
    x, y = a.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    assert torch.equal(x, b.next_batch()[0])
    state = a.state_dict()
    expected = [a.next_batch()[0] for _ in range(3)]
    c = BatchStream(tokens, 4, 16, seed=999)
    c.load_state_dict(state)
    assert all(torch.equal(e, c.next_batch()[0]) for e in expected)
    assert not torch.equal(BatchStream(tokens, 4, 16, seed=8).next_batch()[0], x)


def test_ranks_split_one_global_batch() -> None:
    tokens = torch.arange(3000) % 256
    full = BatchStream(tokens, 4, 8, seed=1).next_batch()[0]
    r0 = BatchStream(tokens, 4, 8, seed=1).next_batch(rank=0, world=2)[0]
    r1 = BatchStream(tokens, 4, 8, seed=1).next_batch(rank=1, world=2)[0]
    assert torch.equal(torch.cat([r0, r1]), full)


def test_eval_batches_fixed_and_in_range() -> None:
    tokens = torch.arange(1000) % 256
    b1, b2 = eval_batches(tokens, 3, 4, 32), eval_batches(tokens, 3, 4, 32)
    assert len(b1) == 3 and all(torch.equal(p[0], q[0]) for p, q in zip(b1, b2))
    assert int(b1[-1][1].max()) <= 255 and b1[0][0][0, 0] == 0
    with pytest.raises(DataError, match="seq_len"):
        eval_batches(torch.arange(10), 1, 1, 32)
    with pytest.raises(DataError, match="seq_len"):
        BatchStream(torch.arange(10), 1, 32, seed=0)


def test_byte_tokenizer_round_trip() -> None:
    s = "naïve ∑ 🙂 code\n"
    assert decode(encode(s)) == s and max(encode(s)) < 256
    assert decode(encode(s)[:-3] + [0xF0]).endswith("\ufffd")  # a cut character is replaced, not an error
