"""The evaluation's ASR (`echox.infer.asr`) on real Whisper tiny.en."""

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

LONG = ("The first sentence talks about the weather in Paris, which was sunny all week. The second "
        "sentence is about a cat that sat on a warm mat near the window. The third sentence "
        "describes a long train journey from Berlin to Vienna through the mountains. The fourth "
        "sentence mentions that the library closes at nine on Fridays. The last sentence ends "
        "with the word elephant.")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs the espeak-ng program (scripts/setup.sh installs it)")
def test_transformers_whisper_hears_an_answer_longer_than_its_window(tmp_path):
    """A spoken answer over 30 s is transcribed to its end (it was cut at Whisper's window:
    the S2S score of a long answer read only its first 30 s)."""
    from echox.infer.asr import make_asr

    wav = tmp_path / "long.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "100", "-w", str(wav), LONG], check=True)
    audio, sr = sf.read(wav, dtype="float32")
    audio = np.concatenate([audio, np.zeros(sr * 3, dtype=np.float32)])
    assert len(audio) / sr > 34
    asr = make_asr("transformers:openai/whisper-tiny.en")
    heard = asr.transcribe(audio, sr).lower()
    assert "paris" in heard and "elephant" in heard, heard
    short = asr.transcribe(audio[: sr * 8], sr).lower()  # one window, as before
    assert "paris" in short and "elephant" not in short, short


@pytest.mark.slow
def test_faster_whisper_takes_torchs_thread_count(monkeypatch):
    """`--threads 1` set torch's threads, but CTranslate2 took its default of 4: on a 2-core
    machine the ASR ran on twice the cores beside the model."""
    import faster_whisper
    import torch

    from echox.infer.asr import FasterWhisperASR

    made = []
    real = faster_whisper.WhisperModel

    def recording(*a, **kw):  # the real model, its arguments kept
        made.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(faster_whisper, "WhisperModel", recording)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        asr = FasterWhisperASR()
        assert asr.cpu_threads == 1 and made[-1]["cpu_threads"] == 1
        assert FasterWhisperASR(cpu_threads=2).cpu_threads == 2 and made[-1]["cpu_threads"] == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs the espeak-ng program (scripts/setup.sh installs it)")
def test_heard_margin_counts_whole_words(tmp_path, capsys):
    """bench/heard_margin.py counted substrings: `--word span` was heard in every transcript of
    "a Spanish-speaking country"."""
    from conftest import load_script

    wav = tmp_path / "a.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "130", "-w", str(wav),
                    "Madrid is the capital of Spain, a Spanish speaking country."], check=True)
    bench = load_script("bench/heard_margin.py", "bench_heard_margin")

    def counts(word):
        assert bench.main([str(wav), "--word", word, "--snr", "40", "--copies", "1", "--gains", "0.5",
                           "--threads", "1"]) == 0
        rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "/" in ln]
        return [r.split(" | ")[1] for r in rows]

    assert counts("madrid") == ["1 / 1"] * 3
    assert counts("span") == ["0 / 1"] * 3
