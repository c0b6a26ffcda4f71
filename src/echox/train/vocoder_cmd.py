"""The vocoder commands, which read data manifests around `echox.vocoder`:

- `echox vocoder train`: the CPU-default unit→mel model in front of the pretrained HiFi-GAN
  (`echox.vocoder.train`);
- `echox vocoder distill`: a V2-size HiFi-GAN distilled from the packaged V1
  (`echox.vocoder.distill`);
- `echox vocoder onnx`: run a unit->mel vocoder's HiFi-GAN on ONNX Runtime, with int8 stages
  calibrated on the unit->mel model's mels of a manifest's units (`echox.vocoder.onnx`).

Training data: a TTS manifest whose records carry `units` and `counts` (run lengths at the unit
frame rate, written by `echox units extract`) and the audio they came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from echox.audio import load_audio
from echox.config import MAX_THREADS, int_at_least, load_recipe
from echox.data.manifest import read_jsonl
from echox.fileio import atomic_write_text, check_out_path, folder_config, moved_aside_hint
from echox.errors import ConfigError, EchoXError
from echox.vocoder.distill import (
    DistillConfig,
    TeacherPool,
    build_gta_pool,
    build_pool,
    distill,
    prune_generator,
)
from echox.vocoder.hifigan import HiFiGANConfig, HiFiGANGenerator, mel_spectrogram
from echox.vocoder.io import (
    LOCAL_HIFIGAN,
    PACKAGED_HIFIGANS,
    load_generator,
    load_hifigan,
    load_named_generator,
    load_vocoder,
    save_vocoder,
)
from echox.vocoder.onnx import OnnxHiFiGAN, OnnxSpec, cached_onnx_generator
from echox.vocoder.train import aligned_prediction, train_unit2mel
from echox.vocoder.unit2mel import Unit2Mel, Unit2MelConfig, grow_unit2mel
from echox.vocoder.unit_mel import UnitMelVocoder

# windows of a distillation pool held out to evaluate the student (or a 20th, if more)
HELD_OUT_WINDOWS = 8


def _tts_objects(path: Path) -> tuple[Any, list[dict[str, Any]]]:
    """The TTS manifest's report and the JSON object of each of its good records, whole (for
    "counts", which is not a TTS field). Malformed lines (cut short by a kill, not UTF-8) are
    named and skipped by `read_jsonl`, so a record's line is read again only when it is good;
    split on "\n" only, as read_jsonl does."""
    rep = read_jsonl(path, "tts", on_error="skip")
    lines = path.read_bytes().split(b"\n")
    return rep, [json.loads(lines[n - 1]) for n in rep.lines]


def load_pairs(manifest: str, sample_rate: int, limit: int | None = None) -> list[tuple[list[int], list[int], Any]]:
    """(units, run lengths, waveform at `sample_rate`) for every record that has them."""
    path = Path(manifest)
    if not path.is_file():
        raise ConfigError(f"vocoder data not found: {path}")
    rep, raw = _tts_objects(path)
    pairs = []
    for line, obj in list(zip(rep.lines, raw))[:limit] if limit else zip(rep.lines, raw):
        if not obj.get("units") or not obj.get("counts") or not obj.get("audio"):
            continue
        counts = obj["counts"]
        if not (isinstance(counts, list) and len(counts) == len(obj["units"])
                and all(type(c) is int and c >= 1 for c in counts)):
            raise ConfigError(f"{path}:{line}: 'counts' must be one whole number >= 1 per unit "
                              "(the run lengths `echox units extract` writes)")
        audio = Path(obj["audio"])
        audio = audio if audio.is_absolute() else rep.base_dir / audio
        pairs.append((obj["units"], obj["counts"], load_audio(audio, sample_rate, max_seconds=None)))
    if not pairs:
        raise ConfigError(f"{path}: no record has units, counts and audio; run `echox units extract` first")
    return pairs


@dataclass
class VocoderTrain:
    """The `train` section of a vocoder recipe (recipes/tiny/vocoder.yaml)."""

    output_dir: str = "runs/vocoder"
    max_steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int | None = None  # default: the shared schedule's
    log_every: int = 50
    seed: int = 0
    segment_frames: int | None = None  # random crops of at most this many mel frames
    holdout: int = 0  # the manifest's last N pairs, held out
    eval_every: int = 0
    save_every: int = 0
    hifigan: str = "universal"  # the mel HiFi-GAN the trained unit->mel model feeds
    output_sr: int = 16000


@dataclass
class VocoderData:
    """The `data` section of a vocoder recipe."""

    train: str | None = None  # TTS JSONL with units and counts
    limit: int | None = None


VOCODER_SECTIONS: dict[str, type | None] = {"vocoder": Unit2MelConfig, "train": VocoderTrain,
                                            "data": VocoderData}


def cmd_train_vocoder(args: argparse.Namespace) -> int:
    import torch

    recipe = load_recipe(args.recipe, VOCODER_SECTIONS, sets=args.set or [])
    if args.threads:
        torch.set_num_threads(args.threads)
    data: VocoderData = recipe["data"]
    tr: VocoderTrain = recipe["train"]
    train_path = args.data or data.train
    if not train_path:
        raise ConfigError("give --data: a TTS manifest with units and counts")
    init = None
    grow, postnet = args.grow_decoder, args.add_postnet
    named = {str(o).split("=", 1)[0].strip() for o in args.set or []}  # the keys --set gives
    if args.init:  # continue training a Unit2Mel (a vocoder folder is one too)

        init = Unit2Mel.from_pretrained(args.init).train()
        cfg = init.config
        if args.reinit_units:
            # a new k-means: unit ids mean something else, so only the layers above the
            # unit embedding carry over (a head start over a fresh model). Its K is the init's
            # unless `--set vocoder.num_units=K` gives the new one (that --set was ignored)
            k = recipe["vocoder"].num_units if "vocoder.num_units" in named else cfg.num_units
            if k != cfg.num_units:
                cfg = init.config = dataclasses.replace(cfg, num_units=k)
            init.embed = Unit2Mel(cfg).embed  # a fresh one, of the new K
        if grow or postnet:
            init = grow_unit2mel(init, grow, postnet)
            cfg = init.config
    elif grow or postnet or args.reinit_units:  # --reinit-units alone was ignored, exit 0
        raise ConfigError("--grow-decoder / --add-postnet / --reinit-units change a trained "
                          "model: give --init")
    else:
        cfg = recipe["vocoder"]
    out = check_out_path(tr.output_dir if args.output_dir is None else args.output_dir)
    saved = out / "unit2mel"  # a killed (or finished) run's saves: not thrown away
    if saved.exists() and not (args.init and Path(args.init).resolve() == saved.resolve()):
        raise ConfigError(f"{saved} holds an earlier run's Unit2Mel ({_steps_done(saved)}); "
                          f"continue it with --init {saved}, or give another --out")
    hint = moved_aside_hint(saved)
    if not saved.exists() and hint:  # a save killed between its renames: the run is there
        raise ConfigError(f"{saved} is missing{hint}; then continue with --init {saved}, or "
                          "give another --out")

    def given(value: Any, default: Any) -> Any:  # an option, when given (0 included)
        return default if value is None else value

    steps, lr = given(args.max_steps, tr.max_steps), given(args.lr, tr.lr)
    batch_size, holdout = given(args.batch_size, tr.batch_size), given(args.holdout, tr.holdout)
    if not (steps >= 1 and batch_size >= 1 and 0 < lr < float("inf")):
        raise ConfigError(f"--max-steps and --batch-size must be >= 1 and --lr a finite number "
                          f"> 0; got {steps}, {batch_size}, {lr}")
    segment_frames = given(args.segment_frames, tr.segment_frames)
    if segment_frames is not None and segment_frames < 1:
        raise ConfigError(f"--segment-frames must be >= 1 (or unset: whole utterances), got "
                          f"{segment_frames}")
    for option, value in (("--eval-every", given(args.eval_every, tr.eval_every)),
                          ("--save-every", given(args.save_every, tr.save_every))):
        if value is not None and value < 0:
            raise ConfigError(f"{option} must be >= 0 (0: none), got {value}")
    pairs = load_pairs(train_path, cfg.sample_rate, data.limit)
    if not 0 <= holdout < len(pairs):
        raise ConfigError(f"--holdout must be 0 to {len(pairs) - 1} (the data has {len(pairs)} "
                          f"pairs), got {holdout}")
    # the HiFi-GAN an --init vocoder feeds (and its rate) stay, unless set: "universal" was
    # recorded for a vocoder of the small HiFi-GAN; its steps are kept on record beside this run's
    hifigan, output_sr, record = tr.hifigan, tr.output_sr, {}
    if args.init:
        was = Unit2Mel.read_meta(args.init).get("vocoder") or {}
        theirs = was.get("hifigan")
        if "train.hifigan" not in named:
            if theirs in PACKAGED_HIFIGANS:
                hifigan = theirs
            elif theirs == LOCAL_HIFIGAN:
                hifigan = str(Path(args.init) / LOCAL_HIFIGAN)  # its own generator, copied along
            elif isinstance(theirs, str) and Path(theirs).exists():
                hifigan = theirs  # a generator folder a unit2mel/ save names (resolved there)
        if "train.output_sr" not in named and isinstance(was.get("output_sr"), int):
            output_sr = was["output_sr"]
        before = folder_config(Path(args.init), "training_args.json") or {}
        total = before.get("steps_done", 0) + before.get("init_steps_done", 0)
        if isinstance(total, int) and total > 0:
            record = {"init": str(Path(args.init).resolve()), "init_steps_done": total}
    res = train_unit2mel(
        pairs, cfg, steps=steps, lr=lr,
        batch_size=batch_size, out_dir=out / "unit2mel",
        log_every=tr.log_every, seed=tr.seed, model=init, warmup=tr.warmup,
        segment_frames=segment_frames,
        holdout=holdout, eval_every=given(args.eval_every, tr.eval_every),
        save_every=given(args.save_every, tr.save_every),
        vocoder_meta={"hifigan": hifigan if hifigan in PACKAGED_HIFIGANS
                      else str(Path(hifigan).resolve()), "output_sr": output_sr}, record=record,
    )
    voc = UnitMelVocoder(res["model"].eval(), load_named_generator(hifigan),
                         output_sr=output_sr, hifigan=hifigan)
    save_vocoder(voc, out / "model")
    print(json.dumps({"stage": "vocoder", "pairs": len(pairs), "steps": res["steps"],
                      "first_loss": res["first_loss"], "last_loss": res["loss"],
                      "steps_per_s": res["steps"] / max(res["seconds"], 1e-9),
                      "held_out": res["evals"][-1] if res["evals"] else None,
                      "output": str(out / "model")}))
    return 0


# a teacher pool's settings where the options leave them out
POOL_DEFAULTS: dict[str, Any] = {"teacher": "universal", "windows": 1500, "window_frames": 80,
                                 "unit2mel_share": 0.5, "gta": False}


def _resolved(path: str | None) -> str | None:
    """A path option as an absolute path (None stays None), to compare runs' settings."""
    return None if path is None else str(Path(path).resolve())


def _steps_done(folder: Path) -> str:
    """'N steps' from a Unit2Mel save's training_args.json, where it can be read."""
    done = (folder_config(folder, "training_args.json") or {}).get("steps_done")
    return f"steps done: {done}" if isinstance(done, int) else "steps done: unknown"


def _mels_from_manifest(manifest: str, spec: Any, limit: int | None, unit2mel: Any,
                        gta: bool = False) -> tuple[list, list, list]:
    """Log-mels [M, T] of the manifest's audio and, with a Unit2Mel, of its units' predictions:
    with predicted durations, or with `gta` with the real ones (then the third list holds the
    real audio [T * hop] of each prediction)."""
    import torch

    path = Path(manifest)
    if not path.is_file():
        raise ConfigError(f"hifigan data not found: {path}")
    rep, raw = _tts_objects(path)
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
    """Distil the packaged HiFi-GAN V1 into a narrower student (`echox.vocoder.distill`)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = check_out_path("runs/hifigan-small" if args.output_dir is None else args.output_dir)
    pool_path = Path(args.pool) if args.pool else out / "teacher_pool.safetensors"
    if pool_path.is_dir():
        raise ConfigError(f"--pool {pool_path} is a folder; give a file (new, or a pool to reuse)")
    check_out_path(pool_path, "--pool", folder=False)
    summary_path = out / "summary.json"
    if summary_path.exists() and (not summary_path.is_file() or
                                  (folder_config(out, "summary.json") or {}).get("stage") != "hifigan"):
        raise ConfigError(f"--out {out} holds a summary.json of something else than a "
                          "distillation, which the run would overwrite; give another --out")
    # every number before the slow pool: 0 is a value, not "the default" (it ran 3000 steps)
    cfg = DistillConfig(**{k: v for k, v in (("steps", args.max_steps), ("batch_size", args.batch_size),
                                             ("lr", args.lr), ("eval_every", args.eval_every))
                           if v is not None})
    if not math.isfinite(cfg.lr):
        raise ConfigError(f"--lr must be a finite number > 0, got {cfg.lr}")
    for name, value in (("--windows", args.windows), ("--student-channels", args.student_channels),
                        ("--limit", args.limit)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if args.windows is not None and args.windows <= HELD_OUT_WINDOWS and not pool_path.is_file():
        raise ConfigError(f"--windows must be > {HELD_OUT_WINDOWS}, got {args.windows}: "
                          f"{HELD_OUT_WINDOWS} windows (or a 20th of them) are held out to "
                          "evaluate the student")
    # what the pool is made of. A pool file is reused for a run that gives the same options or
    # leaves them out; one made with other settings is not taken for this one
    given = {k: v for k, v in (("teacher", args.teacher), ("windows", args.windows),
                               ("window_frames", args.window_frames),
                               ("unit2mel", _resolved(args.unit2mel)), ("unit2mel_share", args.unit2mel_share),
                               ("gta", True if args.gta else None), ("data", _resolved(args.data)),
                               ("limit", args.limit), ("teacher_from", _resolved(args.teacher_from)))
             if v is not None}
    used = {**POOL_DEFAULTS, **given}
    # before the slow pool: found after it, the saved pool then blocked the folder for the
    # fixed options, and a student trained in vain was thrown away
    frames_needed = cfg.segment_frames + 3 * cfg.margin_frames
    if "window_frames" in given and given["window_frames"] < frames_needed:
        raise ConfigError(f"--window-frames {given['window_frames']} is too short: a "
                          f"{cfg.segment_frames}-frame segment with {cfg.margin_frames}-frame "
                          f"margins takes at least {frames_needed}")
    student_dir = out / "model"
    if student_dir.resolve() in pool_path.resolve().parents:
        raise ConfigError(f"--pool {pool_path} lies inside {student_dir}, which saving the student "
                          "replaces whole; give a path outside it")
    if (student_dir / "config.json").is_file() and not (
            args.init and Path(args.init).resolve() == student_dir.resolve()):
        raise ConfigError(f"{student_dir} holds an earlier run's student; continue it with "
                          f"--init {student_dir}, or give another --out")
    if pool_path.is_file():
        pool = TeacherPool.load(pool_path)
        if pool.settings is not None:
            other = [f"{k} {pool.settings[k]!r} -> {v!r}" for k, v in given.items()
                     if k in pool.settings and pool.settings[k] != v]
            if other:
                raise ConfigError(f"{pool_path} holds a teacher pool made with other settings "
                                  f"({'; '.join(other)}); give another --out (or --pool), or the "
                                  "pool's own settings")
            used = {**used, **pool.settings}
        print(f"[distill] reusing {pool.mels.shape[0]} teacher windows from {pool_path}",
              file=sys.stderr)
    else:
        if not args.data:
            raise ConfigError("give --data: a TTS manifest whose audio the student learns from")
        teacher = load_hifigan(used["teacher"])
        u2m = Unit2Mel.from_pretrained(args.unit2mel) if args.unit2mel else None
        gta = args.gta
        if gta and u2m is None:
            raise ConfigError("--gta needs --unit2mel")
        share, frames = used["unit2mel_share"], used["window_frames"]
        if not 0.0 <= share < 1.0:  # before the slow manifest read
            raise ConfigError(f"--unit2mel-share must be in [0, 1), got {share}")
        real, predicted, targets = _mels_from_manifest(args.data, teacher.config.mel, args.limit,
                                                       u2m, gta=gta)
        n = used["windows"]
        n_pred = round(n * share) if predicted else 0
        reuse = args.teacher_from
        if reuse:  # the teacher's windows do not depend on the unit->mel: skip the slow part
            if not Path(reuse).is_file():
                raise ConfigError(f"--teacher-from: no pool file at {reuse}")
            old = TeacherPool.load(reuse)
            if old.window_frames != frames:
                raise ConfigError(f"--teacher-from {reuse}: windows of {old.window_frames} "
                                  f"frames, not --window-frames {frames}")
            have = int(old.locked.sum())  # type: ignore[union-attr]
            if have < n - n_pred:
                raise ConfigError(f"--teacher-from {reuse}: {have} teacher windows, but "
                                  f"--windows and --unit2mel-share ask for {n - n_pred}")
            parts = [old.teacher_windows(n - n_pred)]
        else:
            parts = [build_pool(teacher, real, n - n_pred, frames, seed=1)]
        if n_pred and gta:
            parts.append(build_gta_pool(predicted, targets, n_pred, frames,
                                        parts[0].valid, parts[0].hop, seed=2))
        elif n_pred:
            parts.append(build_pool(teacher, predicted, n_pred, frames, seed=2))
        pool = TeacherPool.cat(parts)
        pool.settings = used
    teacher_name = used["teacher"]
    train_pool, eval_pool = pool.split(max(HELD_OUT_WINDOWS, int(pool.mels.shape[0]) // 20))
    if not pool_path.is_file():  # kept once it can be split: a rerun must not reuse a bad pool
        pool_path.parent.mkdir(parents=True, exist_ok=True)
        pool.save(pool_path)
    width = args.student_channels or HiFiGANConfig.v2().upsample_initial_channel
    if args.init:  # continue a student

        student = load_generator(args.init)
    elif args.student_init == "prune":
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
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(summary_path, json.dumps({**summary, "history": res["history"],
                                                "evals": res["eval"]}, indent=2))
    print(json.dumps(summary))
    return 0


def _common_options(p: argparse.ArgumentParser) -> None:
    """Options both commands take (as `echox train` took them for every stage)."""
    p.add_argument("--data", help="TTS manifest with `units` and `counts` (echox units extract)")
    p.add_argument("--out", dest="output_dir", help="output folder (model/ and logs)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--threads", type=int_at_least(0, MAX_THREADS),
                   help="torch threads (1 on a busy CPU; 0 = torch's default)")
    p.add_argument("--eval-every", type=int, help="held-out evaluation interval (0 = only at the end)")


def train_options(p: argparse.ArgumentParser) -> None:
    """Options of `cmd_train_vocoder`: the unit->mel model in front of the HiFi-GAN."""
    _common_options(p)
    p.add_argument("--recipe", help="recipe YAML with vocoder/train/data sections")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override, e.g. --set train.warmup=10 --set vocoder.n_layers=2")
    p.add_argument("--init", help="continue training this Unit2Mel (or unit->mel vocoder) folder")
    p.add_argument("--segment-frames", type=int,
                   help="train on random crops of at most this many mel frames (faster steps)")
    p.add_argument("--holdout", type=int,
                   help="keep the manifest's last N pairs out and report their mel L1 (default: the recipe's)")
    p.add_argument("--save-every", type=int,
                   help="also save OUT/unit2mel every N steps (continue with --init; default: the recipe's)")
    p.add_argument("--grow-decoder", type=int, default=0, metavar="N",
                   help="with --init: add N decoder blocks that start as the identity")
    p.add_argument("--add-postnet", type=int, default=0, metavar="LAYERS",
                   help="with --init: add a postnet of LAYERS (>= 2) convs whose output starts "
                        "at 0")
    p.add_argument("--reinit-units", action="store_true",
                   help="with --init: keep the trained layers but start a fresh unit embedding "
                        "(units from a new k-means)")


def distill_options(p: argparse.ArgumentParser) -> None:
    """Options of `cmd_train_hifigan`: distil the packaged HiFi-GAN V1 into a V2-size student."""
    _common_options(p)
    p.add_argument("--init", help="continue this student (a generator folder)")
    p.add_argument("--teacher", help="packaged HiFi-GAN to distil (default universal)")
    p.add_argument("--unit2mel",
                   help="a Unit2Mel folder: part of the windows come from its mels "
                        "(--unit2mel-share)")
    p.add_argument("--gta", action="store_true",
                   help="with --unit2mel: its windows are its mels with the real durations, "
                        "and their target is the real audio (ground-truth-aligned fine-tuning)")
    p.add_argument("--windows", type=int, help="mel windows in the pool (default 1500)")
    p.add_argument("--unit2mel-share", type=float,
                   help="with --unit2mel: the share of the windows that come from its mels (default 0.5)")
    p.add_argument("--window-frames", type=int, help="frames per pool window (default 80)")
    p.add_argument("--pool", help="teacher pool file (reused when it exists)")
    p.add_argument("--teacher-from", metavar="POOL",
                   help="when building a pool: take its teacher windows from this older pool "
                        "(no teacher run), e.g. to pair them with a retrained --unit2mel's")
    p.add_argument("--limit", type=int, help="read only this many manifest records")
    p.add_argument("--student-channels", type=int, default=128,
                   help="student width (upsample_initial_channel): 128 = V2's size, 256 = half "
                        "of V1")
    p.add_argument("--student-init", choices=["prune", "random"], default="random",
                   help="start the student from scratch (random; how the shipped small one was "
                        "made) or from the teacher's most salient channels (prune; not yet "
                        "shown to distil faster)")


def _stages(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise EchoXError(f"--int8-stages wants comma-separated stage numbers, got {text!r}") from exc


def cmd_onnx_vocoder(args: argparse.Namespace) -> int:
    """Write a copy of a unit->mel vocoder folder that names the same HiFi-GAN plus an ONNX spec
    (stages and calibration mels). The converted graph is built into the EchoX cache here,
    once, and again on any machine that loads the folder without it; a generator that is not
    packaged is converted into the folder itself (`hifigan/generator.onnx`)."""
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    stages = _stages(args.int8_stages)
    src, dst = Path(args.vocoder).resolve(), Path(check_out_path(args.out)).resolve()
    if dst == src or src in dst.parents or dst in src.parents:  # it would replace what it reads
        raise ConfigError(f"--out {args.out} overlaps --vocoder {args.vocoder}; give a new folder")
    if dst.exists() and not args.force:  # checked before the load; nothing is replaced unasked
        what = "folder" if dst.is_dir() else "file"
        raise ConfigError(f"--out {args.out}: a {what} of that name exists; pass --force to "
                          "replace it")
    voc = load_vocoder(args.vocoder)
    if not isinstance(voc, UnitMelVocoder):
        raise EchoXError(f"{args.vocoder}: only unit->mel vocoders have a HiFi-GAN to convert")
    if isinstance(voc.generator, OnnxHiFiGAN):
        raise EchoXError(f"{args.vocoder}: its HiFi-GAN already runs on ONNX Runtime")
    mels: list[np.ndarray] = []
    if stages:
        if not args.calibrate:
            raise EchoXError("--int8-stages needs --calibrate MANIFEST (JSONL records with units)")
        recs = [r for r in read_jsonl(args.calibrate, "tts", on_error="skip").records if r.units]
        if not recs:
            raise EchoXError(f"{args.calibrate}: no record has units")
        picks = np.linspace(0, len(recs) - 1, min(args.n, len(recs))).round().astype(int)
        for i in dict.fromkeys(picks.tolist()):
            ids = voc._clean(recs[i].units, warn=False)
            if ids:
                mels.append(voc.unit2mel.infer(ids).mel[0].T.numpy())
    spec = OnnxSpec(tuple(stages), mels)
    t0 = time.perf_counter()
    voc.generator = cached_onnx_generator(voc.generator, spec)
    voc.onnx = spec
    save_vocoder(voc, args.out, dtype=torch.float16 if args.float16 else None)
    print(f"wrote {args.out}: HiFi-GAN {voc.hifigan!r} on ONNX Runtime, int8 stages {list(spec.int8_stages)}, "
          f"{len(mels)} calibration mels; graph at {voc.generator.path} ({time.perf_counter() - t0:.0f} s)")
    return 0


def onnx_options(p: argparse.ArgumentParser) -> None:
    """Options of `cmd_onnx_vocoder`, e.g. `--vocoder recipes/tiny/vocoder-k500/vocoder-v1
    --calibrate data/tiny/train/tts_units_all.jsonl --int8-stages 1,2 --out runs/voc-int8`."""
    p.add_argument("--vocoder", required=True, help="unit->mel vocoder folder")
    p.add_argument("--out", required=True, help="vocoder folder to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--int8-stages", default="1,2",
                   help="upsampling stages whose convolutions become int8, e.g. 1,2 (default; "
                        "'' keeps everything float32)")
    p.add_argument("--calibrate", help="JSONL manifest with units: their mels calibrate int8")
    p.add_argument("--n", type=int_at_least(1), default=16, help="calibration records (default 16)")
    p.add_argument("--float16", action="store_true",
                   help="store the unit->mel weights in float16 (half the size; loads as float32)")
    p.add_argument("--threads", type=int_at_least(0, MAX_THREADS), default=0, help="torch threads (0 = default)")
