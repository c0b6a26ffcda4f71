"""Spoken-QA loaders on small files written in the hub schemas and the local JSONL schema."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets is imported: never wait on a hub

import io
import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import soundfile as sf

from echox.errors import EvalError
from echox.eval.benchmarks import (
    BENCHMARKS,
    Benchmark,
    QAItem,
    load_benchmark,
    open_benchmark,
    parse_answers,
)

datasets.disable_progress_bars()


def _sine(n: int, sr: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(n) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)  # [T]


def _wav_bytes(wave: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# Three rows per hub schema; answer cells in the forms the hub copies use (plain string,
# list feature, JSON list string, Python list literal string).
SR = {"llama-questions": 16000, "web-questions": 22050, "trivia-qa": 24000}
LENGTHS = [800, 1200, 1600]
SCHEMAS: dict[str, dict[str, Any]] = {
    "llama-questions": {
        "Questions": ["What is the capital of France?", "Which planet is largest?",
                      "How many grams in a kilogram?"],
        "Answer": ["Paris", "Jupiter", "1,000"],
    },
    "web-questions": {
        "question": ["what language do jamaican people speak?", "who was the first president?",
                     "what planet is red?"],
        "answers": [["Jamaican English", "Jamaican Creole English Language"], ["Washington"],
                    ["Mars"]],
    },
    "trivia-qa": {
        "question": ["Which is the highest mountain?", "Which is the longest river?",
                     "What colour is the sky?"],
        "answer": ['["Mount Everest", "Everest"]', "['Nile', 'River Nile']", "Blue"],
    },
}
EXPECTED_ANSWERS = {
    "llama-questions": [["Paris"], ["Jupiter"], ["1,000"]],
    "web-questions": [["Jamaican English", "Jamaican Creole English Language"], ["Washington"],
                      ["Mars"]],
    "trivia-qa": [["Mount Everest", "Everest"], ["Nile", "River Nile"], ["Blue"]],
}
QUESTION_COL = {"llama-questions": "Questions", "web-questions": "question",
                "trivia-qa": "question"}


def _hub_dataset(name: str) -> datasets.Dataset:
    sr = SR[name]
    audio = [{"bytes": _wav_bytes(_sine(n, sr), sr), "path": f"{i}.wav"}
             for i, n in enumerate(LENGTHS)]
    return datasets.Dataset.from_dict({**SCHEMAS[name], "audio": audio}).cast_column(
        "audio", datasets.Audio()
    )


def _write(name: str, storage: str, root: Path) -> Path:
    ds = _hub_dataset(name)
    if storage == "parquet":
        path = root / f"{name}.parquet"
        ds.to_parquet(str(path))
    elif storage == "shards":  # hub snapshot layout
        path = root / "snapshot"
        (path / "data").mkdir(parents=True)
        ds.to_parquet(str(path / "data" / "test-00000-of-00001.parquet"))
    else:
        path = root / "disk"
        ds.save_to_disk(str(path))
    return path


def _check_items(name: str, items: list[QAItem]) -> None:
    assert len(items) == 3
    for i, item in enumerate(items):
        assert item.question == SCHEMAS[name][QUESTION_COL[name]][i]
        assert item.answers == EXPECTED_ANSWERS[name][i]
        assert item.sampling_rate == SR[name]
        assert item.audio is not None and item.audio.dtype == np.float32
        assert item.audio.shape == (LENGTHS[i],)
        np.testing.assert_allclose(item.audio, _sine(LENGTHS[i], SR[name]), atol=1e-3)
        assert item.id == f"{name}-{i}"
        assert item.audio_path is None  # bytes-backed: no real file behind "0.wav"


@pytest.mark.parametrize("storage", ["parquet", "disk", "shards"])
@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_hub_schema_from_local_copy(name: str, storage: str, tmp_path: Path) -> None:
    path = _write(name, storage, tmp_path)
    _check_items(name, load_benchmark(f"{name}={path}"))


def test_aliases_and_hub_id_names(tmp_path: Path) -> None:
    path = _write("trivia-qa", "parquet", tmp_path)
    for spec_name in ("trivia_qa", "TwinkStart/speech-triavia-qa", "TRIVIA-QA"):
        assert len(load_benchmark(f"{spec_name}={path}")) == 3


def test_dataset_dict_splits(tmp_path: Path) -> None:
    test_ds = _hub_dataset("web-questions")
    train_ds = test_ds.select([0])
    datasets.DatasetDict({"train": train_ds, "test": test_ds}).save_to_disk(str(tmp_path / "wq"))
    assert len(load_benchmark(f"web-questions={tmp_path / 'wq'}")) == 3  # "test" by default
    train = load_benchmark(f"web-questions={tmp_path / 'wq'}", split="train")
    assert [it.question for it in train] == [SCHEMAS["web-questions"]["question"][0]]
    with pytest.raises(EvalError, match="no split 'dev'.*train"):
        load_benchmark(f"web-questions={tmp_path / 'wq'}", split="dev")


def test_limit_and_lazy_access(tmp_path: Path) -> None:
    path = _write("llama-questions", "parquet", tmp_path)
    items = load_benchmark(f"llama-questions={path}", limit=2)
    assert [it.answers for it in items] == [["Paris"], ["Jupiter"]]
    assert load_benchmark(f"llama-questions={path}", limit=0) == []
    assert len(load_benchmark(f"llama-questions={path}", limit=99)) == 3
    bench = open_benchmark(f"llama-questions={path}")
    assert isinstance(bench, Benchmark) and len(bench) == 3
    assert bench[-1].answers == ["1,000"]
    with pytest.raises(IndexError):
        bench[3]
    with pytest.raises(EvalError, match="limit"):
        load_benchmark(f"llama-questions={path}", limit=-1)


def test_decode_audio_false_skips_audio(tmp_path: Path) -> None:
    path = _write("llama-questions", "disk", tmp_path)
    items = load_benchmark(f"llama-questions={path}", decode_audio=False)
    assert [it.audio for it in items] == [None, None, None]
    assert items[0].sampling_rate is None and items[0].question.startswith("What")


def test_text_only_question_file_serves_text_mode(tmp_path: Path) -> None:
    """A question file with no audio column: fine without decoding, a clear error with it."""
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"id": "q1", "question": "Capital of Japan?", "answers": ["Tokyo"]}) + "\n")
    (item,) = load_benchmark(f"local:{path}", decode_audio=False)
    assert (item.id, item.question, item.answers, item.audio, item.audio_path) == \
        ("q1", "Capital of Japan?", ["Tokyo"], None, None)
    with pytest.raises(EvalError, match="no audio column"):
        load_benchmark(f"local:{path}")


def _write_local(root: Path) -> Path:
    (root / "wavs").mkdir()
    sf.write(root / "wavs" / "a.wav", _sine(1000, 16000), 16000)
    stereo = np.stack([_sine(500, 8000), _sine(500, 8000)], axis=1)  # [T, 2]
    sf.write(root / "b.wav", stereo, 8000)
    lines = [
        {"audio": "wavs/a.wav", "question": " Capital of Japan? ", "answers": ["Tokyo"],
         "id": "q-a"},
        {"audio": str((root / "b.wav").resolve()), "question": "Largest ocean?",
         "answers": "Pacific"},
    ]
    path = root / "qa.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    return path


def test_local_jsonl(tmp_path: Path) -> None:
    path = _write_local(tmp_path)
    items = load_benchmark(f"local:{path}")
    assert [it.id for it in items] == ["q-a", "local-1"]
    assert [it.question for it in items] == ["Capital of Japan?", "Largest ocean?"]
    assert [it.answers for it in items] == [["Tokyo"], ["Pacific"]]
    assert [it.sampling_rate for it in items] == [16000, 8000]
    assert items[0].audio is not None and items[0].audio.shape == (1000,)
    assert items[1].audio is not None and items[1].audio.shape == (500,)  # stereo -> mono
    assert items[0].audio_path == str(tmp_path / "wavs" / "a.wav")
    assert Path(items[1].audio_path or "").is_file()


def test_hub_schema_jsonl(tmp_path: Path) -> None:
    sf.write(tmp_path / "0.wav", _sine(640, 16000), 16000)
    row = {"Questions": "Who wrote Hamlet?", "Answer": "Shakespeare", "audio": "0.wav"}
    (tmp_path / "lq.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    (item,) = load_benchmark(f"llama-questions={tmp_path / 'lq.jsonl'}")
    assert item.question == "Who wrote Hamlet?" and item.answers == ["Shakespeare"]
    assert item.audio is not None and item.audio.shape == (640,)


def test_malformed_jsonl_line_is_named(tmp_path: Path) -> None:
    path = _write_local(tmp_path)
    with path.open("a", encoding="utf-8") as f:
        f.write('{"audio": "wavs/a.wav", "question": "oops"\n')
    with pytest.raises(EvalError, match=r"qa\.jsonl line 4: malformed JSON"):
        load_benchmark(f"local:{path}")
    path.write_text('["not", "an", "object"]\n', encoding="utf-8")
    with pytest.raises(EvalError, match="line 1: expected a JSON object"):
        load_benchmark(f"local:{path}")


def test_non_utf8_line_and_truncated_audio_are_named(tmp_path: Path) -> None:
    path = _write_local(tmp_path)
    with path.open("ab") as f:
        f.write(b'{"audio": "wavs/a.wav", "question": "caf\xe9", "answers": ["x"]}\n')
    with pytest.raises(EvalError, match=r"qa\.jsonl line 4: not UTF-8 text"):
        load_benchmark(f"local:{path}")
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(EvalError, match="line 1: malformed JSON"):
        load_benchmark(f"local:{path}")
    (tmp_path / "cut").mkdir()
    _write_local(tmp_path / "cut")
    wav = tmp_path / "cut" / "wavs" / "a.wav"
    wav.write_bytes(wav.read_bytes()[:44 + 1000])  # half of its 1,000 samples
    with pytest.raises(EvalError, match=r"line 1: audio file .*a\.wav: truncated WAV file"):
        load_benchmark(f"local:{tmp_path / 'cut' / 'qa.jsonl'}")


def test_local_jsonl_missing_key_and_missing_audio(tmp_path: Path) -> None:
    sf.write(tmp_path / "a.wav", _sine(100, 16000), 16000)
    good = {"audio": "a.wav", "question": "q", "answers": ["a"]}
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"audio": "a.wav", "question": "q"}),
                    encoding="utf-8")
    with pytest.raises(EvalError, match="line 2: missing key 'answers'"):
        load_benchmark(f"local:{path}")
    path.write_text(json.dumps({**good, "audio": "nope.wav"}) + "\n", encoding="utf-8")
    with pytest.raises(EvalError, match=r"line 1: audio file .*nope\.wav does not exist"):
        load_benchmark(f"local:{path}")
    (tmp_path / "dir.wav").mkdir()  # it said "does not exist" of a folder, and of a FIFO
    path.write_text(json.dumps({**good, "audio": "dir.wav"}) + "\n", encoding="utf-8")
    with pytest.raises(EvalError, match=r"line 1: audio file .*dir\.wav is a folder, not a file"):
        load_benchmark(f"local:{path}")
    path.write_text(json.dumps({"wav_file": "a.wav", "question": "q", "answers": "a"}) + "\n",
                    encoding="utf-8")
    with pytest.raises(EvalError, match="no audio column"):
        load_benchmark(f"local:{path}")


def test_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="unknown benchmark 'spoken-squad'"):
        load_benchmark("spoken-squad")
    with pytest.raises(EvalError, match="unknown benchmark"):
        load_benchmark(f"squad={tmp_path}")
    with pytest.raises(EvalError, match="does not exist"):
        load_benchmark(f"web-questions={tmp_path / 'missing'}")
    with pytest.raises(EvalError, match="does not exist"):
        load_benchmark(f"local:{tmp_path / 'missing.jsonl'}")
    with pytest.raises(EvalError, match="names no path"):
        load_benchmark("local:")
    with pytest.raises(EvalError, match="empty benchmark spec"):
        load_benchmark("  ")
    with pytest.raises(EvalError, match="no .parquet files"):
        load_benchmark(f"trivia-qa={tmp_path}")


def test_missing_question_column(tmp_path: Path) -> None:
    ds = _hub_dataset("web-questions").rename_column("question", "utterance")
    ds.to_parquet(str(tmp_path / "wq.parquet"))
    with pytest.raises(EvalError, match=r"no question column.*utterance"):
        load_benchmark(f"web-questions={tmp_path / 'wq.parquet'}")


def test_hub_unreachable_gives_a_hint() -> None:
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("huggingface_hub was imported before HF_HUB_OFFLINE was set")
    with pytest.raises(EvalError, match="llama-questions=PATH"):
        load_benchmark("llama-questions", limit=1)


def test_parse_answers() -> None:
    assert parse_answers("Paris") == ["Paris"]
    assert parse_answers('["a", "b"]') == ["a", "b"]
    assert parse_answers("['a', \"b's\"]") == ["a", "b's"]
    assert parse_answers(["x", 3]) == ["x", "3"]
    assert parse_answers(np.array(["u", "v"])) == ["u", "v"]
    assert parse_answers(1912) == ["1912"]
    assert parse_answers("[not a list") == ["[not a list"]
    assert parse_answers("[1914]") == ["1914"]
    with pytest.raises(EvalError, match="missing"):
        parse_answers(None)
    with pytest.raises(EvalError, match="empty"):
        parse_answers([])
    # a blank answer is in every answer (a hit for anything); whole floats are spoken as integers
    for blank in ("", "  ", ["", " "], '[""]'):
        with pytest.raises(EvalError, match="empty"):
            parse_answers(blank)
    assert parse_answers(["Paris", ""]) == ["Paris"]
    assert parse_answers([1990.0, 2.5]) == ["1990", "2.5"] and parse_answers(np.float64(7)) == ["7"]
    for flag in (True, [False], np.bool_(True), float("nan"), [float("inf")]):
        with pytest.raises(EvalError, match="text or a number"):
            parse_answers(flag)


def test_ids_of_later_lines_are_read_when_the_first_has_none(tmp_path: Path) -> None:
    """A file whose first line had no id ignored the ids of the lines after it: they were
    named local-0, local-1, ... and resume and --compare paired them by line number (here the
    given `local-0` of line 2 would even name line 1)."""
    rows = [{"question": "Q1?", "answers": ["a"]}, {"id": "given", "question": "Q2?", "answers": ["b"]}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [i.id for i in load_benchmark(f"local:{tmp_path / 'q.jsonl'}", decode_audio=False)] == \
        ["local-0", "given"]


def test_text_mode_needs_no_audio_file(tmp_path: Path) -> None:
    """A text run stopped at a question whose audio file was missing, though it reads no audio."""
    rows = [{"id": "a", "audio": "gone.wav", "question": "Q1?", "answers": ["a"]}]
    (tmp_path / "q.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (item,) = load_benchmark(f"local:{tmp_path / 'q.jsonl'}", decode_audio=False)
    assert item.question == "Q1?" and item.audio_path is None


def test_audio_cell_as_array_or_path_dict(tmp_path: Path) -> None:
    """Rows decoded by older `datasets` carry {array, sampling_rate}; others only {path}."""
    sf.write(tmp_path / "a.wav", _sine(300, 16000), 16000)
    two_channel = np.stack([_sine(200, 8000)] * 2)  # [C, T]
    rows = [
        {"audio": {"array": two_channel.tolist(), "sampling_rate": 8000}, "question": "q1",
         "answers": "a"},
        {"audio": {"path": "a.wav", "bytes": None}, "question": "q2", "answers": ["b"]},
    ]
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    first, second = load_benchmark(f"local:{path}")
    assert first.audio is not None and first.audio.shape == (200,) and first.sampling_rate == 8000
    np.testing.assert_allclose(first.audio, _sine(200, 8000), atol=1e-6)
    assert second.audio is not None and second.audio.shape == (300,)
    assert second.audio_path == str(tmp_path / "a.wav")


def test_malformed_audio_cells_and_questions_are_named(tmp_path: Path) -> None:
    """Audio cells of the wrong type inside a dict and a question JSON spells as a lone
    surrogate were ValueError / TypeError / OverflowError tracebacks (the question's from the
    tokenizer, in text mode): each is now an EvalError naming its line."""
    sf.write(tmp_path / "a.wav", _sine(300, 16000), 16000)
    good = {"id": "q", "question": "q", "answers": ["a"]}
    array, rate = "the audio array is not an array", "the audio sampling_rate must be a number"
    cases = [({"array": "abc", "sampling_rate": 16000}, array),
             ({"array": [[0.1], [0.2, 0.3]], "sampling_rate": 16000}, array),  # ragged
             ({"array": [0.1, 0.2], "sampling_rate": "x"}, rate),
             ({"array": [0.1, 0.2], "sampling_rate": float("inf")}, rate),
             ({"array": [0.1, 0.2], "sampling_rate": 2**70}, rate),  # a TypeError in isfinite
             ({"array": [0.1, 0.2], "sampling_rate": 16000.5}, rate),  # was cut to 16000
             ({"array": [0.1, 0.2], "sampling_rate": 0}, rate),
             ({"bytes": "UklGRg=="}, "the audio bytes must be bytes, got a str"),
             ({"path": 5}, "the audio path must be a string, got 5")]
    path = tmp_path / "x.jsonl"
    for cell, says in cases:
        path.write_text(json.dumps({**good, "audio": cell}) + "\n", encoding="utf-8")
        with pytest.raises(EvalError, match=f"x\\.jsonl line 1: {says}"):
            load_benchmark(f"local:{path}")
    path.write_text('{"question": "caf\\udce9", "answers": ["a"], "audio": "a.wav"}\n',
                    encoding="utf-8")
    for decode in (True, False):
        with pytest.raises(EvalError, match="line 1: the question is not valid Unicode text"):
            load_benchmark(f"local:{path}", decode_audio=decode)
