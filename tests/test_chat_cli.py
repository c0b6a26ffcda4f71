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
    lines = (f"hello\n\n{q}\n{tmp_path / 'missing.wav'}\n/nonsense\n/nowhere.wav\n{tmp_path}\n"
             f"/reset\n{'why ' * 80}\n/quit\nnever\n")  # a typed line too long for a file name
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    monkeypatch.chdir(tmp_path)
    code = main(["chat", "--model", str(bundle_dir), *FAST])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "missing.wav" in cap.err and "not found" in cap.err  # the bad turn did not end it
    assert "history cleared" in cap.err
    assert "unknown command /nonsense" in cap.err and "is a folder" in cap.err  # not sent as text
    assert "/nowhere.wav" in cap.err and "unknown command /nowhere" not in cap.err
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
    # the option, not the prompt, is over the LLM's positions (it said "shorten the text")
    one_line_error(capsys, main(["chat", "--model", str(bundle_dir), "--text", "hi",
                                 "--temperature", "0", "--max-new-tokens", "99999999"]),
                   "give a smaller --max-new-tokens")


def test_bad_input_fails_before_the_model_load(bundle_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The question and the answer path are checked first: the (slow) loader is never called."""
    import echox.infer.bundle as bundle_mod
    import echox.infer.chat as chat_mod

    loads: list[object] = []

    def no_load(*args: object, **kwargs: object) -> None:
        loads.append(args)
        raise AssertionError("the bundle was loaded before the input was checked")

    monkeypatch.setattr(bundle_mod, "load_bundle", no_load)
    if hasattr(chat_mod, "load_bundle"):  # imported at module level
        monkeypatch.setattr(chat_mod, "load_bundle", no_load)

    def chat(*argv: str) -> int:
        return main(["chat", *argv, "--model", str(bundle_dir), *FAST])

    one_line_error(capsys, chat(str(tmp_path / "missing.wav")), "missing.wav", "not found")
    one = tmp_path / "one.wav"
    sf.write(one, noise(0.1)[:1], 16000)
    msg = one_line_error(capsys, chat(str(one)))
    assert msg == (f"echox: error: '{one}': question audio is 0.00 s long; "
                   "a question needs at least 0.1 s of audio")
    cut = tmp_path / "cut.wav"
    sf.write(cut, noise(1.0), 16000, subtype="PCM_16")
    cut.write_bytes(cut.read_bytes()[:44 + 16000])
    one_line_error(capsys, chat(str(cut)), "cut.wav", "truncated WAV file",
                   "header says 16000 samples", "file holds 8000")
    long = tmp_path / "long.wav"
    sf.write(long, noise(4.0), 16000)
    one_line_error(capsys, chat(str(long), "--max-audio-seconds", "3.5"), "long.wav",
                   "the limit is 3.5 s", "pass --max-audio-seconds N")
    longer = tmp_path / "longer.wav"  # over the bundle's own encoder.max_seconds (30 s)
    sf.write(longer, noise(31.0), 16000)
    one_line_error(capsys, chat(str(longer)), "longer.wav", "31.0 s; the limit is 30 s",
                   "--max-audio-seconds")
    q = tmp_path / "q.wav"
    sf.write(q, noise(0.5), 16000)
    one_line_error(capsys, chat(str(q), "-o", str(tmp_path / "a.mp3")), "a.mp3",
                   "unsupported suffix")
    (tmp_path / "file").write_text("not a folder")
    one_line_error(capsys, chat("--text", "hi", "-o", str(tmp_path / "file" / "a.wav")),
                   "is not a folder")
    (tmp_path / "dir.wav").mkdir()
    one_line_error(capsys, chat(str(q), "-o", str(tmp_path / "dir.wav")), "dir.wav", "is a folder")
    one_line_error(capsys, chat("-o", str(tmp_path / "turns.mp3")), "turns_1.mp3",
                   "unsupported suffix")  # interactive
    one_line_error(capsys, chat(str(q), "-o", str(q)), "would overwrite the question")
    whole = cut.read_bytes()
    for n in (12, 20, 30, 40):  # cut inside the RIFF, fmt and data headers
        head = tmp_path / f"head{n}.wav"
        head.write_bytes(whole[:n])
        one_line_error(capsys, chat(str(head)), f"head{n}.wav")
    assert loads == []
    with pytest.raises(SystemExit) as exit_:  # parsed with the options, before anything else
        chat(str(q), "--threads", "-1")
    assert exit_.value.code == 2 and "--threads: must be >= 1, got -1" in capsys.readouterr().err
    for opt in ("--speech-workers", "--workers"):  # the serve name and the older one
        with pytest.raises(SystemExit) as exit_:
            chat(str(q), opt, "0")
        assert exit_.value.code == 2 and "must be >= 1, got 0" in capsys.readouterr().err
    assert loads == []


def test_debug_after_the_command_shows_the_traceback(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from echox.errors import AudioError

    args = ["chat", str(tmp_path / "missing.wav"), "--model", str(tmp_path / "nope")]
    one_line_error(capsys, main(args), "missing.wav")
    for debug in (["--debug", *args], [*args, "--debug"]):
        with pytest.raises(AudioError, match="missing.wav"):
            main(debug)


def test_warnings_are_one_line(bundle_dir: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """A near-silent question warns on one line, without Python's source line under it."""
    import warnings

    q = tmp_path / "quiet.wav"
    sf.write(q, noise(0.5) * 1e-6, 16000)

    def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        # what Python's own showwarning does (pytest records warnings instead of showing them)
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        code = main(["chat", str(q), "--model", str(bundle_dir), "-o", str(tmp_path / "a.wav"),
                     *FAST])
    err = capsys.readouterr().err
    assert code == 0, err
    warned = [line for line in err.splitlines() if "silent" in line or "AudioWarning" in line]
    assert len(warned) == 1, err  # once: chat's early check of the question stays quiet
    assert warned[0].startswith("echox: warning: "), err
    assert "load_audio(" not in err


def test_chat_text_beams(bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--text-beams` speaks the beam answer; the sampling temperature then defaults to 0, and
    an explicit one is a one-line error."""
    from echox.infer.bundle import load_bundle
    from echox.model.generation import SamplingConfig
    from echox.model.prompt import Turn

    args = ["chat", "--model", str(bundle_dir), "--text", "tell me more", "-o", str(tmp_path / "a.wav"),
            "--max-new-tokens", "12"]
    assert main([*args, "--text-beams", "3"]) == 0
    out = capsys.readouterr().out
    model = load_bundle(bundle_dir).model
    want = [model.generate_text([[Turn("user", text="tell me more")]],
                                SamplingConfig(max_new_tokens=12, num_beams=n)).texts[0] for n in (3, 1)]
    assert want[0] != want[1] and want[0].strip() in out
    one_line_error(capsys, main([*args, "--text-beams", "3", "--temperature", "0.5"]),
                   "sampling options", "temperature 0")


def test_interactive_odd_input_costs_one_turn_and_no_question_is_overwritten(
        bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A line of non-UTF-8 bytes was a traceback (UnicodeDecodeError from a strict stdin, or a
    tokenizer TypeError on its surrogates) that ended the session; a question named like the
    turn's answer file (answer_1.wav left by an earlier session) was overwritten by its answer."""
    q = tmp_path / "answer_1.wav"
    sf.write(q, noise(0.5), 16000)
    kept = q.read_bytes()
    raw = b"answer_1.wav\n\xff\xfe caf\xe9\nhello\nagain"  # EOF mid-line: still a turn
    strict = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdin", strict)
    monkeypatch.chdir(tmp_path)
    code = main(["chat", "--model", str(bundle_dir), *FAST])
    cap = capsys.readouterr()
    assert code == 0 and "Traceback" not in cap.err, cap.err
    assert "echox: error: the typed text is not valid UTF-8" in cap.err
    assert q.read_bytes() == kept  # the question is still the question
    made = sorted(p.name for p in tmp_path.glob("answer_*.wav"))
    assert made == ["answer_1.wav", "answer_2.wav", "answer_3.wav", "answer_4.wav"]
    monkeypatch.setattr(sys, "stdin", None)  # `echox chat <&-`: refused before the load
    one_line_error(capsys, main(["chat", "--model", str(tmp_path / "nope"), *FAST]),
                   "standard input, which is closed")


def test_a_blank_typed_question_is_refused_before_the_load(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`--text ''` loaded the model (seconds) and then refused the empty turn."""
    one_line_error(capsys, main(["chat", "--text", "  ", "--model", str(tmp_path / "nope")]),
                   "a user turn needs speech")


def test_interactive_keeps_earlier_answers_and_survives_an_impossible_path(
        bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """An earlier session's answer_2.wav was overwritten by this session's second answer; a
    line naming a .wav too long for the file system (an OSError, not an AudioError) ended
    the whole session."""
    old = tmp_path / "answer_2.wav"
    sf.write(old, noise(0.3), 16000)
    kept = old.read_bytes()
    monkeypatch.setattr(sys, "stdin", io.StringIO("x" * 300 + ".wav\nhello\nagain\n"))
    monkeypatch.chdir(tmp_path)
    code = main(["chat", "--model", str(bundle_dir), *FAST])
    cap = capsys.readouterr()
    assert code == 0 and "Traceback" not in cap.err, cap.err
    assert "echox: error: 'xxx" in cap.err and "cannot read it" in cap.err, cap.err
    assert old.read_bytes() == kept
    made = sorted(p.name for p in tmp_path.glob("answer_*.wav"))
    assert made == ["answer_1.wav", "answer_2.wav", "answer_3.wav"]  # hello, (kept), again


def test_out_of_range_numbers_are_one_line(bundle_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`--seed` beyond what torch seeds was an OverflowError traceback; `--max-audio-seconds
    1e308` overflowed counting the limit in samples. It then allowed any length, and a
    40-minute question held gigabytes for minutes: the limit is capped (a clip under the cap
    still answers)."""
    one_line_error(capsys, main(["chat", "--model", str(bundle_dir), "--text", "hi",
                                 "--seed", str(2**64), *FAST]), "seed must be in")
    q = tmp_path / "q.wav"
    sf.write(q, noise(0.5), 16000)
    out = tmp_path / "a.wav"
    one_line_error(capsys, main(["chat", str(q), "--model", str(bundle_dir), "-o", str(out),
                                 "--max-audio-seconds", "1e308", *FAST]), "is above 600 s")
    one_line_error(capsys, main(["chat", str(q), "--model", str(bundle_dir), "-o", str(out),
                                 "--max-audio-seconds", "inf", *FAST]), "finite number")
    code = main(["chat", str(q), "--model", str(bundle_dir), "-o", str(out),
                 "--max-audio-seconds", "600", *FAST])
    assert code == 0 and out.is_file(), capsys.readouterr().err


def test_interactive_quoted_paths_are_audio(bundle_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A dragged-in or copied path comes quoted ('/a b/q.wav'), or as ~/q.wav: it was sent to
    the model as a text question. A quoted question stays a question."""
    from echox.infer.chat import _as_path_if_quoted

    folder = tmp_path / "sp ace"
    folder.mkdir()
    q = folder / "q.wav"
    sf.write(q, noise(0.5), 16000)
    assert _as_path_if_quoted(f"'{q}'") == str(q) == _as_path_if_quoted(f'"{q}"')
    monkeypatch.setenv("HOME", str(folder))
    assert _as_path_if_quoted("~/q.wav") == str(q)
    assert _as_path_if_quoted('"What is the capital of Japan?"') == '"What is the capital of Japan?"'
    import echox.infer.chat as chat

    turns: list[dict] = []
    real = chat._run_turn

    def recorded(*a, **kw):  # the real turn, with what it was given noted
        turns.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(chat, "_run_turn", recorded)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"'{q}'\n\"hello there\"\n"))
    monkeypatch.chdir(tmp_path)
    assert main(["chat", "--model", str(bundle_dir), *FAST]) == 0
    assert [(t["audio"], t["text"]) for t in turns] == [(str(q), None), (None, '"hello there"')]


def test_chat_option_and_line_slips(bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """--model "" loaded the default model; a prompt pushed over the LLM's positions by
    --max-new-tokens said "shorten the text or reset the session"; `/reset now` was an unknown
    command next to a list naming /reset; a one-word question naming a file here (README) was
    read as audio; a missing --vocoder was found after the model load."""
    one_line_error(capsys, main(["chat", "--model", "", "--text", "hi"]), "--model is empty")
    import echox.infer.bundle as bundle_mod

    def no_model(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded before the vocoder path was checked")

    with monkeypatch.context() as m:
        m.setattr(bundle_mod.EchoX, "from_pretrained", no_model)
        one_line_error(capsys, main(["chat", "--model", str(bundle_dir), "--text", "hi",
                                     "--vocoder", str(tmp_path / "none")]), "vocoder folder", "not found")
    err = one_line_error(capsys, main(["chat", "--model", str(bundle_dir), "--text", "hi",
                                       "--temperature", "0", "--max-new-tokens", "1020"]),
                         "lower max_new_tokens (--max-new-tokens) to at most")
    assert "reset" not in err
    (tmp_path / "README").write_text("not audio")
    sf.write(tmp_path / "recording", noise(0.5), 16000, format="WAV")  # a wav without a suffix
    monkeypatch.setattr(sys, "stdin", io.StringIO("/reset now\nREADME\nrecording\n/quit\n"))
    monkeypatch.chdir(tmp_path)
    assert main(["chat", "--model", str(bundle_dir), *FAST]) == 0
    cap = capsys.readouterr()
    assert "/reset takes no arguments" in cap.err and "unknown command" not in cap.err
    assert "README" not in cap.err and "recording" not in cap.err, cap.err
    assert (tmp_path / "answer_1.wav").exists() and (tmp_path / "answer_2.wav").exists()


def test_demo_prints_no_answer_line_for_a_turn_that_is_refused(bundle_dir: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`answer: ` was written before the turn was checked, so the error followed it on its line."""
    assert main(["demo", "--model", str(bundle_dir), "--no-asr", "--max-new-tokens", "1020"]) == 2
    cap = capsys.readouterr()
    assert "answer:" not in cap.out and "--max-new-tokens" in cap.err, cap


def test_an_answer_without_speech_takes_no_file_number(bundle_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A turn whose answer had no speech units (no file written) still used up its number:
    answer_1.wav never appeared and the next answer was answer_2.wav."""
    import echox.infer.chat as chat

    calls = []

    def turn(session, out, stats, stdout, audio=None, text=None):
        calls.append(out.name)
        if len(calls) > 1:  # the first answer has no speech
            sf.write(out, noise(0.1), 16000)

    monkeypatch.setattr(chat, "_run_turn", turn)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nagain\nmore\n"))
    monkeypatch.chdir(tmp_path)
    assert main(["chat", "--model", str(bundle_dir), *FAST]) == 0, capsys.readouterr().err
    assert calls == ["answer_1.wav", "answer_1.wav", "answer_2.wav"]
