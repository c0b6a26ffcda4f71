"""`echox demo` runs end to end offline (the embedded bundle, or the tiny-random fallback)."""

from echox.cli import main
from echox.infer.demo import packaged_question


def test_demo_runs_offline(tmp_path, capsys):
    assert packaged_question().is_file()
    out = tmp_path / "answer.wav"
    assert main(["demo", "--no-asr", "-o", str(out), "--max-new-tokens", "8", "--verbose"]) == 0
    cap = capsys.readouterr()
    text = cap.out
    assert "question:" in text and "answer:" in text and "stats:" in text
    assert out.is_file() or "no speech was produced" in text
    if out.is_file():  # --verbose shows each audio piece: segment.part, length, units
        assert "[AudioChunk 0.0:" in cap.err and "units" in cap.err


def test_demo_missing_model_is_one_line(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err
