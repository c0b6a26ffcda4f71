"""`echox demo` runs end to end offline with the embedded bundle and speaks its answer."""

import re

import numpy as np
import pytest
import soundfile as sf

from echox.cli import main
from echox.infer.demo import packaged_question

OUTPUT_RATE = 16000  # what every EchoX vocoder writes (the embedded one: vocoder output_sr)
MIN_PEAK = 0.01  # -40 dBFS: well above silence (audio.SILENCE_PEAK is 1e-4)


@pytest.mark.slow  # the embedded bundle: real SmolLM2 and Whisper tiny.en
def test_demo_speaks_its_answer_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ECHOX_MODEL", raising=False)  # the embedded (trained) bundle
    assert packaged_question().is_file()
    out = tmp_path / "answer.wav"
    assert main(["demo", "--no-asr", "-o", str(out), "--max-new-tokens", "8", "--verbose"]) == 0
    cap = capsys.readouterr()
    text = cap.out
    assert "question:" in text and "answer:" in text and "stats:" in text
    assert "tiny-random" not in text, "the demo fell back to the untrained model"
    assert "no speech was produced" not in text, text

    # the spoken answer: a real 16 kHz waveform, not silence, of a plausible length
    assert out.is_file()
    wav, sr = sf.read(out, dtype="float32")
    assert sr == OUTPUT_RATE and wav.ndim == 1 and wav.size > 0
    assert np.all(np.isfinite(wav))
    peak, rms = float(np.abs(wav).max()), float(np.sqrt(np.mean(wav.astype(np.float64) ** 2)))
    assert peak > MIN_PEAK and rms > MIN_PEAK / 10, (peak, rms)
    seconds = wav.size / sr
    assert 0.3 < seconds < 20.0, seconds  # a few words for 8 text tokens

    # what the demo reports agrees with the file: the printed length and the audio pieces
    said = re.search(r"spoken answer: .*answer\.wav \(([\d.]+) s\)", text)
    assert said and abs(float(said.group(1)) - seconds) < 0.006, text
    pieces = [(float(s), int(u)) for s, u in
              re.findall(r"\[AudioChunk \d+\.\d+: ([\d.]+) s, (\d+) units", cap.err)]
    assert pieces and cap.err.count("[AudioChunk 0.0:") == 1
    assert abs(sum(s for s, _ in pieces) - seconds) < 0.006 * len(pieces) + 1e-3
    units = sum(u for _, u in pieces)  # 50 Hz units: 20 ms each, longer where durations repeat
    assert 0.01 * units < seconds < 0.2 * units, (units, seconds)


def test_demo_missing_model_is_one_line(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err


def test_demo_checks_the_question_before_the_model(tmp_path, capsys):
    """A 1-sample question or an unwritable answer path is refused before any model load:
    the missing --model folder is never reached."""
    one = tmp_path / "one.wav"
    sf.write(one, np.full(1, 0.5, np.float32), 16000)
    nope = ["--model", str(tmp_path / "nope"), "--no-asr"]
    assert main(["demo", "--question", str(one), *nope]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"echox: error: '{one}': question audio is 0.00 s long; "
                   "a question needs at least 0.1 s of audio")
    assert main(["demo", "-o", str(tmp_path / "a.mp3"), *nope]) == 2
    err = capsys.readouterr().err
    assert "a.mp3" in err and "unsupported suffix" in err and "nope" not in err
    assert main(["demo", "--max-new-tokens", "-1", *nope]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "echox: error: --max-new-tokens must be >= 1, got -1"


def test_demo_refuses_a_long_question_before_the_load(tmp_path, capsys, monkeypatch):
    """Over the default bundle's encoder.max_seconds (30 s, read from its config.json), the
    question is refused before the bundle is loaded, naming the option that raises it."""
    from echox.infer import demo

    def no_load(*args, **kwargs):
        raise AssertionError("the bundle was loaded before the question was checked")

    monkeypatch.setattr(demo, "load_bundle", no_load)
    long = tmp_path / "long.wav"
    sf.write(long, np.zeros(31 * 16000, np.float32) + 0.1, 16000)
    assert main(["demo", "--question", str(long), "--no-asr", "-o", str(tmp_path / "a.wav")]) == 2
    err = capsys.readouterr().err.strip()
    assert "long.wav" in err and "the limit is 30 s" in err and "--max-audio-seconds" in err


@pytest.mark.slow  # the embedded bundle: real SmolLM2 and Whisper tiny.en
def test_demo_transcribes_the_file_it_wrote(tmp_path, capsys, monkeypatch):
    """The transcript line is what Whisper hears in the written answer (its 16-bit samples),
    not in the float samples before writing: on a marginal word the rounding alone changed what
    Whisper heard (docs/results.md, session 24)."""
    import echox.infer.demo as demo

    heard: list[tuple[np.ndarray, int]] = []

    class Recorder:  # stands in for faster-whisper: records what it is given
        def transcribe(self, audio, sample_rate=16000):
            heard.append((np.asarray(audio).copy(), sample_rate))
            return "recorded"

    monkeypatch.setattr(demo, "FasterWhisperASR", Recorder)
    monkeypatch.delenv("ECHOX_MODEL", raising=False)
    out = tmp_path / "answer.wav"
    assert main(["demo", "-o", str(out), "--max-new-tokens", "8"]) == 0
    assert "what Whisper tiny.en hears: 'recorded'" in capsys.readouterr().out
    (audio, rate), = heard
    wav, sr = sf.read(out, dtype="float32")
    assert rate == sr and audio.dtype == np.float32
    np.testing.assert_array_equal(audio, wav)  # exactly the file's samples
    assert np.array_equal(np.round(audio * 32768), audio * 32768)  # 16-bit steps


def test_demo_never_overwrites_its_question(tmp_path, capsys):
    """`-o` naming the question file replaced the question with the answer (echox chat refuses
    it); `--max-audio-seconds 1e308` was an OverflowError traceback. Both before the load."""
    q = tmp_path / "q.wav"
    sf.write(q, np.full(8000, 0.1, np.float32), 16000)
    kept = q.read_bytes()
    nope = ["--model", str(tmp_path / "nope"), "--no-asr"]
    assert main(["demo", "--question", str(q), "-o", str(tmp_path / "." / "q.wav"), *nope]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("echox: error: ") and "would overwrite the question" in err
    assert "\n" not in err and q.read_bytes() == kept
    assert main(["demo", "--question", str(q), "--max-audio-seconds", "1e308",
                 "-o", str(tmp_path / "a.wav"), *nope]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("echox: error: ") and "above 600 s" in err and "\n" not in err


def test_demo_falls_back_only_when_no_bundle_exists(tmp_path, capsys, monkeypatch):
    """A $ECHOX_MODEL naming no folder, or a damaged bundle where one was found, fell back to
    the untrained model (noise, exit 0): now each is an error; no bundle at all still falls
    back, saying so."""
    import echox.infer.bundle as bundle_mod

    monkeypatch.setenv("ECHOX_MODEL", str(tmp_path / "nope"))
    assert main(["demo", "--no-asr", "-o", str(tmp_path / "a.wav")]) == 2
    assert "ECHOX_MODEL" in capsys.readouterr().err and not (tmp_path / "a.wav").exists()
    monkeypatch.delenv("ECHOX_MODEL")
    monkeypatch.setenv("ECHOX_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "cache" / "models" / "tiny"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")
    assert main(["demo", "--no-asr", "-o", str(tmp_path / "a.wav")]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "falling back" not in err
    (broken / "config.json").unlink()
    monkeypatch.setattr(bundle_mod, "shipped_bundle", lambda: tmp_path / "no-shipped")
    assert main(["demo", "--no-asr", "-o", str(tmp_path / "a.wav"), "--max-new-tokens", "2"]) == 0
    assert "no EchoX model bundle found; falling back" in capsys.readouterr().err
    # a relocated base model for no bundle at all: refused (the fallback would ignore it)
    assert main(["demo", "--no-asr", "-o", str(tmp_path / "a.wav"), "--base-llm", str(tmp_path)]) == 2
    assert "no EchoX model bundle was found" in capsys.readouterr().err
