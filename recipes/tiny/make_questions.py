"""Make ``recipes/tiny/questions.jsonl``: spoken-style factoid questions from BIG-bench.

BIG-bench's ``qa_wikidata`` task holds 20,442 cloze prompts built from Wikidata triples
("The capital of Afghanistan is" -> "Kabul"). People do not ask a voice assistant to finish
a sentence, so each cloze whose relation reads naturally as a question is rewritten with a
per-relation template ("What is the capital of Afghanistan?"); the rest are dropped. The 70
``general_knowledge`` questions are already questions and are kept as they are.

Getting the data (the bigbench package pulls tensorflow, so never install it)::

    TMPDIR=/tmp/bbtmp pip download --no-deps --no-clean bigbench==1.0.0 -d /tmp/bb

pip 26 refuses to finish that download (bigbench declares a ``file://`` dependency), but with
``--no-clean`` the unpacked sdist stays in ``/tmp/bbtmp/pip-download-*/bigbench_*``. Point
``--source`` at that folder, or at the ``bigbench-1.0.0.tar.gz`` sdist (read with tarfile)
if you have it, or at a zip of it. Then::

    python recipes/tiny/make_questions.py --source /tmp/bbtmp/pip-download-*/bigbench_*

The output is deterministic for a given ``--seed`` and ``--total``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tarfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from echox.data.match import exist_match

HERE = Path(__file__).resolve().parent
TASKS = ("qa_wikidata", "general_knowledge")

# (relation, cloze pattern with the subject as group x, question template, cap on items kept)
# Relations left out on purpose: eye color, blood type, religion and ethnic group of people
# (unknowable or sensitive), genre of artists (noisy labels: "Madonna -> jazz"), "shares a
# border with" (one gold neighbour among many), given/family names, honorific prefixes,
# "influenced by", "is facet of", public holidays, streak colours, operating systems.
_TEMPLATES: tuple[tuple[str, str, str, int], ...] = (
    ("language_used_in", r"The language used in (?P<x>.+) is", "What language is used in {x}?", 300),
    ("languages_spoken", r"The languages spoken, written or signed by (?P<x>.+) is",
     "What language does {x} speak?", 120),
    ("sport", r"The sport played by (?P<x>.+) is", "What sport does {x} play?", 450),
    ("material", r"The material used in (?P<x>.+) is", "What material is {x} made of?", 120),
    ("country_for_sport", r"The country for sport played by (?P<x>.+) is",
     "Which country does {x} represent in sport?", 150),
    ("place_of_birth", r"The place of birth of (?P<x>.+) is", "Where was {x} born?", 50),
    ("place_of_publication", r"The place of publication of (?P<x>.+) is",
     "Where is {x} published?", 50),
    ("month", r"The month of the year of (?P<x>.+) is", "In which month is {x}?", 50),
    ("form_of_government", r"The basic form of government of (?P<x>.+) is",
     "What form of government does {x} have?", 100),
    ("head_of_government", r"The office held by head of government of (?P<x>.+) is",
     "What is the title of the head of government of {x}?", 50),
    ("citizenship", r"The country of citizenship of (?P<x>.+) is",
     "Which country is {x} a citizen of?", 450),
    ("flag_color", r"The color of the flag of (?P<x>.+) is",
     "What color is on the flag of {x}?", 150),
    ("capital", r"The capital of (?P<x>.+) is", "What is the capital of {x}?", 400),
    ("country", r"The country of (?P<x>.+) is", "Which country is {x} in?", 600),
    ("native_language", r"The native language of (?P<x>.+) is",
     "What is the native language of {x}?", 300),
    ("official_language", r"The official language of (?P<x>.+) is",
     "What is the official language of {x}?", 300),
    ("language", r"The language of (?P<x>.+) is", "What language is {x} in?", 250),
    ("instrument", r"The instrument of (?P<x>.+) is", "What instrument does {x} play?", 250),
    ("original_country", r"The original country of (?P<x>.+) is",
     "Which country does {x} come from?", 300),
    ("continent", r"The continent of (?P<x>.+) is", "Which continent is {x} on?", 250),
    ("team_position", r"The team position of (?P<x>.+) is", "What position does {x} play?", 150),
    ("military_rank", r"The military rank of (?P<x>.+) is", "What military rank did {x} hold?", 60),
    ("emergency_number", r"The emergency phone number of (?P<x>.+) is",
     "What is the emergency phone number in {x}?", 60),
    ("headquarters", r"The headquarters location of (?P<x>.+) is", "Where is {x} headquartered?",
     150),
    ("noble_title", r"The noble title of (?P<x>.+) is", "What noble title did {x} hold?", 60),
    ("voice_type", r"The voice type of (?P<x>.+) is", "What is the voice type of {x}?", 60),
    ("residence", r"The residence of (?P<x>.+) is", "In which city does {x} live?", 100),
    ("basin_country", r"The basin country of (?P<x>.+) is", "Which countries border {x}?",
     66),
    ("record_label", r"The record label of (?P<x>.+) is", "What record label is {x} signed to?", 65),
    ("main_subject", r"The main subject of (?P<x>.+) is", "What is the main subject of {x}?", 62),
    ("currency", r"The currency of (?P<x>.+) is", "What is the currency of {x}?", 47),
    ("historic_county", r"The historic county of (?P<x>.+) is", "Which historic county is {x} in?",
     46),
    ("health_specialty", r"The health specialty of (?P<x>.+) is",
     "Which medical specialty deals with {x}?", 44),
    ("official_religion", r"The official religion of (?P<x>.+) is",
     "What is the official religion of {x}?", 43),
    ("physical_quantity", r"The measured physical quantity of (?P<x>.+) is",
     "What physical quantity does {x} measure?", 38),
    ("developer", r"The developer of (?P<x>.+) is", "Who developed {x}?", 33),
    ("conservation_status", r"The IUCN conservation status of (?P<x>.+) is",
     "What is the conservation status of {x}?", 32),
    ("broadcaster", r"The original broadcaster of (?P<x>.+) is",
     "Which network originally broadcast {x}?", 26),
    ("official_color", r"The official color of (?P<x>.+) is",
     "What are the official colors of {x}?", 23),
    ("manufacturer", r"The manufacturer of (?P<x>.+) is", "Who manufactures {x}?", 17),
    ("publisher", r"The publisher of (?P<x>.+) is", "Who publishes {x}?", 21),
    ("weight_class", r"The competition class of (?P<x>.+) is",
     "In which weight class did {x} compete?", 20),
    ("military_branch", r"The military branch of (?P<x>.+) is",
     "In which military branch did {x} serve?", 20),
    ("located_in", r"(?P<x>.+) is located in", "Where is {x} located?", 450),
    ("capital_of", r"(?P<x>.+) is capital of", "What is {x} the capital of?", 250),
    ("body_of_water", r"(?P<x>.+) is located in or next to body of water",
     "Which river or body of water is {x} next to?", 22),
    ("followed_by", r"(?P<x>.+) is followed by", "What comes after {x}?", 46),
    ("convicted_of", r"(?P<x>.+) convicted of", "What crime was {x} convicted of?", 60),
    ("writing_language", r"(?P<x>.+) writing languages", "In what language did {x} write?", 60),
    ("studied_by", r"(?P<x>.+) is studied by", "Which field studies {x}?", 19),
    ("replaced_by", r"(?P<x>.+) replaced by", "What replaced {x}?", 18),
    ("endemic_to", r"(?P<x>.+) endemic to", "Where is {x} found in the wild?", 40),
)
_COMPILED = tuple((rel, re.compile(rf"^{pat}$"), tpl, cap) for rel, pat, tpl, cap in _TEMPLATES)

# Hand-made aliases for the general_knowledge answers that the exist-match would otherwise
# miss for a right answer ("4" for "four", "1000" for "1,000", "the Sun" for "Sol").
_GK_ALIASES: dict[str, list[str]] = {
    "one": ["1"], "two": ["2"], "four": ["4"], "eight": ["8"], "none": ["zero", "0", "no "],
    "1,000": ["1000", "one thousand", "thousand"], "1,760": ["1760"], "5,280": ["5280"],
    "12": ["twelve"], "4": ["four"], "8": ["eight"], "366": ["three hundred sixty-six"],
    "Sol": ["Sun"], "ears": ["ear"], "foot": ["feet"], "eyes": ["eye"], "trees": ["tree"],
    "−273.15": ["-273.15", "273.15"], "circle": ["round", "circular"], "egg": ["eggs"],
    "Washington, D.C.": ["Washington"],
}

_BAD_SUBJECT = re.compile(r"[\[\]{}<>|_\\@#^~*]")


class QuestionSourceError(ValueError):
    """The BIG-bench source given cannot be read or lacks a task file."""


@dataclass
class Question:
    """One vendored spoken question with its gold answers."""

    id: str
    question: str
    answers: list[str]
    source: str
    relation: str
    cloze: str

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "question": self.question, "answers": self.answers,
                "source": self.source, "relation": self.relation, "cloze": self.cloze}


def read_task(source: Path, task: str) -> dict:
    """Read ``<task>/task.json`` from an sdist archive (tar or zip) or an unpacked folder."""
    suffix = f"benchmark_tasks/{task}/task.json"
    try:
        if source.is_dir():
            hits = sorted(p for p in source.rglob("task.json") if p.as_posix().endswith(suffix))
            if hits:
                return json.loads(hits[0].read_text(encoding="utf-8"))
        elif zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as zf:
                for name in zf.namelist():
                    if name.endswith(suffix):
                        return json.loads(zf.read(name))
        elif tarfile.is_tarfile(source):
            with tarfile.open(source) as tf:
                for member in tf:
                    if member.isfile() and member.name.endswith(suffix):
                        handle = tf.extractfile(member)
                        assert handle is not None
                        return json.loads(handle.read())
        else:
            raise QuestionSourceError(f"{source}: not a folder, tar or zip archive")
    except (OSError, tarfile.TarError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        raise QuestionSourceError(f"{source}: cannot read {suffix}: {err}") from err
    raise QuestionSourceError(f"{source}: no {suffix} inside")


def clean_answers(target: object) -> list[str]:
    """Gold answers as a de-duplicated list; single letters ("U", "E") would match anything."""
    raw = target if isinstance(target, list) else [target]
    out: list[str] = []
    for a in raw:
        a = str(a).strip()
        if (len(a) > 1 or a.isdigit()) and a not in out:
            out.append(a)
    return out


def match_template(cloze: str) -> tuple[str, str, str] | None:
    """``(relation, subject, question template)`` of the first template a cloze fits, or None."""
    text = cloze.replace("[MASK]", "").strip()
    for rel, pattern, template, _ in _COMPILED:
        m = pattern.match(text)
        if m is not None:
            return rel, " ".join(m.group("x").split()), template
    return None


def to_question(cloze: str) -> tuple[str, str] | None:
    """``(relation, question)`` for a qa_wikidata cloze, or None when no template fits."""
    matched = match_template(cloze)
    if matched is None:
        return None
    rel, subject, template = matched
    if not subject or len(subject) > 60 or _BAD_SUBJECT.search(subject):
        return None
    question = template.format(x=subject)
    return rel, question[0].upper() + question[1:]


def wikidata_questions(task: dict) -> list[Question]:
    """All qa_wikidata items with a natural template, answers cleaned, leaks dropped."""
    out: list[Question] = []
    for i, ex in enumerate(task["examples"]):
        phrased = to_question(ex["input"])
        answers = clean_answers(ex["target"])
        if phrased is None or not answers:
            continue
        rel, question = phrased
        if exist_match(question, answers):  # the answer is in the question: no knowledge needed
            continue
        out.append(Question(f"wd-{i:05d}", question, answers, "qa_wikidata", rel, ex["input"]))
    return out


def general_knowledge_questions(task: dict) -> list[Question]:
    """The general_knowledge items: the answer(s) scored 1, plus hand-made aliases."""
    out: list[Question] = []
    for i, ex in enumerate(task["examples"]):
        gold = [k for k, v in ex["target_scores"].items() if v]
        answers = clean_answers(gold + [a for g in gold for a in _GK_ALIASES.get(g, [])])
        out.append(Question(f"gk-{i:03d}", ex["input"].strip(), answers, "general_knowledge",
                            "general_knowledge", ex["input"]))
    return out


def select(questions: list[Question], total: int, seed: int) -> list[Question]:
    """Dedupe, keep every general_knowledge item, then fill ``total`` with balanced relations.

    Water-filling: every relation gets the same quota ``C`` (at most its size and its table
    cap), with ``C`` as large as ``total`` allows, so no single relation ("country of X")
    crowds out the rest.
    """
    merged: dict[str, Question] = {}
    for q in questions:
        key = q.question.casefold()
        if key in merged:  # same question twice: either gold answer is right
            merged[key].answers += [a for a in q.answers if a not in merged[key].answers]
        else:
            merged[key] = q
    rng = random.Random(seed)
    pool = sorted(merged.values(), key=lambda q: q.id)
    rng.shuffle(pool)
    fixed = [q for q in pool if q.source == "general_knowledge"]
    by_rel: dict[str, list[Question]] = {}
    for q in pool:
        if q.source == "qa_wikidata":
            by_rel.setdefault(q.relation, []).append(q)
    caps = {rel: cap for rel, _, _, cap in _TEMPLATES}
    room = {rel: min(len(qs), caps[rel]) for rel, qs in by_rel.items()}
    need = total - len(fixed)
    if sum(room.values()) < need:
        raise SystemExit(f"only {sum(room.values()) + len(fixed)} questions pass the filters; "
                         f"asked for {total}")
    quota = 0
    while sum(min(r, quota + 1) for r in room.values()) <= need:
        quota += 1
    take = {rel: min(r, quota) for rel, r in room.items()}
    spare = [rel for rel, r in room.items() if r > quota]
    rng.shuffle(spare)
    for rel in spare[: need - sum(take.values())]:  # one more item for a few random relations
        take[rel] += 1
    kept = fixed + [q for rel, qs in by_rel.items() for q in qs[: take[rel]]]
    return sorted(kept, key=lambda q: q.id)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, required=True,
                    help="bigbench-1.0.0 sdist (.tar.gz / .zip) or its unpacked folder")
    ap.add_argument("--out", type=Path, default=HERE / "questions.jsonl")
    ap.add_argument("--total", type=int, default=4200, help="questions to keep")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    wd = wikidata_questions(read_task(args.source, "qa_wikidata"))
    gk = general_knowledge_questions(read_task(args.source, "general_knowledge"))
    chosen = select(wd + gk, args.total, args.seed)
    tmp = args.out.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for q in chosen:
            f.write(json.dumps(q.to_json(), ensure_ascii=False) + "\n")
    tmp.replace(args.out)
    rels = Counter(q.relation for q in chosen)
    print(f"{len(wd)} qa_wikidata questions phrased, {len(gk)} general_knowledge; "
          f"wrote {len(chosen)} to {args.out}", file=sys.stderr)
    print("per relation: " + ", ".join(f"{r} {n}" for r, n in rels.most_common()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
