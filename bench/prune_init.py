"""How close a pruned HiFi-GAN student starts to its teacher, before any distillation.

    python bench/prune_init.py [--audio src/echox/assets/question.wav] [--widths 384 256 192 128]

The first half of the clip's mel calibrates (`prune_generator(..., calibration_mel=...)`), the
second half is scored: mean |log-mel(student audio) - log-mel(teacher audio)|, with and
without calibration, next to the same distance for silence. Prints a table.
"""

from __future__ import annotations

import argparse
import sys

import torch

from echox.audio import load_audio
from echox.config import int_at_least
from echox.vocoder.distill import check_student_width, prune_generator
from echox.vocoder.hifigan import mel_spectrogram
from echox.vocoder.io import load_hifigan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--audio", default="src/echox/assets/question.wav")
    ap.add_argument("--teacher", default="universal")
    ap.add_argument("--widths", type=int_at_least(1), nargs="+", default=[384, 256, 192, 128])
    ap.add_argument("--threads", type=int_at_least(1), default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher = load_hifigan(args.teacher)
    for w in args.widths:  # all of them before the table (a bad one came after its header)
        check_student_width(teacher.config, w)
    spec = teacher.config.mel
    wav = torch.from_numpy(load_audio(args.audio, spec.sampling_rate))
    mel = mel_spectrogram(wav[: len(wav) // spec.hop_length * spec.hop_length], spec)
    half = mel.shape[-1] // 2
    cal, test = mel[:, :, :half], mel[:, :, half:]
    with torch.no_grad():
        ref = mel_spectrogram(teacher(test), spec)

        def dist(audio: torch.Tensor) -> float:
            return float((mel_spectrogram(audio, spec) - ref).abs().mean())

        silence = dist(torch.full((1, test.shape[-1] * spec.hop_length), 1e-4))
        print(f"{args.audio}: {half} calibration frames, {test.shape[-1]} scored frames\n")
        print("| width | mel L1 to teacher, pruned | pruned + calibrated | silence |")
        print("|---|---|---|---|")
        for w in args.widths:
            plain = dist(prune_generator(teacher, w).eval()(test))
            calibrated = dist(prune_generator(teacher, w, calibration_mel=cal).eval()(test))
            print(f"| {w} | {plain:.2f} | {calibrated:.2f} | {silence:.2f} |")
    return 0


if __name__ == "__main__":
    import _cli

    sys.exit(_cli.run(main))
