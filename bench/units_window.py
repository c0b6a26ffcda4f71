"""Unit extraction with a shorter Whisper window: speed and agreement with the 30 s window.

    python bench/units_window.py --manifest data/tiny/test/tts.jsonl \
        --kmeans recipes/tiny/vocoder-k500/km500.joblib --n 48 --windows 30,15,10 --threads 1

Whisper pads every utterance to its 30 s window and attends to the padding, so extracting the
units of a 3 s answer runs the encoder layers over ten times the frames it needs. A shorter
window (`echox units extract --window-seconds`) runs fewer frames but changes the features a
little. For each window this prints the seconds per utterance and, against the 30 s window,
the share of 50 Hz frames with the same unit and the share of utterances whose deduplicated
unit sequence is identical. Whether the committed vocoder voices the shorter window's units
as well is a separate measurement (its gold-unit WER, docs/units.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from echox.config import int_at_least


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default="data/tiny/test/tts.jsonl", help="TTS JSONL with audio")
    p.add_argument("--kmeans", default="recipes/tiny/vocoder-k500/km500.joblib")
    p.add_argument("--n", type=int_at_least(1), default=48, help="first N utterances")
    p.add_argument("--windows", default="30,15,10", help="comma-separated seconds; 30 is the reference")
    p.add_argument("--batch-size", type=int_at_least(1), default=8)
    p.add_argument("--threads", type=int_at_least(1), default=1)
    args = p.parse_args(argv)
    try:
        windows = [float(w) for w in args.windows.split(",")]
    except ValueError:
        windows = []
    if not windows or not all(0 < w < np.inf for w in windows):
        p.error(f"--windows takes comma-separated seconds > 0, got {args.windows!r}")

    from echox.audio import load_audio
    from echox.units.cli import _extractor_spec
    from echox.units.kmeans import UnitKMeans, dedup_with_counts

    torch.set_num_threads(args.threads)
    manifest = Path(args.manifest)
    if not manifest.is_file():
        print(f"units_window: {manifest} not found (echox data build-tiny makes it)", file=sys.stderr)
        return 2
    recs = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()][: args.n]
    if not recs or not all(isinstance(r, dict) and "audio" in r for r in recs):
        raise SystemExit(f"{manifest}: needs records with an 'audio' field")
    wavs = [load_audio(str(manifest.parent / r["audio"]), 16000) for r in recs]
    km = UnitKMeans.load(args.kmeans)
    spec, layer = _extractor_spec(argparse.Namespace(kmeans=args.kmeans, features=None, layer=None), km)
    if 30.0 not in windows:
        windows.insert(0, 30.0)

    units: dict[float, list[np.ndarray]] = {}
    secs: dict[float, float] = {}
    for w in windows:
        feats = spec.build(layer, "cpu", None if w == 30.0 else w)
        feats([wavs[0]])  # warm-up
        t0 = time.perf_counter()
        out = [f for i in range(0, len(wavs), args.batch_size) for f in feats(wavs[i : i + args.batch_size])]
        secs[w] = (time.perf_counter() - t0) / len(wavs)
        units[w] = [km.predict(f) for f in out]

    ref = units[30.0]
    audio_s = sum(x.size for x in wavs) / 16000 / len(wavs)
    print(f"{len(wavs)} utterances of {manifest} (mean {audio_s:.1f} s), {spec} layer {layer}, "
          f"{args.threads} thread(s)\n")
    print("| window | s / utterance | speed-up | frames with the same unit | same dedup sequence |")
    print("|---|---|---|---|---|")
    for w in windows:
        same = np.concatenate([a == b for a, b in zip(ref, units[w])]).mean()
        seq = np.mean([dedup_with_counts(a)[0] == dedup_with_counts(b)[0] for a, b in zip(ref, units[w])])
        print(f"| {w:g} s | {secs[w]:.3f} | {secs[30.0] / secs[w]:.2f}x | {same:.3f} | {seq:.3f} |")
    return 0


if __name__ == "__main__":
    import _cli

    sys.exit(_cli.run(main))
