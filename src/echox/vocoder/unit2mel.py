"""`Unit2Mel`: deduplicated speech units -> an 80-bin log-mel (22,050 Hz, hop 256) that a mel
HiFi-GAN (`echox.vocoder.hifigan`) renders; `UnitMelVocoder` (unit_mel.py) chains the two.

`Unit2Mel` follows FastSpeech (Ren et al., 2019): unit embedding + sinusoidal positions ->
feed-forward Transformer (FFT) blocks with a 1-D conv FFN -> duration predictor (log(d + 1),
in mel frames) -> length regulator -> FFT blocks -> Linear to mels (+ optional postnet).
Mels are **time-major** `[B, F, n_mels]`; HiFi-GAN wants `[B, n_mels, F]`.

Units come at `unit_rate` (50 Hz for Whisper-encoder or mHuBERT frames) before deduplication;
mel frames come at `sample_rate / hop_length` (~86.13 Hz). `align_durations` turns dedup run
lengths into integer mel-frame durations for training.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from echox.errors import (
    VocoderCheckpointError,
    VocoderConfigError,
    VocoderFileNotFoundError,
    VocoderInputError,
)
from echox.fileio import atomic_dir, check_replaceable, folder_config, moved_aside_hint
from echox.vocoder.base import eval_mode, load_weights, read_json, save_weights

FORMAT = "echox-unit2mel"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# ----------------------------------------------------------------------------- config


@dataclass
class Unit2MelConfig:
    """Sizes of `Unit2Mel` plus the frame-rate bookkeeping between units and mels."""

    num_units: int = 500  # k-means clusters (unit ids 0 .. num_units - 1)
    d_model: int = 256
    n_heads: int = 2
    n_layers: int = 4  # FFT blocks in the encoder, and again in the decoder
    n_dec_layers: int | None = None  # decoder blocks when not n_layers (see grow_unit2mel)
    ffn_dim: int = 1024
    ffn_kernel: int = 3  # first conv of the FFN (FastSpeech uses 9; 3 is cheaper on CPU)
    dur_hidden: int = 256
    dur_kernel: int = 3
    dropout: float = 0.1
    n_mels: int = 80
    postnet_layers: int = 0  # 0 = no postnet
    postnet_channels: int = 256
    postnet_kernel: int = 5
    unit_rate: float = 50.0  # Hz of unit frames before deduplication
    sample_rate: int = 22050  # of the mel HiFi-GAN
    hop_length: int = 256
    max_unit_frames: int = 64  # cap of one predicted duration (guards untrained predictors)

    def __post_init__(self) -> None:
        positive = ("num_units", "d_model", "n_heads", "ffn_dim", "ffn_kernel", "dur_hidden",
                    "dur_kernel", "n_mels", "postnet_channels", "postnet_kernel",
                    "sample_rate", "hop_length", "max_unit_frames")
        optional = ("n_dec_layers",) if self.n_dec_layers is not None else ()
        for name in positive + ("n_layers", "postnet_layers") + optional:
            value = getattr(self, name)
            low = 1 if name in positive else 0  # 0 layers: an attention-free (local) model
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise VocoderConfigError(f"Unit2MelConfig.{name} must be an int >= {low}, "
                                         f"got {value!r}")
        if self.postnet_layers == 1:
            raise VocoderConfigError("postnet_layers must be 0 (off) or >= 2")
        if self.d_model % self.n_heads:
            raise VocoderConfigError(
                f"d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        for name in ("ffn_kernel", "dur_kernel", "postnet_kernel"):
            if getattr(self, name) % 2 == 0:
                raise VocoderConfigError(f"Unit2MelConfig.{name} must be odd (same-length conv)")
        if not 0.0 <= self.dropout < 1.0:
            raise VocoderConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.unit_rate > 0:
            raise VocoderConfigError(f"unit_rate must be > 0 Hz, got {self.unit_rate}")

    @property
    def decoder_layers(self) -> int:
        return self.n_layers if self.n_dec_layers is None else self.n_dec_layers

    @property
    def mel_rate(self) -> float:
        """Mel frames per second (22050 / 256 = 86.13 Hz for HiFi-GAN V1)."""
        return self.sample_rate / self.hop_length

    @property
    def frames_per_unit_frame(self) -> float:
        """Mel frames per (pre-dedup) unit frame, ~1.72 for 50 Hz units."""
        return self.mel_rate / self.unit_rate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> Unit2MelConfig:
        if not isinstance(raw, dict):
            raise VocoderConfigError(f"{source}: Unit2MelConfig must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise VocoderConfigError(f"{source}: unknown Unit2MelConfig keys {unknown}")
        try:
            return cls(**raw)
        except VocoderConfigError as exc:
            raise VocoderConfigError(f"{source}: {exc}") from exc

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")

    @classmethod
    def from_json(cls, path: str | Path) -> Unit2MelConfig:
        path = Path(path)
        return cls.from_dict(read_json(path, "Unit2Mel config"), source=str(path))

    @classmethod
    def tiny(cls, **overrides: Any) -> Unit2MelConfig:
        """A ~50k-parameter config for tests."""
        base: dict[str, Any] = dict(num_units=20, d_model=32, n_heads=2, n_layers=1, ffn_dim=64,
                                    dur_hidden=32, dropout=0.0, n_mels=16)
        base.update(overrides)
        return cls(**base)


# ----------------------------------------------------------------------------- alignment


def align_durations(
    run_lengths_at_unit_rate: Sequence[int],
    n_mel_frames: int,
    unit_rate: float,
    mel_rate: float,
    tolerance: float = 0.15,
) -> list[int]:
    """Dedup run lengths (unit frames) -> integer mel-frame durations summing to `n_mel_frames`.

    Each run ends at a cumulative time; we round that boundary (not each duration) to mel
    frames, so rounding errors never accumulate. Boundaries are stretched by
    n_mel_frames / expected frames, so a mel a frame or two off the unit count still fits
    exactly; a mismatch beyond `tolerance` (relative, plus 2 frames) is an error, since it
    means the units and the audio are not the same utterance (e.g. a padded 30 s window).
    Runs may get 0 frames only when the mel is shorter than the units imply.
    """
    runs = [int(r) for r in run_lengths_at_unit_rate]
    if not runs:
        raise VocoderInputError("no run lengths given")
    if any(r <= 0 for r in runs):
        raise VocoderInputError(f"run lengths must be >= 1, got min {min(runs)}")
    if n_mel_frames <= 0:
        raise VocoderInputError(f"n_mel_frames must be >= 1, got {n_mel_frames}")
    if unit_rate <= 0 or mel_rate <= 0:
        raise VocoderInputError(f"rates must be > 0, got {unit_rate} and {mel_rate}")
    total_units = sum(runs)
    expected = total_units * mel_rate / unit_rate
    if abs(expected - n_mel_frames) > tolerance * expected + 2:
        raise VocoderInputError(
            f"{total_units} unit frames at {unit_rate} Hz = {expected:.1f} mel frames at "
            f"{mel_rate:.2f} Hz, but the mel has {n_mel_frames}; units and audio do not match"
        )
    cum = np.cumsum(runs, dtype=np.float64) * (n_mel_frames / total_units)  # [R] boundaries
    ends = np.floor(cum + 0.5).astype(np.int64)
    ends[-1] = n_mel_frames
    return np.diff(np.concatenate(([0], ends))).tolist()


def length_regulate(
    x: torch.Tensor, durations: torch.Tensor, max_frames: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat each unit vector `durations` times: x [B, T, D], durations [B, T] ->
    (frames [B, F, D], frame mask [B, F]); F = the longest row total (capped by max_frames)."""
    d = durations.long().clamp_min(0)  # [B, T]
    cum = d.cumsum(1)  # [B, T]
    total = cum[:, -1]  # [B]
    n = int(total.max()) if total.numel() else 0
    if max_frames is not None:
        n = min(n, int(max_frames))
    frames = torch.arange(n, device=x.device).unsqueeze(0).expand(x.shape[0], n)  # [B, F]
    idx = torch.searchsorted(cum, frames.contiguous(), right=True)  # unit of each frame
    idx = idx.clamp(max=max(x.shape[1] - 1, 0))
    y = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, F, D]
    mask = frames < total.unsqueeze(1)  # [B, F]
    return y * mask.unsqueeze(-1).to(y.dtype), mask


def sinusoidal_positions(n: int, dim: int, device: torch.device | None = None,
                         offset: torch.Tensor | None = None) -> torch.Tensor:
    """Transformer sine/cosine positions [n, dim] (Vaswani et al., 2017); with `offset` [B]
    (where each row's first position sits in its utterance, e.g. for a training crop)
    [B, n, dim] for positions offset + 0 .. offset + n - 1."""
    pos = torch.arange(n, device=device, dtype=torch.float32)  # [n]
    pos = pos.unsqueeze(-1) if offset is None else (offset.to(device).float()[:, None] + pos)[..., None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32)
                     * (-math.log(10000.0) / dim))  # [dim / 2]
    pe = torch.zeros(*pos.shape[:-1], dim, device=device)
    pe[..., 0::2] = torch.sin(pos * freq)
    pe[..., 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe


# ----------------------------------------------------------------------------- model


class FFTBlock(nn.Module):
    """Pre-norm self-attention + conv FFN (FastSpeech's FFT block); pads stay zero."""

    def __init__(self, d: int, heads: int, ffn_dim: int, kernel: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.conv1 = nn.Conv1d(d, ffn_dim, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv1d(ffn_dim, d, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], mask [B, T] (True = valid) -> [B, T, D]."""
        keep = mask.unsqueeze(-1).to(x.dtype)  # [B, T, 1]
        h = self.norm1(x)
        h = self.attn(h, h, h, key_padding_mask=~mask, need_weights=False)[0]
        x = (x + self.drop(h)) * keep
        h = (self.norm2(x) * keep).transpose(1, 2)  # [B, D, T]
        h = self.conv2(self.drop(F.relu(self.conv1(h)))).transpose(1, 2)  # [B, T, D]
        return (x + self.drop(h)) * keep


class DurationPredictor(nn.Module):
    """2 x (conv, ReLU, LayerNorm, dropout) -> Linear: log(mel frames + 1) per unit."""

    def __init__(self, d: int, hidden: int, kernel: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(d, hidden, kernel, padding=kernel // 2)
        self.norm1 = nn.LayerNorm(hidden)
        self.conv2 = nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2)
        self.norm2 = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], mask [B, T] -> [B, T] (0 at pads)."""
        keep = mask.unsqueeze(-1).to(x.dtype)
        h = F.relu(self.conv1((x * keep).transpose(1, 2))).transpose(1, 2)  # [B, T, H]
        h = self.drop(self.norm1(h)) * keep
        h = F.relu(self.conv2(h.transpose(1, 2))).transpose(1, 2)
        h = self.drop(self.norm2(h))
        return self.proj(h).squeeze(-1) * mask.to(x.dtype)


class Postnet(nn.Module):
    """Residual conv stack refining the mel (Tacotron 2 style, without batch norm so that
    padded batches and single utterances behave the same)."""

    def __init__(self, n_mels: int, channels: int, kernel: int, layers: int, dropout: float):
        super().__init__()
        dims = [n_mels] + [channels] * (layers - 1) + [n_mels]
        self.convs = nn.ModuleList(
            nn.Conv1d(a, b, kernel, padding=kernel // 2) for a, b in zip(dims[:-1], dims[1:])
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, mel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """mel [B, F, M] -> residual [B, F, M]."""
        keep = mask.unsqueeze(1).to(mel.dtype)  # [B, 1, F]
        h = mel.transpose(1, 2) * keep  # [B, M, F]
        for i, conv in enumerate(self.convs):
            h = conv(h)
            if i < len(self.convs) - 1:
                h = self.drop(torch.tanh(h))
            h = h * keep
        return h.transpose(1, 2)


@dataclass
class Unit2MelOutput:
    """Result of `Unit2Mel.forward`."""

    mel: torch.Tensor  # [B, F, n_mels] log-mel (time-major), 0 at padded frames
    mel_mask: torch.Tensor  # [B, F] True = real frame
    log_dur_pred: torch.Tensor  # [B, T] predicted log(frames + 1), 0 at pads
    durations: torch.Tensor  # [B, T] frames per unit actually used (given or predicted)
    unit_mask: torch.Tensor  # [B, T] True = real unit
    mel_before_postnet: torch.Tensor | None = None  # [B, F, n_mels] when a postnet exists


@dataclass
class Unit2MelLoss:
    total: torch.Tensor
    mel: torch.Tensor  # L1 on log-mel (before and after the postnet, averaged)
    duration: torch.Tensor  # MSE on log(frames + 1)


class Unit2Mel(nn.Module):
    """Deduplicated units -> log-mel frames with predicted (or given) durations."""

    def __init__(self, config: Unit2MelConfig) -> None:
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.num_units, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        def block() -> FFTBlock:
            return FFTBlock(c.d_model, c.n_heads, c.ffn_dim, c.ffn_kernel, c.dropout)

        self.encoder = nn.ModuleList(block() for _ in range(c.n_layers))
        self.enc_norm = nn.LayerNorm(c.d_model)
        self.dur_predictor = DurationPredictor(c.d_model, c.dur_hidden, c.dur_kernel, c.dropout)
        self.decoder = nn.ModuleList(block() for _ in range(c.decoder_layers))
        self.dec_norm = nn.LayerNorm(c.d_model)
        self.proj = nn.Linear(c.d_model, c.n_mels)
        self.postnet = (Postnet(c.n_mels, c.postnet_channels, c.postnet_kernel,
                                c.postnet_layers, c.dropout) if c.postnet_layers else None)

    def durations_from_log(
        self, log_dur: torch.Tensor, mask: torch.Tensor, length_scale: float = 1.0
    ) -> torch.Tensor:
        """round(exp(pred) - 1), at least 1 frame per real unit (as fairseq does), 0 at pads."""
        cap = math.log1p(self.config.max_unit_frames)
        d = torch.round((torch.exp(log_dur.clamp(max=cap)) - 1.0) * length_scale).long()
        return d.clamp(min=1, max=self.config.max_unit_frames) * mask.long()  # [B, T]

    def _check_units(self, units: torch.Tensor, mask: torch.Tensor) -> None:
        if units.dim() != 2 or units.dtype.is_floating_point or units.dtype == torch.bool:
            raise VocoderInputError(f"units must be integer ids [B, T], got {units.dtype} "
                                    f"{tuple(units.shape)}")
        if mask.shape != units.shape:
            raise VocoderInputError(f"unit_mask {tuple(mask.shape)} != units {tuple(units.shape)}")
        if units.shape[1] == 0 or not bool(mask.any(1).all()):
            raise VocoderInputError("every row needs at least one unit")
        valid = units[mask]
        if bool((valid < 0).any()) or bool((valid >= self.config.num_units).any()):
            raise VocoderInputError(
                f"unit ids must be in [0, {self.config.num_units}), got "
                f"[{int(valid.min())}, {int(valid.max())}]"
            )

    def forward(
        self,
        units: torch.Tensor,
        unit_mask: torch.Tensor | None = None,
        durations: torch.Tensor | None = None,
        max_frames: int | None = None,
        length_scale: float = 1.0,
        unit_offset: torch.Tensor | None = None,
        frame_offset: torch.Tensor | None = None,
    ) -> Unit2MelOutput:
        """units [B, T] (ids), unit_mask [B, T] (True = real), durations [B, T] mel frames
        (ground truth when training; predicted when None) -> `Unit2MelOutput`.
        `unit_offset` / `frame_offset` [B]: where a cropped row starts in its utterance, so
        that its positions are the ones the full utterance would give."""
        mask = torch.ones_like(units, dtype=torch.bool) if unit_mask is None else unit_mask.bool()
        self._check_units(units, mask)
        keep = mask.unsqueeze(-1).float()  # [B, T, 1]
        x = self.embed(units.masked_fill(~mask, 0))  # [B, T, D]
        x = self.drop(x + sinusoidal_positions(x.shape[1], x.shape[2], x.device, unit_offset)) * keep
        for blk in self.encoder:
            x = blk(x, mask)
        x = self.enc_norm(x) * keep
        log_dur = self.dur_predictor(x, mask)  # [B, T]
        if durations is None:
            durations = self.durations_from_log(log_dur.detach(), mask, length_scale)
        else:
            if durations.shape != units.shape:
                raise VocoderInputError(f"durations {tuple(durations.shape)} != units "
                                        f"{tuple(units.shape)}")
            if bool((durations < 0).any()):
                raise VocoderInputError("durations must be >= 0")
            durations = durations.long() * mask.long()
        if bool((durations.sum(1) == 0).any()):
            raise VocoderInputError("a row has durations summing to 0 frames")
        h, mel_mask = length_regulate(x, durations, max_frames)  # [B, F, D], [B, F]
        if h.shape[1] == 0:
            raise VocoderInputError(f"max_frames={max_frames} leaves no frames")
        fkeep = mel_mask.unsqueeze(-1).float()
        h = self.drop(h + sinusoidal_positions(h.shape[1], h.shape[2], h.device, frame_offset)) * fkeep
        for blk in self.decoder:
            h = blk(h, mel_mask)
        mel = self.proj(self.dec_norm(h)) * fkeep  # [B, F, M]
        before = None
        if self.postnet is not None:
            before, mel = mel, mel + self.postnet(mel, mel_mask)
        return Unit2MelOutput(mel, mel_mask, log_dur, durations, mask, before)

    @torch.inference_mode()
    def infer(
        self, units: Sequence[int] | torch.Tensor, length_scale: float = 1.0,
        durations: Sequence[int] | torch.Tensor | None = None,
    ) -> Unit2MelOutput:
        """One unit sequence [T] -> output with batch size 1, always in eval mode; `durations`
        [T] (mel frames per unit) replace the predicted ones when given."""
        u = torch.as_tensor(units, device=self.embed.weight.device)
        if u.dim() == 1:
            u = u.unsqueeze(0)
        d = None
        if durations is not None:
            d = torch.as_tensor(durations, device=u.device)
            d = d.unsqueeze(0) if d.dim() == 1 else d
        with eval_mode(self):
            return self(u, durations=d, length_scale=length_scale)

    # -- checkpoints
    def save_pretrained(
        self, folder: str | Path, vocoder: dict[str, Any] | None = None,
        extra_files: dict[str, str] | None = None,
        write_extra: Callable[[Path], Any] | None = None,
        dtype: torch.dtype | None = None,
    ) -> Path:
        """Write config.json + model.safetensors into `folder` atomically (temp dir + rename);
        `write_extra(tmp)` may add more files to the temporary folder before the rename.
        `dtype` (e.g. float16) stores smaller weights; loading casts them back."""
        folder = check_replaceable(folder, "saving the unit->mel model",
                                   is_earlier_save=lambda d: (folder_config(d) or {}).get("format") == FORMAT)
        meta: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION,
                                "unit2mel": self.config.to_dict()}
        if vocoder is not None:
            meta["vocoder"] = vocoder
        with atomic_dir(folder) as tmp:
            save_weights(self, tmp / WEIGHTS_FILE, dtype)
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text, encoding="utf-8")
            if write_extra is not None:
                write_extra(tmp)
        return folder

    @staticmethod
    def read_meta(folder: str | Path) -> dict[str, Any]:
        """Parse and check a checkpoint folder's config.json."""
        folder = Path(folder)
        if not folder.is_dir():
            raise VocoderFileNotFoundError(f"Unit2Mel checkpoint folder not found: {folder}"
                                           f"{moved_aside_hint(folder)}")
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise VocoderFileNotFoundError(f"Unit2Mel checkpoint file missing: {folder / name}")
        try:
            meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as exc:
            raise VocoderCheckpointError(f"{folder / CONFIG_FILE}: not valid JSON ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or "unit2mel" not in meta:
            raise VocoderCheckpointError(f"{folder / CONFIG_FILE} is not an {FORMAT} config")
        version = meta.get("format_version", 0)
        if isinstance(version, bool) or not isinstance(version, int):
            raise VocoderCheckpointError(f"{folder / CONFIG_FILE}: format_version must be an "
                                         f"integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise VocoderCheckpointError(f"{folder / CONFIG_FILE}: format version "
                                         f"{meta['format_version']} is newer than supported")
        return meta

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, map_location: str | torch.device = "cpu"
    ) -> Unit2Mel:
        """Rebuild the model of a `save_pretrained` folder (eval mode)."""
        folder = Path(folder)
        meta = cls.read_meta(folder)
        model = cls(Unit2MelConfig.from_dict(meta["unit2mel"], source=str(folder / CONFIG_FILE)))
        load_weights(model, folder / WEIGHTS_FILE)
        return model.to(map_location).eval()


def grow_unit2mel(model: Unit2Mel, extra_decoder_layers: int = 0,
                  postnet_layers: int = 0) -> Unit2Mel:
    """A larger copy of a trained `model` that starts out computing exactly the same mels.

    `extra_decoder_layers` FFT blocks go on top of the decoder with their attention output
    and second FFN conv zeroed, so each starts as the identity; `postnet_layers` (>= 2) adds a
    postnet to a model without one, its last conv zeroed, so its residual starts at 0.
    Training then goes on from the old model's quality instead of from scratch.
    """
    c = model.config
    if extra_decoder_layers < 0:
        raise VocoderConfigError(f"extra_decoder_layers must be >= 0, got {extra_decoder_layers}")
    if postnet_layers and c.postnet_layers:
        raise VocoderConfigError(f"the model already has a {c.postnet_layers}-layer postnet")
    n_dec = c.decoder_layers + extra_decoder_layers if extra_decoder_layers else c.n_dec_layers
    cfg = Unit2MelConfig.from_dict({**c.to_dict(), "n_dec_layers": n_dec,
                                    "postnet_layers": postnet_layers or c.postnet_layers})
    grown = Unit2Mel(cfg).to(next(model.parameters()).device)
    _, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    if unexpected:
        raise VocoderConfigError(f"grow_unit2mel: unexpected weights {unexpected[:4]}")
    with torch.no_grad():
        for blk in list(grown.decoder)[c.decoder_layers:]:
            for t in (blk.attn.out_proj.weight, blk.attn.out_proj.bias,
                      blk.conv2.weight, blk.conv2.bias):
                t.zero_()
        if postnet_layers and grown.postnet is not None:
            grown.postnet.convs[-1].weight.zero_()
            grown.postnet.convs[-1].bias.zero_()
    grown.train(model.training)
    return grown


def unit2mel_loss(
    out: Unit2MelOutput,
    target_mel: torch.Tensor,
    target_mask: torch.Tensor,
    target_log_dur: torch.Tensor,
    dur_weight: float = 1.0,
) -> Unit2MelLoss:
    """Masked L1 on log-mel [B, F, M] + `dur_weight` * masked MSE on log(frames + 1) [B, T]."""
    n = min(out.mel.shape[1], target_mel.shape[1])
    mask = (out.mel_mask[:, :n] & target_mask[:, :n].bool()).unsqueeze(-1).float()  # [B, F, 1]
    denom = mask.sum().clamp_min(1.0) * target_mel.shape[-1]
    preds = [out.mel] + ([out.mel_before_postnet] if out.mel_before_postnet is not None else [])
    mel_loss = sum(((p[:, :n] - target_mel[:, :n]).abs() * mask).sum() / denom for p in preds)
    mel_loss = mel_loss / len(preds)
    umask = out.unit_mask.float()
    dur_err = (out.log_dur_pred - target_log_dur.to(out.log_dur_pred.dtype)) ** 2 * umask
    dur_loss = dur_err.sum() / umask.sum().clamp_min(1.0)
    return Unit2MelLoss(mel_loss + dur_weight * dur_loss, mel_loss, dur_loss)
