"""Which HiFi-GAN stages can run in int8? Speed and fidelity of each choice against float32.

    python bench/hifigan_int8.py --manifest data/tiny/train/tts.jsonl --stages "" 1 1,2 0,1,2 0,1,2,3

Converts the packaged HiFi-GAN (default V1 `universal`) with `echox.vocoder.onnx` once
per stage set (calibrated on the mels of `--calib` clips of the manifest's audio), vocodes the
mels of `--test` other clips with each, and prints a table: real-time factor of the generator
(best of `--reps` passes, at `--threads` threads), and against torch float32 on the same mel:
waveform SNR, and log-mel L1 over all frames and over voiced frames (mean log-mel > -7).
Int8 noise that fills silences shows as a high all-frames L1 beside a low voiced one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from echox.config import int_at_least

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True, help="JSONL with `audio` (at the generator's rate)")
    ap.add_argument("--hifigan", default="universal", help="packaged name or generator folder")
    ap.add_argument("--stages", nargs="+", default=["", "1", "1,2", "0,1,2"],
                    help="stage sets to try ('' = float32 on ONNX Runtime)")
    ap.add_argument("--calib", type=int_at_least(1), default=16, help="calibration clips")
    ap.add_argument("--test", type=int_at_least(1), default=8, help="test clips (after the calibration ones)")
    ap.add_argument("--threads", type=int_at_least(1), default=1)
    ap.add_argument("--reps", type=int_at_least(1), default=3)
    args = ap.parse_args(argv)
    try:
        stage_sets = [[int(s) for s in text.split(",") if s.strip()] for text in args.stages]
    except ValueError:
        ap.error(f"--stages: each set is comma-separated stage numbers, got {args.stages}")

    import numpy as np
    import torch

    from echox.audio import load_audio
    from echox.vocoder.hifigan import mel_spectrogram
    from echox.vocoder.io import load_named_generator
    from echox.vocoder.onnx import convert_generator_onnx, load_onnx_generator

    torch.set_num_threads(args.threads)
    path = Path(args.manifest)
    if not path.is_file():
        raise SystemExit(f"{path}: no such file")
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    audio = [path.parent / r["audio"] for r in recs if r.get("audio")][: args.calib + args.test]
    if len(audio) < args.calib + args.test:
        print(f"{path}: need {args.calib + args.test} clips with audio", file=sys.stderr)
        return 2
    gen = load_named_generator(args.hifigan)
    sr = gen.config.mel.sampling_rate
    mels = [mel_spectrogram(torch.from_numpy(load_audio(a, sr, max_seconds=None)), gen.config.mel)
            for a in audio]  # [1, M, T] each
    calib, test = [m[0].numpy() for m in mels[: args.calib]], mels[args.calib:]
    seconds = sum(m.shape[-1] for m in test) * gen.config.hop_length / sr
    with torch.inference_mode():
        refs = [gen(m)[0].numpy() for m in test]

    def timed(fn) -> float:
        fn(test[0])  # warm-up
        best = float("inf")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            for m in test:
                fn(m)
            best = min(best, time.perf_counter() - t0)
        return best / seconds

    def fidelity(outs: list[np.ndarray]) -> tuple[float, float, float]:
        snr, l1, voiced = [], [], []
        for o, r in zip(outs, refs):
            snr.append(10 * np.log10(np.sum(r**2) / max(np.sum((o - r) ** 2), 1e-12)))
            mo = mel_spectrogram(torch.from_numpy(o), gen.config.mel)[0]
            mr = mel_spectrogram(torch.from_numpy(r), gen.config.mel)[0]
            d = (mo - mr).abs().mean(0)  # per frame
            l1.append(float(d.mean()))
            voiced.append(float(d[mr.mean(0) > -7].mean()))
        return float(np.mean(snr)), float(np.mean(l1)), float(np.mean(voiced))

    with torch.inference_mode():
        rows = [("torch float32", timed(gen), (float("inf"), 0.0, 0.0))]
    with tempfile.TemporaryDirectory() as work:
        for stages in stage_sets:
            folder = Path(work) / f"s{'_'.join(map(str, stages)) or 'fp32'}"
            t0 = time.perf_counter()
            convert_generator_onnx(gen, folder, stages, calib)
            built = time.perf_counter() - t0
            onnx = load_onnx_generator(folder, threads=args.threads)
            name = f"onnx int8 stages {stages}" if stages else "onnx float32"
            rows.append((f"{name} (built in {built:.0f} s)", timed(onnx),
                         fidelity([onnx(m)[0].numpy() for m in test])))
    print(f"\n{args.hifigan}: {len(test)} clips, {seconds:.1f} s of audio, {args.threads} thread(s), "
          f"best of {args.reps}\n")
    print("| generator | RTF | SNR vs float32 (dB) | log-mel L1, all frames | voiced frames |")
    print("|---|---|---|---|---|")
    for name, rtf, (snr, l1, voiced) in rows:
        print(f"| {name} | {rtf:.3f} | {snr:.1f} | {l1:.3f} | {voiced:.3f} |")
    return 0


if __name__ == "__main__":
    import _cli

    sys.exit(_cli.run(main))
