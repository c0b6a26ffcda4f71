"""What the speech adapter hears: its CTC transcript and what the shrink keeps, per question.

    python bench/ctc_probe.py --model runs/tiny/s2t/model --qa data/tiny/test/qa.jsonl --n 100

For each spoken question: the adapter's frames, the frames the shrink keeps, the share of
frames whose CTC argmax is the blank, and the greedy CTC transcript (runs collapsed, blanks
removed) with its word error rate against the question text. A printed table sums them up
(means; WER over all words); `--show K` prints the first K transcripts. An adapter that
never predicts a blank keeps one frame per run of equal tokens, so a long run of one token
(e.g. "?") swallows whatever was said there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def probe(model, wave: np.ndarray) -> dict:
    with torch.no_grad():
        out = model.encode_speech([wave])
    n = int(out.frame_lengths[0])
    ids = out.ctc_logits[0, :n].argmax(-1).tolist()
    blank = model.adapter.blank_id
    collapsed = [t for i, t in enumerate(ids) if (i == 0 or t != ids[i - 1]) and t != blank]
    return {"frames": n, "kept": int(out.lengths[0]), "blank_share": sum(t == blank for t in ids) / n,
            "ctc_text": model.tokenizer.decode(collapsed).strip()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="EchoX checkpoint or bundle folder")
    p.add_argument("--qa", default="data/tiny/test/qa.jsonl", help="local: QA JSONL with audio")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--show", type=int, default=5, help="print this many transcripts")
    p.add_argument("--json", help="write per-question rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from echox.audio import load_audio
    from echox.eval.wer import edit_distance, normalize_words
    from echox.model.echox import EchoX

    model = EchoX.from_pretrained(args.model).eval()
    qa = Path(args.qa)
    rows = []
    for line in qa.read_text().splitlines()[: args.n]:
        item = json.loads(line)
        wave = load_audio(str(qa.parent / item["audio"]), 16000)
        r = probe(model, wave)
        r.update(id=item["id"], question=item["question"])
        ref = normalize_words(item["question"])
        r["errors"], r["words"] = edit_distance(ref, normalize_words(r["ctc_text"])), len(ref)
        rows.append(r)
    for r in rows[: args.show]:
        print(f"{r['question']!r}\n  -> {r['ctc_text']!r} ({r['kept']}/{r['frames']} kept)")
    wer = sum(r["errors"] for r in rows) / max(sum(r["words"] for r in rows), 1)
    print(f"{'model':<40} {'n':>4} {'frames':>7} {'kept':>6} {'blank':>6} {'CTC WER':>8}")
    print(f"{args.model[-40:]:<40} {len(rows):>4} {np.mean([r['frames'] for r in rows]):7.1f} "
          f"{np.mean([r['kept'] for r in rows]):6.1f} {np.mean([r['blank_share'] for r in rows]):6.2f} "
          f"{wer:8.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
