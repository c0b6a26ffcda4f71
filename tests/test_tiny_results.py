"""`bench/tiny_results.py` end to end on two tiny random bundles and a tiny corpus (CPU, fast)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import load_script

ROWS = ["Text-LLM accuracy", "Cascade accuracy", "S2T accuracy (piper voice)", "S2S accuracy",
        "S2T accuracy (espeak-ng en-us voice)", "S2T − S2S gap", "ASR-WER",
        "T2C intelligibility WER", "First-audio latency, median", "First-audio latency, p90",
        "Gap Echo − Gold, paired bootstrap"]


def _script() -> Any:
    return load_script("bench/tiny_results.py", "bench_tiny_results")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny random bundles: different speech adapter, echo decoder and denoiser, the same
    T2C, unit language and vocoder (as Echo and the gold-unit baseline share Stage II)."""
    from test_engine import make_bundle_parts

    from echox.infer.bundle import save_bundle

    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for name in ("echo", "gold"):
        model, voc = make_bundle_parts()  # built from the config's seed: the same weights
        if name == "gold":
            torch.manual_seed(2)
            with torch.no_grad():
                for part in (model.adapter, model.echo, model.denoiser):
                    for p in part.parameters():
                        p.add_(0.05 * torch.randn_like(p))
        out[name] = save_bundle(root / name, model, voc)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny corpus test folder: qa.jsonl, qa_espeak.jsonl and tts_units.jsonl."""
    test = tmp_path_factory.mktemp("tiny") / "test"
    rng = np.random.default_rng(0)
    qa, qa_e, tts = [], [], []
    for i in range(3):
        qid = f"wd-{i}"
        for kind in ("q", "q_espeak"):
            (test / "audio" / kind).mkdir(parents=True, exist_ok=True)
            wav = (0.1 * rng.standard_normal(int(22050 * (0.5 + 0.3 * i)))).astype(np.float32)
            sf.write(test / "audio" / kind / f"{qid}.wav", wav, 22050)
        rec = {"id": qid, "question": f"What is thing {i}?", "answers": [f"thing{i}"]}
        qa.append({**rec, "audio": f"audio/q/{qid}.wav"})
        qa_e.append({**rec, "audio": f"audio/q_espeak/{qid}.wav"})
        tts.append({"id": qid, "text": f"The answer is thing {i}.", "audio": f"audio/a/{qid}.wav",
                    "units": [1, 2, 3]})
        tts.append({"id": f"{qid}-q", "text": rec["question"], "audio": f"audio/q/{qid}.wav",
                    "units": [4, 5]})
    for name, rows in (("qa", qa), ("qa_espeak", qa_e), ("tts_units", tts)):
        (test / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return test


def _wer_of(run: str | Path) -> float | None:
    """The corpus WER of a run folder's saved transcripts, each against its own text (None
    where the texts hold no words)."""
    from echox.eval.wer import edit_distance, normalize_words

    recs = [json.loads(x) for x in Path(run, "items.jsonl").read_text().splitlines()]
    refs = [normalize_words(r["text"]) for r in recs]
    edits = sum(edit_distance(w, normalize_words(r.get("transcript", ""))) for w, r in zip(refs, recs))
    words = sum(map(len, refs))
    return edits / words if words else None


def _args(corpus: Path, out: Path, **bundles: Path) -> list[str]:
    args = ["--data", str(corpus), "--config", "tiny-random", "--out", str(out), "--n", "2",
            "--max-new-tokens", "6", "--batch-size", "2", "--threads", "1", "--resamples", "200"]
    for name, path in bundles.items():
        args += [f"--{name}", str(path)]
    return args


def test_tiny_results_table_json_png_and_cheap_rerun(tmp_path: Path, bundles: dict[str, Path],
                                                     corpus: Path, capsys: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _script()
    out = tmp_path / "res"
    assert bench.main(_args(corpus, out, **bundles)) == 0
    table = capsys.readouterr().out
    for row in ROWS:
        assert row in table, row
    assert (out / "results.md").read_text() in table
    assert (out / "results.png").stat().st_size > 1000
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == 2 and not res["skipped"]
    assert res["test_audio"] in table and len(res["test_audio"]) == 16
    assert 0.0 <= res["text_accuracy"] <= 1.0 and 0.0 <= res["cascade_accuracy"] <= 1.0
    heard = [json.loads(x) for x in Path(res["runs"]["cascade"], "items.jsonl").read_text().splitlines()]
    assert len(heard) == 2 and all(isinstance(r["heard"], str) for r in heard)
    for b in ("echo", "gold"):
        m = res["metrics"][b]
        for key in ("text_accuracy", "cascade_accuracy", "s2t_accuracy", "s2s_accuracy",
                    "s2t_espeak_accuracy"):
            assert 0.0 <= m[key] <= 1.0, (b, key)
        assert -1.0 <= m["gap"] <= 1.0
        assert m["gap"] == pytest.approx(m["s2t_accuracy"] - m["s2s_accuracy"])
        s2s = Path(res["runs"][(m.get("shared_runs") or {}).get("s2s", f"{b}-s2s")])
        assert m["asr_wer"] == pytest.approx(_wer_of(s2s)), b  # None where no text had words
        assert m["t2c_wer"] == pytest.approx(_wer_of(m["t2c"]["run"])) and m["t2c"]["n"] == 2
        # the same T2C, unit language and vocoder: voiced once, for the first bundle
        assert m["t2c"].get("same_as") == (None if b == "echo" else "echo")
        lat = m["first_audio_ms"]
        assert lat["of"] == 2 and (lat["n"] == 0 or lat["median"] <= lat["p90"])
    boot = res["gap_difference"]
    assert boot["n"] == 2 and -1.0 <= boot["lo"] <= boot["mean"] <= boot["hi"] <= 1.0
    assert res["metrics"]["echo"]["t2c_wer"] == res["metrics"]["gold"]["t2c_wer"]
    assert not (out / "gold-t2c").exists()
    for name in ("text", "cascade", "echo-s2t", "echo-s2s", "echo-s2t-espeak", "gold-s2s", "echo-t2c"):
        assert Path(res["runs"][name], "items.jsonl").is_file(), name
        assert name == "echo-t2c" or res["commands"][name].startswith("echox eval --mode ")
    assert "same T2C" in table

    # a rerun on the finished folders loads nothing and gives the same numbers
    import echox.eval.run as run_mod
    import echox.infer.bundle as bundle_mod

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("a complete rerun must not load a model")

    monkeypatch.setattr(bundle_mod, "load_bundle", boom)
    monkeypatch.setattr(run_mod, "TextAnswerer", boom)
    assert bench.main(_args(corpus, out, **bundles)) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["metrics"] == res["metrics"] and again["gap_difference"] == res["gap_difference"]
    assert again["test_audio"] == res["test_audio"]
    # the same questions spoken anew (piper samples noise): another digest
    clip = corpus / "audio" / "q" / "wd-0.wav"
    wav, sr = sf.read(clip)
    sf.write(clip, wav * 0.5, sr)
    from echox.eval.benchmarks import open_benchmark

    items = list(open_benchmark(f"local:{corpus / 'qa.jsonl'}", limit=2, decode_audio=False))
    assert bench.audio_digest(items) != res["test_audio"]
    # and the runs made on the old audio are not reused for it (they were, under the new digest)
    bench.file_audio_digest.cache_clear()
    capsys.readouterr()
    assert bench.main(_args(corpus, out, **bundles)) == 2
    assert "other settings" in capsys.readouterr().err
    sf.write(clip, wav, sr)
    bench.file_audio_digest.cache_clear()


def test_tiny_results_shared_bundle_and_skips(tmp_path: Path, bundles: dict[str, Path],
                                              corpus: Path, capsys: Any) -> None:
    """One folder as both bundles shares its runs; missing espeak / units files skip rows."""
    bench = _script()
    data = tmp_path / "test"
    data.mkdir()
    (data / "qa.jsonl").write_text("".join(
        json.dumps({**json.loads(x), "audio": str(corpus / json.loads(x)["audio"])}) + "\n"
        for x in (corpus / "qa.jsonl").read_text().splitlines()))
    out = tmp_path / "res"
    args = _args(data, out, echo=bundles["echo"], gold=bundles["echo"])
    args[args.index("--n") + 1] = "1"
    assert bench.main(args) == 0
    table = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert set(res["skipped"]) == {"s2t_espeak_accuracy", "t2c_wer"}
    assert "echox units extract" in res["skipped"]["t2c_wer"]
    assert "skipped" in table and "echox units extract" in table
    assert res["metrics"]["gold"]["shared_runs"] == {"s2t": "echo-s2t", "s2s": "echo-s2s"}
    assert not (out / "gold-s2s").exists()
    boot = res["gap_difference"]
    assert boot["lo"] == boot["hi"] == boot["mean"] == 0.0  # identical runs: no difference
    assert "greedy text)" in table  # no repetition guard
    # the guard is part of a run's settings: the folders made without it are not reused
    assert bench.main(args + ["--no-repeat-ngram", "2"]) == 2
    assert "other settings" in capsys.readouterr().err
    args[args.index("--out") + 1] = str(tmp_path / "guarded")
    assert bench.main(args + ["--no-repeat-ngram", "2", "--repetition-penalty", "1.5"]) == 0
    assert "greedy text, repetition penalty 1.5, no repeated 2-gram" in capsys.readouterr().out
    res = json.loads((tmp_path / "guarded" / "results.json").read_text())
    assert res["no_repeat_ngram_size"] == 2 and res["repetition_penalty"] == 1.5
    for name in ("text", "cascade", "echo-s2t", "echo-s2s"):
        assert "--repetition-penalty 1.5 --no-repeat-ngram 2" in res["commands"][name], name
        run = json.loads((tmp_path / "guarded" / name / "run.json").read_text())
        assert run["no_repeat_ngram_size"] == 2, name
    # nor are guarded folders reused by a run without the guard
    assert bench.main(args) == 2 and "other settings" in capsys.readouterr().err
    # text beams: recorded, passed on, and named in the table's header
    args[args.index("--out") + 1] = str(tmp_path / "beams")
    assert bench.main(args + ["--text-beams", "2"]) == 0
    assert "text by beam search over 2)" in capsys.readouterr().out
    res = json.loads((tmp_path / "beams" / "results.json").read_text())
    assert res["num_beams"] == 2 and "length_penalty" not in res
    for name in ("text", "cascade", "echo-s2t", "echo-s2s"):
        assert "--text-beams 2" in res["commands"][name], name


def test_tiny_results_slim_bundle_takes_the_t2c_from_t2c(tmp_path: Path, bundles: dict[str, Path],
                                                        corpus: Path) -> None:
    """A slim bundle stores no T2C: its row is skipped, or voiced with `--t2c CHECKPOINT`."""
    from test_engine import make_bundle_parts

    from echox.infer.bundle import save_bundle

    bench = _script()
    model, voc = make_bundle_parts()
    slim = save_bundle(tmp_path / "slim", model, voc, slim=True)
    out = tmp_path / "res"
    args = _args(corpus, out, echo=slim)
    args[args.index("--n") + 1] = "1"
    assert bench.main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert "--t2c" in res["skipped"]["t2c_wer:echo"] and res["metrics"]["echo"]["t2c_wer"] is None
    assert bench.main(args + ["--t2c", str(bundles["echo"])]) == 0
    res = json.loads((out / "results.json").read_text())
    t2c = res["metrics"]["echo"]["t2c"]
    assert not res["skipped"] and t2c["source"] == str(bundles["echo"].resolve()) and t2c["n"] == 1
    assert res["metrics"]["echo"]["t2c_wer"] == pytest.approx(_wer_of(t2c["run"]))
    assert res["gap_difference"] is None and "needs --echo and --gold" in (out / "results.md").read_text()
    # a slim bundle that decodes units by beam search: the --t2c checkpoint decodes as it does,
    # in a run of its own (not the greedy one above)
    model.config.t2c.beams = 2
    beamed = save_bundle(tmp_path / "slim-beams", model, voc, slim=True)
    args[args.index("--echo") + 1] = str(beamed)
    args[args.index("--out") + 1] = str(tmp_path / "res-beams")
    assert bench.main(args + ["--t2c", str(bundles["echo"])]) == 0
    res = json.loads((tmp_path / "res-beams" / "results.json").read_text())
    assert res["metrics"]["echo"]["t2c"]["beams"] == 2 and t2c["beams"] == 1
    assert res["metrics"]["echo"]["t2c"]["fingerprint"] != t2c["fingerprint"]


def test_tiny_results_t2c_only(tmp_path: Path, bundles: dict[str, Path], corpus: Path) -> None:
    """`--t2c-only` voices the answers through the T2C and runs nothing else."""
    bench = _script()
    out = tmp_path / "res"
    args = _args(corpus, out, echo=bundles["echo"])
    args[args.index("--n") + 1] = "1"
    assert bench.main(args + ["--t2c-only"]) == 0
    res = json.loads((out / "t2c.json").read_text())
    assert res["t2c"]["echo"]["n"] == 1
    assert res["t2c"]["echo"]["wer"] == pytest.approx(_wer_of(res["t2c"]["echo"]["run"]))
    assert not (out / "text").exists() and not (out / "results.json").exists()


def test_tiny_results_missing_files(tmp_path: Path, capsys: Any) -> None:
    bench = _script()
    assert bench.main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "qa.jsonl" in err and "echox data build-tiny" in err
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "qa.jsonl").write_text("")
    assert bench.main(["--data", str(tmp_path / "d"), "--config", "tiny-random",
                       "--echo", str(tmp_path / "nobundle"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nobundle/config.json" in err and "echox bundle" in err


def test_paired_bootstrap_is_ordered_and_reproducible() -> None:
    bench = _script()
    diffs = [1, 0, 0, -1, 1, 1, 0, 0]
    a = bench.paired_bootstrap(diffs, 500, seed=3)
    assert a == bench.paired_bootstrap(diffs, 500, seed=3)
    assert a["lo"] <= a["mean"] <= a["hi"] and a["mean"] == pytest.approx(0.25)
    assert bench.paired_bootstrap([0, 0], 100)["lo"] == 0.0


def test_tiny_results_shares_s2t_runs_of_an_equal_s2t_part(tmp_path: Path, corpus: Path) -> None:
    """Stage III with a frozen S2T model changes only the echo decoder and denoiser: the two
    bundles' s2t runs are run once (the S2T answers would be the same), their s2s runs twice."""
    from test_engine import make_bundle_parts

    from echox.infer.bundle import save_bundle

    paths = {}
    for name in ("echo", "gold"):
        model, voc = make_bundle_parts()
        if name == "gold":
            torch.manual_seed(3)
            with torch.no_grad():
                for part in (model.echo, model.denoiser):
                    for p in part.parameters():
                        p.add_(0.05 * torch.randn_like(p))
        paths[name] = save_bundle(tmp_path / name, model, voc)
    bench = _script()
    assert bench.s2t_fingerprint(paths["echo"]) == bench.s2t_fingerprint(paths["gold"])
    out = tmp_path / "res"
    assert bench.main(_args(corpus, out, **paths)) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["metrics"]["gold"]["shared_runs"] == {"s2t": "echo-s2t", "s2t-espeak": "echo-s2t-espeak"}
    assert not (out / "gold-s2t").exists() and (out / "gold-s2s" / "items.jsonl").is_file()
    assert res["metrics"]["gold"]["s2t_accuracy"] == res["metrics"]["echo"]["s2t_accuracy"]
    # a different adapter makes a different fingerprint
    model, voc = make_bundle_parts()
    with torch.no_grad():
        next(model.adapter.parameters()).add_(0.1)
    other = save_bundle(tmp_path / "other", model, voc)
    assert bench.s2t_fingerprint(other) != bench.s2t_fingerprint(paths["echo"])


def test_run_as_a_script_an_input_error_is_one_line(tmp_path: Path) -> None:
    """The script's own `__main__` path (loading it as a module skips it): a missing input is
    one line and exit 2. It once called bench/_cli's run() in place of the script's own."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "bench" / "tiny_results.py"), "--echo",
                        str(tmp_path / "none"), "--data", str(tmp_path / "test"),
                        "--out", str(tmp_path / "out"), "--threads", "1"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("tiny_results: missing ") and "qa.jsonl" in r.stderr


def test_t2c_run_resumes_after_a_torn_last_line(tmp_path: Path) -> None:
    """A T2C run killed mid-write leaves a last line without its newline: the next record must
    not be glued to it (and lost, so the item is voiced again on every rerun)."""
    from types import SimpleNamespace

    bench = _script()
    voc = SimpleNamespace(sample_rate=16000, synthesize=lambda units: np.zeros(160 * len(units)))
    model = SimpleNamespace(units_from_text=lambda texts: [[1, 2, 3] for _ in texts])
    bundle = SimpleNamespace(model=model, vocoder=voc, units=lambda toks: list(toks))
    ctx = SimpleNamespace(out=tmp_path, runs={}, bundle=lambda path: bundle,
                          asr=lambda: SimpleNamespace(transcribe=lambda audio, sr: "heard"))
    answers = [{"id": f"a{i}", "text": f"answer {i}"} for i in range(3)]
    bench.t2c_run(ctx, "t2c", tmp_path / "b", tmp_path / "b", answers[:1], {"mode": "t2c"})
    with open(tmp_path / "t2c" / "items.jsonl", "a") as f:
        f.write('{"id": "a1", "text": "ans')  # torn: no newline
    bench.t2c_run(ctx, "t2c", tmp_path / "b", tmp_path / "b", answers, {"mode": "t2c"})
    assert sorted(bench.read_items(tmp_path / "t2c" / "items.jsonl")) == ["a0", "a1", "a2"]


def test_a_damaged_run_json_is_one_line_naming_it(tmp_path: Path) -> None:
    """A run folder's settings cut short (a kill in an older, non-atomic write) or replaced by
    another file stop the script with one line naming it; it was a JSONDecodeError traceback."""
    bench = _script()
    bench.check_run_dir(tmp_path / "run", {"mode": "s2t"})
    bench.check_run_dir(tmp_path / "run", {"mode": "s2t"})  # the same settings: reused
    for damaged, says in (('{"mode": "s2', "malformed JSON"), ("[1]", "expected a JSON object")):
        (tmp_path / "run" / "run.json").write_text(damaged)
        with pytest.raises(bench.Stop, match=f"run.json: {says}"):
            bench.check_run_dir(tmp_path / "run", {"mode": "s2t"})


def test_a_setting_older_runs_did_not_record_is_taken_as_this_runs(tmp_path: Path) -> None:
    """The cascade run now records the question audio it heard: a cascade folder of an older
    version, without it, was refused as "made with other settings" (300 answers to redo)."""
    bench = _script()
    bench.check_run_dir(tmp_path / "run", {"mode": "cascade"})  # as the older version wrote it
    bench.check_run_dir(tmp_path / "run", {"mode": "cascade", "audio": "abc"})
    assert json.loads((tmp_path / "run" / "run.json").read_text())["audio"] == "abc"
    with pytest.raises(bench.Stop, match="other settings"):  # recorded now: other audio is refused
        bench.check_run_dir(tmp_path / "run", {"mode": "cascade", "audio": "xyz"})
