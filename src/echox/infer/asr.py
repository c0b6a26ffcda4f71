"""ASR backends for scoring speech output (S2S mode): faster-whisper or transformers Whisper.

UltraEval-Audio transcribes with Whisper-large-v3; offline here the packaged Whisper tiny.en
(CTranslate2, via faster-whisper) is the default. Both take 16 kHz float32 mono.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from echox.audio import load_audio
from echox.errors import CheckpointError
from echox.hub import resolve
from echox.hub.whisper_ct2 import packaged_whisper_tiny_en
from echox.hub.bars import no_loading_bar


class ASR(Protocol):
    name: str

    def transcribe(self, audio: np.ndarray, sample_rate: int = 16000) -> str: ...


def _to_16k(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    return load_audio(np.asarray(audio, dtype=np.float32), 16000, orig_sr=sample_rate, max_seconds=None)


@dataclass
class FasterWhisperASR:
    """`path`: a CTranslate2 Whisper folder (default: the packaged tiny.en). `cpu_threads`:
    CTranslate2's threads; None takes torch's (`--threads`): CTranslate2's own default is 4,
    twice the cores of a 2-core machine beside a model on the other."""

    path: str | None = None
    compute_type: str = "int8"
    beam_size: int = 1
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        import torch
        from faster_whisper import WhisperModel

        if self.path is None:
            self.path = str(packaged_whisper_tiny_en())
        if self.cpu_threads is None:
            self.cpu_threads = torch.get_num_threads()
        try:
            self._model = WhisperModel(self.path, device="cpu", compute_type=self.compute_type,
                                       cpu_threads=self.cpu_threads)
        except Exception as e:  # noqa: BLE001 - ctranslate2 raises RuntimeError/ValueError
            raise CheckpointError(f"cannot load faster-whisper model {self.path}: {e}") from e
        self.name = f"faster-whisper:{self.path}"

    def transcribe(self, audio: np.ndarray, sample_rate: int = 16000) -> str:
        wav = _to_16k(audio, sample_rate)
        if wav.size == 0:
            return ""
        segments, _ = self._model.transcribe(wav, beam_size=self.beam_size, language="en",
                                             condition_on_previous_text=False, vad_filter=False)
        return " ".join(s.text.strip() for s in segments).strip()


WHISPER_WINDOW = 30  # seconds of audio in one Whisper input (its feature extractor's n_samples)


@dataclass
class TransformersWhisperASR:
    """Any `transformers` Whisper (e.g. openai/whisper-large-v3, as UltraEval-Audio uses)."""

    name_or_path: str = "openai/whisper-large-v3"

    def __post_init__(self) -> None:
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor


        folder = resolve(self.name_or_path)
        try:
            self._proc = WhisperProcessor.from_pretrained(folder)
            with no_loading_bar():
                self._model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot load Whisper from {folder}: {e}") from e
        self._torch = torch
        self.name = f"transformers:{self.name_or_path}"

    def transcribe(self, audio: np.ndarray, sample_rate: int = 16000) -> str:
        wav = _to_16k(audio, sample_rate)
        if wav.size == 0:
            return ""
        n = int(getattr(self._proc.feature_extractor, "n_samples", WHISPER_WINDOW * 16000))
        if wav.size <= n:
            return self._window(wav)
        # Whisper's long-form decoding: each window starts where the last one's speech ended
        inputs = self._proc(wav, sampling_rate=16000, return_tensors="pt", truncation=False,
                            padding="longest", return_attention_mask=True)
        with self._torch.no_grad():
            ids = self._model.generate(inputs.input_features, attention_mask=inputs.attention_mask,
                                       return_timestamps=True)
        return self._proc.batch_decode(ids, skip_special_tokens=True)[0].strip()

    def _window(self, wav: np.ndarray) -> str:
        """At most one window (30 s) of 16 kHz audio, padded to it."""
        feats = self._proc(wav, sampling_rate=16000, return_tensors="pt").input_features
        with self._torch.no_grad():
            ids = self._model.generate(feats, max_new_tokens=200)
        return self._proc.batch_decode(ids, skip_special_tokens=True)[0].strip()


def check_asr_spec(spec: str) -> tuple[str, str]:
    """`(kind, argument)` of an ASR spec, refused at once when the kind is unknown (before
    anything slow is loaded)."""
    kind, _, arg = spec.partition(":")
    if kind not in ("faster-whisper", "transformers"):
        raise CheckpointError(f"unknown ASR {spec!r}; use faster-whisper[:PATH] or "
                              "transformers[:NAME]")
    return kind, arg


def make_asr(spec: str) -> ASR:
    """`faster-whisper[:PATH]` or `transformers[:NAME_OR_PATH]`."""
    kind, arg = check_asr_spec(spec)
    if kind == "faster-whisper":
        return FasterWhisperASR(arg or None)
    return TransformersWhisperASR(arg or "openai/whisper-large-v3")
