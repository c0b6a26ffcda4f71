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
