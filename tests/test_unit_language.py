"""Unit language (BPE over units): exact round trip, stable ids, parsing, persistence, stats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from echox.errors import UnitError
from echox.units.kmeans import dedup
from echox.units.language import (
    MAX_UNITS,
    UnitLanguage,
    compression_stats,
    parse_unit_strings,
    plot_stats,
)

NUM_UNITS = 64


def _word_corpus(seed: int, n_seqs: int = 200, n_words: int = 20) -> list[np.ndarray]:
    """Sequences built from a small set of random unit "words", so n-grams repeat a lot."""
    rng = np.random.default_rng(seed)
    words = [rng.integers(0, NUM_UNITS, size=rng.integers(2, 6)) for _ in range(n_words)]
    return [
        np.concatenate([words[i] for i in rng.integers(0, n_words, size=rng.integers(5, 25))])
        for _ in range(n_seqs)
    ]


@pytest.fixture(scope="module")
def corpus() -> list[np.ndarray]:
    return _word_corpus(seed=0)


@pytest.fixture(scope="module")
def lang(corpus: list[np.ndarray]) -> UnitLanguage:
    return UnitLanguage.train(corpus, num_units=NUM_UNITS, vocab_size=160, max_token_units=6)


@pytest.mark.parametrize("vocab_size", [NUM_UNITS, NUM_UNITS + 1, 100, 160, 400])
def test_round_trip_random_sequences(corpus: list[np.ndarray], vocab_size: int) -> None:
    # Train only on units < 48, then encode arbitrary sequences: unseen units and repeats.
    train = [s[s < 48] for s in corpus]
    lang = UnitLanguage.train(train, num_units=NUM_UNITS, vocab_size=vocab_size, max_token_units=5)
    assert NUM_UNITS <= lang.vocab_size <= vocab_size
    rng = np.random.default_rng(1)
    cases: list[list[int]] = [[], [0], [NUM_UNITS - 1], [7, 7, 7, 7, 7], list(range(NUM_UNITS))]
    cases += [rng.integers(0, NUM_UNITS, size=rng.integers(1, 120)).tolist() for _ in range(40)]
    cases += [np.repeat(c, rng.integers(1, 4, size=len(c))).tolist() for c in corpus[:20]]
    for units in cases:
        ids = lang.encode(units)
        assert all(0 <= t < lang.vocab_size for t in ids)
        assert lang.decode(ids) == units
    batch = lang.encode_batch(cases)
    assert batch == [lang.encode(u) for u in cases]


def test_identity_when_vocab_equals_num_units(corpus: list[np.ndarray]) -> None:
    lang = UnitLanguage.train(corpus, num_units=NUM_UNITS, vocab_size=NUM_UNITS)
    assert lang.vocab_size == NUM_UNITS
    units = [3, 3, 9, 1, 63, 0]
    assert lang.encode(units) == units
    assert lang.decode(units) == units


def test_stable_ids_and_token_lengths(lang: UnitLanguage) -> None:
    # ids 0..K-1 are the single units; merged tokens come after and respect the length cap.
    for u in range(NUM_UNITS):
        assert lang.token_units(u) == (u,)
        assert lang.encode([u]) == [u]
    merged = [lang.token_units(t) for t in range(NUM_UNITS, lang.vocab_size)]
    assert merged, "expected some merges on a repetitive corpus"
    assert all(2 <= len(m) <= lang.max_token_units for m in merged)
    assert len(set(merged)) == len(merged)


def test_compression_on_repeated_ngrams(lang: UnitLanguage, corpus: list[np.ndarray]) -> None:
    held_out = _word_corpus(seed=0, n_seqs=260)[200:]  # same words, new sentences
    stats = compression_stats(lang, held_out)
    assert stats["units_per_token"] > 1.5
    assert stats["total_units"] == sum(len(dedup(s)) for s in held_out)
    assert stats["tokens_p50"] < stats["units_p50"]
    assert stats["units_p50"] <= stats["units_p90"] <= stats["units_p99"]
    identity = compression_stats(UnitLanguage.identity(NUM_UNITS), held_out)
    assert identity["units_per_token"] == 1.0


def test_token_str_format(lang: UnitLanguage) -> None:
    assert lang.token_str(5) == "5"
    tid = lang.vocab_size - 1
    units = lang.token_units(tid)
    assert lang.token_str(tid) == "_".join(map(str, units))
    ids = lang.encode([1, 2, 3, 4])
    strs = lang.tokens_to_str(ids)
    assert lang.units_from_strings(strs) == [1, 2, 3, 4]
    with pytest.raises(UnitError):
        lang.token_str(lang.vocab_size)


def test_parse_released_checkpoint_strings() -> None:
    strs = ["<|unit_▁837_81|>", "<|unit_194|>", "<|unit_▁1000_5_1203|>", "837_81_194"]
    assert parse_unit_strings(strs, num_units=1000) == [837, 81, 194, 5, 837, 81, 194]
    assert parse_unit_strings("<|unit_▁12_999_1000|>", num_units=1000) == [12, 999]
    lang = UnitLanguage.identity(NUM_UNITS)
    assert lang.units_from_strings(["<|unit_▁63_64_2|>"]) == [63, 2]


def test_save_load_equality(lang: UnitLanguage, corpus: list[np.ndarray], tmp_path: Path) -> None:
    lang.save(tmp_path / "ul")
    assert (tmp_path / "ul" / "tokenizer.json").is_file()
    loaded = UnitLanguage.load(tmp_path / "ul")
    assert loaded.vocab_size == lang.vocab_size
    assert loaded.num_units == lang.num_units
    assert loaded.max_token_units == lang.max_token_units
    assert [loaded.token_units(t) for t in range(loaded.vocab_size)] == [
        lang.token_units(t) for t in range(lang.vocab_size)
    ]
    for seq in corpus[:30]:
        assert loaded.encode(seq) == lang.encode(seq)


def test_load_errors(lang: UnitLanguage, tmp_path: Path) -> None:
    with pytest.raises(UnitError, match="not found"):
        UnitLanguage.load(tmp_path / "missing")
    lang.save(tmp_path / "bad")
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UnitError, match="corrupt tokenizer"):
        UnitLanguage.load(tmp_path / "bad")
    lang.save(tmp_path / "badmeta")
    (tmp_path / "badmeta" / "unit_language.json").write_text(json.dumps({"x": 1}), encoding="utf-8")
    with pytest.raises(UnitError, match="corrupt unit-language metadata"):
        UnitLanguage.load(tmp_path / "badmeta")


def test_damaged_unit_tokens_file_is_one_unit_error(tmp_path: Path) -> None:
    """A bundle's unit_tokens.json (the released model's unit language) that is not UTF-8, not
    an object or missing a key was a UnicodeDecodeError, AttributeError or KeyError traceback
    from `echox chat`."""
    from echox.units.unit_tokens import META_FILE, UnitTokens

    UnitTokens(["0", "1", "2"], offset=10, num_units=3).save(tmp_path)
    assert UnitTokens.load(tmp_path).texts == ["0", "1", "2"]
    p = tmp_path / META_FILE
    good = json.loads(p.read_text(encoding="utf-8"))
    for raw, why in ((b"\xff{}", "not UTF-8 text"), (p.read_bytes()[:20], "malformed JSON"),
                     (b"[]", "expected a JSON object, got list"),
                     (json.dumps({k: v for k, v in good.items() if k != "texts"}).encode(),
                      'expected "texts"')):
        p.write_bytes(raw)
        with pytest.raises(UnitError, match=f"{p}: {why}"):
            UnitTokens.load(tmp_path)


def test_bad_inputs(lang: UnitLanguage) -> None:
    with pytest.raises(UnitError, match="outside"):
        lang.encode([1, NUM_UNITS])
    with pytest.raises(UnitError, match="outside"):
        lang.encode([-1])
    with pytest.raises(UnitError, match="outside"):
        lang.decode([lang.vocab_size])
    with pytest.raises(UnitError, match="vocab_size"):
        UnitLanguage.train([[1, 2]], num_units=NUM_UNITS, vocab_size=NUM_UNITS - 1)
    with pytest.raises(UnitError, match="num_units"):
        UnitLanguage.identity(MAX_UNITS + 1)


def test_max_units_supported() -> None:
    assert MAX_UNITS == 6400
    lang = UnitLanguage.identity(MAX_UNITS)
    assert lang.decode(lang.encode([0, MAX_UNITS - 1, 17])) == [0, MAX_UNITS - 1, 17]


def test_plot_stats(lang: UnitLanguage, corpus: list[np.ndarray], tmp_path: Path) -> None:
    rows = [compression_stats(UnitLanguage.identity(NUM_UNITS), corpus), compression_stats(lang, corpus)]
    out = tmp_path / "plots" / "compression.png"
    plot_stats(rows, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("bad", [[1.7, 2.2], "12", [True, False], None, [2**70], [float("nan")]])
def test_ids_that_are_not_integers_are_refused(lang: UnitLanguage, bad: object) -> None:
    """Casting would truncate 1.7 to unit 1 or read the string "12" as id 12: silently wrong."""
    with pytest.raises(UnitError, match="must be integer ids"):
        lang.encode(bad)  # type: ignore[arg-type]
    with pytest.raises(UnitError, match="must be integer ids"):
        lang.decode(bad)  # type: ignore[arg-type]
    with pytest.raises(UnitError, match="must be an integer"):
        lang.token_units(1.5)  # type: ignore[arg-type]
    assert lang.encode(np.array([1, 2], np.uint8)) == lang.encode([1, 2])  # any int dtype is fine


def test_several_sequences_at_once_are_refused(lang: UnitLanguage) -> None:
    """A [2, N] array was flattened into one sequence: its rows ran together."""
    two = np.array([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(UnitError, match=r"one sequence \[N\], got shape \(2, 3\).*encode_batch"):
        lang.encode(two)
    with pytest.raises(UnitError, match="one sequence"):
        lang.decode(np.zeros((2, 2), np.int64))
    assert lang.encode(two[:1]) == lang.encode([1, 2, 3])  # a batch of one is its sequence
    assert lang.encode_batch(list(two)) == [lang.encode([1, 2, 3]), lang.encode([4, 5, 6])]


def test_metadata_with_a_bad_vocab_size(lang: UnitLanguage, tmp_path: Path) -> None:
    lang.save(tmp_path / "l")
    meta = json.loads((tmp_path / "l" / "unit_language.json").read_text(encoding="utf-8"))
    meta["vocab_size"] = "many"
    (tmp_path / "l" / "unit_language.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(UnitError, match="corrupt unit-language metadata"):
        UnitLanguage.load(tmp_path / "l")


def test_sizes_beyond_what_the_bpe_trainer_takes_are_unit_errors() -> None:
    """`echox units train-language --max-token-units 1e23` (or --min-frequency) was an
    OverflowError traceback, and --vocab-size 1e11 aborted the process: the BPE trainer sized
    a table by it and the allocation failed in Rust, with no Python error at all."""
    seqs = [[1, 2, 3, 1, 2, 3]] * 4
    with pytest.raises(UnitError, match="max_token_units must be in"):
        UnitLanguage.train(seqs, num_units=8, vocab_size=12, max_token_units=10**23)
    with pytest.raises(UnitError, match="min_frequency must be in"):
        UnitLanguage.train(seqs, num_units=8, vocab_size=12, min_frequency=10**23)
    with pytest.raises(UnitError, match="vocab_size must be <="):
        UnitLanguage.train(seqs, num_units=8, vocab_size=10**11)
