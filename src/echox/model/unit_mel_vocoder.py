"""`UnitMelVocoder`: the `Vocoder` that chains a `Unit2Mel` and a mel HiFi-GAN generator.

Units -> log-mel (`echox.model.unit2mel.Unit2Mel`) -> waveform (HiFi-GAN V1, or a distilled
generator that travels in the folder's `hifigan/`), resampled to the output rate. Split out of
`echox.model.unit2mel`, which re-exports every name here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from echox.model.unit2mel import (
    LOCAL_HIFIGAN,
    Unit2Mel,
)
from echox.model.vocoder import (
    ChunkAudio,
    Vocoder,
    VocoderConfigError,
    VocoderFileNotFoundError,
    VocoderInputError,
)

if TYPE_CHECKING:
    from echox.convert.hifigan import HiFiGANConfig
    from echox.convert.hifigan_onnx import OnnxSpec

__all__ = ["UnitMelVocoder", "hifigan_reach_frames", "load_named_generator"]



def hifigan_reach_frames(config: HiFiGANConfig) -> int:
    """Upper bound of mel frames on one side that can change a HiFi-GAN output sample."""
    res = max((k - 1) // 2 * sum(d + 1 for d in ds)
              for k, ds in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes))
    reach, rate = 3.0, 1  # conv_pre, kernel 7
    for u, k in zip(config.upsample_rates, config.upsample_kernel_sizes):
        reach += math.ceil(k / u) / rate
        rate *= u
        reach += res / rate
    return math.ceil(reach + 3 / rate)


class UnitMelVocoder(nn.Module, Vocoder):
    """`Vocoder` = Unit2Mel + mel HiFi-GAN generator, resampled to `output_sr`.

    Streaming: a chunk is rendered with up to `context_units` preceding units; their mel is
    generated (so durations and attention see the context) and dropped, except the last
    `mel_context_frames` (+ the preroll) which HiFi-GAN renders to warm up its convolutions.

    `onnx` (an `OnnxSpec`) records that the named HiFi-GAN runs on ONNX Runtime (optionally
    with int8 stages); `from_pretrained` then builds that generator (cached) and
    `save_pretrained` writes the spec back.
    """

    def __init__(
        self,
        unit2mel: Unit2Mel,
        generator: nn.Module | None = None,
        output_sr: int = 16000,
        context_units: int = 16,
        mel_context_frames: int | None = None,
        hifigan: str = "universal",
        onnx: OnnxSpec | None = None,
    ) -> None:
        super().__init__()
        if generator is None:
            generator = load_named_generator(hifigan)
        gcfg = getattr(generator, "config", None)
        mel = getattr(gcfg, "mel", None)
        c = unit2mel.config
        if mel is None:
            raise VocoderConfigError("generator needs a HiFiGANConfig `.config` with `.mel`")
        theirs = (mel.sampling_rate, mel.hop_length, mel.n_mels)
        if theirs != (c.sample_rate, c.hop_length, c.n_mels):
            raise VocoderConfigError(
                f"Unit2Mel makes {c.n_mels} mels at {c.sample_rate} Hz / hop {c.hop_length}; "
                f"the HiFi-GAN wants {mel.n_mels} at {mel.sampling_rate} Hz / hop {mel.hop_length}"
            )
        if isinstance(output_sr, bool) or not isinstance(output_sr, int) or output_sr <= 0:
            raise VocoderConfigError(f"output_sr must be a positive int, got {output_sr!r}")
        if context_units < 0:
            raise VocoderConfigError(f"context_units must be >= 0, got {context_units}")
        self.unit2mel = unit2mel
        self.generator = generator.eval().requires_grad_(False)
        self.output_sr = output_sr
        self.default_context_units = context_units
        self.mel_context_frames = (hifigan_reach_frames(gcfg) if mel_context_frames is None
                                   else int(mel_context_frames))
        self.hifigan = hifigan
        self.onnx = onnx
        g = math.gcd(output_sr, c.sample_rate)
        self._up, self._down = output_sr // g, c.sample_rate // g

    @property
    def sample_rate(self) -> int:
        return self.output_sr

    def _clean(self, units: Sequence[int], warn: bool = True) -> list[int]:
        n = self.unit2mel.config.num_units
        try:
            ids = [int(u) for u in units]
        except (TypeError, ValueError) as exc:
            raise VocoderInputError(f"units must be integer ids, got {units!r:.80}") from exc
        kept = [u for u in ids if 0 <= u < n]
        if warn and len(kept) < len(ids):
            warnings.warn(f"dropped {len(ids) - len(kept)} unit ids outside [0, {n})", stacklevel=3)
        return kept

    def _out_len(self, n_src: int) -> int:
        """Output samples spanning `n_src` HiFi-GAN samples (rounded, not ceil'd: the last
        sample of resample_poly's ceil length lies past the end and is faded by its padding)."""
        return int(round(n_src * self._up / self._down))

    def _resample(self, wav: np.ndarray) -> np.ndarray:
        """HiFi-GAN rate -> `output_sr`, trimmed to `_out_len`. The filter's overshoot is
        clipped so that the output keeps HiFi-GAN's (tanh) [-1, 1] range."""
        if self._up == self._down:
            return wav.astype(np.float32)
        from scipy.signal import resample_poly

        out = resample_poly(wav, self._up, self._down)[: self._out_len(len(wav))]
        return np.clip(out, -1.0, 1.0).astype(np.float32)

    @torch.inference_mode()
    def _vocode(self, mel: torch.Tensor) -> np.ndarray:
        """Time-major mel [1, F, M] -> audio [F * hop] at the HiFi-GAN rate."""
        return self.generator(mel.transpose(1, 2))[0].float().cpu().numpy()

    def synthesize(self, units: Sequence[int]) -> np.ndarray:
        """Units -> float32 mono audio [S] at `output_sr`; S = round(frames * hop * out_sr / sr)."""
        ids = self._clean(units)
        if not ids:
            raise VocoderInputError(f"no valid unit ids to synthesise (got {len(units)})")
        return self._resample(self._vocode(self.unit2mel.infer(ids).mel))

    def synthesize_chunk(
        self, units: Sequence[int], left_context: Sequence[int], preroll: int, **kwargs: Any
    ) -> ChunkAudio:
        """Render `left_context + units`, keep the chunk's audio plus `preroll` samples of the
        context's end; a chunk without valid ids gives empty audio (with a warning)."""
        if kwargs:
            raise VocoderInputError(f"unknown options {sorted(kwargs)}")
        ids, ctx = self._clean(units), self._clean(left_context, warn=False)
        if not ids:
            warnings.warn(f"skipped a chunk without valid unit ids ({len(units)})", stacklevel=3)
            return ChunkAudio(np.zeros(0, dtype=np.float32), 0)
        hop, src_sr = self.unit2mel.config.hop_length, self.unit2mel.config.sample_rate
        out = self.unit2mel.infer(ctx + ids)  # mel [1, F, M]; context mel is made, then dropped
        ctx_frames = int(out.durations[0, : len(ctx)].sum())
        pre_frames = math.ceil(max(preroll, 0) * src_sr / self.output_sr / hop) + 1
        mel_ctx = min(ctx_frames, pre_frames + self.mel_context_frames)  # HiFi-GAN warm-up
        audio = self._resample(self._vocode(out.mel[:, ctx_frames - mel_ctx :]))
        start = self._out_len(mel_ctx * hop)  # chunk start, output rate
        keep = min(max(preroll, 0), start)
        return ChunkAudio(audio[start - keep :], keep)

    # -- checkpoints
    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
        """The Unit2Mel weights + config. A packaged HiFi-GAN is stored by name (with its ONNX
        spec and calibration mels, if any); any other generator is copied into
        `folder/hifigan/` (torch weights, or the converted ONNX graph) so that the folder is
        self-contained."""
        import shutil

        from echox.convert.hifigan import HIFIGAN_NAMES, SMALL_HIFIGAN, save_generator
        from echox.convert.hifigan_onnx import OnnxHiFiGAN

        packaged = self.hifigan in HIFIGAN_NAMES or self.hifigan == SMALL_HIFIGAN
        meta = {"hifigan": self.hifigan if packaged else LOCAL_HIFIGAN,
                "output_sr": self.output_sr, "context_units": self.default_context_units}
        spec = self.onnx if packaged else None
        if spec is not None:
            meta["onnx"] = spec.to_meta()

        def write(tmp: Path) -> None:
            if packaged:
                if spec is not None:
                    spec.save_calibration(tmp)
            elif isinstance(self.generator, OnnxHiFiGAN):
                shutil.copytree(self.generator.path.parent, tmp / LOCAL_HIFIGAN)
            else:
                save_generator(self.generator, tmp / LOCAL_HIFIGAN, dtype=dtype)

        return self.unit2mel.save_pretrained(folder, vocoder=meta, write_extra=write, dtype=dtype)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        generator: nn.Module | None = None,
        output_sr: int | None = None,
        map_location: str | torch.device = "cpu",
    ) -> UnitMelVocoder:
        """Load a `save_pretrained` folder; `generator` overrides the HiFi-GAN it names."""
        meta = Unit2Mel.read_meta(folder).get("vocoder") or {}
        model = Unit2Mel.from_pretrained(folder, map_location)
        name = str(meta.get("hifigan", "universal"))
        spec = None
        if generator is None:
            generator = load_named_generator(name, base=Path(folder))
            if meta.get("onnx") is not None:  # the named generator, run on ONNX Runtime
                from echox.convert.hifigan_onnx import OnnxSpec, cached_onnx_generator

                spec = OnnxSpec.from_meta(meta["onnx"], Path(folder))
                generator = cached_onnx_generator(generator, spec)
        return cls(model, generator, output_sr or int(meta.get("output_sr", 16000)),
                   int(meta.get("context_units", 16)), hifigan=name, onnx=spec).to(map_location)


def load_named_generator(name: str, base: Path | None = None) -> nn.Module:
    """A packaged HiFi-GAN (`universal`, `LJSpeech`, `small`), a `save_generator` folder or an
    original `generator_*` checkpoint file; relative paths are taken from `base` when given."""
    from echox.convert.hifigan import (
        HIFIGAN_NAMES,
        SMALL_HIFIGAN,
        load_generator,
        load_hifigan,
        load_hifigan_checkpoint,
    )

    if name in HIFIGAN_NAMES or name == SMALL_HIFIGAN:
        return load_hifigan(name)
    path = Path(name)
    if base is not None and not path.is_absolute():
        path = base / path
    if path.is_dir():
        return load_generator(path)
    if not path.is_file():
        raise VocoderFileNotFoundError(
            f"HiFi-GAN {name!r} is neither one of {HIFIGAN_NAMES + (SMALL_HIFIGAN,)} nor an "
            "existing folder or file")
    return load_hifigan_checkpoint(path)
