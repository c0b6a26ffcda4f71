"""`UnitMelVocoder`: the `Vocoder` that chains a `Unit2Mel` and a mel HiFi-GAN generator.

Units -> log-mel (`echox.vocoder.unit2mel.Unit2Mel`) -> waveform (a HiFi-GAN generator, in
torch or on ONNX Runtime), resampled to the output rate. Its folders (the Unit2Mel weights
plus the HiFi-GAN they name) are read and written by `echox.vocoder.io`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.signal import resample_poly
from torch import nn

from echox.errors import VocoderConfigError, VocoderInputError
from echox.vocoder.base import ChunkAudio, Vocoder, skipped_chunk, unit_ids
from echox.vocoder.hifigan import hifigan_reach_frames
from echox.vocoder.onnx import OnnxSpec
from echox.vocoder.unit2mel import Unit2Mel


#: Left-context units of a streamed chunk. The unit->mel model attends over all the units it is
#: given, so a chunk rendered with little history comes out longer than in the whole rendering
#: (docs/results.md, session 51: 16 units x1.012 of its length, 128 x1.003; its mel is made and
#: dropped, and HiFi-GAN only warms up on the last frames, so the cost is small).
DEFAULT_CONTEXT_UNITS = 128


class UnitMelVocoder(nn.Module, Vocoder):
    """`Vocoder` = Unit2Mel + mel HiFi-GAN generator, resampled to `output_sr`.

    Streaming: a chunk is rendered with up to `context_units` preceding units; their mel is
    generated (so durations and attention see the context) and dropped, except the last
    `mel_context_frames` (+ the preroll) which HiFi-GAN renders to warm up its convolutions.

    `generator` is a `HiFiGANGenerator` or an `OnnxHiFiGAN`; `hifigan` names it in saved
    folders (a packaged name such as "universal", or a path). `onnx` (an `OnnxSpec`) records
    that the named HiFi-GAN runs on ONNX Runtime (optionally with int8 stages);
    `echox.vocoder.io` then builds that generator (cached) on load and writes the spec back.
    """

    def __init__(
        self,
        unit2mel: Unit2Mel,
        generator: nn.Module,
        output_sr: int = 16000,
        context_units: int = DEFAULT_CONTEXT_UNITS,
        mel_context_frames: int | None = None,
        hifigan: str = "universal",
        onnx: OnnxSpec | None = None,
    ) -> None:
        super().__init__()
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
        ids = unit_ids(units)
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
        out = resample_poly(wav, self._up, self._down)[: self._out_len(len(wav))]
        return np.clip(out, -1.0, 1.0).astype(np.float32)

    @torch.inference_mode()
    def _vocode(self, mel: torch.Tensor) -> np.ndarray:
        """Time-major mel [1, F, M] -> audio [F * hop] at the HiFi-GAN rate."""
        return self.generator(mel.transpose(1, 2))[0].float().cpu().numpy()

    #: Longest unit sequence rendered in one pass (about 3 minutes of speech). The unit->mel
    #: model attends over all units at once, so memory grows with their square (60,000 units
    #: asked for about 29 GB); a longer one goes through `synthesize_stream` in chunks.
    max_units_at_once = 4096

    def synthesize(self, units: Sequence[int]) -> np.ndarray:
        """Units -> float32 mono audio [S] at `output_sr`; S = round(frames * hop * out_sr / sr)
        for up to `max_units_at_once` valid units. A longer sequence is rendered in chunks of
        that size, each with left context and a 10 ms crossfade, as the streaming path does."""
        units = unit_ids(units)
        ids = self._clean(units)
        if not ids:
            raise VocoderInputError(f"no valid unit ids to synthesise (got {len(units)})")
        size = self.max_units_at_once
        if len(ids) > size:
            chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
            return np.concatenate(list(self.synthesize_stream(chunks))).astype(np.float32)
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
            return skipped_chunk(units)
        hop, src_sr = self.unit2mel.config.hop_length, self.unit2mel.config.sample_rate
        out = self.unit2mel.infer(ctx + ids)  # mel [1, F, M]; context mel is made, then dropped
        ctx_frames = int(out.durations[0, : len(ctx)].sum())
        pre_frames = math.ceil(max(preroll, 0) * src_sr / self.output_sr / hop) + 1
        mel_ctx = min(ctx_frames, pre_frames + self.mel_context_frames)  # HiFi-GAN warm-up
        audio = self._resample(self._vocode(out.mel[:, ctx_frames - mel_ctx :]))
        start = self._out_len(mel_ctx * hop)  # chunk start, output rate
        keep = min(max(preroll, 0), start)
        return ChunkAudio(audio[start - keep :], keep)
