"""Which Whisper encoder layer and K make compact, well-clustered units? (cheap proxies)

Reads a JSONL manifest of `{"text": ..., "audio": path}` records (paths relative to the
manifest), fits k-means per (layer, K) on a training split and reports on held-out utterances:

- kept %: units left after deduplication / frames (lower = shorter T2C targets);
- units/s and units/char: deduplicated sequence length against time and transcript length;
- rel. inertia: mean squared distance to the nearest centroid / total variance (1 - R^2),
  comparable across layers of different scale;
- usage: perplexity of the held-out unit histogram / K (how much of the codebook is used).

None of these measures intelligibility: the resynthesis WER of docs/units.md does (layers 2-3 of
tiny.en best). Example:
    python bench/unit_layer_choice.py --manifest data/tiny/train.jsonl --layers 1 2 3 4 --ks 100 500
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from echox.audio import load_audio
from echox.config import int_at_least
from echox.units.extract import WhisperLayerFeatures
from echox.units.kmeans import UnitKMeans, dedup


def read_manifest(path: Path, max_utts: int) -> list[tuple[str, np.ndarray]]:
    """(text, 16 kHz waveform) pairs from the first `max_utts` records."""
    if not path.is_file():
        raise SystemExit(f"{path}: no such file")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        rec = json.loads(line)
        if not isinstance(rec, dict) or "audio" not in rec or "text" not in rec:
            raise SystemExit(f"{path}:{n + 1}: record needs 'audio' and 'text' fields")
        audio = Path(rec["audio"])
        out.append((rec["text"], load_audio(audio if audio.is_absolute() else path.parent / audio)))
        if len(out) >= max_utts:
            break
    if len(out) < 2:
        raise SystemExit(f"{path}: need at least 2 utterances, found {len(out)}")
    return out


def measure(
    train: list[np.ndarray], held: list[np.ndarray], chars: int, k: int, seconds: float
) -> dict[str, float]:
    """Fit k-means on `train` frames, score it on the `held` frames."""
    km = UnitKMeans.fit(train, n_clusters=k, sample_frames=100_000, seed=0, n_init=1)
    frames = np.concatenate(held)  # [N, D]
    ids = km.predict(frames)  # [N]
    sq = ((frames - km.centroids[ids]) ** 2).sum(axis=1).mean()
    total = ((frames - frames.mean(axis=0)) ** 2).sum(axis=1).mean()
    units = sum(len(dedup(km.predict(h))) for h in held)
    hist = np.bincount(ids, minlength=k) / ids.size
    nz = hist[hist > 0]
    return {
        "kept_pct": 100.0 * units / frames.shape[0],
        "units_per_s": units / seconds,
        "units_per_char": units / max(chars, 1),
        "rel_inertia": float(sq / total),
        "usage": float(np.exp(-(nz * np.log(nz)).sum()) / k),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", type=Path, required=True, help="JSONL of {text, audio} records")
    ap.add_argument("--model", default="openai/whisper-tiny.en", help="Whisper hub id or folder")
    ap.add_argument("--layers", type=int_at_least(0), nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--ks", type=int_at_least(1), nargs="+", default=[100, 500])
    ap.add_argument("--max-utts", type=int_at_least(2), default=200, help="utterances read from the manifest")
    ap.add_argument("--heldout", type=float, default=0.1, help="fraction held out for scoring")
    ap.add_argument("--batch-size", type=int_at_least(1), default=8)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.json:  # before the run: a bad path would lose its results, an input be replaced
        from echox.fileio import check_out_path

        check_out_path(args.json, "--json", folder=False, inputs=[args.manifest, args.model])
    if not 0 < args.heldout < 1:
        ap.error(f"--heldout must be a fraction in (0, 1), got {args.heldout}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    data = read_manifest(args.manifest, args.max_utts)
    n_held = max(1, round(args.heldout * len(data)))
    if n_held >= len(data):
        raise SystemExit(f"--heldout {args.heldout} of {len(data)} utterances leaves none to train on")
    held_text = data[:n_held]
    seconds = sum(w.size for _, w in held_text) / 16000
    chars = sum(len(t) for t, _ in held_text)
    wavs = [w for _, w in data]
    print(f"{len(data)} utterances, {n_held} held out ({seconds:.1f} s)", file=sys.stderr)

    rows = []
    for layer in args.layers:
        t0 = time.perf_counter()
        feats_fn = WhisperLayerFeatures(args.model, layer=layer)
        feats = [f for lo in range(0, len(wavs), args.batch_size)
                 for f in feats_fn(wavs[lo : lo + args.batch_size])]
        print(f"layer {layer}: features in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        for k in args.ks:
            rows.append({"layer": layer, "k": k, **measure(feats[n_held:], feats[:n_held], chars, k, seconds)})

    print("| layer | K | kept % | units/s | units/char | rel. inertia | usage |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['k']} | {r['kept_pct']:.0f} | {r['units_per_s']:.1f} | "
              f"{r['units_per_char']:.2f} | {r['rel_inertia']:.3f} | {r['usage']:.2f} |")
    if args.json:
        from echox.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    import _cli

    sys.exit(_cli.run(main))
