"""`echox units` end to end through the CLI main, on wavs and manifests the test writes."""

from __future__ import annotations

import itertools
import shutil
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from echox.cli import main
from echox.units.extract import CACHE_META
from echox.units.language import UnitLanguage

SR = 16000
TINY = "whisper:builtin:tiny-random-whisper"  # 2 layers, d_model 32, a 3 s window


def _speechlike(seconds: float, seed: int) -> np.ndarray:
    """Tone segments of random pitch and loudness: features that vary with the signal."""
    rng = np.random.default_rng(seed)
    n, seg = int(SR * seconds), SR // 10
    t = np.arange(n) / SR
    f = np.repeat(rng.uniform(150, 3500, n // seg + 1), seg)[:n]
    a = np.repeat(rng.uniform(0.05, 0.5, n // seg + 1), seg)[:n]
    return (a * np.sin(2 * np.pi * f * t) + 0.02 * rng.standard_normal(n)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny-corpus layout: TTS ids X (answer) and X-q (question), dialogue id X."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "audio").mkdir()
    tts, dialogues = [], []
    for i in range(6):
        for kind, secs in (("a", 1.0 + 0.3 * i), ("q", 0.8 + 0.2 * i)):
            sf.write(root / "audio" / f"{kind}{i}.wav", _speechlike(secs, seed=10 * i + len(kind)), SR)
        tts.append({"id": f"x{i}", "text": f"Answer {i}.", "audio": f"audio/a{i}.wav"})
        tts.append({"id": f"x{i}-q", "text": f"Question {i}?", "audio": f"audio/q{i}.wav"})
        dialogues.append({"id": f"x{i}", "correct": i % 2 == 0, "conversations": [
            {"from": "user", "value": f"Question {i}?", "audio": f"audio/q{i}.wav"},
            {"from": "assistant", "value": f"Answer  {i}."}]})  # whitespace differs: still a match
    (root / "tts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tts))
    (root / "dialogues.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dialogues))
    return root


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_units_chain(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    km = out / "km.joblib"
    assert main(["units", "train-kmeans", "--manifest", str(corpus / "tts.jsonl"),
                 "--manifest", str(corpus / "dialogues.jsonl"), "--features", TINY, "--layer", "1",
                 "--k", "16", "--max-frames", "5000", "--out", str(km), "--quiet",
                 "--threads", "1"]) == 0
    # the dialogues' user audio is the TTS questions' audio: 12 distinct files, not 18
    assert "(12 audio files)" in capsys.readouterr().out
    meta = json.loads((out / "km.joblib.json").read_text())
    assert meta["features"] == TINY and meta["layer"] == 1 and meta["k"] == 16 and meta["dim"] == 32

    # extract: --features/--layer come from the k-means' side file
    units_path = out / "tts_units.jsonl"
    extract = ["units", "extract", "--manifest", str(corpus / "tts.jsonl"), "--kmeans", str(km),
               "--out", str(units_path), "--batch-size", "4", "--quiet"]
    assert main(extract) == 0
    assert "(0 from cache, 12 computed)" in capsys.readouterr().out
    rows = _read(units_path)
    assert [r["id"] for r in rows] == [r["id"] for r in _read(corpus / "tts.jsonl")]
    for r in rows:
        u = r["units"]
        assert u and all(0 <= x < 16 for x in u) and all(a != b for a, b in itertools.pairwise(u))
        assert (units_path.parent / r["audio"]).resolve().is_file()  # rebased onto the out folder
    assert len({tuple(r["units"]) for r in rows}) > 1
    # run lengths live in the cache: they add up to the 50 Hz frames of each utterance
    cache = out / "tts_units.cache"
    files = sorted(p for p in cache.rglob("*.json") if p.name != CACHE_META)
    assert len(files) == 12
    by_id = {d["id"]: d for d in (json.loads(p.read_text()) for p in files)}
    a0 = sf.info(str(corpus / "audio" / "a0.wav")).frames
    assert sum(by_id["x0"]["counts"]) == -(-a0 // 320) and by_id["x0"]["units"] == rows[0]["units"]

    # rerun: every utterance comes from the cache, nothing is rewritten
    mtimes = [p.stat().st_mtime_ns for p in files]
    assert main(extract) == 0
    assert "(12 from cache, 0 computed)" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    assert _read(units_path) == rows

    # attach: dialogue x<i> gets the units of TTS record x<i> (the answer), extra keys kept
    d_path = out / "d" / "dialogues_units.jsonl"
    assert main(["units", "attach", "--dialogues", str(corpus / "dialogues.jsonl"),
                 "--tts-units", str(units_path), "--out", str(d_path)]) == 0
    assert "6 assistant turns of 6 dialogues" in capsys.readouterr().out
    answers = {r["id"]: r["units"] for r in rows}
    for d in _read(d_path):
        user, asst = d["conversations"]
        assert asst["units"] == answers[d["id"]] and "units" not in user
        assert "correct" in d and (d_path.parent / user["audio"]).resolve().is_file()

    # train-language on 90 %, measured on the held-out 10 %
    lang_dir = out / "lang"
    assert main(["units", "train-language", "--manifest", str(units_path), "--kmeans", str(km),
                 "--vocab-size", "40", "--max-token-units", "4", "--out", str(lang_dir)]) == 0
    printed = capsys.readouterr().out
    assert "held-out 1 sequences" in printed and "units/token" in printed
    lang = UnitLanguage.load(lang_dir)
    assert lang.num_units == 16 and 16 < lang.vocab_size <= 40 and lang.max_token_units == 4
    info = json.loads((lang_dir / "train_stats.json").read_text())
    assert info["train_sequences"] == 11 and info["heldout"]["units_per_token"] >= 1.0
    for r in rows:
        assert lang.decode(lang.encode(r["units"])) == r["units"]

    # stats: a table row per size (plus the loaded language), a PNG and the JSON rows
    png, js = out / "stats.png", out / "stats.json"
    assert main(["units", "stats", "--manifest", str(units_path), "--kmeans", str(km),
                 "--vocab-sizes", "16,24,40", "--max-token-units", "4", "--language", str(lang_dir),
                 "--exclude-id-suffix=-q", "--heldout", "0.34", "--png", str(png), "--json", str(js),
                 "--save-dir", str(out / "langs")]) == 0
    printed = capsys.readouterr().out
    # each kept language has the train_stats.json train-language writes (docs/units.md: its
    # real vocab_size is what t2c.unit_vocab_size takes); --save-dir wrote none
    kept = json.loads((out / "langs" / "v24" / "train_stats.json").read_text())
    assert kept["asked_vocab_size"] == 24 and kept["vocab_size"] == UnitLanguage.load(out / "langs" / "v24").vocab_size
    assert kept["train_sequences"] == 4 and kept["heldout_sequences"] == 2
    assert "6 sequences: 4 to train, 2 held out" in printed  # questions (-q) excluded
    table = [ln for ln in printed.splitlines() if ln.startswith("| ") and "vocab size" not in ln]
    assert len(table) == 4 and "loaded" in table[0]
    assert png.is_file() and png.stat().st_size > 1000
    stats = json.loads(js.read_text())
    assert [s["asked_vocab_size"] for s in stats] == [None, 16, 24, 40]
    assert stats[1]["units_per_token"] == 1.0  # vocab == K: the identity language
    assert stats[3]["units_per_token"] >= stats[2]["units_per_token"] >= 1.0


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    return err


def test_bad_inputs_exit_2_with_one_line(corpus: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    km = tmp_path / "km.joblib"
    base = ["units", "train-kmeans", "--layer", "1", "--out", str(km), "--quiet"]
    tts = str(corpus / "tts.jsonl")

    assert main([*base, "--manifest", str(tmp_path / "nope.jsonl"), "--features", TINY]) == 2
    assert "nope.jsonl: manifest file not found" in _err(capsys)
    assert main([*base, "--manifest", tts, "--features", "wisper:builtin:tiny-random-whisper"]) == 2
    assert "expected whisper:<model> or hubert:<model>" in _err(capsys)
    assert main([*base, "--manifest", tts, "--features", "whisper:"]) == 2
    assert "expected whisper:<model>" in _err(capsys)
    # more clusters than the corpus has frames (12 short files, about 700 frames)
    assert main([*base, "--manifest", tts, "--features", TINY, "--k", "5000"]) == 2
    assert "need at least n_clusters=5000 frames" in _err(capsys)
    assert main([*base, "--manifest", tts, "--features", TINY, "--k", "50", "--max-frames", "10"]) == 2
    assert "--max-frames is 10" in _err(capsys)
    assert main([*base, "--manifest", tts, "--features", TINY, "--layer", "7"]) == 2
    assert "tiny-random-whisper has 2 layers (give 0..2)" in _err(capsys)
    with pytest.raises(SystemExit) as stop:  # argparse: the option named
        main([*base, "--manifest", tts, "--features", TINY, "--threads", "0"])
    assert stop.value.code == 2 and "argument --threads: must be >= 1" in capsys.readouterr().err
    assert not km.exists()

    assert main([*base, "--manifest", tts, "--features", TINY, "--k", "8"]) == 0
    capsys.readouterr()
    ext = ["units", "extract", "--kmeans", str(km), "--out", str(tmp_path / "u.jsonl"), "--quiet"]
    assert main([*ext, "--manifest", str(corpus / "dialogues.jsonl")]) == 2
    assert "echox units attach" in _err(capsys)
    assert main([*ext, "--manifest", tts, "--layer", "2"]) == 2
    assert "differs from 1" in _err(capsys)
    assert main([*ext, "--manifest", tts, "--device", "gpu9"]) == 2
    assert "--device 'gpu9': not a torch device" in _err(capsys)
    with pytest.raises(SystemExit) as exit_:  # refused while the options are parsed
        main([*ext, "--manifest", tts, "--threads", "0"])
    assert exit_.value.code == 2
    assert "argument --threads: must be >= 1, got 0" in capsys.readouterr().err
    assert main([*ext, "--manifest", tts, "--window-seconds", "99"]) == 2
    assert "window_seconds=99" in _err(capsys)
    w1 = ["--manifest", tts, "--cache", str(tmp_path / "w1")]
    assert main([*ext, *w1, "--window-seconds", "1", "--threads", "1"]) == 0
    assert "(0 from cache, 12 computed)" in capsys.readouterr().out
    assert main([*ext, *w1]) == 2  # the 30 s window never reads the 1 s window's units
    assert "holds units of another extractor" in _err(capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "z", "text": "hi", "audio": "missing.wav"}) + "\n")
    assert main([*ext, "--manifest", str(bad)]) == 2
    assert "missing.wav" in _err(capsys)

    # attach: a dialogue whose TTS record has no units / a different text
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps({"id": "x0", "text": "Answer 0.", "units": [1, 2, 3]}) + "\n")
    att = ["units", "attach", "--dialogues", str(corpus / "dialogues.jsonl"), "--tts-units", str(partial),
           "--out", str(tmp_path / "d.jsonl")]
    assert main(att) == 2
    assert "5 of 6 dialogues have no units" in _err(capsys)
    assert main([*att, "--on-missing", "drop"]) == 0
    capsys.readouterr()
    assert [d["id"] for d in _read(tmp_path / "d.jsonl")] == ["x0"]
    partial.write_text(json.dumps({"id": "x0", "text": "Something else.", "units": [1, 2]}) + "\n")
    assert main([*att, "--on-missing", "drop"]) == 2
    assert "differ in text" in _err(capsys)
    # no dialogue matched at all: an error, not an empty manifest (it wrote one, exit 0)
    partial.write_text(json.dumps({"id": "other", "text": "Answer 0.", "units": [1, 2]}) + "\n")
    for mode in ("drop", "keep", "error"):  # error: it offered --on-missing drop|keep, which fail too
        assert main([*att, "--on-missing", mode, "--out", str(tmp_path / "none.jsonl")]) == 2
        err = _err(capsys)
        assert "no dialogue of" in err and "--on-missing" not in err, err
        assert not (tmp_path / "none.jsonl").exists()

    # unit language: no units yet, and a vocabulary smaller than K
    assert main(["units", "train-language", "--manifest", tts, "--vocab-size", "10",
                 "--out", str(tmp_path / "l")]) == 2
    assert "no records with units" in _err(capsys)
    assert main(["units", "stats", "--manifest", str(partial), "--num-units", "8",
                 "--vocab-sizes", "4,16"]) == 2
    assert "4 is smaller than the 8 units" in _err(capsys)
    assert main(["units", "stats", "--manifest", str(partial), "--num-units", "2",
                 "--vocab-sizes", "8"]) == 2
    assert "holds unit 2, but --num-units gives only 2 units (0..1)" in _err(capsys)  # no k-means
    assert main(["units", "stats", "--manifest", str(partial), "--num-units", "8",
                 "--vocab-sizes", "8,x"]) == 2
    assert "comma-separated integers" in _err(capsys)


def test_read_manifest_keeps_fields_and_odd_line_breaks(tmp_path: Path) -> None:
    from echox.units.cli import read_manifest

    p = tmp_path / "m.jsonl"
    recs = [{"id": "a", "text": "one\u2028two", "audio": "x.wav", "extra": 1},
            {"text": "no id", "audio": "y.wav"}]
    # json.dumps(ensure_ascii=False) writes U+2028 as is; it must not split the record
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n\n", encoding="utf-8")
    m = read_manifest(p)
    assert m.kind == "tts" and m.raw == recs and m.lines == [1, 2]
    assert [m.key(0), m.key(1)] == ["a", "m.jsonl:2"]


def test_a_dialogue_in_another_layout_is_named_as_such(tmp_path: Path) -> None:
    """A dialogue of "messages" was read as a TTS record and refused for a missing 'text'."""
    from echox.errors import ManifestError
    from echox.units.cli import read_manifest

    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"id": "d1", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ManifestError, match=r"d.jsonl:1: the first record is neither a TTS record "
                       r".* nor a dialogue \('conversations'.*its keys: 'id', 'messages'$"):
        read_manifest(p)
    p.write_text(json.dumps({"id": "t1", "audio": "x.wav"}) + "\n")  # a TTS record, still
    with pytest.raises(ManifestError, match="missing required key 'text'"):
        read_manifest(p)


def test_outputs_are_checked_first_and_inputs_never_replaced(
        corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    tts = tmp_path / "tts.jsonl"  # a copy beside its audio, so the corpus stays as it was
    tts.write_text((corpus / "tts.jsonl").read_text().replace("audio/", str(corpus / "audio") + "/"))
    before = tts.read_bytes()
    km = tmp_path / "km.joblib"
    kmeans = ["units", "train-kmeans", "--manifest", str(tts), "--features", TINY, "--layer", "1",
              "--k", "8", "--quiet"]
    assert main([*kmeans, "--out", str(tts)]) == 2  # would overwrite its own manifest
    assert "is the input" in _err(capsys)
    with pytest.raises(SystemExit):
        main([*kmeans, "--out", str(km), "--seed", "-1"])
    assert "--seed: must be >= 0" in capsys.readouterr().err
    assert main([*kmeans, "--out", str(km)]) == 0
    capsys.readouterr()

    ext = ["units", "extract", "--manifest", str(tts), "--kmeans", str(km), "--quiet"]
    (tmp_path / "folder").mkdir()
    assert main([*ext, "--out", str(tmp_path / "folder")]) == 2
    assert "is a folder" in _err(capsys)
    assert main([*ext, "--out", str(tts)]) == 2
    assert "is the input" in _err(capsys)
    assert main([*ext, "--out", str(tmp_path / "u.jsonl"), "--cache", str(tts)]) == 2
    assert "--cache" in _err(capsys) and tts.read_bytes() == before
    assert main([*ext, "--out", str(tmp_path / "u.jsonl"), "--cache", str(corpus)]) == 2
    assert "holds other files" in _err(capsys)
    for w in ("nan", "inf"):
        assert main([*ext, "--out", str(tmp_path / "u.jsonl"), "--window-seconds", w]) == 2
        assert "--window-seconds must be" in _err(capsys)
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    assert main([*ext[:3], str(deep), *ext[4:], "--out", str(tmp_path / "u.jsonl")]) == 2
    assert "nested too deeply" in _err(capsys)
    assert tts.read_bytes() == before and not (tmp_path / "u.jsonl").exists()

    # the k-means' side file: not an object, or another k-means' (a stale pairing)
    meta = tmp_path / "km.joblib.json"
    good = meta.read_text()
    meta.write_text("[1, 2]\n")
    assert main([*ext, "--out", str(tmp_path / "u.jsonl")]) == 2
    assert "not a k-means side file" in _err(capsys)
    meta.write_text(good.replace('"k": 8', '"k": 16'))
    assert main([*ext, "--out", str(tmp_path / "u.jsonl")]) == 2
    assert "belongs to another k-means" in _err(capsys)
    meta.write_text(good)
    # a retrain killed while saving never leaves the new k-means beside the old side file
    from echox.units.kmeans import UnitKMeans

    def killed(self: UnitKMeans, path: str) -> None:
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(UnitKMeans, "save", killed)
        assert main([*kmeans, "--out", str(km), "--layer", "0"]) == 130
    capsys.readouterr()
    assert not meta.exists()
    assert main([*kmeans, "--out", str(km)]) == 0
    capsys.readouterr()

    # nor the k-means it reads, or its side file (extract replaced the k-means with units)
    km_bytes, meta_bytes = km.read_bytes(), meta.read_bytes()
    for over in (km, meta):
        assert main([*ext, "--out", str(over)]) == 2
        assert "is the input" in _err(capsys)
    assert km.read_bytes() == km_bytes and meta.read_bytes() == meta_bytes

    units = tmp_path / "units.jsonl"
    assert main([*ext, "--out", str(units)]) == 0
    capsys.readouterr()
    units_bytes = units.read_bytes()
    att = ["units", "attach", "--dialogues", str(corpus / "dialogues.jsonl"), "--tts-units", str(units)]
    assert main([*att, "--out", str(units)]) == 2
    assert "is the input" in _err(capsys) and units.read_bytes() == units_bytes

    # unit-language folders: never one of other files; replaced whole, so a killed save
    # leaves the old language
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_text("{}")
    lang = ["units", "train-language", "--manifest", str(units), "--kmeans", str(km), "--vocab-size", "12"]
    assert main([*lang, "--out", str(model)]) == 2
    assert "holds other files" in _err(capsys) and (model / "tokenizer.json").read_text() == "{}"
    with pytest.raises(SystemExit):
        main([*lang, "--out", str(tmp_path / "l"), "--seed", "-3"])
    capsys.readouterr()
    assert main([*lang, "--out", str(tmp_path / "l")]) == 0
    capsys.readouterr()
    old = {p.name: p.read_bytes() for p in (tmp_path / "l").iterdir()}

    def half(self: UnitLanguage, directory: str) -> None:
        (Path(directory) / "tokenizer.json").write_text("{}")
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(UnitLanguage, "save", half)
        assert main([*lang[:-1], "16", "--out", str(tmp_path / "l")]) == 130
    capsys.readouterr()
    assert {p.name: p.read_bytes() for p in (tmp_path / "l").iterdir()} == old

    stats = ["units", "stats", "--manifest", str(units), "--kmeans", str(km), "--vocab-sizes", "8,12"]
    assert main([*stats, "--json", str(units)]) == 2
    assert "is the input" in _err(capsys) and units.read_bytes() == units_bytes
    assert main([*stats, "--json", str(km)]) == 2
    assert "is the input" in _err(capsys) and km.read_bytes() == km_bytes
    assert main([*stats, "--json", str(tmp_path / "folder")]) == 2
    assert "is a folder" in _err(capsys)
    assert main([*stats, "--png", str(tmp_path / "plot.xyz")]) == 2
    assert "ending in .png" in _err(capsys)
    assert main([*stats, "--save-dir", str(tts)]) == 2
    assert "is a file" in _err(capsys)
    assert main([*stats, "--png", str(tmp_path / "plot.pgf")]) == 2  # it runs LaTeX
    assert "ending in .png" in _err(capsys)
    small = tmp_path / "k4"
    UnitLanguage.identity(4).save(small)
    assert main([*stats, "--language", str(small)]) == 2
    assert "has K=4 units" in _err(capsys)
    # nor the files of a language it loads (--json over its tokenizer broke the language)
    lang_bytes = {p.name: p.read_bytes() for p in (tmp_path / "l").iterdir()}
    assert main([*stats, "--language", str(tmp_path / "l"), "--json",
                 str(tmp_path / "l" / "tokenizer.json")]) == 2
    assert "is the input" in _err(capsys)
    assert {p.name: p.read_bytes() for p in (tmp_path / "l").iterdir()} == lang_bytes
    # ... nor of a language it does not read (the stats rows replaced its tokenizer, exit 0),
    # nor where --save-dir writes one
    assert main([*stats, "--json", str(tmp_path / "l" / "tokenizer.json")]) == 2
    assert "lies inside the unit language" in _err(capsys)
    assert {p.name: p.read_bytes() for p in (tmp_path / "l").iterdir()} == lang_bytes
    assert main([*stats, "--save-dir", str(tmp_path / "sd"), "--json", str(tmp_path / "sd" / "v8" / "s.json")]) == 2
    assert "where --save-dir writes a language" in _err(capsys)
    inf = tmp_path / "inf"  # a size of Infinity was an OverflowError traceback
    shutil.copytree(tmp_path / "l", inf)
    meta_file = inf / "unit_language.json"
    meta_file.write_text(re.sub(r'"num_units": \d+', '"num_units": Infinity', meta_file.read_text()))
    assert main([*stats, "--language", str(inf)]) == 2
    assert "corrupt unit-language metadata" in _err(capsys)
    # extract: --out never over a recording it reads, nor where its own cache goes
    wav = corpus / "audio" / "a0.wav"
    wav_bytes = wav.read_bytes()
    assert main([*ext, "--out", str(wav)]) == 2
    assert "is the audio of a manifest record" in _err(capsys) and wav.read_bytes() == wav_bytes
    assert main([*ext, "--out", str(tmp_path / "y.cache")]) == 2  # the default cache is y.cache
    assert "cache folder" in _err(capsys) and not (tmp_path / "y.cache").exists()
    assert tts.read_bytes() == before and units.read_bytes() == units_bytes


def test_extract_summary_counts_add_up_to_the_records(
        corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A dropped row was counted as computed, and a stale cache entry (audio spoken anew,
    recomputed) as read from the cache: cached + computed + dropped must be the records."""
    root = tmp_path / "c"
    shutil.copytree(corpus, root)
    rows = _read(root / "tts.jsonl") + [{"id": "gone", "text": "Gone.", "audio": "audio/gone.wav"}]
    (root / "tts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    km = tmp_path / "km.joblib"
    assert main(["units", "train-kmeans", "--manifest", str(corpus / "tts.jsonl"), "--features", TINY,
                 "--layer", "1", "--k", "8", "--out", str(km), "--quiet"]) == 0
    ext = ["units", "extract", "--manifest", str(root / "tts.jsonl"), "--kmeans", str(km),
           "--out", str(tmp_path / "u.jsonl"), "--skip-bad-audio", "--quiet"]
    capsys.readouterr()
    with pytest.warns(UserWarning, match="skipping 'gone'"):
        assert main(ext) == 0
    assert "units for 12 of 13 records (0 from cache, 12 computed, 1 dropped)" in capsys.readouterr().out
    sf.write(root / "audio" / "a0.wav", _speechlike(1.1, seed=99), SR)
    with pytest.warns(UserWarning, match="skipping 'gone'"):
        assert main(ext) == 0
    assert "units for 12 of 13 records (11 from cache, 1 computed, 1 dropped)" in capsys.readouterr().out
    assert len(_read(tmp_path / "u.jsonl")) == 12


def test_attach_refuses_an_id_repeated_with_other_units(
        corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The last of two records with one id silently won; now they must be the same record."""
    tts = tmp_path / "tts_units.jsonl"
    recs = [{"id": f"x{i}", "text": f"Answer {i}.", "units": [i, i + 1]} for i in range(6)]
    att = ["units", "attach", "--dialogues", str(corpus / "dialogues.jsonl"), "--tts-units", str(tts),
           "--out", str(tmp_path / "d.jsonl")]
    for dup, says in (({"id": "x2", "text": "Answer 2.", "units": [7]}, "different units"),
                      ({"id": "x2", "text": "Answer two.", "units": [2, 3]}, "different text")):
        tts.write_text("".join(json.dumps(r) + "\n" for r in [*recs, dup]))
        assert main(att) == 2
        err = _err(capsys)
        assert f"id 'x2' is on lines 3 and 7 with {says}" in err and str(tts) in err, err
        assert not (tmp_path / "d.jsonl").exists()
    same = {"id": "x2", "text": "Answer  2.", "units": [2, 3]}  # the same record again: harmless
    tts.write_text("".join(json.dumps(r) + "\n" for r in [*recs, same]))
    assert main(att) == 0
    assert "6 assistant turns of 6 dialogues" in capsys.readouterr().out
    got = {d["id"]: d["conversations"][1]["units"] for d in _read(tmp_path / "d.jsonl")}
    assert got == {r["id"]: r["units"] for r in recs}


def test_the_window_bench_runs_on_a_kmeans_and_its_side_file(corpus: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """bench/units_window.py failed on every run (TypeError: _extractor_spec() missing 'km'),
    and no test ran it."""
    from conftest import load_script

    km = tmp_path / "km.joblib"
    assert main(["units", "train-kmeans", "--manifest", str(corpus / "tts.jsonl"), "--features", TINY,
                 "--layer", "1", "--k", "8", "--out", str(km), "--quiet"]) == 0
    capsys.readouterr()
    bench = load_script("bench/units_window.py", "bench_units_window")
    assert bench.main(["--manifest", str(corpus / "tts.jsonl"), "--kmeans", str(km), "--n", "2",
                       "--windows", "30,2", "--threads", "1"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "window" not in ln]
    assert [r.split(" | ")[0] for r in rows] == ["| 30 s", "| 2 s"]
    assert rows[0].endswith("| 1.000 | 1.000 |")  # the reference against itself


def test_kmeans_never_replaces_a_recording_and_stats_checks_a_languages_k(
        corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`train-kmeans --out audio/a0.wav` wrote the k-means over that recording (exit 0); `stats
    --language` measured a language of K=500 on a K=8 k-means' units."""
    import shutil

    shutil.copytree(corpus / "audio", tmp_path / "audio")
    (tmp_path / "tts.jsonl").write_text((corpus / "tts.jsonl").read_text())
    rec = tmp_path / "audio" / "a0.wav"
    before = rec.read_bytes()
    assert main(["units", "train-kmeans", "--manifest", str(tmp_path / "tts.jsonl"), "--features",
                 TINY, "--layer", "1", "--k", "8", "--quiet", "--out", str(rec)]) == 2
    assert "is the audio of a manifest record" in _err(capsys)
    assert rec.read_bytes() == before and not (tmp_path / "audio" / "a0.wav.json").exists()
    rows = [{"id": f"u{i}", "text": "x", "units": [(i + j) % 8 for j in range(12)]} for i in range(20)]
    (tmp_path / "units.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lang = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "t2c-warm" / "unit_language"
    assert main(["units", "stats", "--manifest", str(tmp_path / "units.jsonl"), "--num-units", "8",
                 "--language", str(lang)]) == 2
    assert "has K=500 units, but --num-units gives 8" in _err(capsys)
