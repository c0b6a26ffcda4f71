"""The tiny recipe's corpus: question templating, the split, and an end-to-end build."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import load_script

from echox.data.tiny_corpus import (
    DEFAULT_QUESTIONS,
    QAQuestion,
    _tidy,
    build_tiny_corpus,
    greedy_shrinking,
    load_questions,
    split_questions,
)
from echox.errors import DataBuildError

MAKE_QUESTIONS = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "make_questions.py"


@pytest.fixture(scope="module")
def mq():
    """The recipe's question script, imported from its file (it is not a package module)."""
    return load_script(MAKE_QUESTIONS)


@pytest.mark.parametrize(
    "cloze, expected",
    [
        ("The capital of Afghanistan is", ("capital", "What is the capital of Afghanistan?")),
        ("The country of citizenship of Alan Young is",
         ("citizenship", "Which country is Alan Young a citizen of?")),
        ("The country of Acropolis of Athens is", ("country", "Which country is Acropolis of Athens in?")),
        ("Aargau is located in", ("located_in", "Where is Aargau located?")),
        ("The sport played by A. C. Green is", ("sport", "What sport does A. C. Green play?")),
        ("The language used in Botswana is [MASK]",
         ("language_used_in", "What language is used in Botswana?")),
        ("eastern grey kangaroo endemic to",
         ("endemic_to", "Where is eastern grey kangaroo found in the wild?")),
        ("The eye color of A.J. Applegate is", None),  # relation dropped on purpose
        ("ASEAN shares a border with", None),
        ("The genre of Madonna is", None),
    ],
)
def test_cloze_to_question(mq, cloze, expected):
    assert mq.to_question(cloze) == expected


def test_answers_and_leaks(mq):
    assert mq.clean_answers(["U", "Cantonese", "Chinese", "E", "Chinese"]) == ["Cantonese", "Chinese"]
    assert mq.clean_answers("112") == ["112"] and mq.clean_answers("O") == []
    task = {"examples": [
        {"input": "The capital of Japan is", "target": "Tokyo"},
        {"input": "The country of Spain national football team is", "target": "Spain"},  # leak
        {"input": "The blood type of Alec Baldwin is", "target": "O"},  # no template
        {"input": "The official language of Belgium is", "target": ["Dutch", "French", "G"]},
    ]}
    got = mq.wikidata_questions(task)
    assert [(q.id, q.question, q.answers) for q in got] == [
        ("wd-00000", "What is the capital of Japan?", ["Tokyo"]),
        ("wd-00003", "What is the official language of Belgium?", ["Dutch", "French"]),
    ]


def test_vendored_questions_are_clean():
    qs = load_questions(DEFAULT_QUESTIONS)
    assert len(qs) >= 3300
    assert all(q.question.endswith("?") and q.answers for q in qs)
    assert len({q.question.casefold() for q in qs}) == len(qs)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_load_merges_duplicate_questions(tmp_path):
    path = _write(tmp_path / "q.jsonl", [
        {"id": "a", "question": "What is the capital of France?", "answers": ["Paris"]},
        {"id": "b", "question": "what is the capital of  France?", "answers": "Paris, France"},
        {"id": "c", "question": "Who wrote Hamlet?", "answers": ["Shakespeare"]},
    ])
    qs = load_questions(path)
    assert qs == [QAQuestion("a", "What is the capital of France?", ("Paris", "Paris, France")),
                  QAQuestion("c", "Who wrote Hamlet?", ("Shakespeare",))]
    with pytest.raises(DataBuildError, match=r"q2.jsonl:1"):
        load_questions(_write(tmp_path / "q2.jsonl", [{"id": "x", "answers": ["y"]}]))
    with pytest.raises(DataBuildError, match="not found"):
        load_questions(tmp_path / "missing.jsonl")


def test_split_has_no_overlap_and_follows_limit():
    qs = [QAQuestion(f"q{i:03d}", f"Question number {i}?", ("x",)) for i in range(500)]
    full = split_questions(qs, test_size=300, seed=0)
    assert (len(full.train), len(full.test)) == (200, 300)
    assert not {q.question for q in full.train} & {q.question for q in full.test}
    small = split_questions(qs, test_size=300, limit=50, seed=0)
    assert (len(small.train), len(small.test)) == (45, 5)
    tiny = split_questions(qs, limit=6, seed=0)
    assert (len(tiny.train), len(tiny.test)) == (5, 1)
    assert split_questions(qs, limit=50, seed=0) == small  # deterministic
    assert split_questions(qs, limit=50, seed=1).test != small.test
    with pytest.raises(DataBuildError, match="no training"):
        split_questions(qs[:10], test_size=10)
    with pytest.raises(DataBuildError, match="limit"):
        split_questions(qs, limit=1)


def test_train_size_caps_train_and_keeps_the_test_split():
    qs = [QAQuestion(f"q{i:03d}", f"Question number {i}?", ("x",)) for i in range(500)]
    full = split_questions(qs, test_size=100, seed=0)
    capped = split_questions(qs, test_size=100, seed=0, train_size=150)
    assert (len(capped.train), len(capped.test)) == (150, 100)
    assert capped.test == full.test and capped.train == full.train[:150]
    assert split_questions(qs, test_size=100, seed=0, train_size=0) == full  # 0 = all
    with pytest.raises(DataBuildError, match="train_size"):
        split_questions(qs, train_size=-1)


def _tiny_llama():
    """A seeded 2-layer random Llama (vocabulary 64, EOS 2) for the greedy decoding tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def test_greedy_shrinking_matches_generate():
    """Dropping finished rows must not change any row's greedy tokens."""
    import torch

    model = _tiny_llama()
    ids = torch.randint(3, 64, (5, 7))
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 2, 0, 4, 1]):  # left padding of different lengths
        ids[row, :pad], mask[row, :pad] = 0, 0
    with torch.inference_mode():
        free = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                              max_new_tokens=12, eos_token_id=None, pad_token_id=0)[:, 7:]
    # end rows at different steps: the tokens row 0 and row 3 produce at step 2 become EOS
    eos = {int(free[0, 2]), int(free[3, 2])}
    with torch.inference_mode():
        ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=12, eos_token_id=sorted(eos), pad_token_id=0)[:, 7:]
    want = []
    for r in ref.tolist():
        end = next((k for k, t in enumerate(r) if t in eos), None)
        want.append(r[: end + 1] if end is not None else r)
    got = greedy_shrinking(model, ids, mask, 12, eos)
    assert got == want
    assert len({len(r) for r in got}) > 1  # rows really ended at different steps
    assert greedy_shrinking(model, ids, mask, 0, eos) == [[] for _ in range(5)]


def test_tidy_drops_a_cut_off_sentence():
    assert _tidy("Paris is the capital.  It is\nlarge and", hit_eos=False) == "Paris is the capital."
    assert _tidy("It is large and", hit_eos=False) == "It is large and"  # nothing better to keep
    assert _tidy(" Paris.\n", hit_eos=True) == "Paris."
    assert _tidy("a\x13b\x0ec", hit_eos=True) == "abc"  # control bytes of a random LLM


@pytest.mark.slow
def test_build_end_to_end_and_resume(tmp_path):
    """limit=6 with the tiny random LLM and real piper (and espeak-ng when installed)."""
    out = tmp_path / "tiny"
    s = build_tiny_corpus(out, limit=6, llm="builtin:tiny-random-llama", batch_size=4,
                          max_new_tokens=12, progress=False)
    assert s.items == {"train": 5, "test": 1}
    assert s.work["answers_generated"] == 6 and s.work["answers_cached"] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["items"] == s.items and summary["work"] == s.work

    train = [json.loads(x) for x in (out / "train" / "dialogues.jsonl").read_text().splitlines()]
    test_qa = [json.loads(x) for x in (out / "test" / "qa.jsonl").read_text().splitlines()]
    assert len(test_qa) == 1 and len(train) == s.dialogues["train"] >= 1
    assert not {d["conversations"][0]["value"] for d in train} & {r["question"] for r in test_qa}
    for d in train:
        user, bot = d["conversations"]
        assert user["from"] == "user" and bot["from"] == "assistant" and bot["value"]
        assert (out / "train" / user["audio"]).stat().st_size > 1000
        assert isinstance(d["correct"], bool) and d["answers"]
    tts = [json.loads(x) for x in (out / "train" / "tts.jsonl").read_text().splitlines()]
    assert sum(r["id"].endswith("-q") for r in tts) == 5  # every question is a TTS pair too
    assert all((out / "train" / r["audio"]).is_file() for r in tts)
    assert s.hours["train"]["piper_q"] > 0

    from echox.eval.benchmarks import open_benchmark

    bench = open_benchmark(f"local:{out / 'test' / 'qa.jsonl'}")
    item = bench[0]
    assert item.sampling_rate == 22050 and item.audio is not None and item.audio.size > 5000
    if shutil.which("espeak-ng"):
        assert len(open_benchmark(f"local:{out / 'test' / 'qa_espeak.jsonl'}")) == 1
        assert s.work["espeak_synthesized"] == 1
    else:
        assert any("espeak-ng" in w for w in s.warnings)

    wavs = sorted(out.rglob("*.wav"))
    mtimes = [p.stat().st_mtime_ns for p in wavs]
    again = build_tiny_corpus(out, limit=6, llm="builtin:tiny-random-llama", batch_size=4,
                              max_new_tokens=12, progress=False)
    assert again.work["answers_generated"] == 0 and again.work["answers_cached"] == 6
    assert again.work["piper_synthesized"] == 0 and again.work["espeak_synthesized"] == 0
    assert again.work["piper_cached"] == s.work["piper_cached"] + s.work["piper_synthesized"]
    assert [p.stat().st_mtime_ns for p in sorted(out.rglob("*.wav"))] == mtimes
    assert again.dialogues == s.dialogues and again.accuracy == s.accuracy

    with pytest.raises(DataBuildError, match="other answer settings"):
        build_tiny_corpus(out, limit=6, llm="builtin:tiny-random-llama", max_new_tokens=99,
                          progress=False)


class _StopOnceWritten:
    """A stop event that turns set as soon as one of `paths` exists."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.forced = False

    def is_set(self) -> bool:
        return self.forced or any(p.is_file() for p in self.paths)

    def set(self) -> None:
        self.forced = True


@pytest.mark.slow
def test_piper_stopped_midway_keeps_its_wavs_and_reports_no_failure(tmp_path):
    """The corpus hands the early answer audio to step 2's workers by stopping piper: what it
    wrote stays, the rest is left undone (not failed) for the next call to speak."""
    from echox.data.tiny_corpus import piper_synthesize

    jobs = [(f"Answer number {i} is short.", tmp_path / f"a{i}.wav") for i in range(5)]
    stop = _StopOnceWritten([p for _, p in jobs])
    made, failed = piper_synthesize(jobs, workers=1, stop=stop)  # type: ignore[arg-type]
    assert failed == [] and made == 1
    assert sum(p.is_file() for _, p in jobs) == made
    rest = [(t, p) for t, p in jobs if not p.is_file()]
    made2, failed2 = piper_synthesize(rest, workers=2)
    assert failed2 == [] and made + made2 == 5 and all(p.is_file() for _, p in jobs)


def test_extra_t2c_sentences_hold_out_the_test_facts_and_subjects(tmp_path):
    """recipes/tiny/make_tts_text.py: facts behind test questions, and facts naming a test
    question's subject, never become T2C sentences; the rest read as answers."""
    module = load_script(MAKE_QUESTIONS.parent / "make_tts_text.py")
    task = {"examples": [
        {"input": "The capital of Japan is", "target": "Tokyo"},                  # 0: a test fact
        {"input": "The official language of Japan is", "target": "Japanese"},     # 1: test subject
        {"input": "The capital of Afghanistan is", "target": "Kabul"},
        {"input": "The color of the flag of Chad is", "target": ["blue", "yellow", "red"]},
        {"input": "The capital of Afghanistan is", "target": "Kabul"},            # a duplicate
        {"input": "The capital of Peru is", "target": ["U"]},                     # no usable answer
    ]}
    (tmp_path / "split.json").write_text(json.dumps({"train": ["wd-00002"], "test": ["wd-00000", "gk-001"]}))
    held, subjects = module.test_subjects(tmp_path, task)
    assert held == {0} and subjects == {"japan"}
    rows = module.sentences(task, held, subjects)
    assert rows == [("wdx-00002", "The capital of Afghanistan is Kabul."),
                    ("wdx-00003", "The color of the flag of Chad is blue, yellow and red.")]


def test_greedy_shrinking_repetition_guard():
    """With `no_repeat_ngram_size` no row repeats a bigram of its new tokens, and each row of a
    batch whose rows end at different steps gets what it gets alone."""
    import torch

    from echox.model.generation import SamplingConfig

    model = _tiny_llama()
    ids = torch.randint(3, 64, (4, 6))
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 2, 0, 3]):
        ids[row, :pad], mask[row, :pad] = 0, 0

    def bigram_repeats(row: list[int]) -> bool:
        grams = list(zip(row, row[1:]))
        return len(grams) != len(set(grams))

    free = greedy_shrinking(model, ids, mask, 30, {2})
    assert any(bigram_repeats(r) for r in free)
    guard = SamplingConfig(no_repeat_ngram_size=2)
    eos = {greedy_shrinking(model, ids[:1], mask[:1], 30, {2}, guard=guard)[0][4]}  # row 0 ends at 5
    got = greedy_shrinking(model, ids, mask, 30, eos, guard=guard)
    assert not any(bigram_repeats(r) for r in got)
    alone = [greedy_shrinking(model, ids[i:i + 1], mask[i:i + 1], 30, eos, guard=guard)[0]
             for i in range(4)]
    assert got == alone and len(got[0]) == 5


def test_build_tiny_refuses_bad_numbers_before_any_work(tmp_path, capsys):
    """Counts are checked while the options are parsed (CLI) or first thing (API): nothing
    is written, no model is loaded."""
    from echox.cli import main

    out = tmp_path / "corpus"
    for opt, value in (("--limit", "1"), ("--test-size", "0"), ("--train-size", "-1"),
                       ("--batch-size", "0"), ("--max-new-tokens", "0"),
                       ("--piper-workers", "0"), ("--llm-threads", "x")):
        with pytest.raises(SystemExit) as exit_:
            main(["data", "build-tiny", "--out", str(out), opt, value])
        assert exit_.value.code == 2
        assert f"{opt}: " in capsys.readouterr().err
    for kw in ({"piper_workers": 0}, {"max_new_tokens": 0}, {"batch_size": 2.5},
               {"limit": 1}, {"train_size": -1}, {"llm_threads": True}):
        name = next(iter(kw))
        with pytest.raises(DataBuildError, match=f"{name} must be a whole number"):
            build_tiny_corpus(out, progress=False, **kw)
    assert not out.exists()


def test_bad_question_files_and_build_json_are_one_line_errors(tmp_path, capsys):
    """answers that are not a list, an id that is a path, and a damaged build.json stop the
    build with one line; a refused question file leaves no folder (nor build.json) behind."""
    from echox.cli import main

    ok = {"id": "b", "question": "Who wrote Hamlet?", "answers": ["Shakespeare"]}
    out = tmp_path / "corpus"
    for bad, why in (({"id": "a", "question": "Why?", "answers": 5}, "'answers' must be"),
                     ({"id": "../../evil", "question": "Why?", "answers": ["x"]}, "file name")):
        q = _write(tmp_path / "q.jsonl", [bad, ok])
        with pytest.raises(DataBuildError, match=why):
            load_questions(q)
        assert main(["data", "build-tiny", "--out", str(out), "--questions", str(q), "--limit", "2",
                     "--no-espeak", "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert why in err and len(err.splitlines()) == 1
        assert not out.exists()
    q = _write(tmp_path / "q.jsonl", [{**ok, "id": "a", "question": "Why?"}, ok])
    out.mkdir()
    for text in ("{broken", "[1]"):
        (out / "build.json").write_text(text)
        assert main(["data", "build-tiny", "--out", str(out), "--questions", str(q), "--limit", "2",
                     "--no-espeak", "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert "build.json" in err and len(err.splitlines()) == 1
        assert (out / "build.json").read_text() == text


def test_question_ids_of_wrong_type_or_unusable_as_names_and_a_build_json_folder(tmp_path, capsys):
    """A null or list id (once read as "None" / "[1]"), an id with a NUL or too long for a file
    name is refused by name; a build.json that is a folder is one line, not a traceback."""
    from echox.cli import main

    ok = {"id": "b", "question": "Who wrote Hamlet?", "answers": ["Shakespeare"]}
    for bad, why in ((None, "'id' must be a string or integer"), ([1], "'id' must be"),
                     ("a\0b", "file name"), ("a" * 300, "file name")):
        q = _write(tmp_path / "q.jsonl", [{"id": bad, "question": "Why?", "answers": ["x"]}, ok])
        with pytest.raises(DataBuildError, match=why):
            load_questions(q)
    q = _write(tmp_path / "q.jsonl", [{**ok, "id": "a", "question": "Why?"}, ok])
    out = tmp_path / "corpus"
    (out / "build.json").mkdir(parents=True)
    assert main(["data", "build-tiny", "--out", str(out), "--questions", str(q), "--limit", "2",
                 "--no-espeak", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "build.json: is a folder" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["build.json"]


def test_a_corpus_folder_with_no_answer_yet_takes_new_answer_settings(tmp_path):
    """A build that failed before its first answer (a mistyped --llm) left build.json behind,
    and every rerun with the right --llm was refused until the folder was deleted."""
    from echox.data.tiny_corpus import _check_config

    out = tmp_path / "corpus"
    out.mkdir()
    _check_config(out, {"llm": "typo", "max_new_tokens": 64})
    _check_config(out, {"llm": "right", "max_new_tokens": 64})  # nothing made with "typo"
    assert json.loads((out / "build.json").read_text())["llm"] == "right"
    (out / "answers.jsonl").write_text(json.dumps({"id": "q1", "answer": "Tokyo."}) + "\n")
    with pytest.raises(DataBuildError, match="other answer settings"):
        _check_config(out, {"llm": "other", "max_new_tokens": 64})
    assert json.loads((out / "build.json").read_text())["llm"] == "right"


def test_a_cached_answer_without_its_fields_is_answered_again(tmp_path, caplog):
    """A line of answers.jsonl without "answer" (an edit) was a KeyError traceback in the
    build; the build reads it as it reads a torn line: its question is answered again."""
    from echox.data.tiny_corpus import _read_answers

    path = tmp_path / "answers.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (
        {"id": "q1", "answer": "Tokyo.", "correct": True}, {"id": "q2"},
        {"id": "q3", "answer": "Paris.", "correct": "yes"}, {"id": "q4", "answer": 5, "correct": False},
    )) + "\n")
    with caplog.at_level("WARNING"):
        assert list(_read_answers(path, needs=("answer", "correct"))) == ["q1"]
    assert "answers.jsonl:2: no 'answer' or 'correct'; its question is answered again" in caplog.text
    assert list(_read_answers(path)) == ["q1", "q3"]  # the s2t-mix extras record no "correct"
    assert list(_read_answers(path, needs=())) == ["q1", "q2", "q3", "q4"]


def test_an_installed_package_asks_for_a_question_file(tmp_path, monkeypatch):
    """Installed from a wheel, the default question file (recipes/, a checkout's) is not there:
    the error named a path inside the venv's lib folder as if the file had gone missing."""
    import echox.data.tiny_corpus as tc

    monkeypatch.setattr(tc, "DEFAULT_QUESTIONS", tmp_path / "lib" / "recipes" / "questions.jsonl")
    with pytest.raises(DataBuildError, match="give --questions FILE: .*source checkout"):
        load_questions()
