"""Vocoder quality and speed: resynthesize held-out answers from their units.

    python bench/vocoder.py --vocoder runs/tiny/vocoder/model \
        --manifest data/tiny/test/tts_units.jsonl --n 50 [--hifigan universal --hifigan small]

Prints the ASR word error rate (Whisper tiny.en via faster-whisper) of the original piper
audio and of the resynthesis against the text, and the real-time factor of synthesis
(seconds of compute per second of audio) on this machine. With a unit->mel vocoder, each
`--hifigan` (a packaged name or a generator folder) is measured in turn on the same mels, and
`--copy-synthesis` adds the generator run on the original audio's own mel (the ceiling of the
mel route). Each `--stream N` adds the same units rendered as the engine streams them (chunks of
`first_chunk_units`, then `chunk_units`, each with N units of left context and the engine's
crossfade), with the streamed audio's length against the whole rendering's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from echox.config import int_at_least

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocoder", required=True, help="vocoder folder (UnitMelVocoder or fairseq CodeHiFiGAN)")
    ap.add_argument("--manifest", required=True, help="TTS JSONL with text, audio and units")
    ap.add_argument("--n", type=int_at_least(1), default=50, help="records to use")
    ap.add_argument("--threads", type=int_at_least(0), default=0, help="torch threads (0 = default)")
    ap.add_argument("--hifigan", action="append",
                    help="unit->mel vocoders: HiFi-GAN to measure (repeatable; default: its own)")
    ap.add_argument("--copy-synthesis", action="store_true",
                    help="also vocode the original audio's mel with each HiFi-GAN")
    ap.add_argument("--true-durations", action="store_true",
                    help="also run the unit->mel with the durations of the original audio (from "
                         "the records' run lengths): splits the gap into durations and spectra")
    ap.add_argument("--stream", type=int_at_least(0), action="append", metavar="CONTEXT_UNITS",
                    help="also stream the units in the engine's chunks with this many left-context "
                         "units (repeatable)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.json:  # before the run: a bad path would lose its results, an input be replaced
        from echox.fileio import check_out_path

        check_out_path(args.json, "--json", folder=False, inputs=[args.manifest, args.vocoder])

    import numpy as np
    import torch

    from echox.audio import load_audio
    from echox.eval.wer import wer
    from echox.fileio import json_records
    from echox.infer.asr import FasterWhisperASR
    from echox.infer.events import EngineConfig
    from echox.vocoder.io import load_named_generator, load_vocoder
    from echox.vocoder.unit_mel import UnitMelVocoder

    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.manifest)
    recs = [r for r in json_records(path) if r.get("units") and r.get("audio")][: args.n]
    if not recs:
        print(f"{path}: no records with units and audio", file=sys.stderr)
        return 2
    for r in recs:  # what each measured clip needs, checked before the models load
        if not (isinstance(r.get("text"), str) and isinstance(r["audio"], str)
                and isinstance(r["units"], list)):
            raise SystemExit(f"{path}: record {r.get('id')!r} needs a text, an audio path and units")
        if args.true_durations and not isinstance(r.get("counts"), list):
            raise SystemExit(f"{path}: record {r.get('id')!r} has no unit 'counts', which "
                             "--true-durations reads (extract the units with their durations)")
    base = load_vocoder(args.vocoder)
    variants = [("own", base)]
    if args.hifigan:
        if not isinstance(base, UnitMelVocoder):
            print("--hifigan needs a unit->mel vocoder", file=sys.stderr)
            return 2
        variants = [(name, UnitMelVocoder(base.unit2mel, load_named_generator(name), base.output_sr,
                                          base.default_context_units, hifigan=name))
                    for name in args.hifigan]
    asr = FasterWhisperASR()
    refs = [r["text"] for r in recs]
    audio_paths = [Path(r["audio"]) if Path(r["audio"]).is_absolute() else path.parent / r["audio"]
                   for r in recs]
    hyp_orig = [asr.transcribe(load_audio(a, 16000, max_seconds=None), 16000) for a in audio_paths]
    res: dict = {"n": len(recs), "wer_original": wer(refs, hyp_orig),
                 "threads": args.threads or torch.get_num_threads(), "variants": {},
                 "records": [{"id": r.get("id"), "ref": ref, "original": h}
                             for r, ref, h in zip(recs, refs, hyp_orig)]}
    rows = [("original piper", res["wer_original"], None, None)]
    for name, voc in variants:
        voc.synthesize(recs[0]["units"])  # warm-up: lazy init is not part of the RTF
        hyps, rtfs, synth_s, audio_s, voc_s, whole = [], [], 0.0, 0.0, 0.0, []
        for r in recs:
            if args.threads:  # one run reported 2 threads after the ASR pass (cause unknown)
                torch.set_num_threads(args.threads)
            t0 = time.perf_counter()
            if isinstance(voc, UnitMelVocoder):  # synthesize() in its two timed halves
                mel = voc.unit2mel.infer(voc._clean(r["units"])).mel
                t1 = time.perf_counter()
                wav = voc._resample(voc._vocode(mel))
                voc_s += time.perf_counter() - t1
            else:
                wav = voc.synthesize(r["units"])
            dt = time.perf_counter() - t0
            whole.append(wav.size)  # what --stream compares its lengths with
            dur = wav.size / voc.sample_rate
            synth_s, audio_s = synth_s + dt, audio_s + dur
            rtfs.append(dt / max(dur, 1e-9))
            hyps.append(asr.transcribe(wav, voc.sample_rate))
        v = {"wer_resynthesis": wer(refs, hyps), "rtf_total": synth_s / audio_s,
             "rtf_median": float(np.median(rtfs)), "audio_seconds": audio_s,
             "examples": [{"ref": a, "syn": b} for a, b in list(zip(refs, hyps))[:3]],
             "hypotheses": hyps}
        if isinstance(voc, UnitMelVocoder):  # how the time splits between the two models
            v["rtf_generator"] = voc_s / audio_s
            v["params_generator"] = sum(p.numel() for p in voc.generator.parameters())
            if hasattr(voc.generator, "meta"):  # an ONNX Runtime generator: no torch params
                v["generator_runtime"] = voc.generator.meta
        res["variants"][name] = v
        rows.append((f"units -> {name}", v["wer_resynthesis"], v["rtf_total"], v.get("rtf_generator")))
        for ctx in args.stream or []:
            cfg = EngineConfig()
            hyps, ratios = [], []
            for r, whole_size in zip(recs, whole):
                units, chunks = r["units"], []
                while units:
                    size = cfg.chunk_size(len(chunks)) or len(units)
                    chunks.append(units[:size])
                    units = units[size:]
                wav = np.concatenate(list(voc.synthesize_stream(chunks, cfg.crossfade_ms, ctx)))
                ratios.append(wav.size / whole_size)
                hyps.append(asr.transcribe(wav, voc.sample_rate))
            v[f"wer_stream_{ctx}"] = wer(refs, hyps)
            v[f"length_ratio_stream_{ctx}"] = float(np.mean(ratios))
            v[f"hypotheses_stream_{ctx}"] = hyps
            rows.append((f"units streamed, {ctx} context units -> {name} (length x{np.mean(ratios):.4f} "
                         f"of whole, max x{max(ratios):.4f})", v[f"wer_stream_{ctx}"], None, None))
        if args.copy_synthesis and isinstance(voc, UnitMelVocoder):
            from echox.vocoder.hifigan import mel_spectrogram

            spec = voc.generator.config.mel
            hyps = []
            for a in audio_paths:
                wav = torch.from_numpy(load_audio(a, spec.sampling_rate, max_seconds=None))
                n = wav.numel() // spec.hop_length * spec.hop_length
                with torch.inference_mode():
                    out = voc.generator(mel_spectrogram(wav[:n], spec))[0].numpy()
                hyps.append(asr.transcribe(out, spec.sampling_rate))
            v["wer_copy_synthesis"] = wer(refs, hyps)
            v["hypotheses_copy_synthesis"] = hyps
            rows.append((f"original mel -> {name}", v["wer_copy_synthesis"], None, None))
        if args.true_durations and isinstance(voc, UnitMelVocoder):
            from echox.vocoder.train import aligned_prediction

            sr = voc.unit2mel.config.sample_rate
            hyps = []
            for r, a in zip(recs, audio_paths):
                mel = aligned_prediction(voc.unit2mel, r["units"], r["counts"],
                                         load_audio(a, sr, max_seconds=None), str(a))
                hyps.append(asr.transcribe(voc._resample(voc._vocode(mel[None])), voc.sample_rate))
            v["wer_true_durations"] = wer(refs, hyps)
            v["hypotheses_true_durations"] = hyps
            rows.append((f"units + true durations -> {name}", v["wer_true_durations"], None, None))
    print("| audio | WER (Whisper tiny.en) | RTF | of which HiFi-GAN |\n|---|---|---|---|")
    for label, w, rtf, g in rows:
        f = (lambda x: "-" if x is None else f"{x:.3f}")  # noqa: E731
        print(f"| {label} | {w:.3f} | {f(rtf)} | {f(g)} |")
    print(f"\n{res['n']} records, {res['threads']} torch threads")
    for name, v in res["variants"].items():
        for ex in v["examples"][:2]:
            print(f"  [{name}] ref: {ex['ref']}\n  [{name}] syn: {ex['syn']}")
    if args.json:
        from echox.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    import _cli

    sys.exit(_cli.run(main))
