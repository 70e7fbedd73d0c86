"""Synthetic "languages" for the embedded translation task, and the English-like corpus they are derived from.

Each language is a deterministic, invertible, length-preserving mapping of lower-case English text over the
charset `CHARSET` (letters, space, apostrophe). They differ in what a model must learn:

- `cip`: a fixed substitution cipher on the letters (the QWERTY row order: a->q, b->w, ...): a per-character lookup;
- `vow`: vowels rotate (a->e->i->o->u->a), consonants stay: a smaller lookup that leaves most characters alone;
- `rev`: the word order is reversed: a long-range, content-independent reordering;
- `wrv`: each word is spelled backwards: a local reordering inside word boundaries;
- `atb`: Atbash (a<->z, b<->y, ...) and `rot`: ROT13, two more letter lookups that compete with `cip` for capacity;
- `rcp`: `rev` then `cip`, and `wvw`: `wrv` then `vow`: a reordering and a lookup at once.

The English side comes from `pydoc_data.topics` of the running interpreter (stdlib, no download): the text is
cut at punctuation into clauses, words outside the charset break a clause, and clauses are packed greedily into
segments of at most `max_chars` characters. The train/held-out split hashes each sentence (crc32), so it does not
depend on corpus order and a sentence is held out in every language at once.
"""

from __future__ import annotations

import re
import string
import zlib
from collections.abc import Callable
from dataclasses import dataclass

CHARSET = " '" + string.ascii_lowercase
_CIPHER_KEY = "qwertyuiopasdfghjklzxcvbnm"  # a bijection of a-z with no fixed point
_VOWELS = "aeiou"
_WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")
_CLAUSE_SPLIT_RE = re.compile(r"[.;:!?()\[\]{}\n,\"`]+|\s-+\s")


def _translator(src: str, dst: str) -> tuple[dict[int, int], dict[int, int]]:
    return str.maketrans(src, dst), str.maketrans(dst, src)


_CIP_FWD, _CIP_INV = _translator(string.ascii_lowercase, _CIPHER_KEY)
_VOW_FWD, _VOW_INV = _translator(_VOWELS, _VOWELS[1:] + _VOWELS[0])
_ATB, _ = _translator(string.ascii_lowercase, string.ascii_lowercase[::-1])  # self-inverse
_ROT, _ = _translator(string.ascii_lowercase, string.ascii_lowercase[13:] + string.ascii_lowercase[:13])


@dataclass(frozen=True)
class Language:
    """One synthetic language: `encode` maps English to it, `decode` maps it back (decode(encode(s)) == s)."""

    code: str  # three letters; the source tag is `<2code>`
    description: str
    encode: Callable[[str], str]
    decode: Callable[[str], str]

    @property
    def tag(self) -> str:
        """The target-language token prepended to the source sentence (multilingual NMT style)."""
        return f"<2{self.code}>"


def _reverse_words(s: str) -> str:
    return " ".join(reversed(s.split(" ")))


def _reverse_each_word(s: str) -> str:
    return " ".join(w[::-1] for w in s.split(" "))


LANGUAGES: dict[str, Language] = {
    "cip": Language("cip", "substitution cipher on letters (QWERTY order)",
                    lambda s: s.translate(_CIP_FWD), lambda s: s.translate(_CIP_INV)),
    "vow": Language("vow", "vowels rotate a->e->i->o->u->a, consonants unchanged",
                    lambda s: s.translate(_VOW_FWD), lambda s: s.translate(_VOW_INV)),
    "rev": Language("rev", "word order reversed", _reverse_words, _reverse_words),
    "wrv": Language("wrv", "each word spelled backwards", _reverse_each_word, _reverse_each_word),
    "atb": Language("atb", "Atbash: a<->z, b<->y, ...", lambda s: s.translate(_ATB), lambda s: s.translate(_ATB)),
    "rot": Language("rot", "ROT13", lambda s: s.translate(_ROT), lambda s: s.translate(_ROT)),
    "rcp": Language("rcp", "word order reversed, then the cip cipher",
                    lambda s: _reverse_words(s).translate(_CIP_FWD), lambda s: _reverse_words(s.translate(_CIP_INV))),
    "wvw": Language("wvw", "each word spelled backwards, then vowels rotated",
                    lambda s: _reverse_each_word(s).translate(_VOW_FWD),
                    lambda s: _reverse_each_word(s.translate(_VOW_INV))),
}


def get_languages(codes: list[str] | tuple[str, ...]) -> list[Language]:
    """The languages named by `codes`, in that order; unknown or repeated codes raise ValueError."""
    if not codes:
        raise ValueError(f"at least one target language is needed; choose from {', '.join(LANGUAGES)}")
    unknown = [c for c in codes if c not in LANGUAGES]
    if unknown:
        raise ValueError(f"unknown language code(s) {unknown}; choose from {', '.join(LANGUAGES)}")
    if len(set(codes)) != len(codes):
        raise ValueError(f"language codes must be distinct, got {list(codes)}")
    return [LANGUAGES[c] for c in codes]


def check_text(text: str) -> str:
    """Normalise user text (lower case, single spaces) and reject characters outside CHARSET."""
    norm = " ".join(text.lower().split())
    bad = sorted({c for c in norm if c not in CHARSET})
    if bad:
        raise ValueError(f"text contains characters outside the task charset {CHARSET!r}: {bad}; "
                         "use letters, spaces and apostrophes only")
    if not norm:
        raise ValueError("text is empty after normalisation; give at least one word")
    return norm


def pydoc_text() -> str:
    """The `pydoc_data.topics` help text of the running interpreter, topics in sorted order."""
    from pydoc_data.topics import topics  # stdlib; imported lazily because it is ~0.5 MB of strings

    return "\n".join(topics[k] for k in sorted(topics))


def segment_sentences(text: str, max_chars: int = 32, min_chars: int = 12, min_words: int = 3) -> list[str]:
    """Cut text into distinct lower-case word sequences over CHARSET of min_chars..max_chars characters, sorted."""
    if max_chars < min_chars:
        raise ValueError(f"max_chars={max_chars} must be >= min_chars={min_chars}")
    out: set[str] = set()

    def flush(words: list[str]) -> None:
        s = " ".join(words)
        if len(s) >= min_chars and len(words) >= min_words:
            out.add(s)

    for clause in _CLAUSE_SPLIT_RE.split(text):
        cur: list[str] = []
        for w in clause.lower().split():
            if not _WORD_RE.fullmatch(w) or len(w) > max_chars:
                flush(cur)  # a code token or symbol breaks the sentence: the words around it are not adjacent
                cur = []
                continue
            if len(" ".join(cur + [w])) > max_chars:
                flush(cur)
                cur = [w]
            else:
                cur.append(w)
        flush(cur)
    return sorted(out)


def is_held_out(sentence: str, heldout_percent: int) -> bool:
    """Deterministic split: crc32 of the sentence modulo 100 below `heldout_percent`."""
    return zlib.crc32(sentence.encode("utf-8")) % 100 < heldout_percent


def split_corpus(sentences: list[str], heldout_percent: int = 10) -> tuple[list[str], list[str]]:
    """(train, held_out) sentence lists by `is_held_out`, each in input order."""
    if not 0 < heldout_percent < 100:
        raise ValueError(f"heldout_percent must be in (0, 100), got {heldout_percent}")
    train = [s for s in sentences if not is_held_out(s, heldout_percent)]
    held = [s for s in sentences if is_held_out(s, heldout_percent)]
    if not train or not held:
        raise ValueError(f"the split left an empty side ({len(train)} train, {len(held)} held out) from "
                         f"{len(sentences)} sentences; use a larger corpus or another heldout_percent")
    return train, held
