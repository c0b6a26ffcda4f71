"""Streaming latency of an EchoX bundle: tokens and ms to the first audio chunk, and RTF.

    python bench/latency.py --model BUNDLE --questions data/tiny/test/qa.jsonl --n 20

Each question runs in a fresh streaming session with greedy decoding. A question row is the
`local:` QA schema (`{"id", "audio", "question", "answers"}`, audio relative to the file);
rows without audio (or `--input text`) are asked as text. The paper reports 27.17 tokens to
the first segment on average (the paper); `first_segment_tokens` is that number,
`first_audio_tokens` adds the wait for the worker to voice the segment's first audio chunk
(`--first-chunk-units` units; `--chunk-units 0` voices whole segments, as before chunking).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from echox.config import int_at_least


@dataclass
class Row:
    id: str
    text_tokens: int
    first_segment_tokens: int | None
    first_audio_tokens: int | None
    first_audio_ms: float | None
    total_ms: float
    audio_seconds: float
    rtf: float | None
    segments: int


def read_questions(path: Path, n: int) -> list[dict[str, Any]]:
    if not path.is_file():
        raise SystemExit(f"question file not found: {path}")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{i}: not JSON ({e})") from e
        if not isinstance(rec, dict) or not (rec.get("audio") or rec.get("question")):
            raise SystemExit(f"{path}:{i}: needs an 'audio' or 'question' field")
        rows.append(rec)
        if len(rows) == n:
            break
    if not rows:
        raise SystemExit(f"{path} holds no questions")
    return rows


def ask(session: Any, rec: dict[str, Any], base: Path, use_audio: bool) -> Any:
    """Run one question to its Final event."""
    if use_audio and rec.get("audio"):
        events = session.respond(audio=base / rec["audio"])
    else:
        events = session.respond(text=rec["question"])
    final = None
    for ev in events:
        final = ev
    return final


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def fmt(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model bundle folder")
    ap.add_argument("--questions", required=True, type=Path, help="QA JSONL (local: schema)")
    ap.add_argument("--n", type=int_at_least(1), default=20, help="questions to run")
    ap.add_argument("--input", choices=["audio", "text"], default="audio",
                    help="ask with the recorded question (default) or its text")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--speech-workers", "--workers", dest="workers", type=int_at_least(1), default=1,
                    help="speech worker threads (as echox serve --speech-workers)")
    ap.add_argument("--chunk-units", type=int, default=40,
                    help="units per audio chunk after a segment's first; 0 = whole segments")
    ap.add_argument("--first-chunk-units", type=int, default=20,
                    help="units in a segment's first audio chunk")
    ap.add_argument("--threads", type=int_at_least(1), help="torch intra-op threads")
    ap.add_argument("--warmup", type=int_at_least(0), default=1, help="uncounted runs first (lazy init)")
    ap.add_argument("--json", type=Path, help="also write the rows and summary here")
    args = ap.parse_args(argv)
    if args.json is not None:  # before the run, not after it: the rows would be lost
        from echox.fileio import check_out_path

        check_out_path(args.json, "--json", folder=False, inputs=[args.questions, args.model])

    import torch

    from echox.infer.bundle import load_bundle
    from echox.infer.engine import Engine, EngineConfig

    cfg = EngineConfig.greedy(max_new_tokens=args.max_new_tokens, workers=args.workers,
                              chunk_units=args.chunk_units,
                              first_chunk_units=args.first_chunk_units)
    if args.threads:
        torch.set_num_threads(args.threads)
    questions = read_questions(args.questions, args.n)
    if args.input == "text":  # asked as text: each row needs its question's text
        lacking = [q for q in questions if not (isinstance(q.get("question"), str) and q["question"].strip())]
        if lacking:
            raise SystemExit(f"{args.questions}: question {lacking[0].get('id', '?')!r} has no "
                             "'question' text to ask (--input text)")
    base = args.questions.parent
    bundle = load_bundle(args.model)
    if bundle.vocoder is None:
        print("latency: the bundle has no vocoder; audio columns stay empty", file=sys.stderr)
    rows: list[Row] = []
    with Engine(bundle, cfg) as engine:
        for rec in questions[: args.warmup]:
            ask(engine.session(), rec, base, args.input == "audio")
        for rec in questions:
            final = ask(engine.session(), rec, base, args.input == "audio")
            st = final.stats
            rows.append(Row(str(rec.get("id", len(rows))), st.text_tokens,
                            st.first_segment_tokens, st.first_audio_tokens, st.first_audio_ms,
                            st.total_ms, st.audio_seconds, st.rtf, st.segments))

    head = f"{'id':<16} {'tok':>5} {'seg_tok':>7} {'aud_tok':>7} {'aud_ms':>9} {'audio_s':>7} {'rtf':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.id[:16]:<16} {r.text_tokens:>5} {fmt(r.first_segment_tokens):>7} "
              f"{fmt(r.first_audio_tokens):>7} {fmt(r.first_audio_ms):>9} "
              f"{r.audio_seconds:>7.2f} {fmt(r.rtf, 2):>6}")

    def col(name: str) -> list[float]:
        return [float(getattr(r, name)) for r in rows if getattr(r, name) is not None]

    summary: dict[str, Any] = {"n": len(rows), "device": "cpu" if not torch.cuda.is_available()
                               else torch.cuda.get_device_name(0),
                               "threads": torch.get_num_threads(), "workers": args.workers,
                               "chunk_units": args.chunk_units,
                               "first_chunk_units": args.first_chunk_units}
    print("-" * len(head))
    for name in ("first_segment_tokens", "first_audio_tokens", "first_audio_ms", "rtf"):
        vals = col(name)
        med = statistics.median(vals) if vals else None
        summary[name] = {"median": med, "p90": pct(vals, 90), "mean":
                         statistics.fmean(vals) if vals else None, "count": len(vals)}
        print(f"{name:<22} median {fmt(med, 2):>9}  p90 {fmt(pct(vals, 90), 2):>9}  "
              f"(n={len(vals)})")
    if args.json:
        from echox.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps({"summary": summary,
                                                 "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    import _cli

    sys.exit(_cli.run(main))
