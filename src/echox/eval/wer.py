"""Word error rate for ASR checks (vocoder resynthesis, TTS data)."""

from __future__ import annotations

import re
import unicodedata
from typing import Sequence


_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def normalize_words(text: str) -> list[str]:
    """Lowercase, strip accents and punctuation; numbers and words stay. Apostrophes (also the
    typographic ’ ‘ ʼ) join their word: "it’s" is "its"."""
    t = unicodedata.normalize("NFKD", text).translate(_APOSTROPHES)
    t = "".join(c for c in t if not unicodedata.combining(c)).lower()
    t = re.sub(r"[^\w\s']", " ", t).replace("'", "")
    return t.split()


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus WER: total word edits / total reference words."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    edits = words = 0
    for r, h in zip(refs, hyps):
        rw = normalize_words(r)
        edits += edit_distance(rw, normalize_words(h))
        words += len(rw)
    if words == 0:
        raise ValueError("the references hold no words")
    return edits / words
