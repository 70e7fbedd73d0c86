"""The embedded multilingual translation task: vocabulary, run config and presets, batches, evaluation.

English segments of `pydoc_data.topics` (see `languages.py`) are translated into synthetic languages; the source
is `<2xx> english <eos>` (the target-language tag first, as in multilingual NMT), the target `xx-text <eos>`.
Characters are the tokens. Quality is exact match and character error rate (edit distance / reference length)
per language on held-out sentences, decoded greedily with the KV cache. Training (the `TranslateTask` run by the
one `Trainer`) lives in `translate_train.py`.

Shape legend: B = batch, S = source length, T = target length, P = (sentence, language) pairs.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moeflow.config import Config, ConfigError, MoEConfig, check_int, check_number, need
from moeflow.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer, dense_counterpart
from moeflow.models.seq2seq_decode import beam_search, greedy_decode
from moeflow.tasks.languages import CHARSET, LANGUAGES, check_text, get_languages, pydoc_text, segment_sentences, \
    split_corpus
from moeflow.train.config import apply_overrides

SPECIALS = ("<pad>", "<bos>", "<eos>")


# all eight: with four, dense and MoE both reach ~0.98 exact match and the comparison measures nothing
DEFAULT_LANGUAGES = ("cip", "vow", "rev", "wrv", "atb", "rot", "rcp", "wvw")


class CharVocab:
    """Token ids: pad, bos, eos, one `<2xx>` tag per language of the run (in its order), then CHARSET."""

    def __init__(self, languages: list[str] | tuple[str, ...] = DEFAULT_LANGUAGES) -> None:
        """Tags only for the run's languages, so a checkpoint stays loadable when new languages are added."""
        self.languages = [lang.code for lang in get_languages(list(languages))]
        self.itos = list(SPECIALS) + [LANGUAGES[c].tag for c in self.languages] + list(CHARSET)
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad, self.bos, self.eos = 0, 1, 2

    def __len__(self) -> int:
        """Vocabulary size."""
        return len(self.itos)

    def source(self, text: str, lang: str) -> list[int]:
        """`<2lang>` + characters + eos."""
        if lang not in self.languages:
            raise ValueError(f"language {lang!r} is not in this vocabulary ({', '.join(self.languages)})")
        return [self.stoi[LANGUAGES[lang].tag]] + [self.stoi[c] for c in text] + [self.eos]

    def target(self, text: str) -> list[int]:
        """Characters + eos (the decoder input is bos + characters)."""
        return [self.stoi[c] for c in text] + [self.eos]

    def decode(self, ids: list[int]) -> str:
        """Characters up to the first eos; special tokens and tags are skipped."""
        out = []
        for i in ids:
            if i == self.eos:
                break
            s = self.itos[i] if 0 <= i < len(self.itos) else ""
            if len(s) == 1:
                out.append(s)
        return "".join(out)


@dataclass(kw_only=True)
class TranslateConfig(Config):
    """One translation run: the model, the task, and the optimisation (AdamW, warmup, cosine decay)."""

    model: Seq2SeqConfig
    languages: list[str] = field(default_factory=lambda: list(DEFAULT_LANGUAGES))
    max_chars: int = 32  # longest English segment
    heldout_percent: int = 10
    steps: int = 800
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    beta1: float = 0.9  # AdamW betas (0.98: the Transformer-NMT value this task was tuned with)
    beta2: float = 0.98
    grad_clip: float = 1.0
    aux_loss: bool = True  # add the routers' scaled auxiliary losses to the loss
    eval_every: int = 500  # 0: only at the end
    ckpt_every: int = 200  # checkpoint every N steps (and at the end); 0 = only at the end
    eval_sentences: int = 100  # held-out sentences decoded per language
    routing_batches: int = 8  # held-out batches of 128 sentences for the language x expert tables
    log_every: int = 50
    seed: int = 0
    # torch CPU threads, set once by the CLI (0: torch's default). One: on a shared 2-core machine two threads
    # spin in OpenMP barriers (gshard preset, 15 steps: 0.27-0.29 s/step at 1 thread, 3.6-3.9 s at 2); only with
    # OMP_WAIT_POLICY=PASSIVE did 2 threads win (0.35-0.40 s vs 0.46-0.55 s), so one is the robust default
    threads: int = 1
    cpu_limit_s: float = 0.0  # stop once the training steps used this much process CPU time (0: run all steps)

    def __post_init__(self) -> None:
        """Validate the task and optimisation fields."""
        get_languages(self.languages)  # raises on unknown codes
        check_int(self, "max_chars", "steps", "batch_size", "eval_sentences", "routing_batches", "log_every")
        check_int(self, "warmup", "eval_every", "threads", "seed", lo=0)
        check_int(self, "heldout_percent", hi=99)
        check_number(self, "lr", lo=0, lo_open=True)
        check_number(self, "min_lr_ratio", hi=1)
        check_number(self, "weight_decay", "grad_clip", "cpu_limit_s")
        need(self.model.vocab_size == len(CharVocab(self.languages)),
             f"model.vocab_size={self.model.vocab_size} must equal the task vocabulary "
             f"({len(CharVocab(self.languages))} for {len(self.languages)} languages); build "
             "configs with translate_preset() and apply_overrides()")


def _model(moe: MoEConfig | None, *, d_model: int = 128, moe_every: int = 2, layers: int = 2,
           ffn_hidden: int = 256) -> Seq2SeqConfig:
    return Seq2SeqConfig(vocab_size=len(CharVocab(DEFAULT_LANGUAGES)), d_model=d_model, n_heads=4, n_enc_layers=layers,
                         n_dec_layers=layers, ffn_hidden=ffn_hidden, moe=moe, moe_every=moe_every)


def _gshard() -> TranslateConfig:
    # 16 experts of hidden 128, top-2: 256 active hidden units per token, as the dense FFNs and the dense preset.
    # Measured (800 steps, 8 languages, seeds 0-3): 16 experts beat dense on mean CER by more than 8 experts did.
    return TranslateConfig(model=_model(MoEConfig(d_model=128, d_hidden=128, num_experts=16, top_k=2,
                                                  router="gshard", capacity_factor=1.0, random_routing=True)))


def _switch() -> TranslateConfig:
    return TranslateConfig(model=_model(MoEConfig(d_model=128, d_hidden=256, num_experts=16, top_k=1,
                                                  router="switch", capacity_factor=1.25)))


def _dense() -> TranslateConfig:
    return TranslateConfig(model=dense_counterpart(_gshard().model))


def _tiny() -> TranslateConfig:
    # for tests and smoke runs: seconds, not minutes
    return TranslateConfig(model=_model(MoEConfig(d_model=32, d_hidden=16, num_experts=4, top_k=2, router="gshard",
                                                  capacity_factor=1.0), d_model=32, ffn_hidden=32, layers=2),
                           steps=20, batch_size=16, eval_every=0, eval_sentences=8, routing_batches=1, log_every=5,
                           warmup=5,
                           threads=1)  # one thread: tiny ops are dominated by thread synchronisation


TRANSLATE_PRESETS = {"gshard": _gshard, "switch": _switch, "dense": _dense, "tiny": _tiny}


def translate_preset(name: str) -> TranslateConfig:
    """A fresh config for a named preset: gshard (default), switch, dense (gshard's equal-active baseline), tiny."""
    if name not in TRANSLATE_PRESETS:
        raise ConfigError(f"unknown translate preset {name!r}; choose one of {', '.join(TRANSLATE_PRESETS)}")
    return TRANSLATE_PRESETS[name]()


def translate_overrides(cfg: TranslateConfig, overrides: dict[str, Any]) -> TranslateConfig:
    """`cfg` with dotted-key overrides (`steps=300`, `model.moe.capacity_factor=2.0`, `model.moe=None`) through
    the one `--set` parser (train/config.py `apply_overrides`).

    Changing `languages` also sets model.vocab_size (one tag per language) unless that is overridden too.
    """
    overrides = dict(overrides)
    langs = overrides.get("languages")
    if isinstance(langs, (list, tuple)) and "model.vocab_size" not in overrides:
        overrides["model.vocab_size"] = len(CharVocab(list(langs)))  # derived: one tag per language
    return apply_overrides(cfg, overrides)


@dataclass
class PairSet:
    """Tokenised (sentence, language) pairs, padded: src [P, S], tgt_in/tgt_out [P, T], lang [P]."""

    src: Tensor
    tgt_in: Tensor
    tgt_out: Tensor
    lang: Tensor
    english: list[str]

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Rows `idx`, trimmed to their longest source/target."""
        src, tin, tout = self.src[idx], self.tgt_in[idx], self.tgt_out[idx]
        s = int((src != 0).sum(1).max())
        t = int((tout != 0).sum(1).max())
        return src[:, :s], tin[:, :t], tout[:, :t], self.lang[idx]

    def __len__(self) -> int:
        """P."""
        return self.src.shape[0]


class TranslateData:
    """The corpus, its deterministic split, and every (sentence, language) pair tokenised."""

    def __init__(self, languages: list[str], max_chars: int = 32, heldout_percent: int = 10,
                 text: str | None = None) -> None:
        """Segment `text` (default: pydoc topics), split it, and tokenise both sides for every language."""
        self.vocab = CharVocab(languages)
        self.languages = get_languages(languages)
        self.codes = [lang.code for lang in self.languages]
        sentences = segment_sentences(pydoc_text() if text is None else text, max_chars=max_chars)
        self.train_sentences, self.heldout_sentences = split_corpus(sentences, heldout_percent)
        self.train = self._pairs(self.train_sentences)
        self.heldout = self._pairs(self.heldout_sentences)

    def _pairs(self, sentences: list[str]) -> PairSet:
        rows = [(s, li) for li in range(len(self.languages)) for s in sentences]  # language-major
        src = [self.vocab.source(s, self.codes[li]) for s, li in rows]
        tgt = [self.vocab.target(self.languages[li].encode(s)) for s, li in rows]
        s_len, t_len = max(map(len, src)), max(map(len, tgt))
        pad = self.vocab.pad
        src_t = torch.tensor([a + [pad] * (s_len - len(a)) for a in src])
        tout_t = torch.tensor([b + [pad] * (t_len - len(b)) for b in tgt])
        tin_t = torch.tensor([[self.vocab.bos] + b[:-1] + [pad] * (t_len - len(b)) for b in tgt])
        return PairSet(src_t, tin_t, tout_t, torch.tensor([li for _, li in rows]), [s for s, _ in rows])

    def sample(self, batch_size: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """A random training batch (src, tgt_in, tgt_out, lang), languages mixed."""
        return self.train.batch(torch.randint(len(self.train), (batch_size,), generator=gen))

    def heldout_rows(self, lang_index: int, n: int) -> Tensor:
        """Indices into `heldout` of the first n held-out sentences of one language."""
        return torch.nonzero(self.heldout.lang == lang_index).squeeze(1)[:n]


@functools.lru_cache(maxsize=4)
def load_data(languages: tuple[str, ...], max_chars: int = 32, heldout_percent: int = 10) -> TranslateData:
    """TranslateData for the pydoc corpus, memoised per process (segmenting and tokenising take seconds)."""
    return TranslateData(list(languages), max_chars, heldout_percent)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insert, delete, substitute: cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


@torch.no_grad()
def evaluate(model: Seq2SeqTransformer, data: TranslateData, n_per_lang: int,
             batch_size: int = 128) -> dict[str, dict[str, float]]:
    """Per language: exact match, CER (sum of edit distances / sum of reference lengths), and n sentences."""
    was_training = model.training
    model.eval()
    out: dict[str, dict[str, float]] = {}
    for li, code in enumerate(data.codes):
        rows = data.heldout_rows(li, n_per_lang)
        exact = dist = ref_len = 0
        for chunk in rows.split(batch_size):
            src, _, tout, _ = data.heldout.batch(chunk)
            gen = greedy_decode(model, src, max_new_tokens=tout.shape[1] + 8)
            for hyp_ids, ref_ids in zip(gen.tolist(), tout.tolist()):
                hyp, ref = data.vocab.decode(hyp_ids), data.vocab.decode(ref_ids)
                exact += hyp == ref
                dist += edit_distance(hyp, ref)
                ref_len += len(ref)
        out[code] = {"exact": exact / max(1, len(rows)), "cer": dist / max(1, ref_len), "n": len(rows)}
    model.train(was_training)
    return out


@torch.no_grad()
def heldout_loss(model: Seq2SeqTransformer, data: TranslateData, n_per_lang: int, batch_size: int = 256) -> float:
    """Teacher-forced token-mean cross-entropy over the first n held-out sentences of every language
    (inference routing)."""
    was_training = model.training
    model.eval()
    rows = torch.cat([data.heldout_rows(li, n_per_lang) for li in range(len(data.codes))])
    total = tokens = 0.0
    for chunk in rows.split(batch_size):
        src, tin, tout, _ = data.heldout.batch(chunk)
        logits = model(src, tin)
        ce_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tout.reshape(-1),
                                 ignore_index=model.cfg.pad_id, reduction="sum")
        total, tokens = total + float(ce_sum), tokens + float((tout != model.cfg.pad_id).sum())
    model.train(was_training)
    return total / max(tokens, 1.0)


@torch.no_grad()
def translate(model: Seq2SeqTransformer, vocab: CharVocab, texts: list[str], lang: str, beam_size: int = 1,
              max_new_tokens: int | None = None) -> list[str]:
    """Translate English texts into `lang` (greedy when beam_size == 1)."""
    get_languages([lang])
    norm = [check_text(t) for t in texts]
    rows = [vocab.source(t, lang) for t in norm]
    src = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for i, r in enumerate(rows):
        src[i, :len(r)] = torch.tensor(r)
    limit = max_new_tokens or src.shape[1] + 8
    model.eval()
    gen = greedy_decode(model, src, limit) if beam_size == 1 else beam_search(model, src, beam_size, limit)
    return [vocab.decode(g) for g in gen.tolist()]
