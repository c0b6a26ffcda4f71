"""The ``qa-exist-match`` metric of UltraEval-Audio, used for the paper's spoken-QA tables.

A prediction is a hit when one gold answer, tokenised, appears as a contiguous run of the
prediction's tokens. The tokeniser follows the rule of UltraEval-Audio's ``QAExistMatchEvaluator`` (``audio_evals/evaluator/qa_exact_match.py``, whose
``SimpleTokenizer`` comes from DPR); this is a re-implementation without the ``regex`` package:

1. Unicode NFD normalisation (accents become base letter + combining mark);
2. a token is a maximal run of letters, digits and combining marks (categories ``L*``,
   ``N*``, ``M*``), and every other character that is not a space is a token by itself;
3. tokens are lowercased.

"Space" here means Unicode separators and control/format characters (categories ``Z*`` and
``C*``), so tabs, newlines, no-break spaces and zero-width spaces all split tokens and are
dropped. Nothing else is normalised away: "São" keeps its combining tilde and does not
match "Sao"; "Paris." gives ``paris`` ``.``, so the gold answer "Paris" still matches it.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

__all__ = ["tokenize", "exist_match", "accuracy"]


def _kind(ch: str) -> str:
    """Classify one character: 'w' (word: L/N/M), 's' (space: Z/C) or 'p' (other)."""
    major = unicodedata.category(ch)[0]
    if major in ("L", "N", "M"):
        return "w"
    if major in ("Z", "C"):
        return "s"
    return "p"


def tokenize(text: str) -> list[str]:
    """Split ``text`` into lowercased qa-exist-match tokens (after NFD normalisation)."""
    text = unicodedata.normalize("NFD", text)
    tokens: list[str] = []
    word: list[str] = []
    for ch in text:
        kind = _kind(ch)
        if kind == "w":
            word.append(ch)
            continue
        if word:
            tokens.append("".join(word))
            word = []
        if kind == "p":
            tokens.append(ch)
    if word:
        tokens.append("".join(word))
    return [t.lower() for t in tokens]


def _contains(haystack: list[str], needle: list[str]) -> bool:
    """True when ``needle`` is a contiguous sub-list of ``haystack`` (an empty one always is)."""
    n = len(needle)
    if n == 0:
        return True
    first = needle[0]
    for i in range(len(haystack) - n + 1):
        if haystack[i] == first and haystack[i : i + n] == needle:
            return True
    return False


def exist_match(hypothesis: str, answers: str | Sequence[str]) -> bool:
    """Whether any gold answer occurs, token by token and contiguously, in the hypothesis.

    ``answers`` may be one string or several; an empty gold answer matches anything,
    including an empty hypothesis, as UltraEval-Audio's ``has_answer`` does.
    """
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(hypothesis, str):
        raise TypeError(f"hypothesis must be a str, got {type(hypothesis).__name__}")
    hyp_tokens = tokenize(hypothesis)
    for answer in answers:
        if not isinstance(answer, str):
            raise TypeError(f"gold answers must be str, got {type(answer).__name__}: {answer!r}")
        if _contains(hyp_tokens, tokenize(answer)):
            return True
    return False


def accuracy(hits: Sequence[bool]) -> float:
    """Fraction of hits; raises on an empty list, since an accuracy over nothing is undefined."""
    if len(hits) == 0:
        raise ValueError("accuracy() needs at least one result; got an empty list")
    return sum(1 for h in hits if h) / len(hits)
