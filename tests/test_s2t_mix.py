"""Stage I data: ASR turns, a further training voice, perturbation, several manifests as one."""

import json
import random
import shutil

import numpy as np
import pytest
import soundfile as sf
from conftest import load_script, noise

from echox.data.datasets import ConcatDataset, S2TDataset, perturb_audio
from echox.data.manifest import DialogueRecord, read_jsonl
from echox.data.s2t_mix import ASR_PROMPT, build_asr_tts, build_s2t_mix
from echox.errors import ManifestError

QS = ["What is the capital of Japan?", "Who wrote Hamlet?", "How many legs has a spider?"]


def _corpus(tmp_path):
    train = tmp_path / "c" / "train"
    (train / "audio" / "q").mkdir(parents=True)
    (train / "audio" / "a").mkdir(parents=True)
    dialogues, tts = [], []
    for i, q in enumerate(QS):
        sf.write(train / "audio" / "q" / f"x{i}.wav", noise(0.5 + 0.1 * i, i), 16000)
        sf.write(train / "audio" / "a" / f"x{i}.wav", noise(0.7, 10 + i), 16000)
        dialogues.append({"id": f"x{i}", "conversations": [
            {"from": "user", "value": q, "audio": f"audio/q/x{i}.wav"},
            {"from": "assistant", "value": f"Answer {i}."}]})
        tts += [{"id": f"x{i}-q", "text": q, "audio": f"audio/q/x{i}.wav"},
                {"id": f"x{i}", "text": f"Answer {i}.", "audio": f"audio/a/x{i}.wav"}]
    (train / "dialogues.jsonl").write_text("".join(json.dumps(d) + "\n" for d in dialogues))
    (train / "tts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tts))
    return tmp_path / "c"


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs the espeak-ng program (scripts/setup.sh installs it)")
def test_mix_makes_voice_and_asr_turns_and_resumes(tmp_path):
    corpus = _corpus(tmp_path)
    counts = build_s2t_mix(corpus, voice="en-gb")
    assert counts == {"voice_made": 3, "voice_failed": 0, "voice_dialogues": 3, "asr_turns": 9}
    train = corpus / "train"
    wav = train / "audio" / "q_en-gb" / "x1.wav"
    info = sf.info(str(wav))
    assert info.duration > 0.5
    voice = read_jsonl(train / "dialogues_en-gb.jsonl", "dialogue").records
    assert [r.conversations[0].value for r in voice] == QS
    asr = read_jsonl(train / "asr.jsonl", "dialogue")
    assert len(asr.records) == 9
    ds = S2TDataset(asr.records, asr.base_dir)
    ex = ds[0]
    user, bot = ex.turns
    assert user.text == ASR_PROMPT and user.audio is not None and user.transcript == bot.text
    # resumable: existing wavs are kept, manifests rewritten the same
    mtime = wav.stat().st_mtime_ns
    again = build_s2t_mix(corpus, voice="en-gb")
    assert again["voice_made"] == 0 and again["voice_dialogues"] == 3 and wav.stat().st_mtime_ns == mtime
    # a damaged wav (cut short, or its header zeroed) is spoken again, not kept as made
    data = wav.read_bytes()
    wav.write_bytes(data[: len(data) // 2])
    other = train / "audio" / "q_en-gb" / "x2.wav"
    other.write_bytes(bytes(other.stat().st_size))
    third = build_s2t_mix(corpus, voice="en-gb")
    assert third["voice_made"] == 2 and third["voice_dialogues"] == 3
    assert wav.read_bytes() == data and sf.info(str(other)).duration > 0.5


def test_mix_refuses_the_test_voice_and_a_missing_corpus(tmp_path):
    corpus = _corpus(tmp_path)
    for v in ("en-us", "en-us+f3", "EN-US", "En-Us+m2"):  # espeak-ng ignores the case
        with pytest.raises(ManifestError, match="test"):
            build_s2t_mix(corpus, voice=v)
    with pytest.raises(ManifestError, match="no spaces around it"):
        build_s2t_mix(corpus, voice="en-gb ")
    with pytest.raises(ManifestError, match="build-tiny"):
        build_s2t_mix(tmp_path / "nothing")
    counts = build_s2t_mix(corpus, voice=None)  # ASR turns only
    assert counts == {"asr_turns": 6}


def test_mix_names_bad_lines_and_checks_options_first(tmp_path, capsys):
    from echox.cli import main

    corpus = _corpus(tmp_path)
    assert main(["data", "s2t-mix", "--corpus", str(corpus), "--speak-answers", "--quiet"]) == 2
    assert "give both" in capsys.readouterr().err
    assert not (corpus / "train" / "asr.jsonl").exists()  # refused before anything was made
    with (corpus / "train" / "dialogues.jsonl").open("a") as f:
        f.write("{broken\n")
    with pytest.raises(ManifestError, match=r"dialogues\.jsonl line 4: malformed JSON"):
        build_s2t_mix(corpus, voice=None)
    with pytest.raises(ManifestError, match=r"nope\.jsonl not found: check the path"):
        build_asr_tts(corpus, tmp_path / "nope.jsonl")


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs the espeak-ng program (scripts/setup.sh installs it)")
def test_mix_refuses_an_unknown_voice_and_a_dialogue_without_turns(tmp_path, caplog):
    from echox.errors import DataBuildError

    corpus = _corpus(tmp_path)
    # checked once: each question of the corpus (thousands) printed its own failure first
    with caplog.at_level("WARNING"), pytest.raises(
            DataBuildError, match=r"espeak-ng cannot speak with the voice 'xx-nosuchvoice' \(.*"
                                  r"voice does not exist.*espeak-ng --voices"):
        build_s2t_mix(corpus, voice="xx-nosuchvoice")
    assert not caplog.records
    assert not (corpus / "train" / "audio" / "q_xx-nosuchvoice").exists()  # no empty folder left
    with (corpus / "train" / "dialogues.jsonl").open("a") as f:
        f.write(json.dumps({"id": "y"}) + "\n")
    with pytest.raises(ManifestError, match=r"y: no \"conversations\""):
        build_s2t_mix(corpus, voice="en-gb")


def test_prompt_beside_audio_round_trips_and_reaches_the_template(make_model):
    rec = DialogueRecord.from_json({"conversations": [
        {"from": "user", "value": "hello", "audio": "a.wav", "prompt": ASR_PROMPT},
        {"from": "assistant", "value": "hello"}]}, "line 1")
    assert rec.to_json()["conversations"][0]["prompt"] == ASR_PROMPT
    turns = rec.to_turns(None, lambda _: noise(0.4, 1))
    m = make_model()
    enc = m.prompt.encode(turns)
    text = m.tokenizer.decode(enc.input_ids)
    assert ASR_PROMPT in text and len(enc.audio) == 1 and enc.transcripts == ["hello"]
    with pytest.raises(ManifestError):
        DialogueRecord.from_json({"conversations": [
            {"from": "user", "value": "x", "audio": "a.wav", "prompt": 3}]}, "line 2")


def test_perturb_audio():
    w = noise(1.0, 3)
    slow, fast = perturb_audio(w, 0.9, 1.0), perturb_audio(w, 1.1, 1.0)
    assert abs(slow.size - 16000 / 0.9) <= 2 and abs(fast.size - 16000 / 1.1) <= 2
    loud = perturb_audio(w, 1.0, 2.0)
    np.testing.assert_allclose(loud, np.clip(2 * w, -1, 1))
    assert perturb_audio(w, 0.9, 1.0, max_seconds=1.05).size == w.size  # would pass the limit
    assert slow.dtype == np.float32 and loud.dtype == np.float32


def test_dataset_perturbs_with_the_seeded_random(tmp_path):
    corpus = _corpus(tmp_path)
    rep = read_jsonl(corpus / "train" / "dialogues.jsonl", "dialogue")
    with pytest.raises(ManifestError, match="speed"):
        S2TDataset(rep.records, rep.base_dir, perturb=[(3.0, 1.0)])
    ds = S2TDataset(rep.records, rep.base_dir, perturb=[(0.9, 1.0), (1.1, 0.5)])
    plain = S2TDataset(rep.records, rep.base_dir)
    n = plain[2].turns[0].audio.size
    random.seed(0)
    a = [ds[2].turns[0].audio.size for _ in range(12)]
    random.seed(0)
    assert a == [ds[2].turns[0].audio.size for _ in range(12)]  # reproducible from the seed
    assert len(set(a)) == 2 and all(abs(x - n / 0.9) <= 2 or abs(x - n / 1.1) <= 2 for x in a)


def test_concat_dataset_and_several_manifests(tmp_path):
    from echox.train.run import _dialogues

    corpus = _corpus(tmp_path)
    build_s2t_mix(corpus, voice=None)
    train = corpus / "train"
    both = _dialogues([str(train / "dialogues.jsonl"), str(train / "asr.jsonl")], None, 30.0)
    assert isinstance(both, ConcatDataset) and len(both) == 3 + 6
    assert both[0].turns[0].text is None and both[3].turns[0].text == ASR_PROMPT
    assert [both.length(i) for i in range(9)][:3] == [len(QS[i]) + len(f"Answer {i}.") for i in range(3)]
    with pytest.raises(IndexError):
        both[9]
    limited = _dialogues([str(train / "dialogues.jsonl"), str(train / "asr.jsonl")], 4, 30.0)
    assert len(limited) == 4
    one = _dialogues(str(train / "dialogues.jsonl"), None, 30.0)
    assert isinstance(one, S2TDataset) and len(one) == 3


def test_train_speed_bench_runs_every_stage_and_variant(tmp_path, capsys):
    """bench/train_speed.py end to end on tiny-random (speed is not checked, only the table)."""

    corpus = _corpus(tmp_path)
    train = corpus / "train"
    rows = [json.loads(x) for x in (train / "tts.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(0)
    (train / "tts_units.jsonl").write_text("".join(
        json.dumps({**r, "units": rng.integers(0, 50, 12).tolist()}) + "\n" for r in rows))
    mod = load_script("bench/train_speed.py", "bench_train_speed")
    out = tmp_path / "rows.json"
    assert mod.main(["--model", "tiny-random", "--dialogues", str(train / "dialogues.jsonl"),
                     "--tts", str(train / "tts_units.jsonl"), "--n", "3", "--batch-size", "2",
                     "--steps", "1", "--warmup", "1", "--threads", "1",
                     "--variants", "defaults", "cache", "fast", "fast-eager", "frozen", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert [(r["stage"], r["variant"]) for r in got] == [
        ("s2t", "defaults"), ("s2t", "cache"), ("s2t", "fast"), ("s2t", "fast-eager"), ("t2c", "defaults"),
        ("t2c", "fast"), ("echo", "defaults"), ("echo", "cache"), ("echo", "fast"), ("echo", "fast-eager"),
        ("echo", "frozen")]
    assert all(r["examples_per_s"] > 0 and np.isfinite(r["mean_loss"]) for r in got)
    by = {(r["stage"], r["variant"]): r for r in got}
    # the cache changes no loss: the same batches give the same mean loss
    assert by[("s2t", "cache")]["mean_loss"] == pytest.approx(by[("s2t", "defaults")]["mean_loss"], rel=1e-5)
    assert by[("s2t", "cache")]["fill_s"] is not None
    assert by[("echo", "frozen")]["fill_s"] is not None  # the response states, computed once
    assert "speed-up" in capsys.readouterr().out


@pytest.mark.slow  # runs piper
def test_asr_extra_speaks_texts_into_asr_turns_and_resumes(tmp_path):
    from echox.data.s2t_mix import build_asr_extra

    corpus = _corpus(tmp_path)
    texts = tmp_path / "extra.jsonl"
    texts.write_text('{"id": "xa", "text": "Which country is Lisbon in?"}\n'
                     '{"id": "xb", "text": "What language is Hamlet in?"}\n')
    counts = build_asr_extra(corpus, texts, workers=1)
    assert counts == {"extra_made": 2, "extra_failed": 0, "extra_asr_turns": 2}
    rows = [json.loads(x) for x in (corpus / "train" / "asr_extra.jsonl").read_text().splitlines()]
    assert [r["conversations"][1]["value"] for r in rows] == ["Which country is Lisbon in?",
                                                             "What language is Hamlet in?"]
    user = rows[0]["conversations"][0]
    assert user["prompt"] == ASR_PROMPT and user["audio"] == "audio/x/xa.wav"
    wav, sr = sf.read(corpus / "train" / "audio" / "x" / "xa.wav")
    assert sr > 0 and wav.size > sr // 2  # at least half a second of speech
    # the same clips as a TTS manifest (units for the T2C), audio relative to train/
    tts = [json.loads(x) for x in (corpus / "train" / "asr_extra_tts.jsonl").read_text().splitlines()]
    assert tts == [{"id": "xa", "text": "Which country is Lisbon in?", "audio": "audio/x/xa.wav"},
                   {"id": "xb", "text": "What language is Hamlet in?", "audio": "audio/x/xb.wav"}]
    assert all((corpus / "train" / r["audio"]).is_file() for r in tts)
    assert build_asr_extra(corpus, texts, workers=1)["extra_made"] == 0  # kept, not remade
    texts.write_text('{"id": "xa", "text": "one"}\n{"id": "xa", "text": "two"}\n')
    with pytest.raises(ManifestError, match="duplicate id"):
        build_asr_extra(corpus, texts)
    texts.write_text('{"id": "../up", "text": "one"}\n')
    with pytest.raises(ManifestError, match="line 1"):
        build_asr_extra(corpus, texts)


def test_asr_tts_turns_link_clips_already_spoken(tmp_path):
    from echox.data.s2t_mix import build_asr_tts

    corpus = _corpus(tmp_path)
    extra = tmp_path / "tts_extra"
    (extra / "audio").mkdir(parents=True)
    sf.write(extra / "audio" / "f1.wav", noise(0.6, 3), 16000)
    sf.write(extra / "audio" / "f2.wav", noise(0.4, 4), 16000)
    man = extra / "tts.jsonl"
    man.write_text('{"id": "f1", "text": "The capital of Peru is Lima.", "audio": "audio/f1.wav"}\n'
                   '{"id": "f2", "text": "Basra is in Iraq.", "audio": "audio/f2.wav"}\n'
                   '{"id": "f3", "text": "Gone.", "audio": "audio/f3.wav"}\n')
    assert build_asr_tts(corpus, man) == {"tts_asr_turns": 2, "tts_missing_audio": 1}
    train = corpus / "train"
    recs = read_jsonl(train / "asr_tts.jsonl", DialogueRecord).records
    assert [r.conversations[1].value for r in recs] == ["The capital of Peru is Lima.", "Basra is in Iraq."]
    assert recs[0].conversations[0].prompt == ASR_PROMPT
    ds = S2TDataset(recs, train)  # the clips resolve under train/
    assert np.allclose(ds[0].turns[0].audio, sf.read(extra / "audio" / "f1.wav", dtype="float32")[0])
    assert build_asr_tts(corpus, man)["tts_asr_turns"] == 2  # again: the links are kept
    bad = {'{"id": "f1", "text": "x"}': "line 1",  # no audio
           '{"id": "f9", "text": "x", "audio": "audio/none.wav"}': "none of its 1 clips",
           '{"id": "f1", "text": "x", "audio": "audio/f1.wav"}\n{"id": "f1", "text": "y", "audio": "audio/f2.wav"}':
               "duplicate id",
           # blank lines counted: the duplicate was said to be on line 2
           '{"id": "f1", "text": "x", "audio": "audio/f1.wav"}\n\n\n\n{"id": "f1", "text": "y", "audio": "audio/f2.wav"}':
               "line 5: duplicate id 'f1'",
           # two ids, one file: the second clip was written over the first's, exit 0
           '{"id": "f1", "text": "x", "audio": "audio/f1.wav"}\n{"id": "f1.wav", "text": "y", "audio": "audio/f2"}':
               "ids 'f1' and 'f1.wav' would both write audio/tx/f1.wav"}
    import shutil
    shutil.copyfile(extra / "audio" / "f2.wav", extra / "audio" / "f2")
    for rows, message in bad.items():
        man.write_text(rows + "\n")
        with pytest.raises(ManifestError, match=message):
            build_asr_tts(corpus, man)


def test_echo_extra_answers_each_spoken_question_and_resumes(tmp_path):
    from echox.data.s2t_mix import build_echo_extra

    corpus = _corpus(tmp_path)
    train = corpus / "train"
    with pytest.raises(ManifestError, match="asr_extra_tts.jsonl not found"):
        build_echo_extra(corpus)
    clips = [{"id": f"x{i}", "text": q, "audio": f"audio/q/x{i}.wav"} for i, q in enumerate(QS)]
    (train / "asr_extra_tts.jsonl").write_text("".join(json.dumps(c) + "\n" for c in clips))
    (corpus / "build.json").write_text(json.dumps(
        {"llm": "builtin:tiny-random-llama", "system_prompt": "Be brief.", "max_new_tokens": 4}))
    counts = build_echo_extra(corpus, batch_size=2)
    assert counts["extra_answers_made"] == 3
    rows = [json.loads(x) for x in (train / "dialogues_extra.jsonl").read_text().splitlines()]
    answers = {json.loads(x)["id"]: json.loads(x)["answer"]
               for x in (train / "answers_extra.jsonl").read_text().splitlines()}
    assert len(answers) == 3 and len(rows) == counts["extra_dialogues"] == sum(map(bool, answers.values()))
    for r in rows:
        user, bot = r["conversations"]
        assert user["audio"] == f"audio/q/{r['id']}.wav" and user["value"] == QS[int(r["id"][1:])]
        assert bot["from"] == "assistant" and bot["value"] == answers[r["id"]]
    # a torn last answer line is redone, the others are kept
    lines = (train / "answers_extra.jsonl").read_text().splitlines()
    (train / "answers_extra.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:5])
    assert build_echo_extra(corpus, batch_size=2)["extra_answers_made"] == 1
    assert build_echo_extra(corpus, batch_size=2)["extra_answers_made"] == 0
    assert len((train / "dialogues_extra.jsonl").read_text().splitlines()) == counts["extra_dialogues"]


def test_echo_extra_refuses_damaged_corpus_settings(tmp_path):
    """A build.json cut short, not an object or without its LLM was a traceback
    (json.JSONDecodeError, AttributeError, KeyError); now one error naming it, nothing written."""
    from echox.data.s2t_mix import build_echo_extra

    corpus = _corpus(tmp_path)
    clip = {"id": "x0", "text": QS[0], "audio": "audio/q/x0.wav"}
    (corpus / "train" / "asr_extra_tts.jsonl").write_text(json.dumps(clip) + "\n")
    for text, why in (('{"llm": "builtin:tiny', "malformed JSON"),
                      ("[]", "expected a JSON object, got list"),
                      ('{"system_prompt": "Be brief."}', 'no "llm"')):
        (corpus / "build.json").write_text(text)
        with pytest.raises(ManifestError, match=f"corpus settings {corpus / 'build.json'}: {why}"):
            build_echo_extra(corpus)
    assert not (corpus / "train" / "answers_extra.jsonl").exists()


@pytest.mark.slow  # runs piper
def test_speak_extra_answers_makes_a_tts_manifest_that_attaches(tmp_path):
    from echox.cli import main
    from echox.data.s2t_mix import speak_extra_answers

    corpus = _corpus(tmp_path)
    train = corpus / "train"
    with pytest.raises(ManifestError, match="dialogues_extra.jsonl not found"):
        speak_extra_answers(corpus)
    rows = [{"id": f"x{i}", "conversations": [
        {"from": "user", "value": q, "audio": f"audio/q/x{i}.wav"},
        {"from": "assistant", "value": a}]}
        for i, (q, a) in enumerate([("Where is Lima?", "Lima is in Peru."),
                                    ("Who wrote Hamlet?", "Shakespeare wrote Hamlet.")])]
    (train / "dialogues_extra.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = speak_extra_answers(corpus, workers=1)
    assert counts == {"extra_answers_spoken": 2, "extra_answers_failed": 0, "extra_answer_clips": 2}
    tts = [json.loads(x) for x in (train / "answers_extra_tts.jsonl").read_text().splitlines()]
    assert tts == [{"id": "x0", "text": "Lima is in Peru.", "audio": "audio/xa/x0.wav"},
                   {"id": "x1", "text": "Shakespeare wrote Hamlet.", "audio": "audio/xa/x1.wav"}]
    wav, sr = sf.read(train / "audio" / "xa" / "x1.wav")
    assert sr > 0 and wav.size > sr // 2
    assert speak_extra_answers(corpus, workers=1)["extra_answers_spoken"] == 0  # kept
    # the clips' ids are the dialogues': units attach pairs them up (gold units of the answers)
    units = [{**r, "units": [3, 4, 5]} for r in tts]
    (train / "answers_extra_units.jsonl").write_text("".join(json.dumps(r) + "\n" for r in units))
    assert main(["units", "attach", "--dialogues", str(train / "dialogues_extra.jsonl"), "--tts-units",
                       str(train / "answers_extra_units.jsonl"), "--out",
                       str(train / "dialogues_extra_units.jsonl")]) == 0
    got = [json.loads(x) for x in (train / "dialogues_extra_units.jsonl").read_text().splitlines()]
    assert len(got) == 2 and all(r["conversations"][1]["units"] == [3, 4, 5] for r in got)


def test_speak_answers_needs_echo_extra(tmp_path, capsys):
    from echox.cli import main

    corpus = _corpus(tmp_path)
    assert main(["data", "s2t-mix", "--corpus", str(corpus), "--voice", "", "--no-asr",
                 "--speak-answers", "--quiet"]) == 2
    assert "--speak-answers speaks the --echo-extra answers" in capsys.readouterr().err


def test_mix_names_rows_without_id_or_text_and_ids_that_are_paths(tmp_path, capsys):
    """A dialogue or TTS row with no id, a first turn with no value, or an id such as
    `../../x` (which would write a wav outside the corpus) is one error naming its line;
    nothing is spoken or written."""
    from echox.cli import main

    corpus = _corpus(tmp_path)
    train = corpus / "train"
    good = (train / "dialogues.jsonl").read_text()
    for row in ({"conversations": [{"from": "user", "value": "q", "audio": "audio/q/x0.wav"}]},
                {"id": "z", "conversations": [{"from": "user", "audio": "audio/q/x0.wav"}]},
                {"id": "../../../evil", "conversations": [
                    {"from": "user", "value": "q", "audio": "audio/q/x0.wav"}]}):
        (train / "dialogues.jsonl").write_text(good + json.dumps(row) + "\n")
        with pytest.raises(ManifestError, match=r"dialogues\.jsonl line 4: expected an \"id\""):
            build_s2t_mix(corpus, voice="en-gb")
    assert not (tmp_path / "evil.wav").exists() and not (train / "audio" / "q_en-gb").exists()
    (train / "dialogues.jsonl").write_text(good)
    with (train / "tts.jsonl").open("a") as f:
        f.write(json.dumps({"text": "no id", "audio": "audio/a/x0.wav"}) + "\n")
    assert main(["data", "s2t-mix", "--corpus", str(corpus), "--voice", "", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert 'tts.jsonl line 7: expected an "id"' in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["data", "s2t-mix", "--corpus", str(corpus), "--workers", "0"])
    assert "--workers: must be >= 1" in capsys.readouterr().err
    assert not (train / "asr.jsonl").exists()


def test_asr_tts_rerun_replaces_a_clip_whose_row_names_other_audio(tmp_path):
    """The resumed step keeps a linked clip only while it is still the row's audio: a TTS
    manifest that now names another file for the same id gets that file, not the old one."""
    corpus = _corpus(tmp_path)
    train = corpus / "train"
    src = tmp_path / "tts_extra"
    src.mkdir()
    sf.write(src / "one.wav", noise(0.5, 1), 16000)
    sf.write(src / "two.wav", noise(0.6, 2), 16000)
    manifest = src / "tts.jsonl"
    manifest.write_text(json.dumps({"id": "f1", "text": "Fact one.", "audio": "one.wav"}) + "\n")
    build_asr_tts(corpus, manifest)
    clip = train / "audio" / "tx" / "f1.wav"
    assert clip.read_bytes() == (src / "one.wav").read_bytes()
    manifest.write_text(json.dumps({"id": "f1", "text": "Fact two.", "audio": "two.wav"}) + "\n")
    assert build_asr_tts(corpus, manifest)["tts_asr_turns"] == 1
    assert clip.read_bytes() == (src / "two.wav").read_bytes()


def test_mix_refuses_a_voice_with_a_slash_and_ids_too_long_for_a_file(tmp_path, capsys):
    """--voice names a folder and a manifest: `en-gb/../../../evil` would write them outside
    the corpus. An id of 300 characters (or with a NUL) cannot name a wav. Both are one-line
    errors (exit 2) and nothing is written."""
    from echox.cli import main

    corpus = _corpus(tmp_path)
    train = corpus / "train"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["data", "s2t-mix", "--corpus", str(corpus), "--voice", "en-gb/../../../evil",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--voice" in err and "'/'" in err and len(err.splitlines()) == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    good = (train / "dialogues.jsonl").read_text()
    for rid in ("a" * 300, "a\0b"):
        (train / "dialogues.jsonl").write_text(good + json.dumps({"id": rid, "conversations": [
            {"from": "user", "value": "q", "audio": "audio/q/x0.wav"}]}) + "\n")
        with pytest.raises(ManifestError, match=r"dialogues\.jsonl line 4: expected an \"id\""):
            build_s2t_mix(corpus, voice="en-gb")
    (train / "dialogues.jsonl").write_text(good)
    tts = tmp_path / "tts.jsonl"  # a clip path the OS refuses counts as missing
    tts.write_text(json.dumps({"id": "l", "text": "hi", "audio": "a" * 5000}) + "\n"
                   + json.dumps({"id": "k", "text": "hi", "audio": str(train / "audio/a/x0.wav")}) + "\n")
    assert build_asr_tts(corpus, tts) == {"tts_asr_turns": 1, "tts_missing_audio": 1}
