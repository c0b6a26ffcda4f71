"""Manifests and datasets: schemas, bad-line handling, data.json, HF loaders, stage collators."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from echox.audio import save_audio
from echox.data.datasets import (
    S2TDataset,
    S2TExample,
    T2CDataset,
    collate_t2c_examples,
    make_s2t_collator,
)
from echox.data.hf import load_hf_asr, load_hf_dialogues
from echox.data.manifest import (
    AsrRecord,
    DialogueMessage,
    DialogueRecord,
    TtsRecord,
    iter_jsonl,
    read_dialogues_json,
    read_jsonl,
    validate_manifest,
    write_jsonl,
)
from echox.errors import ManifestError
from echox.model.batch import S2TBatch, T2CBatch
from echox.model.prompt import IGNORE, Turn


def _wav(path: Path, seconds: float, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return save_audio(path, (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)


@pytest.fixture(scope="module")
def tok():
    from echox.hub import resolve
    from echox.model.llm import load_tokenizer

    return load_tokenizer(resolve("builtin:tiny-random-llama"), "<audio_patch>")


# ---------------------------------------------------------------- schemas


@pytest.mark.parametrize("rec", [
    AsrRecord(audio="a/b.wav", text="hello world", id="u1", duration=1.5),
    AsrRecord(audio="/abs/c.flac", text="hi"),
    TtsRecord(text="Say this.", audio="t.wav", units=[3, 1, 4, 1, 5], id="t1"),
    TtsRecord(text="Only text."),
    DialogueRecord(id="d1", conversations=[
        DialogueMessage("user", "what is two plus two", audio="q.wav", wer=0.05),
        DialogueMessage("assistant", "Four.", units=[7, 8, 9]),
        DialogueMessage("user", "thanks"),
        DialogueMessage("assistant", "You are welcome.", audio="r.wav", transcript="you're welcome"),
    ]),
])
def test_schema_round_trip(rec, tmp_path):
    cls = type(rec)
    assert cls.from_json(json.loads(json.dumps(rec.to_json())), "x") == rec
    path = write_jsonl(tmp_path / "m.jsonl", [rec, rec])
    rep = read_jsonl(path, cls)
    assert rep.records == [rec, rec] and rep.lines == [1, 2] and not rep.bad_lines
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file


def test_sharegpt_roles_are_mapped():
    rec = DialogueRecord.from_json({"conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
        {"role": "user", "content": "and you?"}, {"from": "Assistant", "value": "fine"}]}, "x")
    assert [m.role for m in rec.conversations] == ["user", "assistant", "user", "assistant"]
    assert rec.conversations[2].value == "and you?"
    assert rec.to_json()["conversations"][0] == {"from": "user", "value": "hi"}


# ---------------------------------------------------------------- bad lines

_GOOD = {"audio": "a.wav", "text": "fine"}
_LINES = [
    json.dumps(_GOOD),
    "",  # blank: ignored
    '{"audio": "b.wav", "text": ',  # line 3: malformed JSON
    json.dumps({"audio": "c.wav"}),  # line 4: missing text
    json.dumps({"audio": "d.wav", "text": 42}),  # line 5: wrong type
    "   ",
    json.dumps({**_GOOD, "id": "last", "duration": 2}),  # line 7
    json.dumps([1, 2]),  # line 8: not an object
]


def test_bad_lines_stop_names_file_and_line(tmp_path):
    p = tmp_path / "asr.jsonl"
    p.write_text("\n".join(_LINES) + "\n")
    with pytest.raises(ManifestError, match=r"asr\.jsonl:3: malformed JSON"):
        read_jsonl(p, AsrRecord)
    p.write_text("\n".join(_LINES[:2] + _LINES[3:]) + "\n")  # drop the malformed one
    with pytest.raises(ManifestError, match=r"asr\.jsonl:3: missing required key 'text'"):
        read_jsonl(p, "asr")
    with pytest.raises(ManifestError, match="not found"):
        read_jsonl(tmp_path / "nope.jsonl", AsrRecord)


def test_bad_lines_skip_keeps_going_and_reports(tmp_path, caplog):
    p = tmp_path / "asr.jsonl"
    p.write_text("\n".join(_LINES) + "\n")
    with caplog.at_level(logging.WARNING, logger="echox.data.manifest"):
        rep = read_jsonl(p, AsrRecord, on_error="skip")
    assert [r.text for r in rep] == ["fine", "fine"] and rep.lines == [1, 7]
    assert rep.records[1].id == "last" and rep.records[1].duration == 2.0
    assert [n for n, _ in rep.bad_lines] == [3, 4, 5, 8]
    reasons = dict(rep.bad_lines)
    assert "malformed JSON" in reasons[3] and "'text'" in reasons[4]
    assert "must be a string" in reasons[5] and "JSON object" in reasons[8]
    assert f"{p}:5:" in caplog.text  # one warning per bad line, file:line
    # a binary file given as a manifest: the first few lines named, then one count (it
    # printed a warning per line, hundreds before the error)
    caplog.clear()
    junk = tmp_path / "junk.jsonl"
    junk.write_bytes(b"\x00\xff garbage\n" * 300)
    with caplog.at_level(logging.WARNING, logger="echox.data.manifest"):
        assert len(read_jsonl(junk, AsrRecord, on_error="skip").bad_lines) == 300
        assert list(iter_jsonl(junk, AsrRecord, on_error="skip")) == []
    lines = caplog.text.splitlines()
    assert len(lines) == 2 * (5 + 2), lines
    assert "300 bad line(s) skipped" in lines[6] and "300 bad line(s) skipped" in lines[-1]


def test_bad_dialogue_role_and_units(tmp_path):
    lines = [
        {"id": "ok", "conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]},
        {"id": "role", "conversations": [{"from": "system", "value": "x"}]},
        {"id": "units", "conversations": [{"from": "assistant", "value": "a", "units": [1, -2]}]},
        {"id": "empty", "conversations": []},
    ]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(o) + "\n" for o in lines))
    with pytest.raises(ManifestError, match=r"d\.jsonl:2: conversations\[0\]: unknown role"):
        read_jsonl(p, DialogueRecord)
    rep = read_jsonl(p, DialogueRecord, on_error="skip")
    assert [r.id for r in rep] == ["ok"] and [n for n, _ in rep.bad_lines] == [2, 3, 4]


def test_a_unit_id_beyond_int64_is_a_bad_line(tmp_path):
    """`units: [1e30 as an integer]` was read, and Stage II training stopped with an
    OverflowError traceback when it made the batch's tensor."""
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"id": "a", "text": "hi", "units": [2**63, 2]}) + "\n"
                 + json.dumps({"id": "b", "text": "hi", "units": [2**63 - 1, 2]}) + "\n")
    rep = read_jsonl(p, "tts", on_error="skip")
    assert [r.id for r in rep] == ["b"] and [n for n, _ in rep.bad_lines] == [1]


# ---------------------------------------------------------------- data.json and validation


def _shard(tmp_path: Path) -> Path:
    """An extracted EchoX-Dialogues shard: data.json plus the wavs it names."""
    shard = tmp_path / "shard0"
    _wav(shard / "wav" / "q0.wav", 0.6, 1)
    _wav(shard / "wav" / "q1.wav", 1.1, 2)
    _wav(shard / "wav" / "r0.wav", 0.4, 3)
    items = [
        {"conversations": [
            {"from": "user", "value": "what is the capital of france", "audio": "wav/q0.wav", "wer": 0.0},
            {"from": "assistant", "value": "Paris is the capital.", "audio": "wav/r0.wav"}]},
        {"conversations": [
            {"from": "user", "value": "name a color", "audio": "wav/q1.wav", "wer": 0.4},
            {"from": "assistant", "value": "Blue.", "units": [5, 6, 7, 8]},
            {"from": "user", "value": "another one"},
            {"from": "assistant", "value": "Green.", "units": [9, 10]}]},
    ]
    (shard / "data.json").write_text(json.dumps(items))
    return shard


def test_read_dialogues_json_and_turns(tmp_path):
    shard = _shard(tmp_path)
    rep = read_dialogues_json(shard)  # the folder or its data.json
    assert len(rep) == 2 and rep.base_dir == shard
    turns = rep.records[0].to_turns(rep.base_dir)
    assert turns[0].role == "user" and turns[0].text is None
    assert turns[0].transcript == "what is the capital of france"
    assert turns[0].audio.dtype == np.float32 and turns[0].audio.shape == (9600,)
    assert turns[1].role == "assistant" and turns[1].text == "Paris is the capital."
    assert turns[1].audio is None  # the spoken response is not an input
    assert rep.records[0].response_units is None
    assert rep.records[1].response_units == [[5, 6, 7, 8], [9, 10]]
    t2 = rep.records[1].to_turns(shard)
    assert t2[2].text == "another one" and t2[2].audio is None

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"conversations": [{"from": "robot", "value": "x"}]}]))
    with pytest.raises(ManifestError, match=r"bad\.json: item 1: .*unknown role"):
        read_dialogues_json(bad)
    bad.write_text(json.dumps({"conversations": []}))
    with pytest.raises(ManifestError, match="expected a JSON list"):
        read_dialogues_json(bad)


def test_validate_manifest_checks_audio(tmp_path):
    _wav(tmp_path / "a.wav", 1.0)
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really audio")
    lines = [{"audio": "a.wav", "text": "ok", "duration": 1.0},
             {"audio": "missing.wav", "text": "gone"},
             {"audio": "broken.wav", "text": "bad"},
             {"audio": str(tmp_path / "a.wav"), "text": "long", "duration": 3.0}]
    p = tmp_path / "asr.jsonl"
    p.write_text("".join(json.dumps(o) + "\n" for o in lines) + "{oops\n")
    rep = validate_manifest(p, "asr", check_audio=True, max_audio_seconds=0.5)
    assert rep.n_records == 4 and [n for n, _ in rep.bad_lines] == [5] and not rep.ok
    by_line: dict[int, list[str]] = {}
    for n, why in rep.audio_issues:
        by_line.setdefault(n, []).append(why)
    assert "not found" in by_line[2][0] and "not a readable audio file" in by_line[3][0]
    assert any("over the 0.5 s limit" in w for w in by_line[1])
    assert any("manifest says 3.00 s" in w for w in by_line[4])
    assert rep.n_audio == 2 and rep.audio_seconds == pytest.approx(2.0)
    assert "4 record(s), 1 bad line(s)" in rep.summary()
    quick = validate_manifest(p, AsrRecord, check_audio=False)
    assert quick.audio_issues == [] and quick.n_audio == 0
    ok = validate_manifest(_shard(tmp_path) / "data.json", "dialogue")
    assert ok.ok and ok.n_audio == 2  # the user audio only
    # a repeated id passed, then `units extract` refused the manifest ("duplicate utterance id")
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps({"id": i, "audio": "a.wav", "text": "t"}) + "\n"
                           for i in ("x", "y", "x")))
    rep = validate_manifest(dup, "tts", check_audio=False)
    assert not rep.ok and rep.bad_lines == [(3, "id 'x' again (first on line 1)")]


def test_validate_flags_a_truncated_wav_and_refuses_a_bad_limit(tmp_path, capsys):
    from echox.cli import main

    data = _wav(tmp_path / "a.wav", 1.0).read_bytes()
    (tmp_path / "a.wav").write_bytes(data[:len(data) // 2])
    p = tmp_path / "asr.jsonl"
    p.write_text(json.dumps({"audio": "a.wav", "text": "cut"}) + "\n")
    rep = validate_manifest(p, "asr", check_audio=True)
    assert [n for n, _ in rep.audio_issues] == [1] and "truncated WAV" in rep.audio_issues[0][1]
    assert main(["data", "validate", str(p), "--schema", "asr", "--max-seconds", "-1"]) == 2
    assert "--max-seconds must be" in capsys.readouterr().err


def test_validate_cli_reports_each_bad_line_once(tmp_path, capsys, caplog):
    from echox.cli import main

    p = tmp_path / "asr.jsonl"
    p.write_text('{"audio": "a.wav"}\n{oops\n')
    assert main(["data", "validate", str(p), "--schema", "asr", "--no-audio"]) == 1
    out, err = capsys.readouterr()
    printed = out + err + caplog.text
    assert printed.count(":1:") + printed.count("line 1") == 1, printed
    assert printed.count(":2:") + printed.count("line 2") == 1, printed


def test_validate_names_the_schema_a_manifest_of_another_kind_fits(tmp_path, capsys):
    """A TTS manifest checked as dialogues (the default) listed "missing required key
    'conversations'" on every line and nothing else."""
    from echox.cli import main

    p = tmp_path / "tts.jsonl"
    p.write_text('{"id": "a", "text": "hi", "units": [1, 2]}\n{"id": "b", "text": "yo", "units": [3]}\n')
    assert main(["data", "validate", str(p), "--no-audio"]) == 1
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "  no usable records: its lines fit --schema tts", out
    assert main(["data", "validate", str(p), "--schema", "tts", "--no-audio"]) == 0
    q = tmp_path / "junk.jsonl"  # fits no schema: no hint
    q.write_text('{"foo": 1}\n')
    assert main(["data", "validate", str(q), "--no-audio"]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == "  no usable records"


# ---------------------------------------------------------------- HF datasets


def _hf_asr(tmp_path: Path):
    import datasets

    blobs = [_wav(tmp_path / f"src{i}.wav", 0.3 + 0.2 * i, i).read_bytes() for i in range(3)]
    ds = datasets.Dataset.from_dict({
        "audio": [{"bytes": b, "path": f"utt{i}.wav"} for i, b in enumerate(blobs)],
        "sentence": ["one", "two", "three"], "id": ["a", "b", "c"],
    }).cast_column("audio", datasets.Audio(sampling_rate=16000))
    return ds


def test_hf_asr_save_to_disk_and_parquet(tmp_path):
    import datasets

    ds = _hf_asr(tmp_path)
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "disk"))
    recs = list(load_hf_asr(tmp_path / "disk", "train"))
    assert [(r.id, r.text) for r in recs] == [("a", "one"), ("b", "two"), ("c", "three")]
    assert all(isinstance(r.audio, bytes) for r in recs)  # embedded audio, kept in memory
    turns = DialogueRecord([DialogueMessage("user", recs[2].text, audio=recs[2].audio),
                            DialogueMessage("assistant", "ok")]).to_turns(None)
    assert turns[0].audio.shape == (int(16000 * 0.7),)
    assert len(list(load_hf_asr(tmp_path / "disk", "test"))) == 1
    with pytest.raises(ManifestError, match="no split 'dev'"):
        load_hf_asr(tmp_path / "disk", "dev")

    (tmp_path / "pq" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    out = tmp_path / "written"
    recs_pq = list(load_hf_asr(tmp_path / "pq", "train", audio_dir=out))
    assert [r.text for r in recs_pq] == ["one", "two", "three"]
    assert all(Path(r.audio).is_file() and Path(r.audio).parent == out for r in recs_pq)
    man = write_jsonl(tmp_path / "asr.jsonl", recs_pq)  # paths, so it can be a manifest now
    assert validate_manifest(man, "asr").ok
    with pytest.raises(ManifestError, match="held in memory as bytes"):
        write_jsonl(tmp_path / "x.jsonl", recs)
    with pytest.raises(ManifestError, match="no text column 'nope'"):
        load_hf_asr(tmp_path / "pq", "train", text_column="nope")
    # its only shards are train's: split test gave the training rows as the eval set, exit 0
    with pytest.raises(ManifestError, match=r"no parquet shards for split 'test'; found \['train'\]"):
        load_hf_asr(tmp_path / "pq", "test")
    (tmp_path / "plain" / "chunks").mkdir(parents=True)  # shards named after no split: one split
    ds.to_parquet(str(tmp_path / "plain" / "chunks" / "0000.parquet"))
    assert len(list(load_hf_asr(tmp_path / "plain", "test", audio_dir=out))) == 3
    # LibriSpeech's split names hold dots: train.clean.100 could not be chosen, and split
    # train merged train.clean.100 and train.clean.360 without a word
    (tmp_path / "ls" / "data").mkdir(parents=True)
    for split, rows in (("train.clean.100", [0, 1]), ("train.clean.360", [2]), ("test.clean", [0])):
        ds.select(rows).to_parquet(str(tmp_path / "ls" / "data" / f"{split}-00000-of-00001.parquet"))
    assert [r.text for r in load_hf_asr(tmp_path / "ls", "train.clean.100", audio_dir=out)] == ["one", "two"]
    with pytest.raises(ManifestError, match=r"no parquet shards for split 'train'; found "
                                            r"\['test.clean', 'train.clean.100', 'train.clean.360'\]"):
        load_hf_asr(tmp_path / "ls", "train")
    (tmp_path / "ls1" / "data").mkdir(parents=True)  # its only split: not read as another
    ds.to_parquet(str(tmp_path / "ls1" / "data" / "train.clean.100-00000-of-00001.parquet"))
    with pytest.raises(ManifestError, match=r"no parquet shards for split 'test'"):
        load_hf_asr(tmp_path / "ls1", "test")


def test_hf_dialogues_nested_audio(tmp_path):
    import datasets

    blob = _wav(tmp_path / "q.wav", 0.5).read_bytes()
    rows = {"id": ["d0", "d1"], "conversations": [
        [{"from": "human", "value": "hello there", "audio": {"bytes": blob, "path": "q.wav"}},
         {"from": "gpt", "value": "Hi!", "audio": None}],
        [{"from": "user", "value": "typed question", "audio": None},
         {"from": "assistant", "value": "Typed answer.", "audio": None}]]}
    feats = datasets.Features({"id": datasets.Value("string"), "conversations": [{
        "from": datasets.Value("string"), "value": datasets.Value("string"),
        "audio": datasets.Audio()}]})
    ds = datasets.Dataset.from_dict(rows).cast(feats)
    ds.save_to_disk(str(tmp_path / "dlg"))
    ds.to_parquet(str(tmp_path / "dlg.parquet"))
    for src in (tmp_path / "dlg", tmp_path / "dlg.parquet"):
        recs = list(load_hf_dialogues(src, "train"))
        assert [r.id for r in recs] == ["d0", "d1"]
        assert [m.role for m in recs[0].conversations] == ["user", "assistant"]
        turns = recs[0].to_turns(None)
        assert turns[0].transcript == "hello there" and turns[0].audio.shape == (8000,)
        assert recs[1].to_turns(None)[0].text == "typed question"


def test_hf_missing_source_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="save_to_disk folder or parquet"):
        load_hf_asr(tmp_path / "empty")
    with pytest.raises(ManifestError, match="cannot load dataset 'nobody/no-such-set'"):
        load_hf_dialogues("nobody/no-such-set", "train")  # offline: fails fast, says what to do



@pytest.mark.parametrize("fname,text", [("dataset_dict.json", "[1, 2]"), ("dataset_dict.json", "{}"),
                                        ("dataset_dict.json", '{"splits": 5}'),
                                        ("state.json", "[]"), ("dataset_info.json", "[]")])
def test_hf_damaged_save_to_disk_json_is_a_one_line_manifest_error(tmp_path, fname, text):
    import datasets

    ds = datasets.Dataset.from_dict({"audio": ["a.wav"], "text": ["hi"]})
    if fname == "dataset_dict.json":
        datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "d"))
        (tmp_path / "d" / fname).write_text(text)
    else:
        ds.save_to_disk(str(tmp_path / "d"))
        (tmp_path / "d" / fname).write_text(text)
    with pytest.raises(ManifestError, match="not a readable save_to_disk folder"):
        load_hf_asr(tmp_path / "d")


def test_hf_parquet_shards_of_different_schemas_is_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"audio": ["a.wav"], "text": ["x"]}), tmp_path / "pq" / "train-0.parquet")
    pq.write_table(pa.table({"audio": [1], "text": [2]}), tmp_path / "pq" / "train-1.parquet")
    with pytest.raises(ManifestError, match="cannot read parquet") as ei:
        load_hf_asr(tmp_path / "pq")
    assert "\n" not in str(ei.value)


def test_hf_audio_cell_of_wrong_types_and_a_long_suffix(tmp_path):
    import datasets

    blob = _wav(tmp_path / "q.wav", 0.1).read_bytes()
    feats = datasets.Features({"audio": {"bytes": datasets.Value("binary"),
                                         "path": datasets.Value("string")},
                               "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"audio": [{"bytes": blob, "path": "x." + "a" * 300}],
                                "text": ["hi"]}, features=feats).save_to_disk(str(tmp_path / "long"))
    rec, = load_hf_asr(tmp_path / "long", audio_dir=tmp_path / "out")
    assert Path(rec.audio).suffix == ".wav" and Path(rec.audio).is_file()
    for name, cell in (("strbytes", {"bytes": "abc", "path": "x.wav"}), ("intpath", {"path": 5})):
        datasets.Dataset.from_dict({"audio": [cell], "text": ["hi"]}).save_to_disk(str(tmp_path / name))
        with pytest.raises(ManifestError, match="row 0: the audio cell's"):
            list(load_hf_asr(tmp_path / name, audio_dir=tmp_path / "out"))
        assert list(load_hf_asr(tmp_path / name, on_error="skip")) == []
    # an empty path named the dataset's folder; a NUL byte cannot be in any file name
    for name, cell, why in (("empty", "", "the audio path is empty"),
                            ("nul", "a\0b.wav", "the audio path holds a NUL byte"),
                            ("emptydict", {"path": " "}, "the audio path is empty")):
        datasets.Dataset.from_dict({"audio": [cell], "text": ["hi"]}).save_to_disk(str(tmp_path / name))
        with pytest.raises(ManifestError, match=f"row 0: {why}"):
            list(load_hf_asr(tmp_path / name))
        assert list(load_hf_asr(tmp_path / name, on_error="skip")) == []


# ---------------------------------------------------------------- torch datasets + collators


def test_s2t_dataset_and_collator(tmp_path, tok):
    from echox.model.prompt import PromptBuilder

    shard = _shard(tmp_path)
    recs = read_dialogues_json(shard).records
    ds = S2TDataset(recs, shard, max_audio_seconds=5.0)
    assert len(ds) == 2 and len(S2TDataset(recs, shard, max_wer=0.2)) == 1
    ex = ds[1]
    assert isinstance(ex, S2TExample) and ex.units == [[5, 6, 7, 8], [9, 10]]
    assert ex.turns[0].audio.shape == (17600,) and ex.turns[0].transcript == "name a color"

    pb = PromptBuilder(tok, "You are helpful.", "<audio_patch>")
    collate = make_s2t_collator(pb, tok)
    batch = collate([ds[0], ds[1]])
    assert isinstance(batch, S2TBatch) and batch.units is None  # dialogue 0 has no units
    ph = tok.convert_tokens_to_ids("<audio_patch>")
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape
    assert batch.input_ids.shape[0] == 2 and int((batch.input_ids == ph).sum()) == 2
    assert [a.shape[0] for a in batch.audio] == [9600, 17600]
    want = tok("what is the capital of france", add_special_tokens=False)["input_ids"]
    assert batch.ctc_targets[0, : len(want)].tolist() == want
    assert bool((batch.ctc_targets[0, len(want):] == IGNORE).all())
    assert len(batch.response_spans[1]) == 2
    for b, spans in enumerate(batch.response_spans):  # the labels are the response tokens
        for s, e in spans:
            assert batch.labels[b, s:e].tolist() == batch.input_ids[b, s:e].tolist()
    s, e = batch.response_spans[1][1]
    assert tok.decode(batch.input_ids[1, s:e]) == "Green."
    pad = batch.attention_mask == 0
    assert bool((batch.labels[pad] == IGNORE).all())

    with_units = collate([ds[1], ds[1]])
    assert with_units.units == [[5, 6, 7, 8], [9, 10]] * 2  # per response, in order
    assert make_s2t_collator(pb, tok, units="ignore")([ds[1]]).units is None
    with pytest.raises(ManifestError, match="units='require'"):
        make_s2t_collator(pb, tok, units="require")([ds[1], ds[0]])
    plain = collate([[Turn("user", text="hi"), Turn("assistant", text="Hello.")]])
    assert plain.audio == [] and plain.ctc_targets.shape[0] == 0
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    assert next(iter(loader)).input_ids.shape[0] == 2

    short = S2TDataset(recs, shard, max_audio_seconds=0.8)
    with pytest.raises(ManifestError, match="over the limit"):
        short[1]
    assert short[0].turns[0].audio.shape == (9600,)
    with pytest.raises(ManifestError, match="no assistant turn"):
        S2TDataset([DialogueRecord([DialogueMessage("user", "hi")], id="q")], shard)


def test_t2c_dataset_and_collator(tok):
    recs = [TtsRecord("Hello.", units=[4, 4, 2], id="a"), TtsRecord("Bye now.", units=[1, 2, 3, 5])]
    ds = T2CDataset(recs, tok)
    text_ids, unit_ids = ds[0]
    assert text_ids == tok("Hello.", add_special_tokens=False)["input_ids"] and unit_ids == [4, 4, 2]
    batch = collate_t2c_examples([ds[0], ds[1]])
    assert isinstance(batch, T2CBatch) and batch.units == [[4, 4, 2], [1, 2, 3, 5]]
    assert tok.decode(batch.text_ids[1]) == "Bye now."
    shifted = T2CDataset(recs, tok, unit_encoder=lambda u: [x + 100 for x in u])
    assert shifted[1].unit_ids == [101, 102, 103, 105]
    with pytest.raises(ManifestError, match=r"1 of 3 TTS records have no 'units' \(first: 2\)"):
        T2CDataset(recs + [TtsRecord("No units yet.", audio="x.wav")], tok)


def test_t2c_dataset_leaves_out_pairs_longer_than_the_t2c(tok, caplog):
    """A runaway manifest line (a book on one line) was trained on: attention for its square."""
    fits = TtsRecord("Hello.", units=[4, 4, 2], id="a")
    book = TtsRecord("word " * 5000, units=[1] * 40_000, id="book")
    ds = T2CDataset([fits, book], tok, max_positions=64)
    assert len(ds) == 1 and ds[0].unit_ids == [4, 4, 2]
    assert "1 of 2 TTS records are longer than the T2C's 64 positions" in caplog.text
    assert "first: book" in caplog.text
    n = len(tok("Hello.", add_special_tokens=False)["input_ids"])
    assert len(T2CDataset([fits], tok, max_positions=n + 3 + 2)) == 1  # exactly at the limit
    with pytest.raises(ManifestError, match="no TTS record fits the T2C's 64 positions"):
        T2CDataset([book], tok, max_positions=64)
    # the model's own count decides (e.g. a row per byte with t2c.char_condition)
    with pytest.raises(ManifestError, match="no TTS record fits"):
        T2CDataset([fits], tok, max_positions=64, row_length=lambda ids, n: 100)
    with pytest.raises(ManifestError, match="empty text ids or unit ids"):  # at once, not mid-run
        T2CDataset([fits, TtsRecord("Hi.", units=[1], id="e")], tok, max_positions=64,
                   unit_encoder=lambda u: u if len(u) > 1 else [])


def test_a_deeply_nested_line_is_a_bad_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    rep = read_jsonl(p, "tts", on_error="skip")
    assert len(rep.records) == 1 and rep.bad_lines == [(2, "malformed JSON (nested too deeply)")]
    with pytest.raises(ManifestError, match=r"t\.jsonl:2: malformed JSON \(nested too deeply\)"):
        read_jsonl(p, "tts")


def test_read_dialogues_json_too_deep_or_too_long_is_a_manifest_error(tmp_path):
    """A data.json nested past Python's recursion limit, or with a 5,000-digit number, is one
    clear error (`echox data validate` exits 2), not a traceback."""
    bad = tmp_path / "data.json"
    bad.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ManifestError, match="not a readable JSON file"):
        read_dialogues_json(bad)
    bad.write_text('[{"id": ' + "1" * 5000 + "}]")
    with pytest.raises(ManifestError, match="not a readable JSON file"):
        read_dialogues_json(bad)


def test_validate_reports_an_audio_path_the_os_refuses(tmp_path, capsys):
    """An audio path too long for the file system is an audio issue of its line, not an
    OSError traceback."""
    from echox.cli import main

    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps({"audio": "a" * 5000 + ".wav", "text": "hi"}) + "\n")
    assert main(["data", "validate", str(p), "--schema", "asr"]) == 1
    out = capsys.readouterr().out
    assert "0 bad line(s)" in out and "1 audio issue(s)" in out and "cannot read it" in out


def test_validate_cli_reports_every_manifest_past_one_it_cannot_read(tmp_path, capsys):
    """`data validate a nope b` stopped at nope: b was never reported."""
    from echox.cli import main

    good = tmp_path / "ok.jsonl"
    good.write_text(json.dumps({"id": "a", "text": "t", "audio": "x.wav"}) + "\n")
    assert main(["data", "validate", str(good), str(tmp_path / "nope.jsonl"), str(good),
                 "--schema", "tts", "--no-audio"]) == 2
    cap = capsys.readouterr()
    assert cap.out.count("ok.jsonl (tts): 1 record(s)") == 2
    assert cap.err.strip().endswith("nope.jsonl: manifest file not found (2 other manifest(s) "
                                    "reported above)") and len(cap.err.strip().splitlines()) == 1

