"""More to hear for Stage I: ASR turns and a further training voice, from a built tiny corpus.

`echox data s2t-mix --corpus data/tiny` adds, to the train split only:

- `train/audio/q_<voice>/<id>.wav`: every train question spoken by espeak-ng with `--voice`
  (default `en-gb`). The test split's espeak-ng copy uses `en-us`, which is refused here so
  that it stays an unseen voice.
- `train/dialogues_<voice>.jsonl`: the QA dialogues with that audio as the question.
- `train/asr.jsonl`: ASR turns. The user turn is a clip with an instruction beside it
  (`"prompt": "Transcribe this audio."`), the assistant turn its exact text. Clips: the
  piper questions, the piper answers and the extra voice's questions.
- with `--asr-extra TEXTS.jsonl` (rows `{"id", "text"}`, e.g. `recipes/tiny/asr_extra.jsonl`):
  `train/audio/x/<id>.wav`, each text spoken by piper (the training voice), and
  `train/asr_extra.jsonl`, their ASR turns: more names to hear than the corpus has.
- with `--asr-tts TTS.jsonl` (a TTS manifest already spoken, rows `{"id", "text", "audio"}`,
  e.g. the tiny recipe's `tts_extra/tts.jsonl`, whose facts and subjects exclude the test
  split's): `train/asr_tts.jsonl`, an ASR turn per clip, nothing synthesised. The clips are
  linked (or copied, across file systems) into `train/audio/tx/`, so every training manifest
  names audio under `train/`.
- with `--echo-extra` (after `--asr-extra`): the corpus's text LLM answers every extra question,
  `train/dialogues_extra.jsonl` (Stage III dialogues); with `--speak-answers` too, piper speaks
  those answers into `train/audio/xa/<id>.wav`, listed in `train/answers_extra_tts.jsonl`
  (`{"id", "text", "audio"}`, the dialogue's id): after `echox units extract`, more answers for
  the T2C to learn from, and the gold units of the extra dialogues.

Train S2T on all three with `--data train/dialogues.jsonl train/dialogues_en-gb.jsonl
train/asr.jsonl` (or `data.train: [...]` in the recipe). The step is resumable: wav files
already made are kept; the manifests are rewritten atomically each run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from echox.config import int_at_least
from echox.data.tiny_corpus import (_read_answers, espeak_synthesize, generate_answers,
                                   piper_synthesize, wav_made)
from echox.errors import ManifestError
from echox.fileio import (
    atomic_write_text,
    is_file_name,
    json_object_lines,
    open_to_append,
    read_json_object,
)

log = logging.getLogger(__name__)

ASR_PROMPT = "Transcribe this audio."
TEST_VOICE = "en-us"  # the test split's espeak-ng voice (echox.data.tiny_corpus)


def _read(path: Path, hint: str = "build the corpus first (echox data build-tiny)") -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; a malformed line, or one that is not an object, is
    an error naming its line."""
    return [row for _, row in _numbered(path, hint)]


def _numbered(path: Path, hint: str) -> list[tuple[int, dict[str, Any]]]:
    """`_read`'s objects, each with its line number in the file (blank lines counted)."""
    if not path.is_file():
        raise ManifestError(f"{path} not found: {hint}")
    return list(json_object_lines(path, ManifestError))


def _conversations(d: dict[str, Any], where: str) -> list[dict[str, Any]]:
    conv = d.get("conversations")
    if not isinstance(conv, list) or not conv or not all(isinstance(t, dict) for t in conv):
        raise ManifestError(f"{where} {d.get('id', '?')}: no \"conversations\" list of turns")
    return conv


def _file_id(rid: Any) -> bool:
    """An id usable as a file name inside its folder (`fileio.is_file_name`)."""
    return isinstance(rid, str) and is_file_name(rid)


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _id_text_rows(path: Path, audio: bool = False) -> list[dict[str, Any]]:
    """The rows of `path`, each checked: a unique "id" usable as a file name, a non-empty
    "text" and, with `audio`, an "audio" path."""
    numbered = _numbered(path, hint="check the path")
    rows = [r for _, r in numbered]
    ids: set[str] = set()
    want = '{"id": str, "text": str' + (', "audio": str}' if audio else "}")
    for i, r in numbered:
        rid, text = r.get("id"), r.get("text")
        if (not _file_id(rid) or not isinstance(text, str)
                or not text.strip() or (audio and not (isinstance(r.get("audio"), str) and r["audio"]))):
            raise ManifestError(f"{path} line {i}: expected {want}")
        if rid in ids:
            raise ManifestError(f"{path} line {i}: duplicate id {rid!r}")
        ids.add(rid)
    return rows


def asr_turn(rid: str, text: str, audio: str) -> dict[str, Any]:
    return {"id": f"asr-{rid}", "conversations": [
        {"from": "user", "value": text, "audio": audio, "prompt": ASR_PROMPT},
        {"from": "assistant", "value": text}]}


def build_s2t_mix(corpus: str | Path, voice: str | None = "en-gb", asr: bool = True,
                  progress: bool = False) -> dict[str, int]:
    """Make the extra voice and the ASR manifests of `corpus/train`; returns counts."""
    train = Path(corpus) / "train"
    dialogues = _read(train / "dialogues.jsonl")
    tts = _read(train / "tts.jsonl")
    counts: dict[str, int] = {}
    extra: list[dict[str, Any]] = []
    if voice is not None and voice != voice.strip():  # "en-gb " named a second manifest
        raise ManifestError(f"--voice {voice!r}: a voice name has no spaces around it")
    if voice:
        # espeak-ng reads voice names without regard to case: EN-US is the test voice too
        if voice.split("+")[0].lower() == TEST_VOICE:
            raise ManifestError(f"--voice {voice}: {TEST_VOICE} speaks the test questions; pick another "
                              "voice (e.g. en-gb, en-gb-x-rp, en-029) so the test voice stays unseen")
        if "/" in voice or "\0" in voice or voice in (".", ".."):  # it names a folder and a file
            raise ManifestError(f"--voice {voice!r}: a voice name cannot hold '/' (it names files "
                                "in the corpus); give the voice's own name, e.g. en-gb")
        folder = f"q_{voice.replace('+', '_')}"
        jobs = []
        where = train / "dialogues.jsonl"
        for i, d in enumerate(dialogues, 1):
            user = _conversations(d, f"{where} line {i}:")[0]
            if not _file_id(d.get("id")) or not isinstance(user.get("value"), str):
                raise ManifestError(f"{where} line {i}: expected an \"id\" usable as a file name "
                                    "and a first turn with a \"value\" string")
            jobs.append((user["value"], train / "audio" / folder / f"{d['id']}.wav"))
        todo = [(t, p) for t, p in jobs if not wav_made(p)]
        made, failed = espeak_synthesize(todo, progress=progress, voice=voice)
        if todo and not made:  # e.g. a voice espeak-ng does not have: not an empty manifest
            with contextlib.suppress(OSError):  # nor an empty folder named after it
                (train / "audio" / folder).rmdir()
            raise ManifestError(f"--voice {voice}: espeak-ng spoke none of {len(todo)} questions; "
                                "check the voice name (espeak-ng --voices)")
        bad = {Path(p) for p in failed}
        for d, (_, path) in zip(dialogues, jobs):
            if path in bad or not wav_made(path):
                continue
            conv = json.loads(json.dumps(d["conversations"]))
            conv[0]["audio"] = f"audio/{folder}/{d['id']}.wav"
            extra.append({"id": f"{d['id']}-{voice}", "conversations": conv})
        _write(train / f"dialogues_{voice}.jsonl", extra)
        counts.update(voice_made=made, voice_failed=len(failed), voice_dialogues=len(extra))
    if asr:
        rows = []
        for i, r in enumerate(tts, 1):
            if not (isinstance(r.get("text"), str) and r["text"] and isinstance(r.get("audio"), str)):
                continue
            if not isinstance(r.get("id"), (str, int)) or isinstance(r["id"], bool):
                raise ManifestError(f"{train / 'tts.jsonl'} line {i}: expected an \"id\" beside "
                                    "its \"text\" and \"audio\"")
            rows.append(asr_turn(str(r["id"]), r["text"], r["audio"]))
        rows += [asr_turn(e["id"], e["conversations"][0]["value"], e["conversations"][0]["audio"])
                 for e in extra]
        _write(train / "asr.jsonl", rows)
        counts["asr_turns"] = len(rows)
    return counts


def build_asr_extra(corpus: str | Path, texts: str | Path, workers: int = 2,
                    progress: bool = False) -> dict[str, int]:
    """Speak `texts` (JSONL rows with "id" and "text") with piper into `corpus/train/audio/x/`
    and write their ASR turns to `corpus/train/asr_extra.jsonl`, and the same clips as a TTS
    manifest (`{"id", "text", "audio"}`) to `corpus/train/asr_extra_tts.jsonl`, for `echox
    units extract` (more T2C data); wavs already made are kept."""
    train = Path(corpus) / "train"
    if not train.is_dir():
        raise ManifestError(f"{train} not found: build the corpus first (echox data build-tiny)")
    rows = _id_text_rows(Path(texts))
    clips = [{"id": r["id"], "text": r["text"], "audio": f"audio/x/{r['id']}.wav"} for r in rows]
    todo = [(c["text"], train / c["audio"]) for c in clips if not wav_made(train / c["audio"])]
    made, failed = piper_synthesize(todo, progress=progress, workers=workers, desc="asr extra")
    spoken = [c for c in clips if wav_made(train / c["audio"])]
    turns = [asr_turn(c["id"], c["text"], c["audio"]) for c in spoken]
    _write(train / "asr_extra.jsonl", turns)
    _write(train / "asr_extra_tts.jsonl", spoken)
    return {"extra_made": made, "extra_failed": len(failed), "extra_asr_turns": len(turns)}


def build_asr_tts(corpus: str | Path, tts_manifest: str | Path) -> dict[str, int]:
    """ASR turns from clips already spoken: each row of `tts_manifest` (`{"id", "text",
    "audio"}`, audio relative to its folder) becomes a turn of `corpus/train/asr_tts.jsonl`,
    its clip hard-linked (copied when it cannot be) to `train/audio/tx/<id>.wav`."""
    import filecmp
    import os
    import shutil

    train = Path(corpus) / "train"
    if not train.is_dir():
        raise ManifestError(f"{train} not found: build the corpus first (echox data build-tiny)")
    src = Path(tts_manifest)
    rows = _id_text_rows(src, audio=True)
    dst_dir = train / "audio" / "tx"
    dst_dir.mkdir(parents=True, exist_ok=True)
    turns, missing = [], 0
    taken: dict[str, str] = {}  # file name -> the id whose clip it holds
    for r in rows:
        rid, text, audio = r["id"], r["text"], r["audio"]
        clip = Path(audio) if Path(audio).is_absolute() else src.parent / audio
        if not os.path.isfile(clip):  # (False, not an error, for a name the OS refuses)
            missing += 1
            continue
        out = dst_dir / f"{rid}{clip.suffix}"
        if taken.setdefault(out.name, rid) != rid:  # "c1" + .wav and "c1.wav" + no suffix
            raise ManifestError(f"{src}: ids {taken[out.name]!r} and {rid!r} would both write "
                                f"audio/tx/{out.name}; give one of them another id")
        # a clip made by an earlier run is kept only while it is still this row's audio (the
        # manifest may now name another file for the same id): else it is replaced
        if not out.is_file() or not (os.path.samefile(clip, out)
                                     or filecmp.cmp(clip, out, shallow=False)):
            tmp = out.with_name(out.name + ".tmp")
            tmp.unlink(missing_ok=True)
            try:
                os.link(clip, tmp)
            except OSError:
                shutil.copyfile(clip, tmp)
            os.replace(tmp, out)
        turns.append(asr_turn(f"t-{rid}", text, f"audio/tx/{out.name}"))
    if not turns:
        raise ManifestError(f"{src}: none of its {len(rows)} clips was found")
    _write(train / "asr_tts.jsonl", turns)
    return {"tts_asr_turns": len(turns), "tts_missing_audio": missing}


def build_echo_extra(corpus: str | Path, batch_size: int = 64, threads: int = 1,
                     progress: bool = False) -> dict[str, int]:
    """Stage III dialogues from the clips `build_asr_extra` spoke: each question of
    `corpus/train/asr_extra_tts.jsonl` with the corpus's own text-LLM answer (the LLM, system
    prompt and answer length of `corpus/build.json`), written to `train/dialogues_extra.jsonl`.
    Echo training needs no answer audio (its targets are the T2C's units of the answer text), so
    every spoken question is a Stage III dialogue. Answers are appended per batch to
    `train/answers_extra.jsonl`, so an interrupted run resumes."""
    train = Path(corpus) / "train"
    clips_path = train / "asr_extra_tts.jsonl"
    build_path = Path(corpus) / "build.json"
    for need in (clips_path, build_path):
        if not need.is_file():
            raise ManifestError(f"{need} not found: build the corpus and its --asr-extra clips first")
    build = read_json_object(build_path, ManifestError, "corpus settings")
    if not isinstance(build.get("llm"), str):
        raise ManifestError(f"corpus settings {build_path}: no \"llm\" (the text LLM that "
                            "answered its questions); is it a tiny corpus?")
    clips = _id_text_rows(clips_path, audio=True)
    answers_path = train / "answers_extra.jsonl"
    done = _read_answers(answers_path)
    todo = [c for c in clips if c["id"] not in done]
    if todo:
        batches = generate_answers(build["llm"], [c["text"] for c in todo],
                                   system_prompt=build.get("system_prompt"), batch_size=batch_size,
                                   max_new_tokens=int(build.get("max_new_tokens", 48)),
                                   threads=threads, progress=progress)
        with open_to_append(answers_path) as f:
            start = 0
            for batch in batches:
                for c, (answer, hit_eos) in zip(todo[start : start + len(batch)], batch):
                    rec = {"id": c["id"], "answer": answer, "hit_eos": hit_eos}
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    done[c["id"]] = rec
                f.flush()
                start += len(batch)
    rows = [{"id": c["id"], "conversations": [
                {"from": "user", "value": c["text"], "audio": c["audio"]},
                {"from": "assistant", "value": done[c["id"]]["answer"]}]}
            for c in clips if done[c["id"]]["answer"]]
    _write(train / "dialogues_extra.jsonl", rows)
    return {"extra_answers_made": len(todo), "extra_dialogues": len(rows)}


def speak_extra_answers(corpus: str | Path, workers: int = 2, progress: bool = False
                        ) -> dict[str, int]:
    """Piper speaks the answers of `train/dialogues_extra.jsonl` (`build_echo_extra`) into
    `train/audio/xa/<id>.wav` and lists them in `train/answers_extra_tts.jsonl` (`{"id",
    "text", "audio"}`, ids those of the dialogues, so `echox units attach` pairs them up);
    wavs already made are kept."""
    train = Path(corpus) / "train"
    dialogues = _read(train / "dialogues_extra.jsonl")
    clips = [{"id": d["id"], "text": d["conversations"][-1]["value"], "audio": f"audio/xa/{d['id']}.wav"}
             for d in dialogues]
    todo = [(c["text"], train / c["audio"]) for c in clips if not wav_made(train / c["audio"])]
    made, failed = piper_synthesize(todo, progress=progress, workers=workers, desc="extra answers")
    spoken = [c for c in clips if wav_made(train / c["audio"])]
    _write(train / "answers_extra_tts.jsonl", spoken)
    return {"extra_answers_spoken": made, "extra_answers_failed": len(failed),
            "extra_answer_clips": len(spoken)}


def cmd_s2t_mix(args: argparse.Namespace) -> int:
    if args.speak_answers and not args.echo_extra:  # before anything is spoken or rewritten
        raise ManifestError("--speak-answers speaks the --echo-extra answers: give both")
    counts = build_s2t_mix(args.corpus, voice=args.voice or None, asr=not args.no_asr,
                           progress=not args.quiet)
    if args.asr_extra:
        counts.update(build_asr_extra(args.corpus, args.asr_extra, workers=args.workers,
                                      progress=not args.quiet))
    if args.asr_tts:
        counts.update(build_asr_tts(args.corpus, args.asr_tts))
    if args.echo_extra:
        counts.update(build_echo_extra(args.corpus, threads=args.llm_threads, progress=not args.quiet))
    if args.speak_answers:
        counts.update(speak_extra_answers(args.corpus, workers=args.workers, progress=not args.quiet))
    print(f"s2t mix in {Path(args.corpus) / 'train'}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def s2t_mix_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default="data/tiny", help="a built tiny corpus (default data/tiny)")
    p.add_argument("--voice", default="en-gb", help="espeak-ng voice of the extra question audio "
                   "('' for none; never en-us, the test voice)")
    p.add_argument("--no-asr", action="store_true", help="no ASR turns")
    p.add_argument("--asr-extra", metavar="TEXTS.jsonl",
                   help="more ASR text ({id, text} rows, e.g. recipes/tiny/asr_extra.jsonl), spoken "
                        "by piper into train/asr_extra.jsonl")
    p.add_argument("--asr-tts", metavar="TTS.jsonl",
                   help="clips already spoken ({id, text, audio} rows, e.g. data/tiny/tts_extra/tts.jsonl) "
                        "as ASR turns in train/asr_tts.jsonl; keep test facts out of it")
    p.add_argument("--workers", type=int_at_least(1), default=2,
                   help="piper processes for --asr-extra and --speak-answers")
    p.add_argument("--echo-extra", action="store_true",
                   help="Stage III dialogues from the --asr-extra clips: the corpus's text LLM answers "
                        "each question (train/dialogues_extra.jsonl)")
    p.add_argument("--speak-answers", action="store_true",
                   help="with --echo-extra: piper speaks its answers (train/answers_extra_tts.jsonl): "
                        "T2C data and gold units for the extra dialogues, after `echox units extract`")
    p.add_argument("--llm-threads", type=int_at_least(1), default=1, help="torch CPU threads of --echo-extra's LLM")
    p.add_argument("--quiet", action="store_true")
    return p

