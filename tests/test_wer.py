import pytest

from echox.eval.wer import edit_distance, normalize_words, wer


def test_normalize_and_distance():
    assert normalize_words("It's Café, PARIS!") == ["its", "cafe", "paris"]
    assert edit_distance(["a", "b", "c"], ["a", "x", "c", "d"]) == 2


def test_corpus_wer():
    assert wer(["the cat sat", "hello"], ["the cat sat", "hello"]) == 0.0
    assert wer(["the cat sat", "hello"], ["a cat", "hello world"]) == pytest.approx(3 / 4)
    with pytest.raises(ValueError):
        wer(["x"], [])
    with pytest.raises(ValueError, match="no words"):
        wer(["!"], ["a"])


def test_typographic_apostrophes_are_apostrophes():
    # an LLM's text answer often writes "’"; Whisper writes "'": the same words
    assert normalize_words("It’s Dalí’s ‘Paris’") == ["its", "dalis", "paris"]
    assert normalize_words("itʼs") == ["its"]
    assert wer(["It’s the capital."], ["it's the capital"]) == 0.0
