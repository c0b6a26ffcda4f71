"""Frozen Whisper speech encoder (any Whisper size) and its log-mel front end.

The encoder is a `transformers` WhisperEncoder, loaded from the encoder weights of any Whisper
checkpoint folder (full model, encoder-only, sharded or not), so Whisper tiny.en and
Whisper-large-v3 run on the same code path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from echox.audio import max_frames
from echox.errors import AudioTooLongError, CheckpointError, ConfigError, loading
from echox.fileio import read_json_object

HOP = 160  # Whisper's mel hop at 16 kHz
SAMPLE_RATE = 16000




def too_long_message(seconds: float, max_seconds: float, what: str = "question audio") -> str:
    """The one-line refusal, naming the command-line option that raises the limit first
    (the message reaches `echox chat` / `echox demo` users), then its Python API and config
    spellings."""
    shown = f"{seconds:.1f}"
    if float(shown) <= max_seconds:  # just over the limit: show enough digits to see it
        shown = f"{seconds:.3f}"
    return (f"{what} is {shown} s; the limit is {max_seconds:g} s (to accept longer speech, "
            "pass --max-audio-seconds N; max_audio_seconds=N in the Python API, "
            "encoder.max_seconds in a model config)")


def check_speech_length(n_samples: int, max_seconds: float, what: str = "question audio",
                        sr: int = SAMPLE_RATE) -> None:
    """Raise `AudioTooLongError` when `n_samples` at `sr` exceed `max_seconds`."""
    if n_samples > max_frames(max_seconds, sr):
        raise AudioTooLongError(too_long_message(n_samples / sr, max_seconds, what))


@dataclass
class SpeechFeatures:
    features: torch.Tensor  # [N, n_mels, n_frames] log-mel, padded to the encoder window
    lengths: torch.Tensor  # [N] valid mel frames per utterance


def _load_encoder_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    files: list[Path]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, CheckpointError, "Whisper weight index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"Whisper weight index {index}: expected a \"weight_map\" object "
                                  "of tensor name -> file name")
        files = sorted({folder / f for k, f in weight_map.items() if "encoder." in k})
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif (folder / "pytorch_model.bin").is_file():
        sd = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return _strip_encoder_prefix(sd, folder / "pytorch_model.bin")
    else:
        raise CheckpointError(f"no Whisper weights (model.safetensors / pytorch_model.bin) in {folder}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    if "encoder." in k:
                        out[k] = fh.get_tensor(k)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot read Whisper weights {f}: {e}") from e
    return _strip_encoder_prefix(out, files[0] if files else index)


def _strip_encoder_prefix(sd: dict[str, torch.Tensor], src: Path) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for prefix in ("model.encoder.", "encoder."):
            if k.startswith(prefix):
                out[k[len(prefix):]] = v
                break
    if not out:
        raise CheckpointError(f"{src}: holds no Whisper encoder weights (model.encoder.*)")
    return out


class WhisperSpeechEncoder(nn.Module):
    """Wraps `transformers.WhisperEncoder`; frozen unless told otherwise."""

    def __init__(self, encoder: nn.Module, trainable: bool = False) -> None:
        super().__init__()
        self.whisper = encoder
        self.trainable = trainable
        self.whisper.requires_grad_(trainable)
        cfg = encoder.config
        self.d_model: int = cfg.d_model
        self.num_mel_bins: int = cfg.num_mel_bins
        self.window_frames: int = 2 * cfg.max_source_positions  # mel frames per window
        # Whether the window is the checkpoint's own (30 s for real Whisper) or a shortened one;
        # `from_folder` sets it False when `window_seconds` cuts the positional embeddings.
        self.native_window: bool = True

    @classmethod
    def from_folder(
        cls, folder: str | Path, trainable: bool = False, window_seconds: float | None = None
    ) -> "WhisperSpeechEncoder":
        """`window_seconds` < the native 30 s keeps only the first positional embeddings, so
        short utterances are not padded to 30 s (several times faster on CPU; the adapter on
        top is trained with the same window)."""
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"Whisper config missing: {folder / 'config.json'}")
        with loading(folder, "Whisper config"):
            cfg = WhisperConfig.from_pretrained(folder)
        sd = _load_encoder_state(folder)
        native_positions = cfg.max_source_positions
        if window_seconds is not None:
            positions = int(round(window_seconds * SAMPLE_RATE / HOP / 2))
            if not 1 <= positions <= cfg.max_source_positions:
                step = 2 * HOP / SAMPLE_RATE  # one encoder position: 0.02 s
                raise ConfigError(
                    f"encoder.window_seconds={window_seconds} must give 1 to "
                    f"{cfg.max_source_positions} encoder positions of {step:g} s, so be in "
                    f"({step / 2:g}, {cfg.max_source_positions * step:g}] for {folder}"
                )
            cfg.max_source_positions = positions
            if "embed_positions.weight" in sd:
                sd["embed_positions.weight"] = sd["embed_positions.weight"][:positions]
        enc = WhisperEncoder(cfg)
        missing, unexpected = enc.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"Whisper encoder weights in {folder} do not fit its config: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        out = cls(enc, trainable=trainable)
        out.native_window = cfg.max_source_positions == native_positions
        return out

    def train(self, mode: bool = True) -> "WhisperSpeechEncoder":
        super().train(mode)
        if not self.trainable:
            self.whisper.eval()  # frozen encoder never uses dropout
        return self

    def output_lengths(self, mel_lengths: torch.Tensor) -> torch.Tensor:
        """Valid encoder frames for `mel_lengths` valid mel frames (conv2 has stride 2)."""
        return torch.div(mel_lengths + 1, 2, rounding_mode="floor").clamp(max=self.window_frames // 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # features [N, n_mels, window_frames] -> [N, window_frames / 2, d_model]
        ctx = torch.enable_grad() if self.trainable else torch.no_grad()
        with ctx:
            dtype = next(self.whisper.parameters()).dtype
            return self.whisper(features.to(dtype)).last_hidden_state


class LogMelFrontEnd:
    """Whisper log-mel features, padded with silence to the encoder's window.

    It featurizes one window per waveform (`max_samples`, `max_seconds`: the window);
    `EchoX.encode_frames` cuts longer clips into consecutive windows before calling it.
    """

    def __init__(self, folder: str | Path | None, num_mel_bins: int, window_frames: int) -> None:
        from transformers import WhisperFeatureExtractor

        pre = Path(folder) / "preprocessor_config.json" if folder is not None else None
        if pre is not None and pre.is_file():
            with loading(folder, "Whisper feature extractor"):
                self.fe = WhisperFeatureExtractor.from_pretrained(folder)
        else:
            self.fe = WhisperFeatureExtractor(feature_size=num_mel_bins)
        if self.fe.feature_size != num_mel_bins:
            raise CheckpointError(
                f"preprocessor_config.json in {folder} gives {self.fe.feature_size} mel bins, "
                f"the encoder expects {num_mel_bins}"
            )
        self.window_frames = window_frames
        self.max_samples = window_frames * HOP
        self.sample_rate = SAMPLE_RATE

    @property
    def max_seconds(self) -> float:
        """Seconds in one encoder window (not the longest accepted clip: `encoder.max_seconds`)."""
        return self.max_samples / SAMPLE_RATE

    def valid_frames(self, w: np.ndarray, i: int = 0) -> int:
        """Valid mel frames of waveform `w` (utterance `i`), after checking that it fits."""
        if w.ndim != 1 or w.size == 0:
            raise ValueError(f"utterance {i}: expected a non-empty mono waveform, got {w.shape}")
        if w.size > self.max_samples:
            raise ValueError(
                f"utterance {i}: {w.size / SAMPLE_RATE:.2f} s is longer than the encoder "
                f"window of {self.max_seconds:.2f} s; split it first"
            )
        return min(self.window_frames, math.ceil(w.size / HOP))

    def __call__(self, waves: list[np.ndarray], device: str | torch.device | None = None) -> SpeechFeatures:
        """Log-mels of `waves`, one padded window each. Without `device`, clip by clip on the
        CPU. With one (a GPU: `EchoX.featurize` passes its own), the whole batch in one STFT
        there: the same features up to float rounding (about 1e-5), without one Python call
        per clip on the host."""
        lengths = [self.valid_frames(np.asarray(w), i) for i, w in enumerate(waves)]
        if device is not None:
            batch = np.zeros((len(waves), self.max_samples), dtype=np.float32)
            for i, w in enumerate(waves):
                w = np.asarray(w, dtype=np.float32)
                batch[i, : w.size] = w
            with torch.autocast("cpu", enabled=False):
                out = self.fe(list(batch), sampling_rate=SAMPLE_RATE, padding="max_length",
                              max_length=self.max_samples, return_tensors="np", device=str(device))
            return SpeechFeatures(torch.from_numpy(np.asarray(out["input_features"])),
                                  torch.tensor(lengths, dtype=torch.long))
        feats = []
        for w in waves:
            w = np.asarray(w, dtype=np.float32)
            with torch.autocast("cpu", enabled=False):  # log-mels in float32 under any autocast
                out = self.fe(
                    w, sampling_rate=SAMPLE_RATE, padding="max_length", max_length=self.max_samples,
                    return_tensors="np",
                )
            feats.append(torch.from_numpy(out["input_features"][0]))
        return SpeechFeatures(torch.stack(feats), torch.tensor(lengths, dtype=torch.long))
