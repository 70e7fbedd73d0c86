"""Translation task: synthetic languages, corpus split, vocabulary, language x expert statistics, CLI and ablation."""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeflow.analysis.routing_lang import LanguageRouting, entropy_bits, mutual_information_bits
from moeflow.cli import main
from moeflow.config import ConfigError, MoEConfig
from moeflow.layers import MoELayer
from moeflow.tasks.ablation import ablation_variants, parse_axis
from moeflow.tasks.languages import CHARSET, LANGUAGES, check_text, pydoc_text, segment_sentences, split_corpus
from moeflow.tasks.translate import CharVocab, TranslateData, edit_distance, translate_overrides, translate_preset
from moeflow.train.checkpoint import load_checkpoint
from moeflow.train.config import parse_set

WORDS = st.text(alphabet="'" + string.ascii_lowercase, min_size=1, max_size=8)
SENTENCES = st.lists(WORDS, min_size=1, max_size=6).map(" ".join)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return segment_sentences(pydoc_text(), max_chars=32)


@settings(max_examples=200, deadline=None)
@given(SENTENCES)
def test_languages_are_invertible_and_length_preserving(s: str) -> None:
    for lang in LANGUAGES.values():
        out = lang.encode(s)
        assert lang.decode(out) == s
        assert len(out) == len(s) and set(out) <= set(CHARSET)


def test_languages_on_the_corpus_are_invertible_distinct_and_deterministic(corpus: list[str]) -> None:
    assert len(corpus) > 2000 and all(12 <= len(s) <= 32 and set(s) <= set(CHARSET) for s in corpus)
    outs = {code: [lang.encode(s) for s in corpus] for code, lang in LANGUAGES.items()}
    for code, lang in LANGUAGES.items():
        assert [lang.decode(o) for o in outs[code]] == corpus
        assert sum(o != s for o, s in zip(outs[code], corpus)) > 0.9 * len(corpus)  # not the identity
    codes = list(LANGUAGES)
    for i, a in enumerate(codes):
        for b in codes[i + 1:]:
            assert sum(x != y for x, y in zip(outs[a], outs[b])) > 0.9 * len(corpus), (a, b)
    assert LANGUAGES["cip"].encode("abc xyz") == "qwe bnm"
    assert LANGUAGES["vow"].encode("the queue") == "thi qaiai"
    assert LANGUAGES["rev"].encode("one two three") == "three two one"
    assert LANGUAGES["wrv"].encode("one two's") == "eno s'owt"
    assert LANGUAGES["atb"].encode("abc xyz") == "zyx cba" and LANGUAGES["rot"].encode("abc xyz") == "nop klm"
    assert LANGUAGES["rcp"].encode("abc xyz") == "bnm qwe" and LANGUAGES["wvw"].encode("one two") == "inu uwt"
    assert segment_sentences(pydoc_text(), max_chars=32) == corpus


def test_split_is_deterministic_disjoint_and_order_free(corpus: list[str]) -> None:
    train, held = split_corpus(corpus, 10)
    assert not set(train) & set(held) and len(train) + len(held) == len(corpus)
    assert 0.05 < len(held) / len(corpus) < 0.15
    train_r, held_r = split_corpus(list(reversed(corpus)), 10)
    assert set(held_r) == set(held) and set(train_r) == set(train)


def test_segmentation_breaks_at_punctuation_and_code() -> None:
    text = "The value is returned, and x = f(y) is called here. Then nothing else happens at all."
    assert segment_sentences(text, max_chars=32, min_chars=6, min_words=2) == [
        "is called here", "the value is returned", "then nothing else happens at all"]


def test_vocab_round_trip_and_text_check() -> None:
    v = CharVocab()
    ids = v.source("it's here", "rev")
    assert v.itos[ids[0]] == "<2rev>" and ids[-1] == v.eos and v.decode(ids) == "it's here"
    assert v.decode(v.target("abc") + v.target("zzz")) == "abc"
    assert check_text("  Hello   World ") == "hello world"
    with pytest.raises(ValueError, match="not in this vocabulary"):
        CharVocab(["cip", "rev"]).source("abc", "atb")  # tags only for the run's languages
    with pytest.raises(ValueError, match="outside the task charset"):
        check_text("x = 1")


def test_edit_distance() -> None:
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0


def test_mutual_information_on_hand_examples() -> None:
    independent = torch.outer(torch.tensor([1.0, 3.0, 4.0]), torch.tensor([2.0, 2.0, 1.0, 5.0]))
    assert mutual_information_bits(independent) == pytest.approx(0.0, abs=1e-12)
    deterministic = torch.diag(torch.tensor([5.0, 5.0, 5.0, 5.0]))  # language l always goes to expert l
    assert mutual_information_bits(deterministic) == pytest.approx(2.0)
    assert entropy_bits(deterministic.sum(0)) == pytest.approx(2.0)
    # two languages, each split evenly over its own pair of experts: I = H(L) = 1 bit, H(E) = 2 bits
    pairs = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    assert mutual_information_bits(pairs) == pytest.approx(1.0)
    # binary symmetric channel with flip probability 0.1: I = 1 - H2(0.1)
    bsc = torch.tensor([[0.45, 0.05], [0.05, 0.45]])
    h2 = -(0.1 * math.log2(0.1) + 0.9 * math.log2(0.9))
    assert mutual_information_bits(bsc) == pytest.approx(1 - h2)


def test_language_routing_counts_a_real_routing() -> None:
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=8, d_hidden=4, num_experts=4, top_k=2, router="gshard", capacity_factor=0.25,
                               random_routing=False))
    x = torch.randn(12, 8)
    layer(x)
    r = layer.last_routing
    lang_T = torch.tensor([0, 1, 2] * 3)  # the last 3 rows play group top-up rows: ignored
    stats = LanguageRouting(["a", "b", "c"], 4)
    stats.add(r, lang_T)
    assert stats.routed_LE.sum() == 2 * 9 and stats.first_LE.sum() == 9 and stats.tokens_L.tolist() == [3, 3, 3]
    e1 = r.expert_ids_N[:9]
    for li in range(3):
        expected = torch.bincount(e1[lang_T == li], minlength=4).double()
        assert torch.equal(stats.first_LE[li], expected)
    kept_KT = r.kept_N.view(2, 12)[:, :9]
    full_drops = [int((~kept_KT.any(0))[lang_T == li].sum()) / 3 for li in range(3)]
    assert stats.tokens_dropped_by_language() == pytest.approx(full_drops) and sum(full_drops) > 0
    kept = int(kept_KT.sum())
    assert stats.kept_LE.sum() == kept and stats.dropped_fraction() == pytest.approx(1 - kept / 18)
    s = stats.summary()
    assert 0 <= s["mi_bits"] <= s["max_mi_bits"] + 1e-12 and 0 <= s["normalized_mi"] <= 1
    assert 0 < s["router_entropy_bits"] <= 2.0 + 1e-9


def test_overrides_and_ablation_variants() -> None:
    cfg = translate_overrides(translate_preset("gshard"), {"steps": 7, "model.moe.capacity_factor": 2,
                                                           "languages": ["cip", "rev"]})
    assert cfg.steps == 7 and cfg.model.moe.capacity_factor == 2.0 and cfg.languages == ["cip", "rev"]
    assert cfg.model.vocab_size == len(CharVocab(["cip", "rev"])) == 3 + 2 + len(CHARSET)
    with pytest.raises(ConfigError, match="unknown config key 'model.moe.capacity'; did you mean .*"
                                          "model.moe.capacity_factor"):
        translate_overrides(cfg, {"model.moe.capacity": 2})
    with pytest.raises(ConfigError, match=r"steps=1.5: expected int"):
        translate_overrides(cfg, parse_set(["steps=1.5"]))
    assert translate_overrides(cfg, parse_set(["lr=1", "model.moe.capacity_factor=None"])).lr == 1.0
    with pytest.raises(ValueError, match="unknown language"):
        translate_overrides(cfg, {"languages": ["xyz"]})
    names = [n for n, _ in ablation_variants(cfg, dict([parse_axis("capacity_factor=0.5,2"),
                                                        parse_axis("random_routing=on,off")]))]
    assert names == ["base", "capacity_factor=0.5", "random_routing=False", "dense"]
    grid = ablation_variants(cfg, dict([parse_axis("num_groups=1,4"), parse_axis("moe_every=1,2")]), grid=True,
                             dense=False)
    assert len(grid) == 4 and grid[-1][1].model.moe.num_groups == 4 and grid[-1][1].model.moe_every == 2


def test_train_and_translate_commands_on_a_tiny_config(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--task", "translate", "--preset", "tiny", "--max-steps", "6", "--set",
                 "eval_sentences=4", "--out", str(tmp_path), "--name", "run"]) == 0
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "summary.json", "report.md",
                 "routing_heatmap.png"):
        assert (run / name).is_file(), name
    assert "I(language; expert)" in (run / "report.md").read_text()
    assert main(["translate", "--run", str(run), "--to", "cip,rev", "--text", "the value is here",
                 "--beam", "2"]) == 0
    out = capsys.readouterr().out
    assert "<2cip> 'the value is here' ->" in out and "<2rev>" in out
    assert main(["translate", "--run", str(tmp_path / "missing"), "--to", "cip", "--text", "a b"]) == 2


def test_ablate_command_prints_the_table(tmp_path, capsys) -> None:
    assert main(["ablate", "--task", "translate", "--preset", "tiny", "--steps", "3", "--set", "eval_sentences=2",
                 "--axis", "capacity_factor=0.5,1.0", "--out", str(tmp_path / "abl")]) == 0
    table = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("variant"))
    end = table.index("", header)  # the per-language table follows after a blank line
    rows = [line.split() for line in table[header + 1:end]]
    assert [r[0] for r in rows] == ["base", "capacity_factor=0.5", "dense"]
    assert float(rows[1][6]) > float(rows[0][6]) and rows[2][6] == "0.000"  # dropped: less capacity drops more
    assert (tmp_path / "abl" / "ablation.md").is_file()


def test_ablate_over_seeds_in_worker_processes(tmp_path, capsys) -> None:
    """--seeds trains each variant once per seed (in 2 worker processes), the row is the mean of the per-seed runs,
    and the table counts the seeds where the MoE's CER beats dense; a run equals the same seed trained alone."""
    out = tmp_path / "abl"
    assert main(["ablate", "--task", "translate", "--preset", "tiny", "--steps", "3", "--set", "eval_sentences=2",
                 "--axis", "none", "--seeds", "0,5", "--jobs", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 runs (2 variants x 2 seed(s)), 2 at a time" in text and "CER < dense" in text
    rows = json.loads((out / "ablation.json").read_text())
    assert [r["variant"] for r in rows] == ["base", "dense"] and rows[0]["seeds"] == [0, 5]
    base = rows[0]
    assert base["exact"] == pytest.approx(sum(base["exact_per_seed"]) / 2)
    assert base["cer_wins_vs_dense"] in ("0/2", "1/2", "2/2")
    assert {Path(r["run"]).name for r in base["runs"]} == {"00_base_seed0", "00_base_seed5"}
    # the per-language table: one line per language, the mean of the two seeds' values
    cip = next(line.split() for line in text.splitlines() if line.startswith("cip "))
    want = sum(r["per_language"]["cip"]["cer"] for r in base["runs"]) / 2
    assert float(cip[3]) == pytest.approx(want, abs=1e-4)
    # the worker's seed-5 run is the run one gets from the same config with seed=5 in this process
    alone = main(["ablate", "--task", "translate", "--preset", "tiny", "--steps", "3", "--set", "eval_sentences=2",
                  "--set", "seed=5", "--set", "threads=1", "--axis", "none", "--no-dense", "--out", str(tmp_path / "one")])
    assert alone == 0
    one = json.loads((tmp_path / "one" / "ablation.json").read_text())[0]
    assert one["heldout_ce"] == pytest.approx(base["heldout_ce_per_seed"][1], rel=1e-6)
    assert main(["ablate", "--task", "translate", "--preset", "tiny", "--seeds", "1,1", "--out",
                 str(tmp_path / "dup")]) == 2
    assert "distinct" in capsys.readouterr().err


def test_translate_data_pairs_are_consistent() -> None:
    data = TranslateData(["vow", "wrv"], text=pydoc_text()[:60000])
    src, tin, tout, lang = data.sample(8, torch.Generator().manual_seed(0))
    v = data.vocab
    for i in range(8):
        code = data.codes[int(lang[i])]
        english = v.decode(src[i].tolist())
        assert v.itos[int(src[i, 0])] == f"<2{code}>"
        assert v.decode(tout[i].tolist()) == LANGUAGES[code].encode(english)
        assert tin[i, 0] == v.bos and torch.equal(tin[i, 1:][tout[i, 1:] != 0], tout[i, :-1][tout[i, 1:] != 0])


def _train_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_translate_resume_is_bitwise_and_stop_at_stops_with_a_checkpoint(tmp_path, capsys) -> None:
    """N steps straight == N/2 (--stop-at) + --resume + N/2: every loss, the held-out loss and the weights.

    Dropout and GShard random routing draw from the global RNG and the batches from the task's generator: the
    checkpoint must restore all of them."""
    common = ["train", "--task", "translate", "--preset", "tiny", "--max-steps", "6", "--quiet", "--out",
              str(tmp_path), "--set", "eval_sentences=2", "--set", "model.dropout=0.1", "--set", "eval_every=2",
              "--set", "languages=['cip','rev']"]
    assert main(common + ["--name", "full"]) == 0
    assert main(common + ["--name", "half", "--stop-at", "3"]) == 0
    out = capsys.readouterr().out
    assert "stopped at step 3 of 6: continue with --resume" in out
    half = tmp_path / "half"
    assert load_checkpoint(half)["step"] == 3 and [r["step"] for r in _train_records(half)] == [1, 2, 3]
    assert json.loads((half / "summary.json").read_text())["steps"] == 3
    torch.manual_seed(321)  # a fresh process would start from other global RNG state
    assert main(["train", "--task", "translate", "--resume", str(half), "--quiet"]) == 0
    full, resumed = _train_records(tmp_path / "full"), _train_records(half)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert [r["loss"] for r in full] == [r["loss"] for r in resumed]  # bitwise, every step
    assert [r["layers"] for r in full] == [r["layers"] for r in resumed]
    ends = [json.loads((tmp_path / n / "summary.json").read_text()) for n in ("full", "half")]
    assert ends[0]["heldout_ce"] == ends[1]["heldout_ce"] and ends[1]["steps"] == 6
    a, b = load_checkpoint(tmp_path / "full")["model"], load_checkpoint(half)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert main(["train", "--task", "translate", "--resume", str(half), "--set", "lr=1.0"]) == 2
    assert "--resume continues a run with its own config.json" in capsys.readouterr().err
