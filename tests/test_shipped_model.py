"""The shipped EchoX-Tiny answers its packaged demo question, in text and in speech.

A real check of the embedded bundle (`src/echox/assets/models/tiny`), not of a fixture: the
packaged question ("What is the capital of Japan?", piper's voice) goes through `echox demo`
exactly as a new user runs it. The text answer must name Tokyo, and so must Whisper tiny.en's
transcript of the spoken answer.
"""

import contextlib
import io
import re

import pytest

from echox.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("demo") / "answer.wav"
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.delenv("ECHOX_MODEL", raising=False)  # the embedded bundle
        assert main(["demo", "-o", str(out)]) == 0
    return buf.getvalue()


def _line(text: str, label: str) -> str:
    m = re.search(rf"^{re.escape(label)}: (.*)$", text, re.M)
    assert m, f"no {label!r} line in the demo output:\n{text}"
    return m.group(1)


def test_the_text_answer_names_tokyo(demo_output):
    assert "tiny-random" not in demo_output, "the demo fell back to the untrained model"
    assert "tokyo" in _line(demo_output, "answer").lower(), demo_output


def test_whisper_hears_tokyo_in_the_spoken_answer(demo_output):
    assert "tokyo" in _line(demo_output, "what Whisper tiny.en hears").lower(), demo_output
