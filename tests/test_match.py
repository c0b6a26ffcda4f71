"""qa-exist-match: tokenisation and matching rules from SPEC.md §Evaluation."""

from __future__ import annotations

import random
import unicodedata

import pytest

from echox.data.match import accuracy, exist_match, tokenize


def test_punctuation_is_its_own_token() -> None:
    assert tokenize("Paris.") == ["paris", "."]
    assert tokenize("it's") == ["it", "'", "s"]
    assert tokenize("Hello, world!") == ["hello", ",", "world", "!"]
    assert tokenize("(a)--b") == ["(", "a", ")", "-", "-", "b"]


def test_numbers() -> None:
    assert tokenize("1,000") == ["1", ",", "000"]
    assert tokenize("3.14 and 42nd") == ["3", ".", "14", "and", "42nd"]
    assert exist_match("It cost 1,000 dollars.", "1,000")
    assert not exist_match("It cost 1000 dollars.", "1,000")
    assert not exist_match("It cost 1,000 dollars.", "1000")
    assert exist_match("There are 12 months.", "12")
    assert not exist_match("There are 120 months.", "12")


def test_accents_nfd_keeps_combining_mark_in_token() -> None:
    tokens = tokenize("São Paulo")
    assert tokens == [unicodedata.normalize("NFD", "são"), "paulo"]
    assert len(tokens[0]) == 4  # s, a, combining tilde, o
    assert not exist_match("São Paulo", "Sao Paulo")
    assert not exist_match("Sao Paulo", "São")
    # Precomposed (NFC) and decomposed (NFD) inputs are the same after normalisation.
    nfc, nfd = unicodedata.normalize("NFC", "Zoë"), unicodedata.normalize("NFD", "Zoë")
    assert nfc != nfd
    assert exist_match(f"The answer is {nfc}.", nfd)
    assert exist_match(f"The answer is {nfd}.", nfc)


def test_case_insensitive() -> None:
    assert exist_match("THE CAPITAL IS PARIS", "paris")
    assert exist_match("the capital is paris", "Paris")
    assert tokenize("ÉCOLE") == [unicodedata.normalize("NFD", "école")]


def test_sentence_punctuation_does_not_block_a_hit() -> None:
    assert exist_match("The capital of France is Paris.", "Paris")
    assert exist_match("Is it Paris?", ["Paris"])
    assert exist_match("\"Paris\"", "paris")


def test_whole_tokens_only() -> None:
    assert not exist_match("Parisian food", "Paris")
    assert not exist_match("cat", "at")


def test_multiword_answer_must_be_contiguous() -> None:
    assert exist_match("He was born in New York City in 1950.", "New York")
    assert exist_match("He was born in New York City in 1950.", "york city")
    assert not exist_match("New jersey and York", "New York")
    assert not exist_match("York New", "New York")
    assert exist_match("Jamaican English, mostly.", "Jamaican English")


def test_multiple_gold_answers() -> None:
    answers = ["Jamaican English", "Jamaican Creole English Language"]
    assert exist_match("They speak jamaican creole english language there", answers)
    assert exist_match("jamaican english", answers)
    assert not exist_match("They speak Creole", answers)
    assert not exist_match("anything", [])


def test_empty_prediction_and_empty_gold() -> None:
    assert not exist_match("", "Paris")
    assert not exist_match("   ", ["Paris", "France"])
    assert exist_match("", "")
    assert exist_match("Anything at all", [""])
    assert exist_match("", ["Paris", ""])
    assert exist_match("x", "  ")  # a gold answer with no tokens behaves like an empty one
    assert tokenize("") == []


def test_unicode_whitespace_and_control_characters_split() -> None:
    text = "New\u00a0York\u2003City\tis\nbig\u200bhere"
    assert tokenize(text) == ["new", "york", "city", "is", "big", "here"]
    assert exist_match(text, "New York City")
    assert exist_match("New York", "New\u3000York")


def test_parity_with_the_regex_tokenizer() -> None:
    """Same tokens as UltraEval-Audio's regex ``[\\p{L}\\p{N}\\p{M}]+|[^\\p{Z}\\p{C}]``."""
    regex = pytest.importorskip("regex")
    pattern = regex.compile(r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])", flags=regex.UNICODE)
    alphabet = "aZé\u0301ß9٣ \u00a0\t\n.,'!-€$😀中文\u200b_İ"
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        expected = [
            m.group().lower() for m in pattern.finditer(unicodedata.normalize("NFD", text))
        ]
        assert tokenize(text) == expected, repr(text)


def test_type_errors() -> None:
    with pytest.raises(TypeError, match="hypothesis"):
        exist_match(None, "a")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="gold answers"):
        exist_match("a", [1])  # type: ignore[list-item]


def test_accuracy() -> None:
    assert accuracy([True, False, True, True]) == pytest.approx(0.75)
    assert accuracy([False]) == 0.0
    with pytest.raises(ValueError, match="empty"):
        accuracy([])
