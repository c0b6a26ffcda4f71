"""Make ``recipes/tiny/asr_extra.jsonl``: more to hear for Stage I, with no corpus entity in it.

The tiny corpus uses 4,200 of BIG-bench's ``qa_wikidata`` questions (``questions.jsonl``). The
others, phrased by the same templates, are spoken questions about *other* subjects: good ASR
text for an adapter that must learn to hear names. Kept: questions whose subject is not the
subject of any corpus question (train or test) and names no such subject, so that nothing
here tells the model about a test question's entity. Only their text is used, as ASR turns
("Transcribe this audio."); their answers are not.

    python recipes/tiny/make_asr_extra.py --source /tmp/bbtmp/pip-download-*/bigbench_* --total 4000

(see make_questions.py for getting the BIG-bench sdist). Then
``echox data s2t-mix --corpus data/tiny --asr-extra recipes/tiny/asr_extra.jsonl`` speaks them
with the training voice (piper) into ``train/asr_extra.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from make_questions import match_template, read_task, wikidata_questions

HERE = Path(__file__).resolve().parent


def corpus_subjects(questions: Path) -> set[str]:
    subjects = set()
    for line in questions.read_text(encoding="utf-8").splitlines():
        q = json.loads(line)
        if q["source"] == "qa_wikidata":
            m = match_template(q["cloze"])
            if m is not None:
                subjects.add(m[1].casefold())
    return subjects


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, required=True, help="bigbench-1.0.0 sdist or folder")
    ap.add_argument("--questions", type=Path, default=HERE / "questions.jsonl")
    ap.add_argument("--out", type=Path, default=HERE / "asr_extra.jsonl")
    ap.add_argument("--total", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    used = corpus_subjects(args.questions)
    corpus_text = {json.loads(x)["question"].casefold()
                   for x in args.questions.read_text(encoding="utf-8").splitlines()}
    named = [s for s in used if len(s) > 3]  # subjects long enough to search for in a text
    seen, pool = set(), []
    for q in wikidata_questions(read_task(args.source, "qa_wikidata")):
        m = match_template(q.cloze)
        subject = m[1].casefold() if m else ""
        text = q.question.casefold()
        if not subject or subject in used or text in corpus_text or text in seen:
            continue
        if any(s in text for s in named):  # names a corpus subject elsewhere
            continue
        seen.add(text)
        pool.append(q)
    random.Random(args.seed).shuffle(pool)
    chosen = sorted(pool[: args.total], key=lambda q: q.id)
    tmp = args.out.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for q in chosen:
            f.write(json.dumps({"id": f"x{q.id}", "text": q.question}, ensure_ascii=False) + "\n")
    tmp.replace(args.out)
    print(f"{len(pool)} questions about subjects outside the corpus; wrote {len(chosen)} to "
          f"{args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
