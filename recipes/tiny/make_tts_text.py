"""Extra Stage II (T2C) data: BIG-bench qa_wikidata facts spoken by piper's joe voice.

The tiny corpus gives the T2C 6,600 training utterances (3,300 questions and their answers).
A text-to-unit model must learn how written words sound from them, and 6,600 sentences are
too few: the first T2C overfit after about 1,500 steps and spoke unseen names badly
(docs/results.md). qa_wikidata holds 20,442 facts as clozes ("The capital of Afghanistan
is" -> "Kabul"); each one, completed with its answer, is a sentence of exactly the kind the
assistant says ("The capital of Afghanistan is Kabul."). This script writes those sentences,
speaks them with piper (run as a separate program, as the corpus builder does), and writes a
TTS manifest for ``echox units extract``.

Held out: nothing that the test split asks about reaches the T2C. A fact is dropped when it
is the source of a test question, or when its cloze names the subject of a test question
("Costa Rica" for "What color is on the flag of Costa Rica?"). Words of test answers are
not dropped: a speech synthesiser is expected to have heard common words such as "Japan"
in other sentences, and the T2C intelligibility row still reads test sentences it never saw.

Getting the source: see ``make_questions.py`` (the BIG-bench sdist, never installed). Then::

    python recipes/tiny/make_tts_text.py --source /tmp/bbtmp/pip-download-*/bigbench_* \\
        --corpus data/tiny --out data/tiny/tts_extra
    echox units extract --manifest data/tiny/tts_extra/tts.jsonl \\
        --kmeans recipes/tiny/vocoder-k500/km500.joblib --out data/tiny/tts_extra/tts_units.jsonl

The run is resumable: wav files already written are kept.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_questions import QuestionSourceError, clean_answers, match_template, read_task  # noqa: E402

from echox.data.tiny_corpus import piper_synthesize, wav_made  # noqa: E402
from echox.fileio import atomic_write_text  # noqa: E402


def spoken_list(items: list[str]) -> str:
    """["a"] -> "a"; ["a", "b", "c"] -> "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def fact_sentence(cloze: str, answers: list[str]) -> str:
    """The cloze completed with its answers, as one sentence ending in a full stop."""
    text = " ".join(cloze.replace("[MASK]", "").split())
    return f"{text} {spoken_list(answers[:3])}."


def test_subjects(corpus: Path, task: dict) -> tuple[set[int], set[str]]:
    """(indices of the test questions' facts, casefolded subjects of those questions)."""
    split = json.loads((corpus / "split.json").read_text(encoding="utf-8"))
    indices, subjects = set(), set()
    for qid in split["test"]:
        if not str(qid).startswith("wd-"):
            continue
        i = int(str(qid)[3:])
        indices.add(i)
        matched = match_template(task["examples"][i]["input"])  # what made the question
        if matched is not None:
            subjects.add(matched[1].casefold())
    return indices, subjects


def sentences(task: dict, held_out: set[int], subjects: set[str]) -> list[tuple[str, str]]:
    """(id, sentence) for every usable fact not held out."""
    out, seen = [], set()
    for i, ex in enumerate(task["examples"]):
        if i in held_out:
            continue
        answers = clean_answers(ex["target"])
        if not answers:
            continue
        text = fact_sentence(ex["input"], answers)
        low = text.casefold()
        if len(text) > 200 or low in seen or any(s in low for s in subjects):
            continue
        seen.add(low)
        out.append((f"wdx-{i:05d}", text))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, required=True,
                   help="the BIG-bench sdist (tar/zip) or its unpacked folder")
    p.add_argument("--corpus", type=Path, default=Path("data/tiny"),
                   help="the tiny corpus (its split.json names the held-out test questions)")
    p.add_argument("--out", type=Path, default=Path("data/tiny/tts_extra"))
    p.add_argument("--limit", type=int, default=0, help="at most N sentences (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="order of the sentences (--limit keeps a prefix)")
    p.add_argument("--workers", type=int, default=1, help="piper processes")
    args = p.parse_args(argv)
    try:
        task = read_task(args.source, "qa_wikidata")
    except QuestionSourceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not (args.corpus / "split.json").is_file():
        print(f"error: {args.corpus / 'split.json'} not found (build the corpus first)", file=sys.stderr)
        return 2
    held_out, subjects = test_subjects(args.corpus, task)
    rows = sentences(task, held_out, subjects)
    random.Random(args.seed).shuffle(rows)
    if args.limit:
        rows = rows[: args.limit]
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = [{"id": rid, "text": text, "audio": f"audio/{rid}.wav"} for rid, text in rows]
    todo = [(r["text"], args.out / r["audio"]) for r in manifest if not wav_made(args.out / r["audio"])]
    print(f"{len(rows)} sentences ({len(held_out)} test facts and "
          f"{len(subjects)} test subjects held out); {len(todo)} to speak", flush=True)
    made, failed = piper_synthesize(todo, progress=True, workers=args.workers)
    bad = {str(f) for f in failed}
    kept = [r for r in manifest if str(args.out / r["audio"]) not in bad]
    atomic_write_text(args.out / "tts.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
    print(f"spoke {made}, failed {len(failed)}; {len(kept)} rows in {args.out / 'tts.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
