"""`echox chat` end to end on a tiny random bundle: one-shot, interactive, and user errors."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import soundfile as sf
from conftest import noise
from test_engine import make_bundle_parts

from echox.cli import main
from echox.infer.bundle import save_bundle

FAST = ["--temperature", "0", "--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, voc = make_bundle_parts()
    return save_bundle(tmp_path_factory.mktemp("chat") / "bundle", model, voc)


def one_line_error(capsys: pytest.CaptureFixture[str], code: int, *words: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    msg = err[-1]
    assert msg.startswith("echox: error: ") and "Traceback" not in "\n".join(err)
    for w in words:
        assert w in msg
    return msg


def test_chat_text_and_speech_turns(bundle_dir: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a.wav"
    code = main(["chat", "--model", str(bundle_dir), "--text", "hi", "-o", str(out), "--stats",
                 *FAST])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "stats: prompt" in cap.out and "first audio" in cap.out
    wav, sr = sf.read(out)
    assert sr == 16000 and wav.size > 0
    q = tmp_path / "q.wav"
    sf.write(q, noise(0.7), 16000)
    out2 = tmp_path / "b.wav"
    code = main(["chat", str(q), "--model", str(bundle_dir), "-o", str(out2), "--no-stream",
                 "--seed", "1", "--temperature", "0.5", "--max-new-tokens", "6"])
    assert code == 0 and sf.info(out2).frames > 0
    out3 = tmp_path / "c.wav"
    code = main(["chat", "--model", str(bundle_dir), "--text", "hi", "-o", str(out3),
                 "--chunk-units", "3", "--first-chunk-units", "1", *FAST])
    assert code == 0 and sf.info(out3).frames > 0


def test_chat_interactive(bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    q = tmp_path / "q.wav"
    sf.write(q, noise(0.5), 16000)
    lines = f"hello\n\n{q}\n{tmp_path / 'missing.wav'}\n/reset\nagain\n/quit\nnever\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    monkeypatch.chdir(tmp_path)
    code = main(["chat", "--model", str(bundle_dir), *FAST])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "missing.wav" in cap.err and "not found" in cap.err  # the bad turn did not end it
    assert "history cleared" in cap.err
    made = sorted(p.name for p in tmp_path.glob("answer_*.wav"))
    assert made == ["answer_1.wav", "answer_2.wav", "answer_3.wav"]


def test_chat_user_errors_exit_2(bundle_dir: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"\x00\x01 definitely not audio" * 20)
    code = main(["chat", str(bad), "--model", str(bundle_dir), *FAST])
    one_line_error(capsys, code, "bad.wav", "not a readable audio file")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    one_line_error(capsys, main(["chat", str(empty), "--model", str(bundle_dir), *FAST]),
                   "empty.wav", "empty")
    long = tmp_path / "long.wav"
    sf.write(long, noise(4.0), 16000)  # over the 3 s encoder window, which is fine; not 3.5 s
    one_line_error(capsys, main(["chat", str(long), "--model", str(bundle_dir), *FAST,
                                 "--max-audio-seconds", "3.5"]),
                   "long.wav", "the limit is 3.5 s", "--max-audio-seconds")
    one_line_error(capsys, main(["chat", "--model", str(tmp_path / "nope"), "--text", "hi"]),
                   "nope", "not found")
    monkeypatch.delenv("ECHOX_MODEL", raising=False)
    monkeypatch.setenv("ECHOX_CACHE", str(tmp_path / "cache"))
    import echox.infer.bundle as bundle_mod  # hide the embedded model too

    monkeypatch.setattr(bundle_mod, "shipped_bundle", lambda: tmp_path / "no-shipped")
    one_line_error(capsys, main(["chat", "--text", "hi"]), "models/tiny", "--model")
    one_line_error(capsys, main(["chat", "--model", str(bundle_dir), "--text", "hi",
                                 "--top-p", "0"]), "top_p")
    one_line_error(capsys, main(["chat", "--model", str(tmp_path / "nope"), "--text", "hi",
                                 "--first-chunk-units", "0"]), "first_chunk_units")
