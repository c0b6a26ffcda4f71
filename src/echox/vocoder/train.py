"""Training of the vocoder parts: the loop both trainings share, and the unit -> mel model's.

`train_steps` is the optimisation loop of unit->mel training (`train_unit2mel`, below) and of
HiFi-GAN distillation (`echox.vocoder.distill`): AdamW steps with the learning rate of
`lr_at` (linear warm-up, then cosine decay to a floor), gradient clipping, and loss means
logged every few steps. `train_unit2mel` trains a `Unit2Mel` on (units, run lengths, audio)
pairs of one voice: ground-truth durations drive the length regulator, optionally on random
crops, with held-out losses and periodic checkpoints.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from echox.errors import VocoderInputError
from echox.vocoder.base import eval_mode
from echox.vocoder.hifigan import MelSpec, mel_spectrogram
from echox.vocoder.unit2mel import Unit2Mel, Unit2MelConfig, align_durations, unit2mel_loss
from echox.vocoder.unit_mel import DEFAULT_CONTEXT_UNITS

# ----------------------------------------------------------------------------- shared loop


def lr_at(step: int, steps: int, warmup: int, lr: float, floor: float) -> float:
    """Learning rate of `step` (0-based) of `steps`: linear warm-up to `lr` over `warmup`
    steps, then cosine decay to `floor * lr` at the end."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass
class TrainLog:
    """What `train_steps` logged: a row per log point (step, mean of each loss since the last
    row, lr, seconds), the first step's losses, and the seconds spent so far."""

    history: list[dict[str, float]] = field(default_factory=list)
    first: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step_losses: Callable[[int], dict[str, torch.Tensor]],
    steps: int,
    lr: float,
    warmup: int,
    lr_floor: float,
    grad_clip: float,
    log_every: int = 50,
    after_step: Callable[[int, TrainLog], None] | None = None,
    tag: str | None = None,
    labels: dict[str, str] | None = None,
) -> TrainLog:
    """Run `steps` optimisation steps of `model`.

    Each step sets the learning rate (`lr_at` with `warmup` and `lr_floor`), computes
    `step_losses(step)` (a dict whose "loss" is minimised; the others are logged), clips the
    gradient norm to `grad_clip` and steps `optimizer`. Every `log_every` steps and at the
    last, the means since the previous row go into the log, and with a `tag` onto stderr as
    `[tag] step N/steps loss ...` (`labels` renames losses there). `after_step(done, log)`
    runs after each step, e.g. for held-out evaluation and checkpoints.
    """
    log = TrainLog()
    names = labels or {}
    window: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, warmup, lr, lr_floor)
        losses = step_losses(step)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        values = {k: float(v.detach()) for k, v in losses.items()}
        log.first = log.first or values
        for k, v in values.items():
            window.setdefault(k, []).append(v)
        done = step + 1
        log.seconds = time.perf_counter() - t0
        if done % max(1, log_every) == 0 or done == steps:
            row = {"step": done, **{k: float(np.mean(v)) for k, v in window.items()},
                   "lr": optimizer.param_groups[0]["lr"], "seconds": log.seconds}
            log.history.append(row)
            window = {}
            if tag:
                shown = " ".join(f"{names.get(k, k)} {row[k]:.4f}" for k in values)
                print(f"[{tag}] step {done}/{steps} {shown} ({row['seconds']:.0f}s)",
                      file=sys.stderr, flush=True)
        if after_step is not None:
            after_step(done, log)
    log.seconds = time.perf_counter() - t0
    return log


# ----------------------------------------------------------------------------- unit -> mel


AudioOrMel = np.ndarray | torch.Tensor


@dataclass
class Unit2MelExample:
    """One training utterance with durations already in mel frames."""

    units: list[int]  # deduplicated unit ids [T]
    durations: list[int]  # mel frames per unit [T], summing to the mel length
    mel: torch.Tensor  # [F, n_mels] log-mel (time-major)
    unit_start: int = 0  # a crop's first unit / mel frame within its utterance
    frame_start: int = 0


@dataclass
class Unit2MelBatch:
    units: torch.Tensor  # [B, T] (0 at pads)
    unit_mask: torch.Tensor  # [B, T] True = real
    durations: torch.Tensor  # [B, T] mel frames
    log_dur: torch.Tensor  # [B, T] log(frames + 1)
    mel: torch.Tensor  # [B, F, n_mels]
    mel_mask: torch.Tensor  # [B, F]
    unit_offset: torch.Tensor  # [B] crop starts (0 for whole utterances)
    frame_offset: torch.Tensor  # [B]

    def to(self, device: torch.device | str) -> Unit2MelBatch:
        return Unit2MelBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _as_mel(audio_or_mel: AudioOrMel, cfg: Unit2MelConfig, where: str) -> torch.Tensor:
    """1-D waveform at cfg.sample_rate -> log-mel; 2-D [n_mels, F] or [F, n_mels] -> as is.
    Returns time-major [F, n_mels]."""
    x = torch.as_tensor(np.asarray(audio_or_mel) if not isinstance(audio_or_mel, torch.Tensor)
                        else audio_or_mel).float()
    if x.dim() == 1:
        spec = MelSpec(n_mels=cfg.n_mels, sampling_rate=cfg.sample_rate, hop_length=cfg.hop_length)
        return mel_spectrogram(x, spec)[0].transpose(0, 1)  # [F, M]
    if x.dim() == 2 and x.shape[0] == cfg.n_mels:
        return x.transpose(0, 1).contiguous()  # HiFi-GAN layout [M, F]
    if x.dim() == 2 and x.shape[1] == cfg.n_mels:
        return x
    raise VocoderInputError(f"{where}: expected a waveform [S] or a mel with {cfg.n_mels} bins, "
                            f"got shape {tuple(x.shape)}")


def prepare_unit2mel_example(
    units: Sequence[int], run_lengths: Sequence[int], audio_or_mel: AudioOrMel,
    cfg: Unit2MelConfig, where: str = "example",
) -> Unit2MelExample:
    """(dedup units, their run lengths at cfg.unit_rate, wav at cfg.sample_rate or mel)."""
    units = [int(u) for u in units]
    if len(units) != len(run_lengths) or not units:
        raise VocoderInputError(f"{where}: {len(units)} units but {len(run_lengths)} run lengths")
    if min(units) < 0 or max(units) >= cfg.num_units:
        raise VocoderInputError(f"{where}: unit ids must be in [0, {cfg.num_units}), got "
                                f"{min(units)}..{max(units)}; vocoder.num_units must be the "
                                "k-means K of these units")
    mel = _as_mel(audio_or_mel, cfg, where)
    durs = align_durations(run_lengths, mel.shape[0], cfg.unit_rate, cfg.mel_rate)
    return Unit2MelExample(units, durs, mel)


def aligned_prediction(model: Unit2Mel, units: Sequence[int], run_lengths: Sequence[int],
                       audio_or_mel: AudioOrMel, where: str = "example") -> torch.Tensor:
    """The model's mel [F, n_mels] for `units` with the durations of the real recording
    (ground-truth-aligned: frame for frame with that recording's mel)."""
    ex = prepare_unit2mel_example(units, run_lengths, audio_or_mel, model.config, where)
    return model.infer(ex.units, durations=ex.durations).mel[0].float()


def collate_unit2mel(examples: Sequence[Unit2MelExample]) -> Unit2MelBatch:
    """Right-pad a list of examples into one batch."""
    b = len(examples)
    t = max(len(e.units) for e in examples)
    f = max(e.mel.shape[0] for e in examples)
    m = examples[0].mel.shape[1]
    units = torch.zeros(b, t, dtype=torch.long)
    durs = torch.zeros(b, t, dtype=torch.long)
    umask = torch.zeros(b, t, dtype=torch.bool)
    mel = torch.zeros(b, f, m)
    fmask = torch.zeros(b, f, dtype=torch.bool)
    for i, e in enumerate(examples):
        n, nf = len(e.units), e.mel.shape[0]
        units[i, :n] = torch.tensor(e.units)
        durs[i, :n] = torch.tensor(e.durations)
        umask[i, :n] = True
        mel[i, :nf] = e.mel
        fmask[i, :nf] = True
    return Unit2MelBatch(units, umask, durs, torch.log1p(durs.float()), mel, fmask,
                         torch.tensor([e.unit_start for e in examples]),
                         torch.tensor([e.frame_start for e in examples]))


def crop_example(ex: Unit2MelExample, max_frames: int, rng: np.random.Generator) -> Unit2MelExample:
    """A random run of whole units whose mel span is at most `max_frames` (at least one unit).

    Training on crops keeps the per-step cost bounded by `max_frames` instead of the longest
    utterance in the batch. The crop remembers where it starts (`unit_start`, `frame_start`)
    so that the model gives it the positions of the full utterance: without that, crops
    always start at position 0 and the model never learns the later positions.
    """
    if max_frames <= 0:
        raise ValueError(f"max_frames must be > 0, got {max_frames}")
    if ex.mel.shape[0] <= max_frames:
        return ex
    ends = np.cumsum(ex.durations)
    starts = ends - np.asarray(ex.durations)
    # last unit index j such that the span [starts[i], ends[j]) fits, for each start i
    last = np.searchsorted(ends, starts + max_frames, side="right") - 1
    ok = np.nonzero(last >= np.arange(len(ex.units)))[0]
    if len(ok) == 0:  # one unit longer than the window: take it alone, mel cut to the window
        i = int(rng.integers(len(ex.units)))
        a = int(starts[i])
        return Unit2MelExample([ex.units[i]], [max_frames], ex.mel[a:a + max_frames],
                               ex.unit_start + i, ex.frame_start + a)
    i = int(ok[rng.integers(len(ok))])
    j = int(last[i])
    a, b = int(starts[i]), int(ends[j])
    return Unit2MelExample(ex.units[i:j + 1], ex.durations[i:j + 1], ex.mel[a:b],
                           ex.unit_start + i, ex.frame_start + a)


@torch.no_grad()
def evaluate_unit2mel(model: Unit2Mel, examples: Sequence[Unit2MelExample],
                      batch_size: int = 8, device: str | torch.device = "cpu") -> dict[str, float]:
    """Held-out losses with ground-truth durations (mel L1 is what the HiFi-GAN hears)."""
    tot = {"mel": 0.0, "duration": 0.0}
    n = 0
    with eval_mode(model):
        for k in range(0, len(examples), batch_size):
            chunk = examples[k:k + batch_size]
            batch = collate_unit2mel(chunk).to(device)
            out = model(batch.units, batch.unit_mask, batch.durations)
            loss = unit2mel_loss(out, batch.mel, batch.mel_mask, batch.log_dur)
            tot["mel"] += loss.mel.item() * len(chunk)
            tot["duration"] += loss.duration.item() * len(chunk)
            n += len(chunk)
    return {k: v / max(n, 1) for k, v in tot.items()}


def train_unit2mel(
    pairs: Sequence[tuple[Sequence[int], Sequence[int], AudioOrMel]],
    cfg: Unit2MelConfig,
    steps: int = 2000,
    lr: float = 1e-3,
    batch_size: int = 16,
    out_dir: str | Path | None = None,
    log_every: int = 50,
    progress: bool = True,
    seed: int = 0,
    warmup: int | None = None,
    grad_clip: float = 1.0,
    weight_decay: float = 0.01,
    device: str | torch.device = "cpu",
    model: Unit2Mel | None = None,
    segment_frames: int | None = None,
    holdout: int = 0,
    eval_every: int = 0,
    save_every: int = 0,
    vocoder_meta: dict[str, Any] | None = None,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a Unit2Mel on (dedup units, run lengths, wav at cfg.sample_rate or mel) pairs.

    Ground-truth durations drive the length regulator; the duration predictor learns them on
    the side. The output bias starts at the data's mean log-mel (a cheap, big head start).
    `segment_frames` trains on random crops of at most that many mel frames (whole units).
    `holdout` keeps the last pairs out of training and reports their losses every
    `eval_every` steps and at the end. Saves the model to `out_dir` (with
    training_args.json) when given, also every `save_every` steps, so a long run can be
    stopped at any time and continued with `model=`. `vocoder_meta` (the HiFi-GAN it feeds,
    its output rate) and `record` (e.g. the steps an init had done) are written with each
    save. Returns a summary dict.
    """
    if steps <= 0 or batch_size <= 0 or lr <= 0:
        raise ValueError(f"steps, batch_size and lr must be > 0 (got {steps}, {batch_size}, {lr})")
    if not pairs:
        raise VocoderInputError("train_unit2mel needs at least one (units, runs, audio) pair")
    if segment_frames is not None and segment_frames <= 0:
        raise ValueError(f"segment_frames must be > 0, got {segment_frames}")
    if not 0 <= holdout < len(pairs):
        raise ValueError(f"holdout must be in [0, {len(pairs)}) for {len(pairs)} pairs, got {holdout}")
    examples = [prepare_unit2mel_example(u, r, a, cfg, where=f"pair {i}")
                for i, (u, r, a) in enumerate(pairs)]
    held = examples[len(examples) - holdout:] if holdout else []
    examples = examples[:len(examples) - holdout]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    continued = model is not None
    if model is None:
        model = Unit2Mel(cfg)
        with torch.no_grad():
            model.proj.bias.copy_(torch.cat([e.mel for e in examples]).mean(0))
    elif model.config != cfg:
        raise ValueError("model.config differs from cfg")
    model.to(device).train()
    warmup = min(100, steps // 10) if warmup is None else warmup
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98),
                            weight_decay=weight_decay)
    evals: list[dict[str, float]] = []

    def evaluate_held(done: int) -> None:
        ev = {"step": done, **evaluate_unit2mel(model, held, device=device)}
        evals.append(ev)
        if progress:
            print(f"[unit2mel] held-out ({len(held)}) step {done}: mel {ev['mel']:.4f} "
                  f"dur {ev['duration']:.4f}", file=sys.stderr, flush=True)

    if held and continued:  # where a continued model starts, so its gain can be read off
        evaluate_held(0)
    run_args = {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
                "warmup": warmup, "grad_clip": grad_clip, "weight_decay": weight_decay,
                "segment_frames": segment_frames, "examples": len(examples), "holdout": holdout,
                **(record or {})}
    meta = {"hifigan": "universal", "output_sr": 16000, "context_units": DEFAULT_CONTEXT_UNITS,
            **(vocoder_meta or {})}

    def step_losses(step: int) -> dict[str, torch.Tensor]:
        idx = rng.choice(len(examples), size=min(batch_size, len(examples)), replace=False)
        chosen = [examples[i] for i in idx]
        if segment_frames:
            chosen = [crop_example(e, segment_frames, rng) for e in chosen]
        batch = collate_unit2mel(chosen).to(device)
        out = model(batch.units, batch.unit_mask, batch.durations,
                    unit_offset=batch.unit_offset, frame_offset=batch.frame_offset)
        loss = unit2mel_loss(out, batch.mel, batch.mel_mask, batch.log_dur)
        return {"loss": loss.total, "mel": loss.mel, "duration": loss.duration}

    def after_step(done: int, log: TrainLog) -> None:
        if held and ((eval_every and done % eval_every == 0) or done == steps):
            evaluate_held(done)
        if out_dir is not None and save_every and done % save_every == 0 and done < steps:
            _save(model, out_dir, {**run_args, "steps_done": done,
                                   "loss": log.history[-1]["loss"] if log.history else None}, meta)

    log = train_steps(model, opt, step_losses, steps, lr, warmup, 0.1, grad_clip, log_every,
                      after_step, "unit2mel" if progress else None, {"duration": "dur"})
    history = log.history
    model.eval()
    summary: dict[str, Any] = {
        "steps": steps, "first_loss": log.first["loss"], "loss": history[-1]["loss"],
        "mel_loss": history[-1]["mel"], "duration_loss": history[-1]["duration"],
        "history": history, "seconds": log.seconds, "examples": len(examples),
        "params": sum(p.numel() for p in model.parameters()), "out_dir": None, "model": model,
        "evals": evals,
    }
    if out_dir is not None:
        _save(model, out_dir, {**run_args, "steps_done": steps, "final_loss": summary["loss"],
                               "held_out": evals[-1] if evals else None}, meta)
        summary["out_dir"] = str(out_dir)
    return summary


def _save(model: Unit2Mel, out_dir: str | Path, args: dict[str, Any], meta: dict[str, Any]) -> None:
    model.save_pretrained(out_dir, vocoder=meta,
                          extra_files={"training_args.json": json.dumps(args, indent=2)})
