"""`echox train vocoder` (the CPU-default unit→mel model in front of the pretrained HiFi-GAN)
and `echox train hifigan` (a V2-size HiFi-GAN distilled from the packaged V1).

Data: a TTS manifest whose records carry `units` and `counts` (run lengths at the unit frame
rate, written by `echox units extract`) and the audio they came from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from echox.config import ConfigError, read_yaml_mapping


def load_pairs(manifest: str, sample_rate: int, limit: int | None = None) -> list[tuple[list[int], list[int], Any]]:
    """(units, run lengths, waveform at `sample_rate`) for every record that has them."""
    from echox.audio import load_audio
    from echox.data.manifest import read_jsonl

    path = Path(manifest)
    if not path.is_file():
        raise ConfigError(f"vocoder data not found: {path}")
    raw = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    rep = read_jsonl(path, "tts", on_error="skip")
    pairs = []
    for obj in raw[:limit] if limit else raw:
        if not obj.get("units") or not obj.get("counts") or not obj.get("audio"):
            continue
        audio = Path(obj["audio"])
        audio = audio if audio.is_absolute() else rep.base_dir / audio
        pairs.append((obj["units"], obj["counts"], load_audio(audio, sample_rate, max_seconds=None)))
    if not pairs:
        raise ConfigError(f"{path}: no record has units, counts and audio; run `echox units extract` first")
    return pairs


def cmd_train_vocoder(args: argparse.Namespace) -> int:
    import torch

    from echox.model.unit2mel import Unit2MelConfig, UnitMelVocoder
    from echox.train.vocoder import train_unit2mel

    recipe: dict[str, Any] = {"vocoder": {}, "train": {}, "data": {}}
    if args.recipe:
        loaded = read_yaml_mapping(args.recipe, "recipe")
        for k in recipe:
            recipe[k].update(loaded.get(k) or {})
    for s in args.set or []:
        key, _, val = s.partition("=")
        section, _, name = key.partition(".")
        if section not in recipe or not name:
            raise ConfigError(f"--set {s!r}: use vocoder.KEY=V, train.KEY=V or data.KEY=V")
        recipe[section][name] = yaml.safe_load(val)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = recipe["data"]
    train_path = args.data or data.get("train")
    if not train_path:
        raise ConfigError("give --data: a TTS manifest with units and counts")
    init = None
    grow, postnet = getattr(args, "grow_decoder", 0) or 0, getattr(args, "add_postnet", 0) or 0
    if args.init:  # continue training a Unit2Mel (a vocoder folder is one too)
        from echox.model.unit2mel import Unit2Mel

        init = Unit2Mel.from_pretrained(args.init).train()
        cfg = init.config
        if getattr(args, "reinit_units", False):
            # a new k-means: unit ids mean something else, so only the layers above the
            # unit embedding carry over (a head start over a fresh model)
            init.embed.weight.data.copy_(Unit2Mel(cfg).embed.weight.data)
        if grow or postnet:
            from echox.model.unit2mel import grow_unit2mel

            init = grow_unit2mel(init, grow, postnet)
            cfg = init.config
    elif grow or postnet:
        raise ConfigError("--grow-decoder / --add-postnet grow a trained model: give --init")
    else:
        cfg = Unit2MelConfig.from_dict(recipe["vocoder"], source="vocoder section")
    tr = recipe["train"]
    out = Path(args.output_dir or tr.get("output_dir", "runs/vocoder"))
    pairs = load_pairs(train_path, cfg.sample_rate, data.get("limit"))
    res = train_unit2mel(
        pairs, cfg, steps=args.max_steps or tr.get("steps", 2000), lr=args.lr or tr.get("lr", 1e-3),
        batch_size=args.batch_size or tr.get("batch_size", 16), out_dir=out / "unit2mel",
        log_every=tr.get("log_every", 50), seed=tr.get("seed", 0), model=init,
        warmup=tr.get("warmup"),
        segment_frames=getattr(args, "segment_frames", None) or tr.get("segment_frames"),
        holdout=getattr(args, "holdout", 0) or tr.get("holdout", 0),
        eval_every=getattr(args, "eval_every", 0) or tr.get("eval_every", 0),
        save_every=getattr(args, "save_every", 0) or tr.get("save_every", 0),
    )
    voc = UnitMelVocoder(res["model"].eval(), output_sr=tr.get("output_sr", 16000),
                         hifigan=tr.get("hifigan", "universal"))
    voc.save_pretrained(out / "model")
    print(json.dumps({"stage": "vocoder", "pairs": len(pairs), "steps": res["steps"],
                      "first_loss": res["first_loss"], "last_loss": res["loss"],
                      "steps_per_s": res["steps"] / max(res["seconds"], 1e-9),
                      "held_out": res["evals"][-1] if res["evals"] else None,
                      "output": str(out / "model")}))
    return 0


def _mels_from_manifest(manifest: str, spec: Any, limit: int | None, unit2mel: Any,
                        gta: bool = False) -> tuple[list, list, list]:
    """Log-mels [M, T] of the manifest's audio and, with a Unit2Mel, of its units' predictions:
    with predicted durations, or with `gta` with the real ones (then the third list holds the
    real audio [T * hop] of each prediction)."""
    import torch

    from echox.audio import load_audio
    from echox.convert.hifigan import mel_spectrogram
    from echox.data.manifest import read_jsonl
    from echox.train.vocoder import aligned_prediction

    path = Path(manifest)
    if not path.is_file():
        raise ConfigError(f"hifigan data not found: {path}")
    rep = read_jsonl(path, "tts", on_error="skip")
    raw = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    real, predicted, targets = [], [], []
    for obj in raw[:limit] if limit else raw:
        if not isinstance(obj, dict) or not obj.get("audio"):
            continue
        audio = Path(obj["audio"])
        audio = audio if audio.is_absolute() else rep.base_dir / audio
        wav = load_audio(audio, spec.sampling_rate, max_seconds=None)
        n = len(wav) // spec.hop_length * spec.hop_length
        if n <= spec.n_fft:
            continue
        real.append(mel_spectrogram(torch.from_numpy(wav[:n]), spec)[0])
        if unit2mel is not None and gta and obj.get("units") and obj.get("counts"):
            mel = aligned_prediction(unit2mel, obj["units"], obj["counts"], real[-1], str(audio))
            predicted.append(mel.transpose(0, 1))
            targets.append(torch.from_numpy(wav[:n]))
        elif unit2mel is not None and not gta and obj.get("units"):
            with torch.no_grad():
                predicted.append(unit2mel.infer(obj["units"]).mel[0].transpose(0, 1).float())
    if not real:
        raise ConfigError(f"{path}: no record with readable audio")
    if unit2mel is not None and not predicted:
        raise ConfigError(f"{path}: no record with units" + (" and counts" if gta else ""))
    return real, predicted, targets


def cmd_train_hifigan(args: argparse.Namespace) -> int:
    """Distil the packaged HiFi-GAN V1 into a narrower student (`echox.train.hifigan_distill`)."""
    import torch

    from echox.convert.hifigan import HiFiGANConfig, HiFiGANGenerator, load_hifigan
    from echox.model.unit2mel import Unit2Mel
    from echox.train.hifigan_distill import (
        DistillConfig,
        TeacherPool,
        build_gta_pool,
        build_pool,
        distill,
        prune_generator,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir or "runs/hifigan-small")
    pool_path = Path(args.pool) if args.pool else out / "teacher_pool.safetensors"
    teacher_name = args.teacher or "universal"
    if pool_path.is_file():
        pool = TeacherPool.load(pool_path)
        print(f"[distill] reusing {pool.mels.shape[0]} teacher windows from {pool_path}",
              file=sys.stderr)
    else:
        if not args.data:
            raise ConfigError("give --data: a TTS manifest whose audio the student learns from")
        teacher = load_hifigan(teacher_name)
        u2m = Unit2Mel.from_pretrained(args.unit2mel) if args.unit2mel else None
        gta = bool(getattr(args, "gta", False))
        if gta and u2m is None:
            raise ConfigError("--gta needs --unit2mel")
        share = float(getattr(args, "unit2mel_share", 0.5))
        if not 0.0 <= share < 1.0:  # before the slow manifest read
            raise ConfigError(f"--unit2mel-share must be in [0, 1), got {share}")
        real, predicted, targets = _mels_from_manifest(args.data, teacher.config.mel, args.limit,
                                                       u2m, gta=gta)
        n = args.windows
        n_pred = round(n * share) if predicted else 0
        reuse = getattr(args, "teacher_from", None)
        if reuse:  # the teacher's windows do not depend on the unit->mel: skip the slow part
            if not Path(reuse).is_file():
                raise ConfigError(f"--teacher-from: no pool file at {reuse}")
            old = TeacherPool.load(reuse)
            if old.window_frames != args.window_frames:
                raise ConfigError(f"--teacher-from {reuse}: windows of {old.window_frames} "
                                  f"frames, not --window-frames {args.window_frames}")
            have = int(old.locked.sum())  # type: ignore[union-attr]
            if have < n - n_pred:
                raise ConfigError(f"--teacher-from {reuse}: {have} teacher windows, but "
                                  f"--windows and --unit2mel-share ask for {n - n_pred}")
            parts = [old.teacher_windows(n - n_pred)]
        else:
            parts = [build_pool(teacher, real, n - n_pred, args.window_frames, seed=1)]
        if n_pred and gta:
            parts.append(build_gta_pool(predicted, targets, n_pred, args.window_frames,
                                        parts[0].valid, parts[0].hop, seed=2))
        elif n_pred:
            parts.append(build_pool(teacher, predicted, n_pred, args.window_frames, seed=2))
        pool = TeacherPool.cat(parts)
        out.mkdir(parents=True, exist_ok=True)
        pool.save(pool_path)
    train_pool, eval_pool = pool.split(max(8, int(pool.mels.shape[0]) // 20))
    cfg = DistillConfig(steps=args.max_steps or 3000, batch_size=args.batch_size or 16,
                        lr=args.lr or 5e-4, **({"eval_every": args.eval_every}
                                               if getattr(args, "eval_every", 0) else {}))
    width = getattr(args, "student_channels", None) or HiFiGANConfig.v2().upsample_initial_channel
    if args.init:  # continue a student
        from echox.convert.hifigan import load_generator

        student = load_generator(args.init)
    elif getattr(args, "student_init", "random") == "prune":
        student = prune_generator(load_hifigan(teacher_name), width,
                                  calibration_mel=train_pool.mels[:16])
    else:
        student = HiFiGANGenerator(HiFiGANConfig(upsample_initial_channel=width))
    res = distill(train_pool, cfg, student=student, eval_pool=eval_pool, out_dir=out / "model")
    summary = {"stage": "hifigan", "teacher": teacher_name, "windows": res["windows"],
               "params": res["params"], "steps": res["steps"], "seconds": round(res["seconds"], 1),
               "first": res["history"][0] if res["history"] else None,
               "last": res["history"][-1] if res["history"] else None,
               "eval": res["eval"][-1] if res["eval"] else None, "output": str(out / "model")}
    (out / "summary.json").write_text(json.dumps({**summary, "history": res["history"],
                                                  "evals": res["eval"]}, indent=2))
    print(json.dumps(summary))
    return 0
