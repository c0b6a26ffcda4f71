"""fairseq's unit HiFi-GAN (`CodeHiFiGAN`): speech units -> 16 kHz waveform.

Our PyTorch implementation of fairseq's ``CodeGenerator`` + ``VariancePredictor``,
key-compatible with the authors' ``g_00500000`` and ``vocoder_config.json``: unit embeddings,
optionally repeated by predicted durations, go through the HiFi-GAN generator layers of
`echox.vocoder.hifigan`. Architecture facts (layer names, paddings, activation slopes,
duration rounding) were read from fairseq / speech-resynthesis (MIT, Meta) and HiFi-GAN
(Kong et al., 2020); the code is written anew.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from echox.errors import (
    VocoderCheckpointError,
    VocoderConfigError,
    VocoderFileNotFoundError,
    VocoderInputError,
)
from echox.vocoder.base import ChunkAudio, Vocoder, eval_mode, read_json, skipped_chunk, unit_ids
from echox.vocoder.hifigan import HiFiGANLayers, fold_weight_norm, hifigan_reach_frames

# ----------------------------------------------------------------------------- config


@dataclass
class DurationPredictorConfig:
    """fairseq's `dur_predictor_params` (a VariancePredictor)."""

    encoder_embed_dim: int = 128
    var_pred_hidden_dim: int = 128
    var_pred_kernel_size: int = 3
    var_pred_dropout: float = 0.5


@dataclass
class CodeHiFiGANConfig:
    """Generator fields of fairseq's `vocoder_config.json`; defaults = the authors' vocoder
    (mHuBERT layer 11, km1000, LJSpeech). Training-only keys of the file are ignored."""

    resblock: str = "1"
    upsample_rates: list[int] = field(default_factory=lambda: [5, 4, 4, 2, 2])
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [11, 8, 8, 4, 4])
    upsample_initial_channel: int = 512
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = field(
        default_factory=lambda: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    )
    num_embeddings: int = 1000
    embedding_dim: int = 128
    model_in_dim: int = 128
    dur_predictor_params: DurationPredictorConfig | None = field(
        default_factory=DurationPredictorConfig
    )
    sampling_rate: int = 16000
    multispkr: bool = False  # fairseq concatenates a speaker embedding (`spkr`) to the units
    num_speakers: int = 200
    f0: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.dur_predictor_params, dict):
            self.dur_predictor_params = DurationPredictorConfig(**self.dur_predictor_params)
        self.resblock = str(self.resblock)
        self.multispkr = bool(self.multispkr)  # fairseq treats any truthy value as "on"
        if self.f0:
            raise VocoderConfigError("f0-conditioned CodeHiFiGAN (f0: true) is not supported")
        if self.resblock != "1":
            raise VocoderConfigError(f"only resblock '1' is supported, got {self.resblock!r}")
        n_up = len(self.upsample_rates)
        if n_up == 0 or len(self.upsample_kernel_sizes) != n_up:
            raise VocoderConfigError("upsample_rates and upsample_kernel_sizes differ in length")
        for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes):
            if u < 1 or k < u or (k - u) % 2:
                raise VocoderConfigError(f"upsample kernel {k} must be >= rate {u} with k-u even")
        if self.upsample_initial_channel % (2**n_up):
            raise VocoderConfigError("upsample_initial_channel must be divisible by 2**len(ups)")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise VocoderConfigError("resblock kernel and dilation lists must match in length")
        if any(k % 2 == 0 for k in self.resblock_kernel_sizes):
            raise VocoderConfigError("resblock kernel sizes must be odd")
        need_in = self.embedding_dim * (2 if self.multispkr else 1)
        if self.model_in_dim != need_in:
            raise VocoderConfigError(f"model_in_dim {self.model_in_dim} must be {need_in}")
        dp = self.dur_predictor_params
        if dp is not None:
            if dp.encoder_embed_dim != self.embedding_dim:
                raise VocoderConfigError("dur_predictor encoder_embed_dim must equal embedding_dim")
            if dp.var_pred_kernel_size % 2 == 0:
                raise VocoderConfigError("var_pred_kernel_size must be odd")

    @property
    def hop_size(self) -> int:
        """Output samples per (duration-expanded) unit frame, e.g. 320 = 20 ms at 16 kHz."""
        return math.prod(self.upsample_rates)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> CodeHiFiGANConfig:
        """Read the flat fairseq dict (or one nesting the generator fields one level down)."""
        if "upsample_rates" not in raw:
            nested = [v for v in raw.values() if isinstance(v, dict) and "upsample_rates" in v]
            if not nested:
                raise VocoderConfigError(f"{source}: no 'upsample_rates'; not a vocoder config")
            raw = nested[0]
        if raw.get("embedder_params"):
            raise VocoderConfigError(f"{source}: speaker 'embedder_params' are not supported")
        names = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in raw.items() if k in names and v is not None}
        kwargs["dur_predictor_params"] = raw.get("dur_predictor_params")
        hop = raw.get("code_hop_size")
        try:
            cfg = cls(**kwargs)
        except TypeError as exc:
            raise VocoderConfigError(f"{source}: {exc}") from exc
        except VocoderConfigError as exc:
            raise VocoderConfigError(f"{source}: {exc}") from exc
        if hop is not None and int(hop) != cfg.hop_size:
            raise VocoderConfigError(
                f"{source}: code_hop_size {hop} != product of upsample_rates {cfg.hop_size}"
            )
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> CodeHiFiGANConfig:
        """Load a fairseq `vocoder_config.json`."""
        path = Path(path)
        raw = read_json(path, "vocoder config")
        if not isinstance(raw, dict):
            raise VocoderConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The flat fairseq layout (with `code_hop_size`), for writing a vocoder_config.json."""
        out = asdict(self)
        out["code_hop_size"] = self.hop_size
        return out

    @classmethod
    def tiny(cls) -> CodeHiFiGANConfig:
        """A few-thousand-parameter config for tests (hop 4, 2 resblocks per stage)."""
        return cls(
            upsample_rates=[2, 2],
            upsample_kernel_sizes=[4, 4],
            upsample_initial_channel=32,
            resblock_kernel_sizes=[3, 5],
            resblock_dilation_sizes=[[1, 2], [1, 2]],
            num_embeddings=50,
            embedding_dim=16,
            model_in_dim=16,
            dur_predictor_params=DurationPredictorConfig(16, 16, 3, 0.1),
        )


# ----------------------------------------------------------------------------- model


class _DurationPredictor(nn.Module):
    """fairseq VariancePredictor: 2 x (conv + ReLU, LayerNorm over channels, dropout) -> 1."""

    def __init__(self, cfg: DurationPredictorConfig) -> None:
        super().__init__()
        k, h = cfg.var_pred_kernel_size, cfg.var_pred_hidden_dim
        # fairseq pads conv2 with 1; (k-1)//2 is the same for its k=3 and keeps lengths for others
        pad = (k - 1) // 2
        self.conv1 = nn.Sequential(nn.Conv1d(cfg.encoder_embed_dim, h, k, padding=pad), nn.ReLU())
        self.ln1 = nn.LayerNorm(h)
        self.conv2 = nn.Sequential(nn.Conv1d(h, h, k, padding=pad), nn.ReLU())
        self.ln2 = nn.LayerNorm(h)
        self.proj = nn.Linear(h, 1)
        self.dropout = nn.Dropout(cfg.var_pred_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, E] -> log(duration + 1) predictions [B, T]."""
        x = self.conv1(x.transpose(1, 2)).transpose(1, 2)  # [B, T, H]
        x = self.dropout(self.ln1(x))
        x = self.conv2(x.transpose(1, 2)).transpose(1, 2)
        x = self.dropout(self.ln2(x))
        return self.proj(x).squeeze(-1)  # [B, T]


@dataclass
class CodeHiFiGANOutput:
    """Result of `CodeHiFiGAN.generate`."""

    audio: torch.Tensor  # [B, S], in [-1, 1]
    units: torch.Tensor  # [B, T'] the ids kept after dropping invalid ones
    durations: torch.Tensor  # [B, T'] frames per kept unit (1 without duration prediction)


class CodeHiFiGAN(HiFiGANLayers, Vocoder):
    """fairseq's unit HiFi-GAN (CodeGenerator), loadable from `g_00500000` with strict keys.

    Weights are held as plain convolutions: checkpoint `weight_g`/`weight_v` pairs are folded
    on load (a load_state_dict pre-hook), which equals fairseq's weight-norm removal.
    """

    def __init__(self, config: CodeHiFiGANConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.dict = nn.Embedding(c.num_embeddings, c.embedding_dim)
        self.spkr = nn.Embedding(c.num_speakers, c.embedding_dim) if c.multispkr else None
        self.dur_predictor = (
            _DurationPredictor(c.dur_predictor_params) if c.dur_predictor_params else None
        )
        self._add_layers(c.model_in_dim, c)  # the HiFi-GAN generator: `decode`
        self.register_load_state_dict_pre_hook(self._fold_hook)

    @staticmethod
    def _fold_hook(
        module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *_: Any
    ) -> None:
        fold_weight_norm(state_dict, prefix)

    # -- Vocoder interface
    @property
    def sample_rate(self) -> int:
        return self.config.sampling_rate

    @property
    def hop_size(self) -> int:
        return self.config.hop_size

    @property
    def default_context_units(self) -> int:  # type: ignore[override]
        """Enough left context that the chunk's own audio is exact (each unit is >= 1 frame)."""
        return self.receptive_field_frames()

    def receptive_field_frames(self) -> int:
        """Upper bound of how many input frames on each side can change one output sample."""
        return hifigan_reach_frames(self.config)

    # -- model
    def _clean_units(self, units: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Drop negative ids (padding) and ids >= num_embeddings (with a warning)."""
        u = torch.as_tensor(units, device=self.dict.weight.device)
        if u.dim() == 1:
            u = u.unsqueeze(0)
        if u.dim() != 2 or (u.numel() and u.dtype.is_floating_point) or u.dtype == torch.bool:
            raise VocoderInputError(
                f"units must be integer ids [T] or [B, T], got {u.dtype} {tuple(u.shape)}"
            )
        u = u.long()
        too_big = u >= self.config.num_embeddings
        if too_big.any():
            warnings.warn(
                f"dropped {int(too_big.sum())} unit ids >= num_embeddings "
                f"({self.config.num_embeddings})",
                stacklevel=3,
            )
        keep = (u >= 0) & ~too_big
        rows = [row[k] for row, k in zip(u, keep)]
        if any(len(r) != len(rows[0]) for r in rows):
            raise VocoderInputError("rows keep different numbers of valid units; pass one by one")
        if len(rows[0]) == 0:
            raise VocoderInputError(f"no valid unit ids to synthesise (input {tuple(u.shape)})")
        return torch.stack(rows)  # [B, T']

    def generate(
        self,
        units: torch.Tensor | Sequence[int],
        dur_prediction: bool = True,
        speaker: int | torch.Tensor | None = None,
    ) -> CodeHiFiGANOutput:
        """Units [T] or [B, T] -> audio plus the kept units and their durations.

        Without a duration predictor in the config `dur_prediction` is ignored (as in fairseq).
        """
        codes = self._clean_units(units)  # [B, T]
        x = self.dict(codes)  # [B, T, E]
        durations = torch.ones_like(codes)
        if dur_prediction and self.dur_predictor is not None:
            log_dur = self.dur_predictor(x)  # [B, T], trained on log(count + 1)
            durations = torch.clamp(torch.round(torch.exp(log_dur) - 1).long(), min=1)
            if codes.shape[0] > 1 and len(set(durations.sum(1).tolist())) > 1:
                raise VocoderInputError("predicted lengths differ in the batch; pass one by one")
            x = torch.stack([xb.repeat_interleave(db, dim=0) for xb, db in zip(x, durations)])
        feats = x.transpose(1, 2)  # [B, E, F]
        if self.spkr is not None:
            if speaker is None:
                raise VocoderInputError("this multi-speaker vocoder needs a speaker id")
            spk = torch.as_tensor(speaker, device=codes.device).long().reshape(-1)  # [1] or [B]
            emb = self.spkr(spk).unsqueeze(-1).expand(codes.shape[0], -1, feats.shape[-1])
            feats = torch.cat([feats, emb], dim=1)  # [B, 2E, F]
        return CodeHiFiGANOutput(self.decode(feats), codes, durations)

    def forward(
        self,
        units: torch.Tensor | Sequence[int],
        dur_prediction: bool = True,
        speaker: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Units [T] or [B, T] -> audio [B, S]."""
        return self.generate(units, dur_prediction, speaker).audio

    @torch.inference_mode()
    def synthesize(
        self, units: Sequence[int], dur_prediction: bool = True, speaker: int | None = None
    ) -> np.ndarray:
        """Render one unit sequence to float32 mono audio [S] (always in eval mode)."""
        ids = unit_ids(units)  # one sequence: a batch [B, T] goes to `generate`
        with eval_mode(self):
            audio = self.generate(ids, dur_prediction, speaker).audio[0]
        return audio.float().cpu().numpy()

    @torch.inference_mode()
    def synthesize_chunk(
        self,
        units: Sequence[int],
        left_context: Sequence[int],
        preroll: int,
        dur_prediction: bool = True,
        speaker: int | None = None,
    ) -> ChunkAudio:
        """Render `left_context + units` and cut the context off, keeping `preroll` samples
        of its end. A chunk without valid ids gives empty audio (with a warning), so that one
        bad chunk does not end a stream."""
        n = self.config.num_embeddings
        context = [int(u) for u in left_context if 0 <= int(u) < n]
        if not any(0 <= int(u) < n for u in units):
            return skipped_chunk(units)
        with eval_mode(self):
            out = self.generate(context + [int(u) for u in units], dur_prediction, speaker)
        ctx_samples = int(out.durations[0, : len(context)].sum()) * self.hop_size
        keep = min(max(preroll, 0), ctx_samples)
        audio = out.audio[0, ctx_samples - keep :].float().cpu().numpy()
        return ChunkAudio(audio, keep)

    # -- loading
    def load_fairseq_state_dict(
        self, state_dict: dict[str, torch.Tensor], source: str = "<state_dict>"
    ) -> None:
        """Strictly load a fairseq generator state dict; errors name the offending keys."""
        sd = fold_weight_norm(dict(state_dict))
        own = self.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if missing or unexpected:
            raise VocoderCheckpointError(
                f"{source}: keys do not match the config; missing {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                f"{' ...' if len(unexpected) > 8 else ''}"
            )
        for key, value in sd.items():
            if not isinstance(value, torch.Tensor) or value.shape != own[key].shape:
                is_tensor = isinstance(value, torch.Tensor)
                found = tuple(value.shape) if is_tensor else type(value).__name__
                raise VocoderCheckpointError(
                    f"{source}: shape mismatch for {key}: checkpoint {found}, "
                    f"model {tuple(own[key].shape)} (wrong vocoder_config.json?)"
                )
        self.load_state_dict(sd, strict=True)

    @classmethod
    def from_fairseq(
        cls,
        checkpoint_path: str | Path,
        config_path: str | Path,
        map_location: str | torch.device = "cpu",
        trust_pickle: bool = False,
    ) -> CodeHiFiGAN:
        """Load the authors' `g_00500000` + `vocoder_config.json`, in eval mode.

        The file is read with `torch.load(weights_only=True)`: fairseq saves a plain
        `{"generator": state_dict}`. `trust_pickle=True` allows full unpickling for files that
        also hold other Python objects; only use it for files you trust.
        """
        checkpoint_path = Path(checkpoint_path)
        config = CodeHiFiGANConfig.from_json(config_path)
        if not checkpoint_path.is_file():
            raise VocoderFileNotFoundError(f"vocoder checkpoint not found: {checkpoint_path}")
        try:
            # read on the CPU, then moved: a device torch.load cannot restore to ("cpu:0")
            ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=not trust_pickle)
        except Exception as exc:  # torch raises several types for unreadable/unsafe files
            raise VocoderCheckpointError(
                f"{checkpoint_path}: cannot be read as a torch checkpoint with "
                f"weights_only={not trust_pickle} ({type(exc).__name__}: {str(exc)[:300]})"
            ) from exc
        if not isinstance(ckpt, dict) or "generator" not in ckpt:
            keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
            raise VocoderCheckpointError(
                f"{checkpoint_path}: no top-level 'generator' key (found {keys})"
            )
        model = cls(config)
        model.load_fairseq_state_dict(ckpt["generator"], source=str(checkpoint_path))
        return model.to(map_location).eval()
