"""How firmly Whisper hears a word in a spoken answer: copies of the audio with white noise at
several signal-to-noise ratios, and at other gains, each transcribed by Whisper tiny.en.

    echox demo -o answer.wav
    python bench/heard_margin.py answer.wav --word tokyo [--snr 50 40 30] [--copies 10]

One row per condition: how many of the copies' transcripts contain `--word`, by the eval's
match rule (whole words, case-folded: `span` is not heard in "Spanish").
A word heard in every copy is firm; one that comes and goes with noise 50 dB below the speech
(far under anything a listener notices) is on the edge of what the model said.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from echox.config import int_at_least


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("audio", help="the spoken answer (wav/flac/ogg)")
    p.add_argument("--word", required=True, help="the word to look for in each transcript")
    p.add_argument("--snr", type=float, nargs="+", default=[50.0, 40.0, 30.0],
                   help="white-noise levels, dB below the speech's RMS")
    p.add_argument("--copies", type=int_at_least(1), default=10, help="noisy copies per level (seeds 0..N-1)")
    p.add_argument("--gains", type=float, nargs="+", default=[0.5, 0.8, 1.25],
                   help="other gains than the file's own (clipped to [-1, 1])")
    p.add_argument("--threads", type=int_at_least(1), default=1, help="torch / CTranslate2 threads")
    args = p.parse_args(argv)
    if not args.word.strip():  # every transcript "contains" the empty word
        p.error("--word: give a word")
    if not all(math.isfinite(x) for x in args.snr):
        p.error(f"--snr: levels must be finite numbers, got {args.snr}")
    if not all(0 < x < math.inf for x in args.gains):
        p.error(f"--gains: gains must be finite numbers > 0, got {args.gains}")

    import torch

    from echox.audio import load_audio
    from echox.errors import EchoXError
    from echox.infer.asr import FasterWhisperASR

    torch.set_num_threads(args.threads)
    try:
        wav = load_audio(args.audio, 16000, max_seconds=None)
    except EchoXError as e:
        print(f"heard_margin: {e}", file=sys.stderr)
        return 2
    asr = FasterWhisperASR()
    from echox.data.match import exist_match

    def heard(t: str) -> bool:  # the eval's rule, word by word: "span" is not in "Spanish"
        return exist_match(t, args.word)

    rms = float(np.sqrt(np.mean(wav.astype(np.float64) ** 2)))
    rows: list[tuple[str, int, int, str]] = []
    first = asr.transcribe(wav)
    rows.append(("as written", int(heard(first)), 1, first))
    for g in args.gains:
        t = asr.transcribe(np.clip(wav * g, -1.0, 1.0).astype(np.float32))
        rows.append((f"gain {g:g}", int(heard(t)), 1, t))
    for snr in args.snr:
        said = []
        for seed in range(args.copies):
            noise = np.random.default_rng(seed).standard_normal(wav.size) * rms * 10 ** (-snr / 20)
            said.append(asr.transcribe((wav + noise).astype(np.float32)))
        hits = sum(map(heard, said))
        other = next((t for t in said if not heard(t)), said[0])
        rows.append((f"white noise, {snr:g} dB SNR", hits, len(said), other))
    print(f"| condition | transcripts with {args.word!r} | one transcript (a miss if any) |")
    print("|---|---:|---|")
    for name, hits, n, t in rows:
        print(f"| {name} | {hits} / {n} | {t!r} |")
    return 0


if __name__ == "__main__":
    import _cli

    sys.exit(_cli.run(main))
