"""`echox onnx-vocoder`: run a unit->mel vocoder's HiFi-GAN on ONNX Runtime, with int8 stages.

    echox onnx-vocoder --vocoder recipes/tiny/vocoder-k500/vocoder-v1 \
        --calibrate data/tiny/train/tts_units_all.jsonl --int8-stages 1,2 --out runs/voc-int8

Writes a copy of the vocoder folder that names the same HiFi-GAN plus an ONNX spec (stages and
calibration mels, which the unit->mel model makes from the manifest's units: exactly what the
generator sees at inference). The converted graph is built into the EchoX cache here, once,
and again on any machine that loads the folder without it. A generator that is not packaged
is converted into the folder itself (`hifigan/generator.onnx`).
"""

from __future__ import annotations

import argparse
import time
from typing import Any


def _stages(text: str) -> list[int]:
    from echox.cli import UserError

    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise UserError(f"--int8-stages wants comma-separated stage numbers, got {text!r}") from exc


def cmd_onnx_vocoder(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from echox.cli import UserError
    from echox.convert.hifigan_onnx import OnnxHiFiGAN, OnnxSpec, cached_onnx_generator
    from echox.data.manifest import read_jsonl
    from echox.infer.bundle import load_vocoder
    from echox.model.unit2mel import UnitMelVocoder

    if args.threads:
        torch.set_num_threads(args.threads)
    stages = _stages(args.int8_stages)
    voc = load_vocoder(args.vocoder)
    if not isinstance(voc, UnitMelVocoder):
        raise UserError(f"{args.vocoder}: only unit->mel vocoders have a HiFi-GAN to convert")
    if isinstance(voc.generator, OnnxHiFiGAN):
        raise UserError(f"{args.vocoder}: its HiFi-GAN already runs on ONNX Runtime")
    mels: list[np.ndarray] = []
    if stages:
        if not args.calibrate:
            raise UserError("--int8-stages needs --calibrate MANIFEST (JSONL records with units)")
        recs = [r for r in read_jsonl(args.calibrate, "tts", on_error="skip").records if r.units]
        if not recs:
            raise UserError(f"{args.calibrate}: no record has units")
        picks = np.linspace(0, len(recs) - 1, min(args.n, len(recs))).round().astype(int)
        for i in dict.fromkeys(picks.tolist()):
            ids = voc._clean(recs[i].units, warn=False)
            if ids:
                mels.append(voc.unit2mel.infer(ids).mel[0].T.numpy())
    spec = OnnxSpec(tuple(stages), mels)
    t0 = time.perf_counter()
    voc.generator = cached_onnx_generator(voc.generator, spec)
    voc.onnx = spec
    voc.save_pretrained(args.out, dtype=torch.float16 if args.float16 else None)
    print(f"wrote {args.out}: HiFi-GAN {voc.hifigan!r} on ONNX Runtime, int8 stages {list(spec.int8_stages)}, "
          f"{len(mels)} calibration mels; graph at {voc.generator.path} ({time.perf_counter() - t0:.0f} s)")
    return 0


def add_cli(sub: Any) -> None:
    from echox.convert import official

    c = sub.add_parser("convert", help="import checkpoints made elsewhere (official: the released "
                                       "EchoX-3B / EchoX-8B)")
    official.add_cli(c.add_subparsers(dest="what", required=True))
    p = sub.add_parser("onnx-vocoder", help="run a unit->mel vocoder's HiFi-GAN on ONNX Runtime "
                                            "(optionally int8) for faster CPU synthesis")
    p.add_argument("--vocoder", required=True, help="unit->mel vocoder folder")
    p.add_argument("--out", required=True, help="vocoder folder to write")
    p.add_argument("--int8-stages", default="1,2",
                   help="upsampling stages whose convolutions become int8, e.g. 1,2 (default; "
                        "'' keeps everything float32)")
    p.add_argument("--calibrate", help="JSONL manifest with units: their mels calibrate int8")
    p.add_argument("--n", type=int, default=16, help="calibration records (default 16)")
    p.add_argument("--float16", action="store_true",
                   help="store the unit->mel weights in float16 (half the size; loads as float32)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.set_defaults(func=cmd_onnx_vocoder)
