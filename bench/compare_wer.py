"""Is one vocoder really better than another? Paired bootstrap over the clips of bench runs.

    python bench/compare_wer.py runs/bench_a.json runs/bench_b.json [--baseline NAME] [--n 100]
    python bench/compare_wer.py runs/tiny/eval-t2c-ctl/echo-t2c runs/tiny/eval-t2c-ga/echo-t2c

Reads the `--json` files of `bench/vocoder.py` (they keep every transcript) or the T2C
intelligibility runs of `bench/tiny_results.py` (a folder with an `items.jsonl` of `id`, `text`,
`transcript`), lines their records up by id, and prints for each system (the original audio
when a vocoder file is given, then every variant of every file, or the run folder's
`parent/name`) the corpus WER and, against the baseline, the WER difference with a 95 % interval from a
paired bootstrap over clips (resampling whole clips, as their errors are not independent
words). Only the clips that all files share are used.

S2S runs of `echox eval` (`items.jsonl` with `text` = the model's own text answer and
`transcript` = Whisper's hearing of its speech) work the same way. When the runs' text answers
differ (e.g. two models whose S2T parts differ), each run is scored against its own answers: a
WER is its edits over its own reference words, and the bootstrap resamples the same clips for
every run.

Why: on this corpus a single clip where Whisper loops ("... the North Sea to the North Sea
...") can add 80 word errors, so two runs of the vocoder bench can differ by 2 points for
reasons that have nothing to do with the vocoder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from echox.config import int_at_least


def _eval_run(path: Path) -> dict:
    """A `bench/tiny_results.py` T2C run folder (or its items.jsonl) in the vocoder-bench shape."""
    items = path / "items.jsonl" if path.is_dir() else path
    if not items.is_file():
        raise SystemExit(f"{path}: no items.jsonl (a T2C run of bench/tiny_results.py)")
    recs = []
    for n, line in enumerate(items.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line a killed run cut short; the resumed run redid it
            print(f"compare_wer: {items}:{n}: a torn line, skipped", file=sys.stderr)
            continue
        try:
            recs.append({"id": r["id"], "ref": r["text"], "hyp": r["transcript"]})
        except (KeyError, TypeError):
            raise SystemExit(f"{items}:{n}: not an item with id, text and transcript") from None
    run = items.parent
    name = f"{run.parent.name}/{run.name}" if run.parent.name else run.name
    return {"records": recs, "variants": {name: {"hypotheses": [r["hyp"] for r in recs]}}}


def _vocoder_results(path: Path) -> dict:
    """A bench/vocoder.py --json file, checked: a KeyError or IndexError came out of a file of
    another shape (and a file that is no JSON was an error that did not name it)."""
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SystemExit(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(res, dict) or "records" not in res:
        raise SystemExit(f"{path}: no per-record transcripts (rerun bench/vocoder.py with --json)")
    recs, variants = res["records"], res.get("variants")
    if not isinstance(recs, list) or not all(
            isinstance(r, dict) and isinstance(r.get("id"), str) and isinstance(r.get("ref"), str)
            and isinstance(r.get("original", ""), str) for r in recs):
        raise SystemExit(f"{path}: its records are not objects with an id and a ref (text)")
    if not isinstance(variants, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("hypotheses"), list) and len(v["hypotheses"]) == len(recs)
            and all(isinstance(h, str) for h in v["hypotheses"]) for v in variants.values()):
        raise SystemExit(f"{path}: its variants do not each hold a transcript per record "
                         f"({len(recs)} records)")
    return res


def load_systems(paths: list[str]) -> tuple[list[str], dict[str, list[str]], dict[str, list[str]]]:
    """(shared record ids, {system: transcripts in id order}, {system: its references in id order}).

    A vocoder-bench file's variants (and its "original") share the file's references; a run
    folder's references are its own `text` fields."""
    per_file = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise SystemExit(f"{p}: no such file or folder")
        is_run = path.is_dir() or path.suffix == ".jsonl"  # a tiny_results.py T2C run
        res = _eval_run(path) if is_run else _vocoder_results(path)
        ids = [r["id"] for r in res["records"]]
        if len(set(ids)) != len(ids):
            raise SystemExit(f"{p}: record ids are not unique")
        per_file.append(("" if is_run else path.stem, res, ids))
    shared = [i for i in per_file[0][2] if all(i in set(f[2]) for f in per_file[1:])]
    if not shared:
        raise SystemExit("the files share no record ids")
    first = {r["id"]: r for r in per_file[0][1]["records"]}
    systems: dict[str, list[str]] = {}
    refs: dict[str, list[str]] = {}
    if all("original" in first[i] for i in shared):
        systems["original"] = [first[i]["original"] for i in shared]
        refs["original"] = [first[i]["ref"] for i in shared]
    for stem, res, ids in per_file:
        pos = {i: k for k, i in enumerate(ids)}
        own = [res["records"][pos[i]]["ref"] for i in shared]
        for name, v in res["variants"].items():
            label = f"{stem}:{name}" if stem else name
            if label in systems:
                raise SystemExit(f"two inputs are both called {label!r}")
            systems[label] = [v["hypotheses"][pos[i]] for i in shared]
            refs[label] = own
    return shared, systems, refs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="bench/vocoder.py --json files")
    ap.add_argument("--baseline", help="system to compare against (default: the first variant)")
    ap.add_argument("--n", type=int_at_least(1), help="use only the first N shared clips")
    ap.add_argument("--exclude", action="append", default=[], metavar="ID",
                    help="leave this clip out (repeatable), e.g. an answer whose text is an LLM loop")
    ap.add_argument("--cap", action="store_true",
                    help="count a clip's errors up to its reference words at most: a clip where "
                         "the speech or Whisper loops counts as all wrong, not many times wrong "
                         "(the bootstrap interval is then far less driven by a few such clips)")
    ap.add_argument("--samples", type=int_at_least(1), default=2000, help="bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import numpy as np

    from echox.eval.wer import edit_distance, normalize_words

    ids, systems, refs = load_systems(args.results)
    if args.exclude:
        excluded = set(args.exclude)
        unknown = sorted(excluded - set(ids))
        if unknown:
            raise SystemExit(f"--exclude: no shared clip has the id {unknown[0]!r}")
        keep = [k for k, i in enumerate(ids) if i not in excluded]
        if not keep:  # it said "the references hold no words"
            raise SystemExit(f"--exclude leaves none of the {len(ids)} shared clips")
        ids = [ids[k] for k in keep]
        systems = {name: [v[k] for k in keep] for name, v in systems.items()}
        refs = {name: [v[k] for k in keep] for name, v in refs.items()}
    if args.n:
        ids = ids[: args.n]
        systems = {k: v[: args.n] for k, v in systems.items()}
        refs = {k: v[: args.n] for k, v in refs.items()}
    ref_words = {k: [normalize_words(r) for r in v] for k, v in refs.items()}
    # a clip whose reference has no words has no error rate: a resample of such clips alone
    # divided by 0 (a NaN interval)
    keep = [j for j in range(len(ids)) if all(v[j] for v in ref_words.values())]
    if len(keep) < len(ids):
        print(f"compare_wer: {len(ids) - len(keep)} clip(s) whose text has no words left out: "
              f"{', '.join(ids[j] for j in range(len(ids)) if j not in set(keep))}", file=sys.stderr)
        ids = [ids[j] for j in keep]
        systems = {k: [v[j] for j in keep] for k, v in systems.items()}
        refs = {k: [v[j] for j in keep] for k, v in refs.items()}
        ref_words = {k: [v[j] for j in keep] for k, v in ref_words.items()}
    words = {k: np.array([len(r) for r in v], dtype=np.float64) for k, v in ref_words.items()}
    if not ids:
        raise SystemExit("the references hold no words")
    edits = {k: np.array([edit_distance(r, normalize_words(h)) for r, h in zip(ref_words[k], hyps)],
                         dtype=np.float64) for k, hyps in systems.items()}
    if args.cap:
        edits = {k: np.minimum(e, words[k]) for k, e in edits.items()}
    names = list(systems)
    own_refs = len({tuple(v) for v in refs.values()}) > 1
    base = args.baseline or (names[1] if len(names) > 1 and names[0] == "original" else names[0])
    if base not in edits:
        raise SystemExit(f"--baseline {base!r} is not one of {names}")
    rng = np.random.default_rng(args.seed)
    draws = rng.integers(0, len(ids), size=(args.samples, len(ids)))  # the same clips for all
    base_words = words[base]
    if own_refs:
        differ = sum(len({refs[k][j] for k in names}) > 1 for j in range(len(ids)))
        print(f"{len(ids)} clips; each system against its own text answers (they differ on "
              f"{differ}; {int(base_words.sum())} reference words for {base}); differences against "
              f"{base}, 95 % paired-bootstrap interval ({args.samples} resamples)\n")
    else:
        print(f"{len(ids)} clips, {int(base_words.sum())} reference words; differences against {base}, "
              f"95 % paired-bootstrap interval ({args.samples} resamples)\n")
    if args.cap:
        print("errors per clip capped at its reference words (--cap)\n")
    print("| system | WER | minus baseline | 95 % interval | clips better / worse |\n"
          "|---|---|---|---|---|")
    base_wer = edits[base].sum() / base_words.sum()
    base_draws = edits[base][draws].sum(1) / base_words[draws].sum(1)
    for k in names:
        wer = edits[k].sum() / words[k].sum()
        if k == base:
            print(f"| {k} | {wer:.3f} | - | - | - |")
            continue
        diff = edits[k][draws].sum(1) / words[k][draws].sum(1) - base_draws
        lo, hi = np.percentile(diff, [2.5, 97.5])
        point = wer - base_wer
        # per clip, its error rate against the baseline's (each on its own reference words)
        rate, base_rate = edits[k] / np.maximum(words[k], 1), edits[base] / np.maximum(base_words, 1)
        better, worse = int((rate < base_rate).sum()), int((rate > base_rate).sum())
        print(f"| {k} | {wer:.3f} | {point:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {better} / {worse} |")
    return 0


if __name__ == "__main__":
    import _cli

    sys.exit(_cli.run(main))
