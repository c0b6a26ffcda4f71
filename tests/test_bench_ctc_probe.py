"""bench/ctc_probe.py: name recall, and a run end to end on tiny-random (with --llm-asr)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
from conftest import load_script, noise

ROOT = Path(__file__).resolve().parents[1]


def _probe():
    return load_script("bench/ctc_probe.py", "bench_ctc_probe")


def test_names_and_recall():
    p = _probe()
    q = "Which country is José Mojica a citizen of?"
    assert p.names(q) == ["josé", "mojica"]
    assert p.names("What is the capital of Japan?") == ["japan"]
    assert p.name_recall(q, "Which country is Jose Mojica a citizen of?") == (1, 2)
    assert p.name_recall(q, "which country is josé mojica, a citizen of") == (2, 2)
    assert p.name_recall("How many legs do horses have?", "anything") == (0, 0)


def test_probe_runs_with_llm_asr(tmp_path, make_model, capsys):
    p = _probe()
    m = make_model()
    folder = m.save_pretrained(tmp_path / "m")
    (tmp_path / "audio").mkdir()
    rows = []
    for i, q in enumerate(["What is the capital of Japan?", "Who wrote Hamlet?"]):
        sf.write(tmp_path / "audio" / f"{i}.wav", noise(1.0 + 0.3 * i, i), 16000)
        rows.append({"id": f"q{i}", "question": q, "answers": ["x"], "audio": f"audio/{i}.wav"})
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rows.json"
    assert p.main(["--model", str(folder), "--qa", str(qa), "--n", "2", "--llm-asr",
                   "--batch-size", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "LLM WER" in table[-2] and "CTC names" in table[-2]
    got = json.loads(out.read_text())
    assert [r["names"] for r in got] == [1, 1]
    from echox.eval.wer import edit_distance, normalize_words

    for r in got:  # each row's count is the word edits from its question to its transcript
        assert r["llm_errors"] == edit_distance(normalize_words(r["question"]),
                                                normalize_words(r["llm_text"]))


@pytest.mark.slow  # the packaged Whisper tiny.en
def test_probe_scores_a_whole_asr_beside_the_adapter(tmp_path, make_model, capsys):
    """`--asr faster-whisper`: Whisper tiny.en transcribes the packaged spoken question."""
    p = _probe()
    folder = make_model().save_pretrained(tmp_path / "m")
    wav = ROOT / "src" / "echox" / "assets" / "question.wav"
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"id": "japan", "question": "What is the capital of Japan?",
                              "answers": ["Tokyo"], "audio": str(wav)}) + "\n")
    out = tmp_path / "rows.json"
    assert p.main(["--model", str(folder), "--qa", str(qa), "--n", "1", "--asr", "faster-whisper",
                   "--json", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "ASR WER" in table[-2] and "ASR names" in table[-2]
    (row,) = json.loads(out.read_text())
    assert "japan" in row["asr_text"].lower() and row["names_asr"] == 1 and row["asr_errors"] <= 1
    assert float(table[-1].split()[-1]) == 1.0  # every name heard
