"""The bench scripts treat bad input as `echox` does: a bad count or value is refused while the
options are parsed (argparse, exit 2, the option named), and run as a script, an input error
found later (a missing or unreadable file) is one line on stderr and exit 2, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/echox-bench-input"  # every argv below names it, so no run gets far

# (script, argv, the message argparse gives); the other arguments point at missing files
BAD_OPTIONS = [
    ("corpus_llm", ["--threads", "0", "--questions", MISSING], "argument --threads: must be >= 1, got 0"),
    ("corpus_llm", ["--n", "x", "--questions", MISSING], "argument --n: expected a whole number, got 'x'"),
    ("cpu_bf16", ["--reps", "0"], "argument --reps: must be >= 1, got 0"),
    ("ctc_probe", ["--show", "-1", "--model", MISSING], "argument --show: must be >= 0, got -1"),
    ("eval_speed", ["--max-new-tokens", "0", "--benchmark", f"local:{MISSING}"],
     "argument --max-new-tokens: must be >= 1, got 0"),
    ("heard_margin", [MISSING, "--word", "w", "--copies", "0"], "argument --copies: must be >= 1, got 0"),
    ("heard_margin", [MISSING, "--word", "w", "--gains", "0"], "--gains: gains must be finite numbers > 0"),
    ("hifigan_int8", ["--manifest", MISSING, "--reps", "0"], "argument --reps: must be >= 1, got 0"),
    ("hifigan_int8", ["--manifest", MISSING, "--stages", "1,x"], "--stages: each set is comma-separated"),
    ("llm_compile", ["--steps", "0", "--config", MISSING], "argument --steps: must be >= 1, got 0"),
    ("llm_compile", ["--warmup", "-1", "--config", MISSING], "argument --warmup: must be >= 0, got -1"),
    ("load", ["--workers", "0", "--question", MISSING], "argument --workers: must be >= 1, got 0"),
    ("load", ["--startup-timeout", "nan", "--question", MISSING], "--startup-timeout must be a finite"),
    ("train_speed", ["--threads", "1", "0", "--show-curves", MISSING], "argument --threads: must be >= 1, got 0"),
    ("train_speed", ["--lr", "0", "--show-curves", MISSING], "--lr must be a finite number > 0"),
    ("units_window", ["--n", "0", "--manifest", MISSING], "argument --n: must be >= 1, got 0"),
    ("units_window", ["--windows", "30,abc", "--manifest", MISSING], "--windows takes comma-separated seconds"),
    ("vocoder", ["--vocoder", MISSING, "--manifest", MISSING, "--n", "0"], "argument --n: must be >= 1, got 0"),
]


@pytest.mark.parametrize(("name", "argv", "message"), BAD_OPTIONS,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_OPTIONS)])
def test_bad_option_is_refused_while_parsing(name: str, argv: list[str], message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script(f"bench/{name}.py", f"bench_{name}")
    with pytest.raises(SystemExit) as stop:
        script.main(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def _script(name: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), *argv],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr.strip()


def test_missing_or_bad_input_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "none.jsonl"
    assert _one_line(_script("corpus_llm", "--questions", str(missing))) == \
        f"corpus_llm: error: {missing}: no such file"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Who?"}\n{not json\n')
    assert _one_line(_script("corpus_llm", "--questions", str(bad))).startswith(
        f"corpus_llm: error: {bad}:2: not a JSON record with a question")
    assert _one_line(_script("hifigan_int8", "--manifest", str(missing))) == \
        f"hifigan_int8: error: {missing}: no such file"
    assert _one_line(_script("train_speed", "--show-curves", str(missing))).startswith("train_speed: error: ")


# (script, argv with the input file as {inp}): --json naming that input is refused before the run
JSON_OVER_INPUT = [
    ("ctc_probe", ["--model", MISSING, "--qa", "{inp}"]),
    ("latency", ["--model", MISSING, "--questions", "{inp}"]),
    ("vocoder", ["--vocoder", MISSING, "--manifest", "{inp}"]),
    ("unit_layer_choice", ["--manifest", "{inp}"]),
    ("train_speed", ["--model", MISSING, "--dialogues", "{inp}"]),
]


# (script, argv with the measured model or vocoder folder as {dir})
JSON_IN_MODEL = [
    ("ctc_probe", ["--model", "{dir}", "--qa", "{inp}"]),
    ("latency", ["--model", "{dir}", "--questions", "{inp}"]),
    ("vocoder", ["--vocoder", "{dir}", "--manifest", "{inp}"]),
    ("unit_layer_choice", ["--model", "{dir}", "--manifest", "{inp}"]),
]


@pytest.mark.parametrize(("name", "argv"), JSON_IN_MODEL, ids=[n for n, _ in JSON_IN_MODEL])
def test_json_output_never_lands_in_the_measured_model(name: str, argv: list[str], tmp_path: Path) -> None:
    """`--json BUNDLE/config.json` ran the whole measurement, then wrote over the bundle's
    config: the bundle no longer loaded (checksum mismatch)."""
    from echox.errors import ConfigError

    script = load_script(f"bench/{name}.py", f"bench_{name}")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"question": "Who?"}\n')
    args = [a.replace("{inp}", str(inp)).replace("{dir}", str(folder)) for a in argv]
    with pytest.raises(ConfigError, match="lies inside .*an input of this command"):
        script.main([*args, "--json", str(folder / "config.json")])
    assert (folder / "config.json").read_text() == "{}"


@pytest.mark.parametrize(("name", "argv"), JSON_OVER_INPUT, ids=[n for n, _ in JSON_OVER_INPUT])
def test_json_output_never_replaces_an_input_and_is_checked_first(name: str, argv: list[str],
                                                                  tmp_path: Path) -> None:
    """`--json` was written at the end with write_text: over its own --qa/--questions/--manifest
    (the questions were gone, exit 0), or, below a missing folder, after the whole run."""
    from echox.errors import ConfigError

    script = load_script(f"bench/{name}.py", f"bench_{name}")
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"question": "Who?"}\n')
    args = [a.replace("{inp}", str(inp)) for a in argv]
    with pytest.raises(ConfigError, match="is an input of this command"):
        script.main([*args, "--json", str(tmp_path / "." / "in.jsonl")])
    assert inp.read_text() == '{"question": "Who?"}\n'
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        script.main([*args, "--json", str(tmp_path / "afile" / "rows.json")])


def test_odd_question_and_manifest_rows_are_one_line_before_the_load(tmp_path: Path) -> None:
    """A JSON list, a row without its question or text, a --true-durations run on units
    without their counts: KeyError / TypeError / AttributeError tracebacks, some after the
    model had loaded; an empty question file gave a table of NaNs and exit 0."""
    from echox.errors import ConfigError

    def rows(name: str, *recs: object) -> str:
        p = tmp_path / name
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
        return str(p)

    # a question that is no audio: every turn a bad_audio error, "served 0 turns", exit 0
    from echox.errors import AudioError

    load = load_script("bench/load.py", "bench_load")
    with pytest.raises(AudioError, match="garbage.jsonl"):
        load.main(["--clients", "1", "--duration", "1", "--question", rows("garbage.jsonl", {"a": 1})])
    probe = load_script("bench/ctc_probe.py", "bench_ctc_probe")
    with pytest.raises(ConfigError, match=r"lst.jsonl:1: not a JSON object"):
        probe.main(["--model", MISSING, "--qa", rows("lst.jsonl", ["a"])])
    with pytest.raises(ConfigError, match=r"noq.jsonl:2: no 'question' text"):
        probe.main(["--model", MISSING, "--qa", rows("noq.jsonl", {"audio": "a.wav", "question": "Who?"},
                                                     {"audio": "b.wav"})])
    with pytest.raises(SystemExit, match="no questions"):
        probe.main(["--model", MISSING, "--qa", rows("empty.jsonl")])
    latency = load_script("bench/latency.py", "bench_latency")
    with pytest.raises(SystemExit, match=r"question 'q1' has no 'question' text to ask \(--input text\)"):
        latency.main(["--model", MISSING, "--questions", rows("aud.jsonl", {"id": "q1", "audio": "a.wav"}),
                      "--input", "text"])
    voc = load_script("bench/vocoder.py", "bench_vocoder")
    unit_row = {"id": "u1", "audio": "a.wav", "units": [1, 2], "text": "hi"}
    with pytest.raises(SystemExit, match="has no unit 'counts'"):
        voc.main(["--vocoder", MISSING, "--manifest", rows("u.jsonl", unit_row), "--true-durations"])
    with pytest.raises(SystemExit, match="needs a text, an audio path and units"):
        voc.main(["--vocoder", MISSING, "--manifest", rows("t.jsonl", {**unit_row, "text": None})])


@pytest.mark.parametrize(("name", "argv", "says"), [
    ("tiny_results", ["--echo", MISSING, "--batch-size", "0"], "--batch-size: must be >= 1"),
    ("latency", ["--model", MISSING, "--questions", MISSING, "--warmup", "-1"], "--warmup: must be >= 0"),
    ("heard_margin", [MISSING, "--word", " "], "--word: give a word"),
])
def test_counts_and_words_that_mean_nothing_are_refused(name: str, argv: list[str], says: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """--batch-size 0 became 16 without a word, --warmup -1 was taken, --word "" matched every
    transcript."""
    script = load_script(f"bench/{name}.py", f"bench_{name}")
    with pytest.raises(SystemExit) as stop:
        script.main(argv)
    assert stop.value.code == 2 and says in capsys.readouterr().err


def test_prune_init_checks_every_width_before_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    """A width the teacher cannot be cut to was found after the table's header (and after the
    rows of the widths before it)."""
    from echox.errors import VocoderConfigError

    bench = load_script("bench/prune_init.py", "bench_prune_init")
    with pytest.raises(VocoderConfigError, match="student width 1000 must be in"):
        bench.main(["--widths", "256", "1000"])
    assert capsys.readouterr().out == ""
