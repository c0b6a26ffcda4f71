"""HiFi-GAN: the generator every vocoder of EchoX ends in, and its log-mel front end.

`HiFiGANGenerator` renders a log-mel (HiFi-GAN V1: 80 bins, 22,050 Hz, hop 256) as a
waveform; `CodeHiFiGAN` (code_hifigan.py) runs the same layers (`HiFiGANLayers`) on unit
embeddings. Layer names (`conv_pre`, `ups.i`, `resblocks.i*K+j.convs{1,2}.k`, `conv_post`) are
those of the original checkpoints (Kong et al., 2020), so their state dicts load strictly once
`fold_weight_norm` has turned the weight-normalised convolutions (`weight_g`, `weight_v`) into
plain weights, which is what `remove_weight_norm` does for inference. The mel recipe follows
the original `meldataset.py`; the code is our own.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from echox.errors import VocoderCheckpointError, VocoderConfigError, VocoderInputError

LRELU_SLOPE = 0.1  # inside the generator; the last activation uses torch's default 0.01
GENERATOR_CONFIG = "config.json"  # a generator folder's config, in the original HiFi-GAN schema

_WEIGHT_NORM_SUFFIXES = (  # (g, v): torch.nn.utils.weight_norm, then its parametrization
    (".weight_g", ".weight_v"),
    (".parametrizations.weight.original0", ".parametrizations.weight.original1"),
)


def fold_weight_norm(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Replace each `X.weight_g` / `X.weight_v` pair (and the newer parametrization names)
    whose key starts with `prefix` by `X.weight = g * v / ||v||`, in place; returns `state`.

    The norm runs over every axis but 0 (torch's weight_norm default `dim=0`, which HiFi-GAN
    and fairseq used for Conv1d and ConvTranspose1d alike).
    """
    for g_suffix, v_suffix in _WEIGHT_NORM_SUFFIXES:
        for key in [k for k in state if k.startswith(prefix) and k.endswith(g_suffix)]:
            stem = key[: -len(g_suffix)]
            if stem + v_suffix not in state:
                raise VocoderCheckpointError(f"{key} has no matching {stem + v_suffix}")
            g, v = state.pop(key), state.pop(stem + v_suffix)
            shape = (v.shape[0],) + (1,) * (v.dim() - 1)
            if g.shape != shape:
                raise VocoderCheckpointError(
                    f"{stem}.weight_g has shape {tuple(g.shape)}, v is {tuple(v.shape)}")
            norm = v.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(shape)  # [C, 1, ...]
            state[stem + ".weight"] = g * v / norm
    return state


# ----------------------------------------------------------------------------- mel front end


@dataclass(frozen=True)
class MelSpec:
    """Mel analysis of HiFi-GAN V1 (its `config_v1.json`): the vocoder's input contract."""

    n_mels: int = 80
    sampling_rate: int = 22050
    hop_length: int = 256
    n_fft: int = 1024
    win_length: int = 1024
    fmin: float = 0.0
    fmax: float = 8000.0

    def __post_init__(self) -> None:
        if not 0 < self.hop_length <= self.win_length <= self.n_fft:
            raise VocoderConfigError(f"need 0 < hop <= win <= n_fft, got {self}")
        if not 0 <= self.fmin < self.fmax <= self.sampling_rate / 2:
            raise VocoderConfigError(f"need 0 <= fmin < fmax <= sr/2, got {self}")


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear (200/3 Hz per mel) below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    lin = hz / f_sp
    log = min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep
    return np.where(hz >= min_log_hz, log, lin)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    lin = mel * f_sp
    log = min_log_hz * np.exp(logstep * (mel - min_log_mel))
    return np.where(mel >= min_log_mel, log, lin)


@functools.lru_cache(maxsize=8)
def mel_filterbank(params: MelSpec = MelSpec()) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters `[n_mels, n_fft // 2 + 1]`.

    Same definition as librosa's default `filters.mel` (which HiFi-GAN used); each
    triangle is scaled by 2 / bandwidth so that it has unit area in Hz.
    """
    fft_hz = np.linspace(0.0, params.sampling_rate / 2, params.n_fft // 2 + 1)  # [F]
    edges = _mel_to_hz(
        np.linspace(_hz_to_mel(params.fmin), _hz_to_mel(params.fmax), params.n_mels + 2)
    )  # [M + 2]
    width = np.diff(edges)  # [M + 1]
    dist = edges[:, None] - fft_hz[None, :]  # [M + 2, F]
    rising = -dist[:-2] / width[:-1, None]  # [M, F]
    falling = dist[2:] / width[1:, None]  # [M, F]
    bank = np.maximum(0.0, np.minimum(rising, falling))
    bank *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    out = bank.astype(np.float32)
    out.setflags(write=False)  # shared through the cache
    return out


def mel_spectrogram(wav: torch.Tensor, params: MelSpec = MelSpec()) -> torch.Tensor:
    """Log-mel `[B, n_mels, T]` of waveforms `[B, S]` or `[S]` at `params.sampling_rate`.

    HiFi-GAN's recipe: reflect-pad (n_fft - hop) / 2 on both sides, STFT without centering,
    magnitude sqrt(re^2 + im^2 + 1e-9), mel projection, natural log of max(x, 1e-5).
    With S a multiple of hop, T = S / hop.
    """
    if not isinstance(wav, torch.Tensor) or not wav.is_floating_point():
        raise VocoderInputError(f"wav must be a floating-point torch.Tensor, got {type(wav)}")
    if wav.dim() == 1:
        wav = wav.unsqueeze(0)
    if wav.dim() != 2:
        raise VocoderInputError(f"wav must be [S] or [B, S], got shape {tuple(wav.shape)}")
    pad = (params.n_fft - params.hop_length) // 2
    if wav.shape[-1] <= pad:
        raise VocoderInputError(f"wav has {wav.shape[-1]} samples; need more than {pad}")
    x = F.pad(wav.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)  # [B, S + 2 pad]
    window = torch.hann_window(params.win_length, device=wav.device, dtype=wav.dtype)
    spec = torch.stft(
        x,
        n_fft=params.n_fft,
        hop_length=params.hop_length,
        win_length=params.win_length,
        window=window,
        center=False,
        return_complex=True,
    )  # [B, F, T]
    mag = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)  # [B, F, T]
    bank = torch.from_numpy(mel_filterbank(params).copy()).to(wav.device, wav.dtype)  # [M, F]
    mel = torch.matmul(bank, mag)  # [B, M, T]
    return torch.log(torch.clamp(mel, min=1e-5))


# ----------------------------------------------------------------------------- generator


class GeneratorSizes(Protocol):
    """The layer sizes a HiFi-GAN generator is built from (`HiFiGANConfig`, `CodeHiFiGANConfig`)."""

    @property
    def upsample_rates(self) -> Sequence[int]: ...
    @property
    def upsample_kernel_sizes(self) -> Sequence[int]: ...
    @property
    def upsample_initial_channel(self) -> int: ...
    @property
    def resblock_kernel_sizes(self) -> Sequence[int]: ...
    @property
    def resblock_dilation_sizes(self) -> Sequence[Sequence[int]]: ...


def hifigan_reach_frames(sizes: GeneratorSizes) -> int:
    """Upper bound of how many input frames on each side can change one output sample."""
    res = max((k - 1) // 2 * sum(d + 1 for d in ds)
              for k, ds in zip(sizes.resblock_kernel_sizes, sizes.resblock_dilation_sizes))
    reach, rate = 3.0, 1  # conv_pre, kernel 7
    for u, k in zip(sizes.upsample_rates, sizes.upsample_kernel_sizes):
        reach += math.ceil(k / u) / rate
        rate *= u
        reach += res / rate
    return math.ceil(reach + 3 / rate)  # conv_post


@dataclass(frozen=True)
class HiFiGANConfig:
    """Generator sizes; defaults are HiFi-GAN V1 (product of upsample_rates = hop 256)."""

    num_mels: int = 80
    upsample_rates: tuple[int, ...] = (8, 8, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 4, 4)
    upsample_initial_channel: int = 512
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    mel: MelSpec = field(default_factory=MelSpec)

    def __post_init__(self) -> None:
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise VocoderCheckpointError("upsample rate and kernel lists differ in length")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise VocoderCheckpointError("resblock kernel and dilation lists differ in length")
        if int(np.prod(self.upsample_rates)) != self.mel.hop_length:
            raise VocoderCheckpointError(
                f"upsampling x{int(np.prod(self.upsample_rates))} != mel hop {self.mel.hop_length}"
            )

    @property
    def hop_length(self) -> int:
        return self.mel.hop_length

    @classmethod
    def from_json(cls, path: Path | str) -> HiFiGANConfig:
        """Read an original HiFi-GAN `config.json` (only resblock type "1" is supported)."""
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise VocoderCheckpointError(f"cannot read HiFi-GAN config {path}: {exc}") from exc
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "<dict>") -> HiFiGANConfig:
        """Parse the original HiFi-GAN config schema (`num_mels`, `hop_size`, ...)."""
        if not isinstance(raw, dict):
            raise VocoderCheckpointError(f"{source}: a HiFi-GAN config must be a JSON object")
        if str(raw.get("resblock", "1")) != "1":
            raise VocoderCheckpointError(f"{source}: only resblock '1' (V1/V2-style) is supported")
        try:
            mel = MelSpec(
                n_mels=int(raw["num_mels"]),
                sampling_rate=int(raw["sampling_rate"]),
                hop_length=int(raw["hop_size"]),
                n_fft=int(raw["n_fft"]),
                win_length=int(raw["win_size"]),
                fmin=float(raw["fmin"]),
                fmax=float(raw["fmax"]),
            )
            return cls(
                num_mels=mel.n_mels,
                upsample_rates=tuple(int(x) for x in raw["upsample_rates"]),
                upsample_kernel_sizes=tuple(int(x) for x in raw["upsample_kernel_sizes"]),
                upsample_initial_channel=int(raw["upsample_initial_channel"]),
                resblock_kernel_sizes=tuple(int(x) for x in raw["resblock_kernel_sizes"]),
                resblock_dilation_sizes=tuple(tuple(int(x) for x in d)
                                              for d in raw["resblock_dilation_sizes"]),
                mel=mel,
            )
        except KeyError as exc:
            raise VocoderCheckpointError(f"{source} lacks HiFi-GAN field {exc}") from exc
        except (TypeError, ValueError, OverflowError) as exc:  # VocoderConfigError of MelSpec too
            raise VocoderCheckpointError(f"{source}: bad HiFi-GAN config ({exc})") from exc

    def to_dict(self) -> dict:
        """The original HiFi-GAN config schema (what `from_dict` reads)."""
        m = self.mel
        return {
            "resblock": "1", "num_mels": self.num_mels,
            "upsample_rates": list(self.upsample_rates),
            "upsample_kernel_sizes": list(self.upsample_kernel_sizes),
            "upsample_initial_channel": self.upsample_initial_channel,
            "resblock_kernel_sizes": list(self.resblock_kernel_sizes),
            "resblock_dilation_sizes": [list(d) for d in self.resblock_dilation_sizes],
            "sampling_rate": m.sampling_rate, "hop_size": m.hop_length, "n_fft": m.n_fft,
            "win_size": m.win_length, "fmin": m.fmin, "fmax": m.fmax,
        }

    @classmethod
    def v2(cls) -> HiFiGANConfig:
        """HiFi-GAN V2's sizes (128 initial channels, ~0.9M parameters; V1 has 13.9M)."""
        return cls(upsample_initial_channel=128)


class ResBlock(nn.Module):
    """HiFi-GAN's ResBlock1: per dilation, lrelu -> dilated conv -> lrelu -> conv, residual."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]) -> None:
        super().__init__()

        def conv(d: int) -> nn.Conv1d:
            pad = d * (kernel_size - 1) // 2  # keeps the length
            return nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=pad)

        self.convs1 = nn.ModuleList(conv(d) for d in dilations)
        self.convs2 = nn.ModuleList(conv(1) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T] -> [B, C, T]
        for c1, c2 in zip(self.convs1, self.convs2, strict=True):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class HiFiGANLayers(nn.Module):
    """The HiFi-GAN generator's layers: conv_pre, then per upsampling stage a transposed conv
    and the mean of the stage's ResBlocks, then conv_post and tanh.

    Subclasses call `_add_layers` in their `__init__` and run `decode` in their forward.
    """

    def _add_layers(self, in_channels: int, sizes: GeneratorSizes) -> None:
        ch = sizes.upsample_initial_channel
        self.conv_pre = nn.Conv1d(in_channels, ch, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()  # index i * n_kernels + j, as in the checkpoints
        ups = zip(sizes.upsample_rates, sizes.upsample_kernel_sizes, strict=True)
        blocks = list(zip(sizes.resblock_kernel_sizes, sizes.resblock_dilation_sizes, strict=True))
        for i, (u, k) in enumerate(ups):
            c_in, c_out = ch // 2**i, ch // 2 ** (i + 1)
            self.ups.append(nn.ConvTranspose1d(c_in, c_out, k, u, padding=(k - u) // 2))
            self.resblocks.extend(ResBlock(c_out, rk, rd) for rk, rd in blocks)
        self.conv_post = nn.Conv1d(ch // 2 ** len(sizes.upsample_rates), 1, 7, padding=3)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Features [B, in_channels, T] -> audio [B, T * hop] in [-1, 1]."""
        k = len(self.resblocks) // len(self.ups)
        x = self.conv_pre(x)  # [B, C0, T]
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))  # [B, C_i, T * prod(u[:i+1])]
            x = sum(self.resblocks[i * k + j](x) for j in range(k)) / k
        x = self.conv_post(F.leaky_relu(x))  # default slope 0.01, as HiFi-GAN; [B, 1, T * hop]
        return torch.tanh(x).squeeze(1)  # [B, T * hop]


class HiFiGANGenerator(HiFiGANLayers):
    """Log-mel `[B, n_mels, T]` -> waveform `[B, T * hop]` in [-1, 1]."""

    def __init__(self, config: HiFiGANConfig = HiFiGANConfig()) -> None:
        super().__init__()
        self.config = config
        self._add_layers(config.num_mels, config)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.dim() != 3 or mel.shape[1] != self.config.num_mels:
            raise VocoderInputError(
                f"expected log-mel [B, {self.config.num_mels}, T], got {tuple(mel.shape)}"
            )
        return self.decode(mel)
