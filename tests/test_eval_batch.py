"""Batched `echox eval` (text and s2t): same answers as one at a time, same resume and errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import load_script, noise

from echox.audio import load_audio
from echox.cli import main
from echox.errors import AudioError, EvalError
from echox.eval.benchmarks import QAItem, open_benchmark
from echox.eval.run import CascadeAnswerer, S2TAnswerer, TextAnswerer, run_eval
from echox.model.generation import SamplingConfig

ROOT = Path(__file__).resolve().parent.parent
LLM = "builtin:tiny-random-llama"
QUESTIONS = ["What is the capital of Japan?", "Who?",
             "Which planet of our solar system is the largest one of all?", "2+2?",
             "Name a river in Europe."]
SECONDS = [0.4, 1.9, 1.1, 2.7, 0.6]  # different prompt lengths: the batch is left-padded


def spoken_items(n: int = 5) -> list[QAItem]:
    """Noise 'questions' of different lengths (one at 22.05 kHz, resampled on load)."""
    items = []
    for i in range(n):
        sr = 22050 if i == 1 else 16000
        wav = noise(SECONDS[i] * sr / 16000, seed=i)
        items.append(QAItem(f"q{i}", QUESTIONS[i], [f"answer{i}"], wav, sr, None))
    return items


@pytest.fixture(scope="module")
def model() -> Any:
    from echox.config import preset_config
    from echox.model.echox import EchoX

    torch.manual_seed(0)
    return EchoX.build(preset_config("tiny-random")).eval()


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A `local:` benchmark of five spoken items with wav files."""
    root = tmp_path_factory.mktemp("bench")
    lines = []
    for item in spoken_items():
        sf.write(root / f"{item.id}.wav", item.audio, item.sampling_rate)
        lines.append({"id": item.id, "audio": f"{item.id}.wav", "question": item.question,
                      "answers": item.answers})
    (root / "qa.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return f"local:{root / 'qa.jsonl'}"


def stop_on(tokens: list[list[int]], picks: list[tuple[int, int]]) -> list[int]:
    """Stop ids taken from free-running answers (row, step), so rows end at different steps."""
    return sorted({tokens[r][k] for r, k in picks})


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# ---------------------------------------------------------------- s2t


def test_s2t_batch_is_token_identical_to_one_at_a_time(make_model: Any) -> None:
    from echox.model.prompt import Turn

    model = make_model().eval()
    items = spoken_items()
    ans = S2TAnswerer(model, max_new_tokens=12)
    free = [ans.answer(it).token_ids for it in items]
    # make some rows stop early: a finished row must not disturb the others
    model.llm.base.generation_config.eos_token_id = stop_on(free, [(0, 3), (2, 6)])
    waves = [load_audio(it.audio, 16000, orig_sr=it.sampling_rate) for it in items]
    batch = model.collate([[Turn("user", audio=w)] for w in waves], add_generation_prompt=True)
    merged, _ = model.embed_inputs(batch, padding_side="left")
    assert (merged.attention_mask == 0).any()  # the prompts really are padded

    alone = [ans.answer(it) for it in items]
    together = ans.answer_batch(items)
    assert [a.token_ids for a in together] == [a.token_ids for a in alone]
    assert [a.text for a in together] == [a.text for a in alone]
    assert len({len(a.token_ids) for a in alone}) > 1  # rows really ended at different steps
    assert all(a.stats["batch"] == 5 and a.stats["tokens"] == len(a.token_ids) for a in together)
    assert len({a.stats["ms"] for a in together}) == 1  # the batch's time, shared equally
    assert all(a.stats["batch"] == 1 for a in alone)


# ---------------------------------------------------------------- text


def reference_text_answer(ans: TextAnswerer, question: str, eos: list[int], beams: int = 1) -> list[int]:
    """The answer as `echox eval` made it before batching: `generate` on one question (greedy,
    or transformers' beam search), without its EOS."""
    msgs = [{"role": "system", "content": ans.system_prompt},
            {"role": "user", "content": question}]
    ids = ans.tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
    with torch.no_grad():
        out = ans.model.generate(**ids, max_new_tokens=ans.max_new_tokens, do_sample=False,
                                 num_beams=beams, eos_token_id=eos, pad_token_id=ans.tok.pad_token_id)
    row = out[0, ids["input_ids"].shape[1]:].tolist()
    return row[:-1] if row and row[-1] in eos else row


def test_text_batch_is_token_identical_to_generate() -> None:
    ans = TextAnswerer(LLM, "Answer in one short sentence.", max_new_tokens=16)
    assert ans.tok.pad_token is not None and ans.tok.padding_side == "left"
    items = [QAItem(f"t{i}", q, ["x"], None, None, None) for i, q in enumerate(QUESTIONS)]
    lengths = {len(ans.tok(ans.prompt(q), add_special_tokens=False)["input_ids"])
               for q in QUESTIONS}
    assert len(lengths) > 1  # the prompts really are padded

    free = [reference_text_answer(ans, q, sorted(ans.eos_ids)) for q in QUESTIONS]
    eos = stop_on(free, [(0, 2), (3, 9)])  # rows end at different steps
    ans.eos_ids = set(eos)
    want = [reference_text_answer(ans, q, eos) for q in QUESTIONS]
    together = ans.answer_batch(items)
    assert [a.token_ids for a in together] == want
    assert len({len(w) for w in want}) > 1
    texts = [ans.tok.decode(w, skip_special_tokens=True).strip() for w in want]
    assert [a.text for a in together] == texts
    assert ans.answer(items[3]).token_ids == want[3]
    assert all(a.stats["batch"] == len(items) for a in together)


def test_text_beam_search_is_transformers_beam_search() -> None:
    """`--text-beams`: the text LLM's answers by beam search, batched. Where no hypothesis
    ends before the length limit they are those of transformers' `generate(num_beams=...)`;
    where some end, the rule for when a row is done differs from transformers' default (a row
    ends once N hypotheses have ended and the best of them beats every open one, which then
    cannot compete: `beam_search_steps`), so there each row is checked against itself alone."""
    ans = TextAnswerer(LLM, "Answer in one short sentence.", max_new_tokens=12,
                       decoding=SamplingConfig(num_beams=3))
    items = [QAItem(f"t{i}", q, ["x"], None, None, None) for i, q in enumerate(QUESTIONS)]
    want = [reference_text_answer(ans, q, sorted(ans.eos_ids), beams=3) for q in QUESTIONS]
    assert all(len(w) == ans.max_new_tokens for w in want)  # the random LLM never says EOS
    together = ans.answer_batch(items)
    assert [a.token_ids for a in together] == want
    assert want != [reference_text_answer(ans, q, sorted(ans.eos_ids)) for q in QUESTIONS]
    assert ans.answer(items[1]).token_ids == want[1]

    ans.eos_ids = set(stop_on(want, [(0, 3), (3, 8)]))  # hypotheses end at different steps
    together = [a.token_ids for a in ans.answer_batch(items)]
    assert together == [ans.answer(it).token_ids for it in items]
    assert len({len(t) for t in together}) > 1 and min(len(t) for t in together) < ans.max_new_tokens
    assert not any(set(t) & ans.eos_ids for t in together)


# ---------------------------------------------------------------- cascade


class HeardByLength:
    """An ASR stand-in for the unit test: each clip's "transcript" is a question picked by the
    clip's length (the real ASR runs in test_eval_cli_cascade_with_faster_whisper)."""

    name = "by-length"

    def __init__(self, heard: dict[int, str]) -> None:
        self.heard, self.calls = heard, 0

    def transcribe(self, audio: np.ndarray, sample_rate: int = 16000) -> str:
        self.calls += 1
        return self.heard[audio.size]


def test_cascade_answers_what_the_asr_heard(tmp_path: Path) -> None:
    text = TextAnswerer(LLM, "Answer in one short sentence.", max_new_tokens=8)
    items = spoken_items()
    sizes = [load_audio(it.audio, 16000, orig_sr=it.sampling_rate).size for it in items]
    # the ASR mishears the first two questions as each other's
    heard = [QUESTIONS[1], QUESTIONS[0], *QUESTIONS[2:]]
    asr = HeardByLength(dict(zip(sizes, heard)))
    cascade = CascadeAnswerer(asr, text)
    got = cascade.answer_batch(items)
    want = text.answer_batch([QAItem(it.id, h, it.answers, None, None, None)
                              for it, h in zip(items, heard)])
    assert [a.token_ids for a in got] == [a.token_ids for a in want]
    assert [a.heard for a in got] == heard and asr.calls == len(items)
    assert got[0].token_ids != got[1].token_ids  # the answers really follow what was heard
    assert all(a.stats["asr_ms"] >= 0 and a.stats["ms"] >= a.stats["asr_ms"] for a in got)
    # gold answers that the LLM's answer to the heard question holds are hits; `heard` is kept
    items[2].answers = [got[2].text.split()[0]] if got[2].text.split() else ["x"]
    s = run_eval(items, cascade, "cascade", tmp_path / "c", "t", progress=False, batch_size=3)
    recs = {r["id"]: r for r in records(tmp_path / "c" / "items.jsonl")}
    assert s.mode == "cascade" and s.n == 5 and s.asr == "by-length"
    assert [recs[it.id]["heard"] for it in items] == heard
    assert recs["q2"]["hit"] is bool(got[2].text.split())
    with pytest.raises(EvalError, match="CascadeAnswerer"):
        run_eval(items, text, "cascade", tmp_path / "t", "t", progress=False)


@pytest.mark.slow
def test_eval_cli_cascade_with_faster_whisper(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The packaged spoken question through Whisper tiny.en and the tiny random LLM."""
    q = ROOT / "src" / "echox" / "assets" / "question.wav"
    (tmp_path / "qa.jsonl").write_text(json.dumps(
        {"id": "japan", "audio": str(q), "question": "What is the capital of Japan?",
         "answers": ["Tokyo"]}) + "\n")
    out = tmp_path / "cascade"
    args = ["eval", "--mode", "cascade", "--llm", LLM, "--benchmark",
            f"local:{tmp_path / 'qa.jsonl'}", "--out", str(out)]
    assert main(args) == 0
    (rec,) = records(out / "items.jsonl")
    assert "capital of japan" in rec["heard"].lower()
    assert json.loads((out / "summary.json").read_text())["mode"] == "cascade"
    assert "cascade accuracy" in capsys.readouterr().out
    assert main([*args, "--device", "cuda"]) == 2  # the cascade's LLM runs on the CPU
    assert "--device" in capsys.readouterr().err


# ---------------------------------------------------------------- runner: resume and errors


class Recording(S2TAnswerer):
    """The real s2t answerer, noting the ids of each batch it is given."""

    def __init__(self, model: Any) -> None:
        super().__init__(model, max_new_tokens=6)
        self.batches: list[list[str]] = []

    def answer_batch(self, items: Any) -> Any:
        self.batches.append([it.id for it in items])
        return super().answer_batch(items)


def interrupted(items: list[QAItem], after: int) -> Iterator[QAItem]:
    """The items, then Ctrl-C once `after` of them were read."""
    yield from items[:after]
    raise KeyboardInterrupt


def test_batched_run_resumes_after_an_interrupt(tmp_path: Path, model: Any) -> None:
    items = spoken_items()
    ref = run_eval(items, S2TAnswerer(model, 6), "s2t", tmp_path / "ref", "b", progress=False)
    first = Recording(model)
    with pytest.raises(KeyboardInterrupt):  # stopped while reading the second batch
        run_eval(interrupted(items, 3), first, "s2t", tmp_path / "run", "b", progress=False,
                 batch_size=2)
    assert first.batches == [["q0", "q1"]]
    assert [r["id"] for r in records(tmp_path / "run" / "items.jsonl")] == ["q0", "q1"]
    second = Recording(model)
    summary = run_eval(items, second, "s2t", tmp_path / "run", "b", progress=False, batch_size=2)
    assert second.batches == [["q2", "q3"], ["q4"]]
    got, want = records(tmp_path / "run" / "items.jsonl"), records(tmp_path / "ref" / "items.jsonl")
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for g, w in zip(got, want):  # the same record format, the same answers
        assert list(g) == list(w)
        assert [g[k] for k in ("text", "hit", "answers")] == [w[k] for k in ("text", "hit", "answers")]
        assert set(g["stats"]) == {"ms", "tokens", "batch"}
    assert (summary.n, summary.accuracy) == (ref.n, ref.accuracy)


def test_batched_run_skips_items_already_done(tmp_path: Path, model: Any) -> None:
    items = spoken_items()
    run_eval([items[0], items[2]], S2TAnswerer(model, 6), "s2t", tmp_path, "b", progress=False)
    ans = Recording(model)
    summary = run_eval(items, ans, "s2t", tmp_path, "b", progress=False, batch_size=3)
    assert ans.batches == [["q1", "q3", "q4"]]
    assert summary.n == 5 and len(records(tmp_path / "items.jsonl")) == 5
    again = Recording(model)
    run_eval(items, again, "s2t", tmp_path, "b", progress=False, batch_size=3)
    assert again.batches == []  # nothing left


@pytest.mark.parametrize("batch_size", [1, 4])
def test_bad_audio_fails_as_one_at_a_time(tmp_path: Path, model: Any, batch_size: int) -> None:
    """The items before the bad one are saved, and the bad one raises its own error."""
    items = spoken_items()
    items[2].audio = np.full(8000, np.nan, dtype=np.float32)
    with pytest.raises(AudioError, match="non-finite"):
        run_eval(items, S2TAnswerer(model, 6), "s2t", tmp_path, "b", progress=False,
                 batch_size=batch_size)
    assert [r["id"] for r in records(tmp_path / "items.jsonl")] == ["q0", "q1"]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_undecodable_audio_file_fails_as_one_at_a_time(tmp_path: Path, model: Any, bench: str,
                                                        batch_size: int) -> None:
    src = Path(bench.split(":", 1)[1])
    lines = src.read_text().splitlines()
    (tmp_path / "bad.wav").write_bytes(b"RIFF, but not really a wav file")
    rows = [json.loads(x) for x in lines]
    for r in rows:
        r["audio"] = str(src.parent / r["audio"])
    rows[2]["audio"] = str(tmp_path / "bad.wav")
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = open_benchmark(f"local:{tmp_path / 'qa.jsonl'}")
    with pytest.raises(EvalError, match="cannot decode"):
        run_eval(items, S2TAnswerer(model, 6), "s2t", tmp_path / "run", "b", progress=False,
                 batch_size=batch_size)
    assert [r["id"] for r in records(tmp_path / "run" / "items.jsonl")] == ["q0", "q1"]


def test_batch_size_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(EvalError, match="at least 1"):
        run_eval([], object(), "s2t", tmp_path, "b", batch_size=0)  # type: ignore[arg-type]
    with pytest.raises(EvalError, match="s2s answers one question at a time"):
        run_eval([], object(), "s2s", tmp_path, "b", asr=object(), batch_size=2)  # type: ignore[arg-type]
    assert main(["eval", "--benchmark", "local:nope.jsonl", "--mode", "s2s", "--batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "s2s answers one question at a time" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", "--benchmark", "local:nope.jsonl", "--mode", "text", "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err


# ---------------------------------------------------------------- CLI and benchmark script


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, model: Any) -> Path:
    from echox.infer.bundle import save_bundle

    return save_bundle(tmp_path_factory.mktemp("bundle") / "tiny", model)


def _model_option(mode: str, bundle_dir: Path) -> list[str]:
    """text mode answers with a text LLM, s2t with a speech model (each refuses the other's)."""
    return ["--llm", LLM] if mode == "text" else ["--model", str(bundle_dir)]


@pytest.mark.parametrize("mode", ["text", "s2t"])
def test_cli_batched_equals_one_at_a_time(tmp_path: Path, bench: str, bundle_dir: Path,
                                          mode: str) -> None:
    outs = {}
    for bs in ("1", "3"):
        out = tmp_path / f"bs{bs}"
        assert main(["eval", "--mode", mode, *_model_option(mode, bundle_dir),
                     "--benchmark", bench, "--out", str(out), "--max-new-tokens", "8",
                     "--batch-size", bs]) == 0
        outs[bs] = records(out / "items.jsonl")
    assert [r["text"] for r in outs["3"]] == [r["text"] for r in outs["1"]]
    assert [r["stats"]["batch"] for r in outs["3"]] == [3, 3, 3, 2, 2]


@pytest.mark.parametrize("mode", ["text", "s2t"])
def test_cli_text_beams(tmp_path: Path, bench: str, bundle_dir: Path, mode: str) -> None:
    """`--text-beams 3`: batched equals one at a time, and the answers are not greedy's."""
    outs = {}
    for name, extra in (("greedy", []), ("b1", ["--text-beams", "3", "--batch-size", "1"]),
                        ("b3", ["--text-beams", "3", "--batch-size", "3"])):
        out = tmp_path / name
        assert main(["eval", "--mode", mode, *_model_option(mode, bundle_dir),
                     "--benchmark", bench, "--out", str(out), "--max-new-tokens", "8", *extra]) == 0
        outs[name] = [r["text"] for r in records(out / "items.jsonl")]
    assert outs["b3"] == outs["b1"]
    assert outs["b3"] != outs["greedy"]


def _bench_script() -> Any:
    return load_script("bench/eval_speed.py", "bench_eval_speed")


def test_bench_eval_speed_runs(bench: str, bundle_dir: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    code = _bench_script().main(["--benchmark", bench, "--n", "4", "--batch-size", "3",
                                 "--model", str(bundle_dir), "--llm", LLM,
                                 "--max-new-tokens", "8"])
    assert code == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| text")
            or line.startswith("| s2t")]
    assert len(rows) == 4
    assert all(r.split("|")[2].strip() in ("1", "3") and r.rstrip(" |").endswith("y") for r in rows)


def test_bench_eval_speed_reports_a_benchmark_it_cannot_read(tmp_path: Path) -> None:
    """A benchmark given with a typo, empty or malformed was taken for "no benchmark file":
    s2t skipped, text on the recipe's questions, an empty table and exit 0."""
    from echox.errors import EvalError

    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    for name in ("nope.jsonl", "empty.jsonl", "bad.jsonl"):
        for mode in ("text", "s2t"):
            with pytest.raises(EvalError):
                _bench_script().main(["--benchmark", f"local:{tmp_path / name}", "--modes", mode,
                                      "--n", "1", "--llm", LLM, "--model", str(tmp_path)])


def test_cli_text_mode_keeps_max_new_tokens(tmp_path: Path, bench: str) -> None:
    """`--mode text --max-new-tokens N` was dropped (the answerer kept its 48) and not
    recorded, so a resume with another N was accepted too."""
    out = tmp_path / "t2"
    assert main(["eval", "--mode", "text", "--llm", LLM, "--benchmark", bench, "--out", str(out),
                 "--max-new-tokens", "2"]) == 0
    short = [r["text"] for r in records(out / "items.jsonl")]
    assert json.loads((out / "eval.json").read_text())["max_new_tokens"] == 2
    assert main(["eval", "--mode", "text", "--llm", LLM, "--benchmark", bench, "--out", str(out),
                 "--max-new-tokens", "8"]) == 2
    longer = tmp_path / "default"
    assert main(["eval", "--mode", "text", "--llm", LLM, "--benchmark", bench,
                 "--out", str(longer)]) == 0
    assert "max_new_tokens" not in json.loads((longer / "eval.json").read_text())
    assert main(["eval", "--mode", "text", "--llm", LLM, "--benchmark", bench,  # the same: resumes
                 "--out", str(longer), "--max-new-tokens", "48"]) == 0
    full = [r["text"] for r in records(longer / "items.jsonl")]
    # greedy both times: two tokens are where the 48-token answers start (a byte-level
    # tokenizer may cut a character in two, so compare lengths, not prefixes)
    assert all(len(a) <= 8 for a in short) and sum(map(len, full)) > 4 * sum(map(len, short))
