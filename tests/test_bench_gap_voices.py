"""bench/gap_voices.py: the Echo − gold gap difference per voice and pooled over voices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script



def _script():
    return load_script("bench/gap_voices.py", "bench_gap_voices")


def _run(folder: Path, hits: list[int], ids: list[str] | None = None) -> str:
    folder.mkdir(parents=True)
    ids = ids or [f"q{i}" for i in range(len(hits))]
    folder.joinpath("items.jsonl").write_text(
        "".join(json.dumps({"id": i, "hit": bool(h)}) + "\n" for i, h in zip(ids, hits)))
    return str(folder)


def test_gap_per_voice_and_pooled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _script()
    # voice a: Echo loses 1 of 4 hits in speech, gold 2 of 4: difference -1/4
    a = [_run(tmp_path / "a" / n, h) for n, h in
         (("es2t", [1, 1, 1, 1]), ("es2s", [1, 1, 1, 0]), ("gs2t", [1, 1, 1, 1]), ("gs2s", [1, 1, 0, 0]))]
    # voice b: both lose nothing; one more question (q4) that voice a lacks: not counted
    b = [_run(tmp_path / "b" / n, h) for n, h in
         (("es2t", [0, 1, 0, 1, 1]), ("es2s", [0, 1, 0, 1, 0]), ("gs2t", [1, 0, 0, 0, 1]),
          ("gs2s", [1, 0, 0, 0, 1]))]
    assert bench.main(["--voice", "a", *a, "--voice", "b", *b, "--resamples", "500"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("4 questions answered by every run")
    assert "| a | +25.0 | +50.0 | -25.0 [" in out
    assert "| b | +0.0 | +0.0 | +0.0 [+0.0, +0.0] |" in out
    assert "| all 2 voices (per question, averaged) | | | -12.5 [" in out


def test_gap_voices_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _script()
    runs = [_run(tmp_path / n, [1]) for n in ("w", "x", "y")]
    assert bench.main(["--voice", "v", *runs, str(tmp_path / "missing")]) == 2
    assert "items.jsonl: run `echox eval` there first" in capsys.readouterr().err
    other = _run(tmp_path / "z", [1], ids=["other"])
    assert bench.main(["--voice", "v", *runs, other]) == 2
    assert "share no question" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # refused while the options are parsed
        bench.main(["--voice", "v", *runs, runs[0], "--resamples", "0"])
    assert stop.value.code == 2
    assert "argument --resamples: must be >= 1, got 0" in capsys.readouterr().err
    assert bench.main(["--voice", "v", *runs, runs[0], "--voice", "v", *runs, runs[0]]) == 2
    assert "share a name" in capsys.readouterr().err
    # read as `echox eval` reads a run: a torn line (a killed run, resumed) is skipped, not a
    # stop, and a hit that is not true/false ("false", a string, counted as a hit) is no answer
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "items.jsonl").write_text('{"id": "q0", "hit": false}\n{"id": "q0", "hi')
    assert bench.main(["--voice", "v", *runs, str(tmp_path / "torn")]) == 0
    assert "| v | +0.0 | +100.0 | -100.0" in capsys.readouterr().out  # Echo 1 -> 1, gold 1 -> 0
    (tmp_path / "torn" / "summary.json").write_text(json.dumps(  # it counted none of them
        {"name": "torn", "mode": "s2s", "benchmark": "b", "n": 0, "accuracy": 0.0,
         "mean_latency_ms": None, "ids": []}))
    assert bench.main(["--voice", "v", *runs, str(tmp_path / "torn")]) == 2
    assert "share no question" in capsys.readouterr().err
    (tmp_path / "str").mkdir()
    (tmp_path / "str" / "items.jsonl").write_text('{"id": "q0", "hit": "false"}\n')
    assert bench.main(["--voice", "v", *runs, str(tmp_path / "str")]) == 2
    assert "share no question" in capsys.readouterr().err
    # runs in the wrong places (s2s given for s2t): every gap's sign flipped, exit 0
    (tmp_path / "torn" / "summary.json").write_text(json.dumps(
        {"name": "torn", "mode": "s2s", "benchmark": "b", "n": 1, "accuracy": 0.0,
         "mean_latency_ms": None, "ids": ["q0"]}))
    assert bench.main(["--voice", "v", str(tmp_path / "torn"), *runs]) == 2
    assert "torn is a run of mode s2s, where one of mode s2t belongs" in capsys.readouterr().err
    (tmp_path / "w" / "eval.json").write_text(json.dumps({"mode": "text"}))  # stopped before its summary
    assert bench.main(["--voice", "v", *runs, str(tmp_path / "torn")]) == 2
    assert "w is a run of mode text, where one of mode s2t belongs" in capsys.readouterr().err
