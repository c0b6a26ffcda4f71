"""The paper's claim, Echo's S2T − S2S gap against the gold-unit baseline's, over several voices.

    python bench/gap_voices.py \
        --voice piper runs/tiny/results30/echo-s2t runs/tiny/results30/echo-s2s \
                      runs/tiny/results30/gold-s2t runs/tiny/results30/gold-s2s \
        --voice espeak runs/tiny/results30/echo-s2t-espeak runs/s32/espeak-echo-s2s \
                       runs/tiny/results30/gold-s2t-espeak runs/s32/espeak-gold-s2s

Each `--voice NAME ECHO_S2T ECHO_S2S GOLD_S2T GOLD_S2S` names four finished `echox eval` run
folders on the same questions spoken in one voice. Per question, gap = s2t hit − s2s hit, and
the difference is gap_echo − gap_gold. Prints a table: each voice's gaps and the mean
difference with its paired bootstrap interval (questions resampled), then the voices pooled:
each question's difference averaged over the voices, so a question is resampled with all its
voices (they are the same question, not independent ones). Only questions every run answered
count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from echox.config import int_at_least
from echox.eval.stats import paired_bootstrap


class Stop(Exception):
    """Bad input: one line on stderr, exit status 2."""


def hits(run: Path, mode: str) -> dict[str, bool]:
    path = run / "items.jsonl"
    if not path.is_file():
        raise Stop(f"no {path}: run `echox eval` there first")
    from echox.eval.run import read_summary, scored_items
    from echox.fileio import folder_config

    # the mode its place says: s2s runs given for s2t ones flipped every gap's sign, exit 0
    summary = read_summary(run) if (run / "summary.json").is_file() else None
    # else the settings of a run stopped before its summary
    given = summary.mode if summary is not None else (folder_config(run, "eval.json") or {}).get("mode")
    if given is not None and given != mode:  # a folder of items alone records none
        raise Stop(f"{run} is a run of mode {given}, where one of mode {mode} belongs (--voice NAME "
                   "ECHO_S2T ECHO_S2S GOLD_S2T GOLD_S2S)")
    # what `echox eval` counts: a torn line (a killed run) is skipped, a hit must be true/false,
    # and only the items its summary counted (a rerun on fewer items keeps the others' lines)
    counted = summary.ids if summary is not None else None
    recs = scored_items(path)
    return {str(k): recs[k]["hit"] for k in (recs if counted is None else counted) if k in recs}


def pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except Stop as e:
        print(f"gap_voices: error: {e}", file=sys.stderr)
        return 2


def run(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--voice", nargs=5, action="append", required=True,
                    metavar=("NAME", "ECHO_S2T", "ECHO_S2S", "GOLD_S2T", "GOLD_S2S"))
    ap.add_argument("--resamples", type=int_at_least(1), default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    names = [v[0] for v in args.voice]
    if len(set(names)) < len(names):
        raise Stop(f"two voices share a name: {names}")
    voices = []
    for name, *runs in args.voice:
        es2t, es2s, gs2t, gs2s = (hits(Path(r), m) for r, m in zip(runs, ("s2t", "s2s", "s2t", "s2s")))
        voices.append((name, es2t, es2s, gs2t, gs2s))
    shared = set.intersection(*(set(h) for v in voices for h in v[1:]))
    ids = [i for i in voices[0][1] if i in shared]  # the first run's order (the benchmark's)
    if not ids:
        raise Stop("the runs share no question")
    print(f"{len(ids)} questions answered by every run; {args.resamples} resamples, seed {args.seed}")
    print("| voice | Echo gap | gold gap | Echo − gold, paired 95 % |")
    print("|---|---:|---:|---:|")
    per_voice = []
    for name, es2t, es2s, gs2t, gs2s in voices:
        ge = [int(es2t[i]) - int(es2s[i]) for i in ids]
        gg = [int(gs2t[i]) - int(gs2s[i]) for i in ids]
        d = [a - b for a, b in zip(ge, gg)]
        per_voice.append(d)
        b = paired_bootstrap(d, args.resamples, args.seed)
        print(f"| {name} | {pts(sum(ge) / len(ids))} | {pts(sum(gg) / len(ids))} | "
              f"{pts(b['mean'])} [{pts(b['lo'])}, {pts(b['hi'])}] |")
    if len(voices) > 1:
        pooled = [sum(col) / len(col) for col in zip(*per_voice)]
        b = paired_bootstrap(pooled, args.resamples, args.seed)
        print(f"| all {len(voices)} voices (per question, averaged) | | | "
              f"{pts(b['mean'])} [{pts(b['lo'])}, {pts(b['hi'])}] |")
    return 0


if __name__ == "__main__":
    import _cli

    sys.exit(_cli.run(main))
