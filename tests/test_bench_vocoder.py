"""`bench/vocoder.py` end to end on a tiny unit->mel vocoder (real Whisper tiny.en ASR)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_vocoder_unit2mel import tiny_generator
from conftest import load_script

from echox.vocoder.io import save_generator, save_vocoder
from echox.vocoder.unit2mel import Unit2Mel, Unit2MelConfig
from echox.vocoder.unit_mel import UnitMelVocoder



def _script(name: str):
    """A `bench/` script as a module."""
    return load_script(f"bench/{name}.py", f"bench_{name}")


def _bench():
    return _script("vocoder")


@pytest.mark.slow
def test_bench_vocoder_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    u2m = Unit2Mel(Unit2MelConfig.tiny(hop_length=16)).eval()
    save_vocoder(UnitMelVocoder(u2m, tiny_generator(seed=0), hifigan="mine"), tmp_path / "voc")
    save_generator(tiny_generator(seed=1), tmp_path / "other")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2):
        sf.write(tmp_path / f"{i}.wav", (0.1 * rng.standard_normal(8000)).astype(np.float32), 16000)
        rows.append({"id": str(i), "text": "hello there", "audio": f"{i}.wav",  # 0.5 s = 25 units
                     "units": [int(u) for u in rng.integers(0, 20, 25)], "counts": [1] * 25})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "res.json"
    code = _bench().main(["--vocoder", str(tmp_path / "voc"), "--manifest", str(tmp_path / "m.jsonl"),
                          "--hifigan", str(tmp_path / "voc" / "hifigan"),
                          "--hifigan", str(tmp_path / "other"), "--copy-synthesis",
                          "--true-durations", "--stream", "0", "--stream", "8",
                          "--threads", "1", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "| original piper |" in table and table.count("| units -> ") == 2
    assert table.count("| original mel -> ") == 2
    assert table.count("| units + true durations -> ") == 2
    assert table.count("| units streamed, 0 context units -> ") == 2
    assert table.count("| units streamed, 8 context units -> ") == 2
    res = json.loads(out.read_text())
    assert res["n"] == 2 and len(res["variants"]) == 2
    for v in res["variants"].values():
        assert 0 <= v["wer_resynthesis"] and v["rtf_total"] > 0
        assert 0 < v["rtf_generator"] <= v["rtf_total"]
        assert "wer_copy_synthesis" in v
        for ctx in (0, 8):  # 25 units: chunks of 20 and 5; without context the crossfade shortens
            assert 0.5 < v[f"length_ratio_stream_{ctx}"] < 1.5 and len(v[f"hypotheses_stream_{ctx}"]) == 2
        for key in ("hypotheses", "hypotheses_copy_synthesis", "hypotheses_true_durations"):
            assert len(v[key]) == 2 and all(isinstance(h, str) for h in v[key])
    assert [r["id"] for r in res["records"]] == ["0", "1"]
    assert all(r["ref"] == "hello there" and isinstance(r["original"], str) for r in res["records"])


def _compare():
    return _script("compare_wer")


def test_compare_wer_pairs_clips_by_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refs = {"a": "one two three four", "b": "five six", "c": "seven eight nine ten"}

    def result(order, hyps):
        return {"records": [{"id": i, "ref": refs[i], "original": refs[i]} for i in order],
                "variants": {"own": {"hypotheses": [hyps[i] for i in order]}}}

    # run x: 1 error in a; run y (another clip order, one clip fewer): 1 error in a, 2 in c
    x = result(["a", "b", "c"], {"a": "one two three", "b": "five six", "c": refs["c"]})
    y = result(["c", "a"], {"a": "one two three", "c": "seven eight"})
    (tmp_path / "x.json").write_text(json.dumps(x))
    (tmp_path / "y.json").write_text(json.dumps(y))
    assert _compare().main([str(tmp_path / "x.json"), str(tmp_path / "y.json"), "--samples", "200"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 clips, 8 reference words")  # b is not in y
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert "| 0.125 | - | - |" in rows["x:own"]  # 1 edit / 8 words
    assert "| 0.375 | +0.250 |" in rows["y:own"]  # 3 / 8
    assert "| 0.000 | -0.125 |" in rows["original"]
    lo, hi = (float(v) for v in rows["y:own"].split("[")[1].split("]")[0].split(","))
    assert 0 <= lo <= 0.25 <= hi <= 0.5
    with pytest.raises(SystemExit, match="no per-record"):
        (tmp_path / "old.json").write_text(json.dumps({"variants": {}}))
        _compare().main([str(tmp_path / "old.json")])
    # files of another shape were a KeyError or an IndexError; one not JSON went unnamed
    for name, text, says in (
            ("noref", {"records": [{"id": "a"}], "variants": {}}, "not objects with an id and a ref"),
            ("short", {"records": [{"id": "a", "ref": "x y"}], "variants": {"v": {"hypotheses": []}}},
             "do not each hold a transcript per record"),
            ("text", "{not json", "not a readable JSON file")):
        (tmp_path / f"{name}.json").write_text(text if isinstance(text, str) else json.dumps(text))
        with pytest.raises(SystemExit, match=f"{name}.json: .*{says}"):
            _compare().main([str(tmp_path / f"{name}.json")])
    # --exclude drops a clip from every system: only a is left (x 1 edit, y 1 edit, 4 words)
    assert _compare().main([str(tmp_path / "x.json"), str(tmp_path / "y.json"), "--exclude", "c",
                            "--samples", "50"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1 clips, 4 reference words")
    assert "| 0.250 | +0.000 |" in [ln for ln in out.splitlines() if ln.startswith("| y:own")][0]
    with pytest.raises(SystemExit, match="no shared clip has the id 'b'"):  # b is not in y
        _compare().main([str(tmp_path / "x.json"), str(tmp_path / "y.json"), "--exclude", "b"])
    with pytest.raises(SystemExit, match="--exclude leaves none of the 2 shared clips"):
        _compare().main([str(tmp_path / "x.json"), str(tmp_path / "y.json"), "--exclude", "a",
                         "--exclude", "c"])


def test_compare_wer_reads_t2c_eval_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The T2C runs of bench/tiny_results.py (items.jsonl folders) pair up by id the same way."""
    def run(name, hyps):
        d = tmp_path / name / "echo-t2c"
        d.mkdir(parents=True)
        (d / "items.jsonl").write_text("".join(
            json.dumps({"id": i, "text": "one two three four", "transcript": h}) + "\n"
            for i, h in hyps.items()))
        return d

    a = run("ctl", {"p": "one two three", "q": "one two"})  # 1 + 2 edits
    b = run("ga", {"q": "one two three four", "p": "one two three four"})
    assert _compare().main([str(a), str(b / "items.jsonl"), "--samples", "100"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 clips, 8 reference words") and "original" not in out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert "| 0.375 | - | - |" in rows["ctl/echo-t2c"]
    assert "| 0.000 | -0.375 |" in rows["ga/echo-t2c"] and rows["ga/echo-t2c"].endswith("| 2 / 0 |")
    # --cap: a looping clip (12 errors on 4 words) counts as 4 errors, not 12
    c = run("loop", {"p": "one two three four " + "north sea " * 6, "q": "one two three four"})
    assert _compare().main([str(b), str(c), "--samples", "100"]) == 0
    assert "| 1.500 | +1.500 |" in capsys.readouterr().out  # 12 / 8
    assert _compare().main([str(b), str(c), "--samples", "100", "--cap"]) == 0
    out = capsys.readouterr().out
    assert "capped" in out and "| 0.500 | +0.500 | [+0.000, +1.000] | 0 / 1 |" in out  # 4 / 8
    # S2S runs whose text answers differ: each is scored against its own text
    def s2s(name, recs):
        d = tmp_path / name / "echo-s2s"
        d.mkdir(parents=True)
        (d / "items.jsonl").write_text("".join(
            json.dumps({"id": i, "text": t, "transcript": h}) + "\n" for i, (t, h) in recs.items()))
        return d

    old = s2s("v4", {"p": ("one two three four", "one two"), "q": ("five six", "five six")})  # 2 / 6
    new = s2s("v5", {"p": ("ten", "ten"), "q": ("five six seven", "five six")})  # 1 / 4
    assert _compare().main([str(old), str(new), "--samples", "100"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 clips; each system against its own text answers (they differ on 2; "
                          "6 reference words for v4/echo-s2s)")
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert "| 0.333 | - | - |" in rows["v4/echo-s2s"]
    assert "| 0.250 | -0.083 |" in rows["v5/echo-s2s"]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "items.jsonl").write_text('["a list"]\n')
    with pytest.raises(SystemExit, match="items.jsonl:1: not an item with id, text and transcript"):
        _compare().main([str(tmp_path / "bad")])


def test_bench_scripts_end_bad_input_with_one_line(tmp_path):
    """Run as scripts, the bench tools report an input error on one line with status 2."""
    import subprocess
    import sys as _sys

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([_sys.executable, str(root / "bench" / "compare_wer.py"),
                        str(tmp_path / "nope.json"), str(tmp_path / "x.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"compare_wer: error: {tmp_path / 'nope.json'}: no such file or folder"
    r = subprocess.run([_sys.executable, str(root / "bench" / "compare_wer.py"), "a", "b", "--samples", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--samples: must be >= 1" in r.stderr


def test_compare_wer_skips_a_torn_line_and_a_clip_without_words(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A run resumed after a kill keeps its torn line (`echox eval` skips it): compare_wer
    stopped there. A clip whose text has no words made every interval NaN."""
    def run(name: str, lines: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "items.jsonl").write_text(lines)
        return d

    rec = lambda i, text, hyp: json.dumps({"id": i, "text": text, "transcript": hyp}) + "\n"  # noqa: E731
    a = run("a", rec("p", "one two", "one two") + '{"id": "q", "te' + "\n" + rec("q", "three", "tree")
            + rec("e", "", "uh"))
    b = run("b", rec("p", "one two", "one") + rec("q", "three", "three") + rec("e", "", ""))
    assert _compare().main([str(a), str(b), "--samples", "200"]) == 0
    cap = capsys.readouterr()
    assert "a torn line, skipped" in cap.err and "1 clip(s) whose text has no words left out: e" in cap.err
    assert cap.out.startswith("2 clips, 3 reference words") and "nan" not in cap.out, cap.out
