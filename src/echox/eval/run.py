"""`echox eval`: spoken knowledge QA, UltraEval-Audio style (s2s-aqa).

Modes:
- `text`: the text LLM answers the question text (the knowledge upper bound);
- `s2t`:  EchoX answers the spoken question in text; the text is matched;
- `s2s`:  EchoX answers in speech; the speech is transcribed by an ASR and matched;
- `cascade`: the ASR (`--asr`) transcribes the spoken question and the text LLM of `text`
  mode answers the transcript: the pipeline baseline, and what the speech model's ear would
  give with that ASR in its place. Each record keeps what was heard (`heard`).

`text`, `s2t` and `cascade` answer `--batch-size` questions at a time, greedily, with the prompts padded
on the left: a question gets the answer it gets alone (up to float rounding in the batched
matrix products); `s2s` answers one question at a time through the streaming engine.

Each run writes `items.jsonl` (one scored item per line, appended as it goes, so an
interrupted run resumes where it stopped), `eval.json` (its settings: a folder resumes only
with the same) and `summary.json`; `--compare` draws a bar chart of several runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import logging
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

import numpy as np

from echox.audio import load_audio
from echox.audio import save_audio as write
from echox.config import MAX_THREADS, int_at_least, load_config
from echox.data.match import exist_match
from echox.data.tiny_corpus import greedy_shrinking
from echox.errors import AudioError, EvalError
from echox.eval.benchmarks import QAItem, open_benchmark
from echox.eval.stats import paired_bootstrap
from echox.fileio import (atomic_write_text, check_out_path, check_plot_path, json_objects,
                          open_to_append)
from echox.hub import resolve
from echox.infer.asr import check_asr_spec, make_asr
from echox.infer.bundle import (DEFAULT_MODEL_HELP, add_device_options, add_text_decoding_options, check_device, bundle_folder,
                                load_bundle, text_decoding)
from echox.infer.engine import Engine, EngineConfig, Final, check_max_audio_seconds
from echox.model.checkpoint import add_base_model_options, base_models_of
from echox.model.generation import (SamplingConfig, beam_results, beam_search_steps, cache_kwargs,
                                     output_cache)
from echox.model.prompt import Turn

log = logging.getLogger(__name__)


#: Questions answered together in text and s2t mode when `--batch-size` is not given.
DEFAULT_BATCH_SIZE = 16


@dataclass
class Answer:
    text: str
    audio: np.ndarray | None = None
    sample_rate: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)  # the generated ids, stop token excluded
    heard: str | None = None  # cascade: the ASR's transcript of the spoken question


class Answerer(Protocol):
    def answer(self, item: QAItem) -> Answer: ...


class BatchAnswerer(Answerer, Protocol):
    def answer_batch(self, items: Sequence[QAItem]) -> list[Answer]: ...


def check_batch_size(mode: str, batch_size: int) -> None:
    """Reject a batch size the mode cannot use, with a one-line reason."""
    if batch_size < 1:
        raise EvalError(f"--batch-size must be at least 1, got {batch_size}")
    if mode == "s2s" and batch_size > 1:
        raise EvalError(f"--batch-size {batch_size}: mode s2s answers one question at a time "
                        "through the streaming engine; use 1 (or modes text / s2t / cascade)")


def _batch_stats(seconds: float, n: int, tokens: int) -> dict[str, Any]:
    """Per-item stats of a batch answered in `seconds`: each item gets an equal share."""
    return {"ms": 1000 * seconds / n, "tokens": tokens, "batch": n}


def _wav16k(item: QAItem) -> np.ndarray:
    if item.audio is None or item.sampling_rate is None:
        raise ValueError(f"item {item.id}: no audio")
    return load_audio(item.audio, 16000, orig_sr=item.sampling_rate, max_seconds=None)


TEXT_MAX_NEW_TOKENS = 48  # the text answerer's answers (the tiny corpus's own are 48 long)
SPEECH_MAX_NEW_TOKENS = 64  # the speech model's (s2t, s2s)


class TextAnswerer:
    """The base text LLM on the question text: what the speech model should preserve.

    Questions are answered in batches: chat prompts padded on the left with the tokenizer's
    pad token (its EOS when it has none) and decoded greedily by the corpus builder's
    `greedy_shrinking`, which gives each row the tokens `generate` gives it alone and stops
    computing a row once it has ended. `decoding`: its repetition guards apply, and with
    `num_beams > 1` the answers come from beam search (`beam_search_steps`, as the speech
    model's answers do); its `max_new_tokens` does not (the answerer's own does).
    """

    def __init__(self, llm: str, system_prompt: str | None = None,
                 max_new_tokens: int = TEXT_MAX_NEW_TOKENS,
                 decoding: SamplingConfig | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer


        folder = resolve(llm)
        self.tok = AutoTokenizer.from_pretrained(folder)
        if self.tok.chat_template is None:
            raise EvalError(f"{llm}: the tokenizer has no chat template; "
                            "text mode needs a chat LLM")
        self.tok.padding_side = "left"  # answers grow on the right
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tok.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [eos])
        self.system_prompt, self.max_new_tokens = system_prompt, max_new_tokens
        self.decoding = decoding

    def prompt(self, question: str) -> str:
        """The chat prompt of one question, ending where the assistant's answer starts."""
        msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        msgs.append({"role": "user", "content": question})
        return self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def answer_batch(self, items: Sequence[QAItem]) -> list[Answer]:
        """Answers to several questions at once, in their order."""
        if not items:
            return []
        t0 = time.perf_counter()
        enc = self.tok([self.prompt(it.question) for it in items], return_tensors="pt",
                       padding=True, add_special_tokens=False)
        if self.decoding is not None and self.decoding.num_beams > 1:
            rows = self._beams(enc["input_ids"], enc["attention_mask"])
        else:
            rows = greedy_shrinking(self.model, enc["input_ids"], enc["attention_mask"],
                                    self.max_new_tokens, self.eos_ids, guard=self.decoding)
        seconds = time.perf_counter() - t0
        out = []
        for row in rows:
            ids = row[:-1] if row and row[-1] in self.eos_ids else row
            out.append(Answer(self.tok.decode(ids, skip_special_tokens=True).strip(),
                              stats=_batch_stats(seconds, len(items), len(ids)), token_ids=ids))
        return out

    def _beams(self, input_ids: Any, attention_mask: Any) -> list[list[int]]:
        """Each row's beam-search answer (no EOS), all rows in one batch."""
        import torch

        model = self.model

        def step(embeds, mask, pos, cache):  # type: ignore[no-untyped-def]
            out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True,
                        logits_to_keep=1, **cache_kwargs(model, cache))
            return out.logits, out.logits, output_cache(out)  # the search reads no hidden states

        embed = model.get_input_embeddings()
        assert self.decoding is not None
        sampling = replace(self.decoding, max_new_tokens=self.max_new_tokens)
        with torch.inference_mode():
            found = beam_results(beam_search_steps(step, embed, embed(input_ids), attention_mask,
                                                   sorted(self.eos_ids), [sampling] * len(input_ids)))
        return [r.tokens for r in found]

    def answer(self, item: QAItem) -> Answer:
        return self.answer_batch([item])[0]


class S2TAnswerer:
    """EchoX answering the spoken question in text (no speech synthesis).

    A batch of questions is one `EchoX.generate_text` call (greedy, or beam search with
    `sampling.num_beams > 1`), which pads the merged speech + text prompts on the left.
    """

    def __init__(self, model: Any, max_new_tokens: int = 64, sampling: SamplingConfig | None = None) -> None:
        self.model = model
        self.sampling = sampling or SamplingConfig(max_new_tokens=max_new_tokens)

    def answer_batch(self, items: Sequence[QAItem]) -> list[Answer]:
        """Text answers to several spoken questions at once, in their order."""
        if not items:
            return []
        t0 = time.perf_counter()
        dialogues = [[Turn("user", audio=_wav16k(it))] for it in items]
        g = self.model.generate_text(dialogues, self.sampling)
        seconds = time.perf_counter() - t0
        return [Answer(text.strip(), stats=_batch_stats(seconds, len(items), len(ids)),
                       token_ids=list(ids))
                for text, ids in zip(g.texts, g.token_ids)]

    def answer(self, item: QAItem) -> Answer:
        return self.answer_batch([item])[0]


class CascadeAnswerer:
    """The cascade baseline: an ASR transcribes each spoken question, then the text LLM
    (`TextAnswerer`) answers the transcripts in one batch. Its accuracy against text mode's is
    what the ASR's mistakes cost; against s2t mode's, how the speech model's ear compares."""

    def __init__(self, asr: Any, text: TextAnswerer) -> None:
        self.asr, self.text = asr, text

    def answer_batch(self, items: Sequence[QAItem]) -> list[Answer]:
        """Transcribe every question, then answer the transcripts together, in order."""
        if not items:
            return []
        t0 = time.perf_counter()
        heard = [self.asr.transcribe(_wav16k(it), 16000).strip() for it in items]
        asr_ms = 1000 * (time.perf_counter() - t0) / len(items)
        answers = self.text.answer_batch([replace(it, question=h) for it, h in zip(items, heard)])
        for ans, h in zip(answers, heard):
            ans.heard = h
            ans.stats["asr_ms"] = asr_ms
            ans.stats["ms"] = ans.stats.get("ms", 0.0) + asr_ms
        return answers

    def answer(self, item: QAItem) -> Answer:
        return self.answer_batch([item])[0]


class S2SAnswerer:
    """EchoX answering in speech through the streaming engine."""

    def __init__(self, bundle: Any, stream: bool = True, max_new_tokens: int = 64,
                 sampling: SamplingConfig | None = None, whole_response: bool = False) -> None:
        cfg = EngineConfig(sampling=sampling or SamplingConfig(max_new_tokens=max_new_tokens), stream=stream,
                           whole_response=whole_response)
        self.engine = Engine(bundle, cfg)

    def answer(self, item: QAItem) -> Answer:
        session = self.engine.session()
        final = None
        for ev in session.respond(audio=_wav16k(item)):
            if isinstance(ev, Final):
                final = ev
        if final is None:  # pragma: no cover - the engine always ends with Final
            raise RuntimeError("the engine gave no final event")
        return Answer(final.text, final.audio, final.sample_rate, asdict(final.stats))


@dataclass
class EvalSummary:
    name: str
    mode: str
    benchmark: str
    n: int
    accuracy: float
    mean_latency_ms: float | None  # the model's answering time, the answer's ASR left out
    asr: str | None = None
    mean_answer_asr_ms: float | None = None  # s2s: the ASR of the spoken answer, for scoring
    ids: list[str] | None = None  # the items counted (items.jsonl may hold others); None: older runs

    def line(self) -> str:
        lat = f", mean latency {self.mean_latency_ms:.0f} ms" if self.mean_latency_ms else ""
        return (f"{self.name}: {self.benchmark} {self.mode} accuracy {100 * self.accuracy:.1f}% "
                f"on {self.n} items{lat}")


def scored_items(path: Path) -> dict[str, dict[str, Any]]:
    """The scored records of a run's items.jsonl, by id (what `echox eval` counts and
    `--compare` pairs; bench scripts read runs with it too). A record without a true/false `hit`
    or with a latency that is not a finite number (an edit, another program's line) is no
    answer the summary can count: its item is answered again."""
    def scored(rec: dict[str, Any]) -> bool:
        return isinstance(rec.get("hit"), bool) and all(
            k not in rec or (isinstance(rec[k], (int, float)) and not isinstance(rec[k], bool)
                             and math.isfinite(rec[k])) for k in ("latency_ms", "answer_asr_ms"))

    done = {}
    for lineno, rec in json_objects(path, "id", log):
        if scored(rec):
            done[rec["id"]] = rec
        else:
            log.warning("%s:%d: no true/false hit or a latency that is not a number; its item is "
                        "answered again", path, lineno)
    return done


def _check_same_item(path: Path, rec: dict[str, Any], item: QAItem) -> None:
    """A record kept from an earlier run counts for `item` only if it is of the same question
    and was scored against the same gold answers: a run resumed on another file (a local one
    without ids names its rows `local-0`, ...) or on edited answers reused the old hits."""
    q, answers = rec.get("question"), rec.get("answers")
    if isinstance(q, str) and q.split() != item.question.split():
        raise EvalError(f"{path} holds item {item.id!r} as another question ({q!r}; now "
                        f"{item.question!r}): a run folder holds one benchmark's answers; give "
                        "another --out (a local benchmark without ids names its rows by number: "
                        "give each question an 'id')")
    if isinstance(answers, list) and answers != list(item.answers):
        raise EvalError(f"{path} scored item {item.id!r} against other gold answers ({answers!r}; "
                        f"now {list(item.answers)!r}): give another --out to score them anew")


def check_unique_ids(items: Iterable[QAItem], benchmark: str = "the benchmark") -> list[QAItem]:
    """The items, each read once (its question, answers and audio file's header;
    `Benchmark.texts()`), with their ids checked unique."""
    seen: set[str] = set()
    out = []
    for item in items:
        if item.id in seen:
            raise EvalError(f"item id {item.id!r} occurs twice in {benchmark}; ids must be unique")
        seen.add(item.id)
        out.append(item)
    return out


def check_resumed_items(path: Path, items: Iterable[QAItem],
                        benchmark: str = "the benchmark") -> dict[str, dict[str, Any]]:
    """`scored_items(path)`, each checked against the item of its id (`_check_same_item`), and
    every item read once (`check_unique_ids`): a bad item or a resumed run on another question
    file is refused before the model loads, not after the items before it were answered."""
    done = scored_items(path)
    for item in check_unique_ids(items, benchmark):
        if item.id in done:
            _check_same_item(path, done[item.id], item)
    return done


def _pending_batches(items: Iterable[QAItem], size: int, done: dict[str, Any],
                     skipped: Any) -> Iterator[list[QAItem]]:
    """The items not done yet, in order, `size` at a time (`skipped()` is called per done one).

    When reading an item fails (audio that cannot be decoded), the items read before it are
    yielded first and the error is raised after them: as with one item at a time, everything
    before a bad item is answered and saved.
    """
    batch: list[QAItem] = []
    queued: set[str] = set()
    it = iter(items)
    while True:
        try:
            item = next(it)
        except StopIteration:
            break
        except Exception:
            if batch:
                yield batch
            raise
        if item.id in done or item.id in queued:
            skipped()
            continue
        batch.append(item)
        queued.add(item.id)
        if len(batch) == size:
            yield batch
            batch, queued = [], set()
    if batch:
        yield batch


def _answers(answerer: Answerer, batch: list[QAItem]) -> Iterator[tuple[QAItem, Answer, float]]:
    """`(item, answer, seconds spent answering it)` for each item of a batch, in order.

    A batch goes to `answer_batch` when the answerer has one; the batch's time is shared
    equally. If the batch fails, its items are answered one by one, so the item at fault
    raises its own error after the ones before it are saved; when none fails alone, the
    batch's error is raised (say, memory for the whole batch).
    """
    batch_error: Exception | None = None
    if len(batch) > 1 and hasattr(answerer, "answer_batch"):
        t0 = time.perf_counter()
        try:
            answers = answerer.answer_batch(batch)
        except Exception as err:  # noqa: BLE001 - re-raised below unless an item fails alone
            log.info("a batch of %d items failed (%s); answering them one at a time",
                     len(batch), err)
            batch_error = err
        else:
            if len(answers) != len(batch):
                raise RuntimeError(f"{type(answerer).__name__}.answer_batch gave {len(answers)} "
                                   f"answers to {len(batch)} items")
            share = (time.perf_counter() - t0) / len(batch)
            for item, ans in zip(batch, answers):
                yield item, ans, share
            return
    for item in batch:
        t0 = time.perf_counter()
        try:
            ans = answerer.answer(item)
        except AudioError as err:  # name the item at fault: a benchmark holds hundreds
            where = item.audio_path or "its audio"
            raise type(err)(f"item {item.id} ({where}): {err}") from err
        yield item, ans, time.perf_counter() - t0
    if batch_error is not None:
        raise batch_error


def _audio_name(item_id: str) -> str:
    """The file name of an item's spoken answer in `audio/`: its id with path separators (and
    NUL) replaced, so that an id such as `../x` or `/data/q1` stays inside the run folder
    instead of overwriting a file elsewhere; a replaced id gets a digest of itself, so that
    `a/b` and `a_b` do not share a file."""
    safe = "".join("_" if c in "/\\\0" else c for c in item_id)
    if safe != item_id:
        safe += "-" + hashlib.sha256(item_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return safe + ".wav"


def _score(item: QAItem, ans: Answer, mode: str, asr: Any, out_dir: Path,
           save_audio: bool) -> dict[str, Any]:
    """One `items.jsonl` record, without latency and stats: the answer matched to the gold
    (in s2s mode its transcript, with the time the ASR took, `answer_asr_ms`)."""
    rec: dict[str, Any] = {"id": item.id, "question": item.question, "answers": item.answers,
                           "text": ans.text}
    hyp = ans.text
    if mode == "s2s":
        if ans.audio is None or ans.audio.size == 0:
            hyp = ""
        else:
            t0 = time.perf_counter()
            hyp = asr.transcribe(ans.audio, ans.sample_rate or 16000)
            rec["answer_asr_ms"] = 1000 * (time.perf_counter() - t0)
            if save_audio:
                write(out_dir / "audio" / _audio_name(item.id), ans.audio,
                      ans.sample_rate or 16000, clip=True)
        rec["transcript"] = hyp
        rec["audio_seconds"] = 0.0 if ans.audio is None else ans.audio.size / (ans.sample_rate or 16000)
    if ans.heard is not None:
        rec["heard"] = ans.heard
    rec["hit"] = exist_match(hyp, item.answers)
    return rec


def run_eval(
    items: Iterable[QAItem], answerer: Answerer, mode: str, out_dir: Path, benchmark: str,
    asr: Any = None, save_audio: bool = False, progress: bool = True, total: int | None = None,
    batch_size: int = 1, done: dict[str, dict[str, Any]] | None = None,
) -> EvalSummary:
    """Answer and score every item not yet in `out_dir/items.jsonl`, then write the summary of
    `items` (records of other items the folder holds are kept but not counted).

    Items go to the answerer `batch_size` at a time (see :func:`check_batch_size`); each
    record is appended and flushed as soon as it is scored, so an interrupted run loses at
    most the batch in flight. A record's `latency_ms` is its share of the batch's answering
    time: the model's (in cascade mode the question's ASR too), not the scoring's; in s2s mode
    the ASR of the spoken answer is timed apart (`answer_asr_ms`, its mean in the summary's
    `mean_answer_asr_ms`).

    `done` is `scored_items(out_dir / "items.jsonl")` where the caller has read it already
    (`check_resumed_items`, before the model loads).
    """
    from tqdm.auto import tqdm

    if mode == "s2s" and asr is None:
        raise EvalError("mode s2s needs an ASR to transcribe the speech output")
    if mode == "cascade" and not isinstance(answerer, CascadeAnswerer):
        raise EvalError("mode cascade needs a CascadeAnswerer (an ASR and a text LLM)")
    check_batch_size(mode, batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "items.jsonl"
    done = scored_items(path) if done is None else dict(done)
    seen: dict[str, None] = {}  # this benchmark's ids: the summary counts these, not the whole file

    def noted(items: Iterable[QAItem]) -> Iterator[QAItem]:
        for item in items:
            if item.id in seen:  # it would be skipped as done: a question never scored
                raise EvalError(f"item id {item.id!r} occurs twice in {benchmark}; ids must be unique")
            seen[item.id] = None
            if item.id in done:
                _check_same_item(path, done[item.id], item)
            yield item

    with open_to_append(path) as f, tqdm(total=total, disable=not progress, desc=f"eval {mode}") as bar:
        for batch in _pending_batches(noted(items), batch_size, done, lambda: bar.update(1)):
            for item, ans, answer_s in _answers(answerer, batch):
                rec = _score(item, ans, mode, asr, out_dir, save_audio)
                rec["latency_ms"] = 1000 * answer_s
                rec["stats"] = ans.stats
                f.write(json.dumps(rec) + "\n")
                f.flush()
                done[item.id] = rec
                bar.update(1)
    recs = [done[i] for i in seen]
    def older(r: dict[str, Any]) -> bool:  # s2s, written before the answer's ASR was timed apart
        return mode == "s2s" and bool(r.get("audio_seconds")) and "answer_asr_ms" not in r

    n_older = sum(map(older, recs))
    if n_older:
        log.warning("%d of %d records in %s were written by an older echox, whose s2s latency_ms "
                    "includes the ASR of the spoken answer: the mean latency leaves them out (%s)",
                    n_older, len(recs), out_dir / "items.jsonl",
                    "none is left, so it is empty" if n_older == len(recs)
                    else f"it is the mean of the other {len(recs) - n_older}")
    lat = [r["latency_ms"] for r in recs if "latency_ms" in r and not older(r)]
    asr_ms = [r["answer_asr_ms"] for r in recs if "answer_asr_ms" in r]
    summary = EvalSummary(
        name=out_dir.name, mode=mode, benchmark=benchmark, n=len(recs),
        accuracy=sum(bool(r["hit"]) for r in recs) / max(len(recs), 1),
        mean_latency_ms=float(np.mean(lat)) if lat else None,
        asr=getattr(asr if asr is not None else getattr(answerer, "asr", None), "name", None),
        mean_answer_asr_ms=float(np.mean(asr_ms)) if asr_ms else None, ids=list(seen),
    )
    (out_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary


def read_summary(run_dir: Path) -> EvalSummary:
    """The `summary.json` of an `echox eval` run folder; anything else is one EvalError."""
    p = Path(run_dir) / "summary.json"
    if not p.is_file():
        raise EvalError(f"no summary.json in {run_dir}: run `echox eval` there first")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise EvalError(f"{p}: not a readable JSON file ({type(e).__name__})") from e
    known = {f.name for f in fields(EvalSummary)}
    required = {f.name for f in fields(EvalSummary) if f.default is MISSING}
    if not isinstance(data, dict) or not required <= set(data):
        raise EvalError(f"{p}: not an echox eval summary (it needs {sorted(required)})")
    s = EvalSummary(**{k: v for k, v in data.items() if k in known})
    number = (int, float)
    if (not all(isinstance(v, str) for v in (s.name, s.mode, s.benchmark))
            or not isinstance(s.n, int) or isinstance(s.accuracy, bool)
            or not isinstance(s.accuracy, number)
            or not all(v is None or isinstance(v, number)
                       for v in (s.mean_latency_ms, s.mean_answer_asr_ms))
            or not (s.ids is None or (isinstance(s.ids, list) and all(isinstance(i, str) for i in s.ids)))):
        raise EvalError(f"{p}: not an echox eval summary (a value of the wrong type)")
    if (isinstance(s.n, bool) or s.n < 0 or not 0 <= s.accuracy <= 1
            or not all(v is None or (not isinstance(v, bool) and math.isfinite(v) and v >= 0)
                       for v in (s.mean_latency_ms, s.mean_answer_asr_ms))):
        raise EvalError(f"{p}: not an echox eval summary (n, accuracy or a latency out of range)")
    return s


def _check_same_questions(first_dir: Path, first: dict[str, dict[str, Any]], run_dir: Path,
                          run: dict[str, dict[str, Any]]) -> None:
    """Runs are paired by item id, and an id can name another question in another file (a
    local file without ids numbers its rows: `local-0`, ...): such runs are refused."""
    for k in sorted(first.keys() & run.keys()):
        a, b = first[k].get("question"), run[k].get("question")
        if isinstance(a, str) and isinstance(b, str) and a.split() != b.split():
            raise EvalError(f"{run_dir} cannot be paired with {first_dir}: item {k!r} is {b!r} "
                            f"in the one and {a!r} in the other (a local benchmark without ids "
                            "names its rows by number: give each question an 'id')")


def compare_runs(run_dirs: list[Path], png: Path | None) -> list[EvalSummary]:
    if png is not None:
        check_plot_path(png, "--png")
    sums = [read_summary(Path(d)) for d in run_dirs]
    # each run against the first, on the questions both answered: a paired difference
    recs = [scored_items(Path(d) / "items.jsonl") for d in run_dirs]
    # only the items each summary counted: a run rerun on fewer items keeps the others' lines
    recs = [rs if s.ids is None else {k: rs[k] for k in s.ids if k in rs} for s, rs in zip(sums, recs)]
    for d, rs in zip(run_dirs[1:], recs[1:]):
        _check_same_questions(run_dirs[0], recs[0], d, rs)
    hits = [{k: bool(r["hit"]) for k, r in rs.items() if "hit" in r} for rs in recs]
    print(f"{'run':<28} {'mode':<7} {'n':>5} {'accuracy':>9}   vs the first run (paired, 95 % bootstrap)")
    names = [Path(d).name for d in run_dirs]
    if len(set(names)) < len(names):  # e.g. several runs/<arm>/s2t: name them by their parent too
        names = [f"{Path(d).parent.name}/{Path(d).name}" for d in run_dirs]
    for i, (s, name) in enumerate(zip(sums, names)):
        line = f"{name[-28:]:<28} {s.mode:<7} {s.n:>5} {100 * s.accuracy:>8.1f}%"
        shared = sorted(set(hits[0]) & set(hits[i]))
        if i and shared:
            b = paired_bootstrap([hits[i][k] - hits[0][k] for k in shared])
            line += (f"   {100 * b['mean']:+.1f} pts [{100 * b['lo']:+.1f}, {100 * b['hi']:+.1f}]"
                     f" on {b['n']} shared")
        elif i:  # other questions: the two accuracies do not compare item by item
            line += "   no shared items: not paired"
        print(line)
    if png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1.6 * len(sums) + 2, 4))
        bars = ax.bar([f"{s.name}\n({s.mode})" for s in sums], [100 * s.accuracy for s in sums])
        ax.bar_label(bars, fmt="%.1f")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(sums[0].benchmark if sums else "")
        fig.tight_layout()
        try:
            png.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(png, dpi=100)
        except (OSError, ValueError, RuntimeError) as e:  # an unwritable folder, an unknown
            # image suffix, .pgf without the LaTeX it runs
            raise EvalError(f"--png {png}: {e}") from e
        finally:
            plt.close(fig)
    return sums


def cmd_eval(args: argparse.Namespace) -> int:
    if args.compare:
        compare_runs([Path(p) for p in args.compare], Path(args.png) if args.png else None)
        return 0
    if not args.benchmark:
        raise EvalError("give --benchmark (e.g. local:data/tiny/test/qa.jsonl or llama-questions)")
    if args.png:  # before the run: a bad chart path was found only once every item was answered
        check_plot_path(args.png, "--png")
    batch_size = args.batch_size
    if batch_size is None:
        batch_size = 1 if args.mode == "s2s" else DEFAULT_BATCH_SIZE
    check_batch_size(args.mode, batch_size)
    sampling = eval_sampling(args)  # checked before anything slow
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if (args.no_stream or args.whole_response or args.save_audio) and args.mode != "s2s":
        given = [o for o, v in (("--no-stream", args.no_stream), ("--whole-response",
                 args.whole_response), ("--save-audio", args.save_audio)) if v]
        raise EvalError(f"{' and '.join(given)}: --no-stream, --whole-response and --save-audio "
                        f"apply to --mode s2s only (--mode {args.mode} speaks no answer)")
    if args.whole_response and not args.no_stream:
        raise EvalError("--whole-response needs --no-stream (a streamed answer is voiced segment by segment)")
    if args.mode in ("text", "cascade"):
        if args.device != "cpu" or args.dtype not in (None, "fp32"):
            raise EvalError(f"--device / --dtype apply to the s2t and s2s modes (a bundle); "
                            f"{args.mode} mode runs its LLM on the CPU in float32")
        if args.max_audio_seconds is not None:
            raise EvalError(f"--max-audio-seconds applies to the s2t and s2s modes; {args.mode} "
                            "mode gives the questions to the text LLM or the ASR")
        if args.model:  # it would be ignored: a whole run on another LLM than the one meant
            raise EvalError(f"--model names the speech model of the s2t and s2s modes; {args.mode} "
                            "mode answers with the text LLM of --llm (default: the --config's LLM)")
        if args.base_llm or args.base_encoder:
            raise EvalError(f"--base-llm / --base-encoder relocate the base models of --model (the "
                            f"s2t and s2s modes); {args.mode} mode names its LLM with --llm")
    else:
        if args.llm:
            raise EvalError(f"--llm names the text LLM of the text and cascade modes; {args.mode} "
                            "mode answers with the speech model of --model")
        check_device(args.device)
        base = base_models_of(args)  # checked before the run folder is made
        if args.max_audio_seconds is not None:
            check_max_audio_seconds(args.max_audio_seconds)
    if args.mode in ("s2s", "cascade"):
        check_asr_spec(args.asr)
    bench = open_benchmark(args.benchmark, limit=args.limit, decode_audio=args.mode != "text")
    # every item read and checked before the run folder is made: a refused benchmark left an
    # eval.json behind
    items = check_unique_ids(bench.texts(), args.benchmark)
    if args.out is not None and not args.out.strip():  # `--out "$UNSET"`: not the default
        raise EvalError("--out is empty; give a run folder")
    out = Path(f"runs/eval/{args.mode}" if args.out is None else args.out)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out} is a file; give a run folder")
    check_out_path(out)  # not below a file, not inside the shipped model's folder
    check_run_folder(out)
    check_not_input(out, Path(bench.source) if Path(bench.source).exists() else None)  # local
    try:  # before anything slow: a run folder that cannot be made fails now, not after the load
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvalError(f"--out {out}: cannot create the run folder ({e.strerror or e})") from e
    settings: dict[str, Any] = {"mode": args.mode, "benchmark": _benchmark_setting(args.benchmark),
                                **asdict(sampling)}
    if args.mode in ("text", "cascade"):
        llm = args.llm or load_config(args.config).llm.name_or_path
        settings.update(llm=llm, system_prompt=args.system_prompt or None)
        if sampling.max_new_tokens == TEXT_MAX_NEW_TOKENS:  # the default, given or not: as
            del settings["max_new_tokens"]  # runs recorded it before the option counted here
    else:
        settings["model"] = str(bundle_folder(args.model).resolve())
        settings["dtype"] = args.dtype  # answers in another precision are other answers
        settings["base_models"] = base  # and of another base LLM
    if args.mode in ("s2s", "cascade"):
        settings["asr"] = args.asr
    if args.mode == "s2s":
        settings.update(stream=not args.no_stream, whole_response=args.whole_response)
    check_run_settings(out, settings)
    done = check_resumed_items(out / "items.jsonl", items, args.benchmark)
    asr = None
    if args.mode in ("text", "cascade"):
        answerer: Answerer = TextAnswerer(llm, args.system_prompt or None,
                                          max_new_tokens=sampling.max_new_tokens, decoding=sampling)
        if args.mode == "cascade":
            answerer = CascadeAnswerer(make_asr(args.asr), answerer)
    else:
        bundle = load_bundle(bundle_folder(args.model), device=args.device, dtype=args.dtype,
                             base_models=base)
        if args.max_audio_seconds is not None:  # the limit the model and the engine read
            bundle.model.config.encoder.max_seconds = float(args.max_audio_seconds)
        if args.mode == "s2t":
            answerer = S2TAnswerer(bundle.model, sampling=sampling)
        else:
            answerer = S2SAnswerer(bundle, stream=not args.no_stream, sampling=sampling,
                                   whole_response=args.whole_response)
            asr = make_asr(args.asr)
    s = run_eval(bench, answerer, args.mode, out, args.benchmark, asr=asr,
                 save_audio=args.save_audio, total=len(bench), batch_size=batch_size, done=done)
    print(s.line())
    print(f"per-item results: {out / 'items.jsonl'}")
    if args.png:
        compare_runs([out], Path(args.png))
    return 0


def check_run_folder(out: Path) -> None:
    """Refuse a folder whose files a run would overwrite but did not write: a summary.json
    without the items.jsonl or eval.json every run writes first is another command's (a corpus
    build's, a vocoder distillation's), and a folder in the place of a run file cannot be
    written."""
    names = ("items.jsonl", "eval.json", "summary.json")
    for name in names:
        if (out / name).exists() and not (out / name).is_file():
            raise EvalError(f"--out {out}: its {name} is not a file; give another --out")
    if (out / "summary.json").exists() and not any((out / n).exists() for n in names[:2]):
        raise EvalError(f"--out {out} holds a summary.json of something else than an eval run "
                        "(no items.jsonl or eval.json), which the run would overwrite; give "
                        "another --out")


RUN_FILES = ("items.jsonl", "eval.json", "summary.json")


def check_not_input(out: Path, source: Path | None) -> None:
    """Refuse a run folder whose files would replace the benchmark it reads: the benchmark is
    one of them (an `eval.json` of questions), or the folder lies inside a benchmark folder."""
    if source is None:
        return
    src, dst = source.resolve(), out.resolve()
    if dst == src or src in dst.parents or (src.parent == dst and src.name in RUN_FILES):
        raise EvalError(f"--out {out} would write over the benchmark {source}; give another --out")


def check_run_settings(out: Path, settings: dict[str, Any]) -> None:
    """A run folder resumes only with the settings it was started with (`eval.json`): the
    records of another mode, model, benchmark or decoding would count as this run's answers.
    A folder with no scored item yet (a run that failed before its first answer, say on a
    mistyped --model) takes the new settings."""
    path = out / "eval.json"
    settings = json.loads(json.dumps(settings))  # as they read back
    if path.is_file() and scored_items(out / "items.jsonl"):
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:
            raise EvalError(f"{path}: not a readable JSON file ({type(e).__name__})") from e
        if not isinstance(old, dict):
            raise EvalError(f"{path}: not the settings of an echox eval run")
        diff = {k: (old.get(k), settings.get(k)) for k in dict.fromkeys([*old, *settings])
                if _setting(k, old.get(k)) != _setting(k, settings.get(k))
                and not (k in UNRECORDED_BEFORE and k not in old)}  # an older run's: unknown
        if diff:
            raise EvalError(f"--out {out} holds a run made with other settings {diff} (old, new): "
                            "give another --out or delete it")
        return
    if not path.is_file() and scored_items(out / "items.jsonl"):
        raise EvalError(f"--out {out} holds scored items but no eval.json: the settings they were "
                        "answered with are unknown (another mode's or model's would count as "
                        "this run's); give another --out")
    if path.is_file():  # a run's settings are replaced; another program's file is not
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            old = {"mode": None}  # a run killed while writing them (before atomic writes)
        if not (isinstance(old, dict) and "mode" in old):
            raise EvalError(f"--out {out}: its eval.json is not an echox eval run's settings, "
                            "and the run would replace it; give another --out")
    atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


#: settings older versions did not record: a run folder without them resumes with any value
UNRECORDED_BEFORE = ("dtype", "base_models")


def _benchmark_setting(spec: str) -> str:
    """A benchmark spec as `eval.json` records it: the file of `local:PATH` and `NAME=PATH` as
    an absolute path (`r3.jsonl` and `./r3.jsonl` are one file; `r3.jsonl` from another folder
    is another); a hub name as given."""
    spec = spec.strip()
    if spec.startswith("local:"):
        return "local:" + str(Path(spec[len("local:"):].strip()).expanduser().resolve())
    if "=" in spec:
        name, path = spec.split("=", 1)
        return f"{name.strip()}={Path(path.strip()).expanduser().resolve()}"
    return spec


def _setting(key: str, value: Any) -> Any:
    """A recorded setting as compared: paths resolved (a run recorded them as typed before), so
    that one file spelled two ways resumes."""
    if isinstance(value, str) and key == "benchmark":
        return _benchmark_setting(value)
    if isinstance(value, str) and key == "model":
        return str(Path(value).expanduser().resolve())
    return value


def eval_sampling(args: argparse.Namespace) -> SamplingConfig:
    """The run's text decoding: greedy or beam search, its answer length and repetition guards."""
    try:
        n = args.max_new_tokens
        if n is None:  # the text answerer's 48 (the corpus's own answers), the speech model's 64
            n = TEXT_MAX_NEW_TOKENS if args.mode in ("text", "cascade") else SPEECH_MAX_NEW_TOKENS
        return SamplingConfig(max_new_tokens=n, **text_decoding(args))
    except ValueError as e:
        raise EvalError(f"decoding options: {e}") from None


def eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"EchoX bundle folder {DEFAULT_MODEL_HELP}")
    p.add_argument("--benchmark", help="llama-questions | web-questions | trivia-qa (from the hub), "
                                       "one of those names =PATH (a local copy in its schema), or "
                                       "local:PATH (EchoX's QA JSONL)")
    p.add_argument("--mode", choices=["text", "s2t", "s2s", "cascade"], default="s2s")

    add_device_options(p)
    add_base_model_options(p)
    p.add_argument("--max-audio-seconds", type=float, metavar="S",
                   help="s2t / s2s: longest spoken question answered, in seconds (default: the "
                        "model's encoder.max_seconds, 30; at most 600); a longer one stops the run with one line")
    p.add_argument("--limit", type=int_at_least(1), help="first N items only")
    p.add_argument("--out", help="run folder (default runs/eval/<mode>); an existing one resumes "
                                    "(with the settings it was started with)")
    p.add_argument("--asr", default="faster-whisper",
                   help="s2s: transcribes the spoken answers; cascade: the spoken questions. "
                        "faster-whisper[:PATH] | transformers[:NAME]")
    p.add_argument("--llm", help="text / cascade mode: the LLM (default: the config's LLM)")
    p.add_argument("--config", default="tiny", help="text / cascade mode: preset/YAML naming the LLM")
    p.add_argument("--system-prompt", default="Answer in one short sentence.", help="text / cascade mode")
    p.add_argument("--threads", type=int_at_least(1, MAX_THREADS),
                   help="torch intra-op threads (default: torch's)")
    p.add_argument("--max-new-tokens", type=int,
                   help=f"longest answer in tokens (default: {TEXT_MAX_NEW_TOKENS} in text / cascade "
                        f"mode, as the tiny corpus's answers; {SPEECH_MAX_NEW_TOKENS} in s2t / s2s)")
    add_text_decoding_options(p)
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"text / s2t / cascade: questions answered together (default "
                        f"{DEFAULT_BATCH_SIZE}); s2s answers one at a time")
    p.add_argument("--no-stream", action="store_true",
                   help="s2s: voice the answer after its text is complete (the same segments)")
    p.add_argument("--whole-response", action="store_true",
                   help="s2s, with --no-stream: one echo segment for the whole answer, no trigger cuts")
    p.add_argument("--save-audio", action="store_true", help="s2s: keep each spoken answer as a wav")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR",
                   help="table of finished runs (and a bar chart with --png)")
    p.add_argument("--png", help="bar chart path")

