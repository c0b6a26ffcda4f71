"""`echox eval` end to end on a tiny random bundle and a local benchmark file."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from echox.cli import main
from echox.eval.benchmarks import load_benchmark
from echox.errors import EvalError
from echox.eval.run import Answer, S2TAnswerer, compare_runs, run_eval
from echox.model.generation import SamplingConfig


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    from test_engine import make_bundle_parts

    from echox.infer.bundle import save_bundle

    model, voc = make_bundle_parts()
    return save_bundle(tmp_path_factory.mktemp("b") / "tiny", model, voc)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        sf.write(root / f"q{i}.wav", (0.1 * rng.standard_normal(16000)).astype(np.float32), 22050)
        lines.append({"id": f"q{i}", "audio": f"q{i}.wav", "question": f"Question {i}?",
                      "answers": [f"answer{i}"]})
    (root / "qa.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return f"local:{root / 'qa.jsonl'}"


class Scripted:
    """A fixed answerer: tests the runner's scoring and resume logic exactly."""

    def __init__(self):
        self.calls = 0

    def answer(self, item):
        self.calls += 1
        return Answer(f"I think answer{item.id[-1]} is right" if item.id != "q1" else "no idea")


def test_runner_scores_and_resumes(tmp_path, bench, capsys):
    items = load_benchmark(bench)
    full = run_eval(items, Scripted(), "s2t", tmp_path / "full", bench, progress=False)
    assert full.n == 4 and full.accuracy == pytest.approx(0.75)  # q1 misses
    a = Scripted()
    run_eval(items[:2], a, "s2t", tmp_path / "part", bench, progress=False)
    with open(tmp_path / "part" / "items.jsonl", "a") as f:
        f.write("{half a line\n")  # an interrupted write
    with open(tmp_path / "part" / "items.jsonl", "a") as f:  # lines no run wrote: answered again
        f.write('{"id": "q2", "question": "no hit"}\n{"id": "q3", "hit": true, "latency_ms": "fast"}\n')
    b = Scripted()
    resumed = run_eval(items, b, "s2t", tmp_path / "part", bench, progress=False)
    assert a.calls == 2 and b.calls == 2  # only the missing items were answered
    assert (resumed.n, resumed.accuracy) == (full.n, full.accuracy)
    other = tmp_path / "other"  # the full run with one hit turned into a miss
    other.mkdir()
    recs = [json.loads(x) for x in (tmp_path / "full" / "items.jsonl").read_text().splitlines()]
    flip = next(r for r in recs if r["hit"])
    flip["hit"] = False
    (other / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (other / "summary.json").write_text((tmp_path / "full" / "summary.json").read_text())
    capsys.readouterr()
    sums = compare_runs([tmp_path / "full", tmp_path / "part", other], tmp_path / "bars.png")
    assert len(sums) == 3 and (tmp_path / "bars.png").stat().st_size > 1000
    lines = capsys.readouterr().out.splitlines()
    assert "+0.0 pts [+0.0, +0.0] on 4 shared" in lines[2]  # same answers as the first run
    assert "-25.0 pts" in lines[3] and "on 4 shared" in lines[3]


def test_s2t_answerer_on_tiny_bundle(bundle_dir, bench):
    from echox.infer.bundle import load_bundle

    items = load_benchmark(bench, limit=1)
    model = load_bundle(bundle_dir).model
    ans = S2TAnswerer(model, max_new_tokens=6).answer(items[0])
    assert isinstance(ans.text, str) and ans.stats["tokens"] <= 6
    guarded = S2TAnswerer(model, sampling=SamplingConfig(max_new_tokens=12, no_repeat_ngram_size=1))
    ids = guarded.answer(items[0]).token_ids
    assert len(ids) > 1 and len(set(ids)) == len(ids)  # no token twice
    from echox.eval.run import S2SAnswerer

    bundle = load_bundle(bundle_dir)
    whole = S2SAnswerer(bundle, stream=False, whole_response=True, max_new_tokens=6)
    assert whole.engine.cfg.whole_response and not whole.engine.cfg.stream
    ans = whole.answer(items[0])
    assert ans.stats["segments"] <= 1 and ans.stats["text_tokens"] <= 6


@pytest.mark.slow
def test_eval_cli_s2s_with_faster_whisper(tmp_path, bundle_dir, bench, capsys):
    out = tmp_path / "s2s"
    args = ["eval", "--model", str(bundle_dir), "--benchmark", bench, "--mode", "s2s", "--limit", "2",
            "--out", str(out), "--max-new-tokens", "8", "--save-audio", "--png", str(tmp_path / "b.png")]
    assert main(args) == 0
    recs = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all("transcript" in r and "hit" in r for r in recs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 2 and summary["asr"].startswith("faster-whisper")
    assert "accuracy" in capsys.readouterr().out
    assert main(args) == 0  # resumed: nothing left to do, same summary
    assert json.loads((out / "summary.json").read_text())["accuracy"] == summary["accuracy"]


def test_eval_cli_errors(tmp_path, capsys, bundle_dir, bench):
    for bad, says in ((["--no-repeat-ngram", "-1"], "decoding options"),
                      (["--repetition-penalty", "0"], "decoding options"),
                      (["--mode", "s2s", "--whole-response"], "--no-stream"),
                      (["--no-stream"], "--mode s2s only"),
                      (["--save-audio"], "--save-audio: --no-stream, --whole-response and "
                                         "--save-audio apply to --mode s2s only (--mode s2t"),
                      (["--text-beams", "0"], "decoding options")):
        args = ["eval", "--benchmark", bench, "--mode", "s2t", "--model", str(bundle_dir), *bad]
        assert main(args + ["--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1
    (tmp_path / "file.txt").write_text("keep me")
    args = ["eval", "--benchmark", bench, "--mode", "s2t", "--model", str(bundle_dir)]
    with pytest.raises(SystemExit) as stop:  # an empty run would report accuracy 0.0
        main([*args, "--limit", "0", "--out", str(tmp_path / "none")])
    assert stop.value.code == 2 and "--limit: must be >= 1" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "file.txt")]) == 2
    err = capsys.readouterr().err
    assert "is a file; give a run folder" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "file.txt").read_text() == "keep me"
    # a question over --max-audio-seconds (the clips are 0.73 s) names the item and its file
    assert main([*args, "--max-audio-seconds", "0.5", "--out", str(tmp_path / "short")]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the loader's progress bar
    assert last.startswith("echox: error: item q0 (") and "q0.wav" in last, err
    assert "the limit is 0.5 s" in last and "Traceback" not in err
    assert main([*args, "--max-audio-seconds", "0", "--out", str(tmp_path / "zero")]) == 2
    assert "--max-audio-seconds must be" in capsys.readouterr().err
    assert not (tmp_path / "zero").exists()  # refused before the run folder is made
    assert main(["eval", "--benchmark", bench, "--mode", "s2s", "--asr", "bogus:x",
                 "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "asr")]) == 2
    err = capsys.readouterr().err
    assert "unknown ASR 'bogus:x'" in err and "nope" not in err
    assert main(["eval", "--benchmark", "nope", "--mode", "s2t", "--model", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["eval", "--compare", str(tmp_path)]) == 2
    capsys.readouterr()
    # a speech model in text mode, a text LLM in s2t mode: each was ignored, and the whole run
    # answered with another model than the one named
    for mode, extra, says in (("text", ["--model", str(bundle_dir)], "--model names the speech model"),
                              ("cascade", ["--model", str(bundle_dir)], "--model names the speech model"),
                              ("s2t", ["--llm", "builtin:tiny-random-llama"], "--llm names the text LLM")):
        out = tmp_path / f"ignored-{mode}"
        assert main(["eval", "--benchmark", bench, "--mode", mode, *extra, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_compare_refuses_what_is_not_an_eval_run(tmp_path, capsys):
    """A summary.json that is not an eval summary, items without `hit` and a bad --png are one
    line each (they were TypeError / KeyError / matplotlib tracebacks)."""
    import json

    from echox.cli import main

    good = tmp_path / "good"
    good.mkdir()
    (good / "summary.json").write_text(json.dumps(
        {"name": "good", "mode": "s2t", "benchmark": "local", "n": 2, "accuracy": 0.5,
         "mean_latency_ms": None}))
    (good / "items.jsonl").write_text('{"id": "1", "hit": true}\n{"id": "2"}\n{"id": "3", "hi')
    def summary(**kw):
        return json.dumps({"name": "b", "mode": "s2t", "benchmark": "x", "n": 2, "accuracy": 0.5,
                           "mean_latency_ms": None, **kw})

    cases = {"{}": "not an echox eval summary", "[1]": "not an echox eval summary",
             "{oops": "not a readable JSON file",
             summary(accuracy=float("nan")): "out of range", summary(n=True): "out of range",
             summary(accuracy=1e308): "out of range", summary(mean_latency_ms=float("inf")): "out of range",
             json.dumps({"name": "b", "mode": "s2t", "benchmark": "x", "n": "2",
                         "accuracy": 0.5, "mean_latency_ms": None}): "a value of the wrong type"}
    for i, (text, words) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}"
        bad.mkdir()
        (bad / "summary.json").write_text(text)
        assert main(["eval", "--compare", str(good), str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("echox: error: ") and words in err and err.count("\n") == 1, err
    for png, words in ((tmp_path, "is a folder"), (tmp_path / "bars.nope", "give a file name ending in .png")):
        assert main(["eval", "--compare", str(good), "--png", str(png)]) == 2
        assert words in capsys.readouterr().err
    assert main(["eval", "--compare", str(good), str(good), "--png", str(tmp_path / "b.png")]) == 0
    assert "on 1 shared" in capsys.readouterr().out and (tmp_path / "b.png").is_file()


def test_a_resumed_run_refuses_records_of_other_questions_or_answers(tmp_path, bench):
    """Resumed on another file (a local one without ids names its rows local-0, ...) or on
    edited gold answers, a run counted the old records' hits for the new items."""
    from dataclasses import replace

    items = load_benchmark(bench)
    run_eval(items, Scripted(), "s2t", tmp_path / "r", bench, progress=False)
    other = [replace(items[0], question="Another question?"), *items[1:]]
    with pytest.raises(EvalError, match="holds item 'q0' as another question"):
        run_eval(other, Scripted(), "s2t", tmp_path / "r", bench, progress=False)
    edited = [replace(items[0], answers=["zzz"]), *items[1:]]
    with pytest.raises(EvalError, match="scored item 'q0' against other gold answers"):
        run_eval(edited, Scripted(), "s2t", tmp_path / "r", bench, progress=False)
    spaced = [replace(items[0], question="  Question   0? "), *items[1:]]  # the same words
    assert run_eval(spaced, Scripted(), "s2t", tmp_path / "r", bench, progress=False).n == 4


def test_compare_counts_the_items_each_summary_counted(tmp_path, bench, capsys):
    """A run rerun on fewer items keeps the other items' lines: --compare paired those too
    and printed a difference its own table contradicted."""
    items = load_benchmark(bench)
    run_eval(items, Scripted(), "s2t", tmp_path / "all", bench, progress=False)
    run_eval(items, Scripted(), "s2t", tmp_path / "few", bench, progress=False)
    few = run_eval(items[2:], Scripted(), "s2t", tmp_path / "few", bench, progress=False)
    assert few.n == 2 and json.loads((tmp_path / "few" / "summary.json").read_text())["ids"] == ["q2", "q3"]
    capsys.readouterr()
    compare_runs([tmp_path / "all", tmp_path / "few"], None)
    assert "on 2 shared" in capsys.readouterr().out.splitlines()[2]


def test_resume_after_a_torn_last_line_keeps_the_next_record(tmp_path, bench):
    """A run killed mid-write leaves a last line without its newline: the next record appended
    must start a line of its own, or it is glued to the fragment and lost from items.jsonl."""
    from echox.eval.run import scored_items

    items = load_benchmark(bench)
    run_eval(items[:2], Scripted(), "s2t", tmp_path, bench, progress=False)
    with open(tmp_path / "items.jsonl", "a") as f:
        f.write('{"id": "q2", "question": "Quest')  # torn: no newline
    resumed = run_eval(items, Scripted(), "s2t", tmp_path, bench, progress=False)
    assert resumed.n == 4
    assert sorted(scored_items(tmp_path / "items.jsonl")) == ["q0", "q1", "q2", "q3"]
    again = Scripted()
    run_eval(items, again, "s2t", tmp_path, bench, progress=False)
    assert again.calls == 0  # every record is on disk: nothing is answered twice


def test_summary_counts_the_items_of_this_benchmark_only(tmp_path, bench):
    """A folder that already holds other items (a run without --limit, another benchmark in
    the default runs/eval/<mode>) must not add them to this run's n and accuracy."""
    items = load_benchmark(bench)
    run_eval(items, Scripted(), "s2t", tmp_path, bench, progress=False)  # 3 hits of 4
    part = run_eval(items[:2], Scripted(), "s2t", tmp_path, bench, progress=False)
    assert (part.n, part.accuracy) == (2, 0.5)  # q0 hits, q1 misses
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert (saved["n"], saved["accuracy"]) == (2, 0.5)


def test_eval_cli_refuses_to_resume_with_other_settings(tmp_path, bundle_dir, bench, capsys):
    """An existing --out resumes: with another model (or mode, benchmark, decoding) its records
    would be counted as this run's answers, so the run is refused before anything loads."""
    import shutil

    other = shutil.copytree(bundle_dir, tmp_path / "other-bundle")
    out = tmp_path / "run"
    args = ["eval", "--benchmark", bench, "--mode", "s2t", "--limit", "2", "--out", str(out),
            "--max-new-tokens", "4"]
    assert main([*args, "--model", str(bundle_dir)]) == 0
    assert main([*args, "--model", str(bundle_dir)]) == 0  # the same settings resume
    capsys.readouterr()
    for extra in (["--model", str(other)], ["--model", str(bundle_dir), "--text-beams", "2"],
                  ["--model", str(bundle_dir), "--mode", "s2s", "--no-stream"]):
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert "other settings" in err and len(err.strip().splitlines()) == 1, err
    assert json.loads((out / "summary.json").read_text())["n"] == 2
    # a run that failed before its first answer (a mistyped --model) binds the folder to nothing
    out2 = tmp_path / "run2"
    args2 = [a if a != str(out) else str(out2) for a in args]
    assert main([*args2, "--model", str(tmp_path / "no-such-bundle")]) == 2
    assert main([*args2, "--model", str(bundle_dir)]) == 0


def test_a_resumed_run_on_an_edited_question_file_is_refused_before_the_load(
        tmp_path, bundle_dir, bench, capsys, monkeypatch):
    """A resumed run on a question file edited in place loaded its model (seconds to minutes)
    before it found that item q0 is another question now."""
    import shutil

    src = Path(bench.removeprefix("local:"))
    root = Path(shutil.copytree(src.parent, tmp_path / "bench"))
    spec = f"local:{root / 'qa.jsonl'}"
    out = tmp_path / "run"
    args = ["eval", "--benchmark", spec, "--mode", "s2t", "--limit", "2", "--out", str(out),
            "--max-new-tokens", "4", "--model", str(bundle_dir)]
    assert main(args) == 0
    qa = root / "qa.jsonl"
    qa.write_text(qa.read_text().replace("Question 0?", "What is the capital of Peru?"))

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr("echox.eval.run.load_bundle", no_load)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds item 'q0' as another question" in err and err.count("\n") == 1, err


def test_a_repeated_item_id_is_an_error_not_a_skipped_question(tmp_path):
    """Two questions with one id: the second was skipped as done, so n and the accuracy were
    over one question (here 1 of 1 instead of 1 of 2)."""
    from echox.errors import EvalError
    from echox.eval.benchmarks import QAItem

    items = [QAItem("x", "The capital of France?", ["Paris"], None, None, None),
             QAItem("x", "The capital of Spain?", ["Madrid"], None, None, None)]

    class Paris:
        def answer(self, item):
            return Answer("Paris")

    with pytest.raises(EvalError, match="'x' occurs twice"):
        run_eval(items, Paris(), "text", tmp_path, "b", progress=False)


def test_compare_refuses_runs_whose_ids_name_other_questions(tmp_path, capsys):
    """A local file without ids numbers its rows (`local-0`, ...): runs over two files, or
    over one file reordered, were paired row by row as if they were the same questions."""
    qs = [("The capital of France?", "Paris"), ("The capital of Spain?", "Madrid"),
          ("The capital of Italy?", "Rome")]

    class Capitals:
        def answer(self, item):
            return Answer("Paris")

    runs = {}
    for name, rows in (("a", qs), ("again", qs), ("reordered", qs[::-1])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"question": q, "answers": [a]}) + "\n" for q, a in rows))
        items = load_benchmark(f"local:{path}", decode_audio=False)
        assert [it.id for it in items] == ["local-0", "local-1", "local-2"]
        runs[name] = tmp_path / "runs" / name
        run_eval(items, Capitals(), "text", runs[name], f"local:{path}", progress=False)
    capsys.readouterr()
    assert main(["eval", "--compare", str(runs["a"]), str(runs["reordered"])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be paired" in err, err
    assert "'local-0' is 'The capital of Italy?'" in err and "'The capital of France?'" in err
    assert main(["eval", "--compare", str(runs["a"]), str(runs["again"])]) == 0  # the same file
    assert "+0.0 pts [+0.0, +0.0] on 3 shared" in capsys.readouterr().out


def test_s2s_latency_is_the_models_and_the_answers_asr_is_apart(tmp_path, bench):
    """The s2s latency counted the ASR of the spoken answer (and the wav write) as the
    model's: a slow ASR made the model look slow."""
    import time

    class Speaker:
        def answer(self, item):
            return Answer("answer0", np.zeros(1600, np.float32), 16000)

    class SlowASR:
        name = "slow"

        def transcribe(self, audio, sr):
            time.sleep(0.3)
            return "answer0"

    items = load_benchmark(bench, limit=2)
    s = run_eval(items, Speaker(), "s2s", tmp_path, bench, asr=SlowASR(), save_audio=True,
                 progress=False)
    # the ASR sleeps 0.3 s: were it inside the latency, the latency would be the longer one
    assert s.mean_answer_asr_ms >= 300 and s.mean_latency_ms < s.mean_answer_asr_ms
    recs = [json.loads(x) for x in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert all(r["answer_asr_ms"] >= 300 and r["latency_ms"] < r["answer_asr_ms"] for r in recs)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["mean_latency_ms"] == s.mean_latency_ms
    assert saved["mean_answer_asr_ms"] == s.mean_answer_asr_ms
    assert (tmp_path / "audio" / "q0.wav").is_file()


def test_a_resumed_s2s_run_leaves_older_latencies_out_of_the_mean(tmp_path, bench, caplog):
    """Records written before the answer's ASR was timed apart hold it in latency_ms; a run
    resumed over them averaged the two kinds."""
    class Speaker:
        def answer(self, item):
            return Answer("answer1", np.zeros(1600, np.float32), 16000)

    class ASR:
        name = "quick"

        def transcribe(self, audio, sr):
            return "answer1"

    items = load_benchmark(bench, limit=2)
    old = {"id": items[0].id, "question": items[0].question, "answers": items[0].answers,
           "text": "answer0", "transcript": "answer0", "audio_seconds": 0.1, "hit": True,
           "latency_ms": 5000.0, "stats": {}}
    (tmp_path / "items.jsonl").write_text(json.dumps(old) + "\n")
    with caplog.at_level("WARNING"):
        s = run_eval(items, Speaker(), "s2s", tmp_path, bench, asr=ASR(), progress=False)
    assert s.n == 2 and s.mean_latency_ms < 1000  # the new record's alone
    assert "1 of 2 records" in caplog.text and "older echox" in caplog.text


def test_eval_keeps_to_its_run_folder(tmp_path, bundle_dir, bench, capsys):
    """An --out holding another command's summary.json (a corpus build's) had it overwritten by
    the run's; a folder in the place of items.jsonl was an IsADirectoryError traceback; and
    with --save-audio an id such as `/abs/x` or `../x` wrote the answer outside the run folder,
    over whatever file was there."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "summary.json").write_text('{"items": {"train": 5}}')
    args = ["eval", "--benchmark", bench, "--mode", "s2t", "--model", str(bundle_dir),
            "--limit", "1", "--max-new-tokens", "2"]
    assert main([*args, "--out", str(corpus)]) == 2
    err = capsys.readouterr().err
    assert "holds a summary.json of something else" in err and err.count("\n") == 1, err
    assert (corpus / "summary.json").read_text() == '{"items": {"train": 5}}'
    (tmp_path / "odd" / "items.jsonl").mkdir(parents=True)
    assert main([*args, "--out", str(tmp_path / "odd")]) == 2
    err = capsys.readouterr().err
    assert "items.jsonl is not a file" in err and err.count("\n") == 1, err
    # a benchmark kept as the run folder's eval.json was replaced by the run's settings
    qs = tmp_path / "qs"
    qs.mkdir()
    local = bench[len("local:"):]
    rows = [json.loads(x) for x in open(local)][:1]
    for r in rows:
        r["audio"] = str(Path(local).parent / r["audio"])
    (qs / "eval.json").write_text(json.dumps(rows[0]) + "\n")
    kept = (qs / "eval.json").read_text()
    qa = [a if a != bench else f"local:{qs / 'eval.json'}" for a in args]
    assert main([*qa, "--out", str(qs)]) == 2
    err = capsys.readouterr().err
    assert "would write over the benchmark" in err and err.count("\n") == 1, err
    assert (qs / "eval.json").read_text() == kept
    # another program's eval.json in an --out is not replaced either
    (tmp_path / "other" / "eval.json").parent.mkdir()
    (tmp_path / "other" / "eval.json").write_text('[{"question": "kept"}]')
    assert main([*args, "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "not an echox eval run's settings" in err and err.count("\n") == 1, err
    assert (tmp_path / "other" / "eval.json").read_text() == '[{"question": "kept"}]'

    victim = tmp_path / "victim.wav"
    victim.write_text("keep")
    items = load_benchmark(bench, limit=2)
    items[0].id, items[1].id = str(tmp_path / "victim"), "../../victim"

    class Speaker:
        def answer(self, item):
            return Answer("answer0", np.full(1600, 0.1, np.float32), 16000)

    class ASR:
        name = "stub"

        def transcribe(self, audio, sr):
            return "answer0"

    run_dir = tmp_path / "runs" / "s2s"
    run_eval(items, Speaker(), "s2s", run_dir, bench, asr=ASR(), save_audio=True, progress=False)
    assert victim.read_text() == "keep" and not (tmp_path / "runs" / "victim.wav").exists()
    assert len(list((run_dir / "audio").glob("*.wav"))) == 2
    from echox.eval.run import _audio_name

    names = [_audio_name(i) for i in ("a/b", "a_b", "a\\b", "q1")]
    assert len(set(names)) == 4 and names[3] == "q1.wav" and all("/" not in n for n in names)


def test_a_bad_png_path_is_refused_before_the_run(tmp_path, bench, capsys):
    """--png was checked only once every item had been answered (exit 2 after the whole run)."""
    (tmp_path / "afile").write_text("x")
    assert main(["eval", "--mode", "text", "--benchmark", bench, "--out", str(tmp_path / "run"),
                 "--png", str(tmp_path / "afile" / "bars.png")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # a suffix matplotlib cannot write failed after the run (and left its new folders behind)
    chart = tmp_path / "nope" / "dir" / "bars.txt"
    assert main(["eval", "--mode", "text", "--benchmark", bench, "--out", str(tmp_path / "run"),
                 "--png", str(chart)]) == 2
    assert "bars.txt: give a file name ending in .png" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "nope").exists()


def test_items_are_checked_before_the_model_loads_on_a_fresh_run(tmp_path, capsys, monkeypatch):
    """A bad item (empty gold answer, blank question, repeated id, missing audio file) was found
    only when its turn came, after the model loaded and the items before it were answered."""
    root = tmp_path / "b"
    root.mkdir()
    sf.write(root / "q.wav", np.zeros(1600, np.float32), 16000)

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr("echox.eval.run.load_bundle", no_load)
    good = {"id": "a", "audio": "q.wav", "question": "Q?", "answers": ["x"]}
    for bad, msg in [({"answers": [None]}, "gold answer list is empty"),
                     ({"answers": ["  "]}, "gold answer list is empty"),
                     ({"answers": ""}, "gold answer is empty"),
                     ({"question": "   "}, "question is empty"),
                     ({"id": "a"}, "'a' occurs twice"),
                     ({"audio": "nope.wav"}, "nope.wav does not exist"),
                     ({"audio": "cut.wav"}, "truncated WAV file")]:
        (root / "cut.wav").write_bytes((root / "q.wav").read_bytes()[:1000])
        (root / "qa.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "b", **bad}) + "\n")
        out = tmp_path / f"run-{len(msg)}"
        assert main(["eval", "--mode", "s2t", "--benchmark", f"local:{root / 'qa.jsonl'}",
                     "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert msg in err and "line 2" in err or "occurs twice" in err, err
        assert err.count("\n") == 1, err
        assert not out.exists()  # refused before the run folder is made (it held an eval.json)


def test_a_scored_folder_without_eval_json_is_not_taken_over(tmp_path, bench, capsys):
    """A run folder whose eval.json was lost took another mode's records as this run's (the
    text answers counted as s2t ones, and eval.json was written anew as s2t)."""
    out = tmp_path / "run"
    run_eval(load_benchmark(bench, limit=2), Scripted(), "text", out, bench, progress=False)
    assert not (out / "eval.json").exists()
    assert main(["eval", "--mode", "s2t", "--benchmark", bench, "--limit", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no eval.json" in err and err.count("\n") == 1, err
    assert not (out / "eval.json").exists()


def test_one_benchmark_or_model_spelled_two_ways_resumes(tmp_path, bundle_dir, bench, capsys,
                                                        monkeypatch):
    """`local:r3.jsonl` and `local:/abs/r3.jsonl` (or a model folder with a trailing slash) were
    "other settings", and the resume was refused."""
    src = Path(bench.removeprefix("local:"))
    monkeypatch.chdir(src.parent)
    out = tmp_path / "run"
    args = ["eval", "--mode", "s2t", "--limit", "1", "--max-new-tokens", "2", "--out", str(out)]
    assert main([*args, "--benchmark", "local:qa.jsonl", "--model", str(bundle_dir)]) == 0
    recorded = json.loads((out / "eval.json").read_text())
    assert recorded["benchmark"] == f"local:{src}" and recorded["model"] == str(Path(bundle_dir).resolve())
    assert main([*args, "--benchmark", f"local:{src}", "--model", str(bundle_dir) + "/"]) == 0
    # another base LLM gives other answers: not mixed into this run (nor refused late)
    from echox.hub import resolve

    llm = str(resolve("builtin:tiny-random-llama"))
    assert main([*args, "--benchmark", f"local:{src}", "--model", str(bundle_dir), "--base-llm", llm]) == 2
    assert "other settings" in capsys.readouterr().err
    assert main([*args[:-2], "--out", str(tmp_path / "r2"), "--benchmark", f"local:{src}",
                 "--model", str(bundle_dir), "--base-llm", str(tmp_path / "nope")]) == 2
    assert "folder not found" in capsys.readouterr().err and not (tmp_path / "r2").exists()
    assert main(["eval", "--mode", "text", "--benchmark", f"local:{src}", "--base-llm", llm,
                 "--out", str(tmp_path / "r3")]) == 2
    assert "--llm" in capsys.readouterr().err
    # a folder recorded as typed by an older echox (no dtype nor base models) resumes too
    older = {k: v for k, v in recorded.items() if k not in ("dtype", "base_models")}
    (out / "eval.json").write_text(json.dumps({**older, "benchmark": "local:./qa.jsonl"}))
    assert main([*args, "--benchmark", f"local:{src}", "--model", str(bundle_dir)]) == 0, \
        capsys.readouterr().err
    assert main([*args, "--benchmark", f"local:{src}", "--model", str(bundle_dir), "--out", ""]) == 2
    assert "--out is empty" in capsys.readouterr().err


def test_compare_says_when_runs_share_no_items(tmp_path, bench, capsys):
    """Runs over different questions printed two rows and no word that nothing was paired."""
    items = load_benchmark(bench)
    run_eval(items[:2], Scripted(), "s2t", tmp_path / "a", bench, progress=False)
    run_eval(items[2:], Scripted(), "s2t", tmp_path / "b", bench, progress=False)
    capsys.readouterr()
    compare_runs([tmp_path / "a", tmp_path / "b"], None)
    lines = capsys.readouterr().out.splitlines()
    assert "no shared items" in lines[2] and "no shared" not in lines[1], lines
