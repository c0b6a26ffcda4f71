"""What the streaming engine is told (`EngineConfig`) and what it yields (the events).

Split out of `echox.infer.engine`, which re-exports every name here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from echox.errors import ConfigError
from echox.model.generation import SamplingConfig

__all__ = ["AudioChunk", "EngineConfig", "Event", "Final", "LatencyStats", "Segment",
           "SegmentSpeech", "SpeechPiece", "TextDelta"]


# ----------------------------------------------------------------------------- config


def _default_sampling() -> SamplingConfig:
    return SamplingConfig(max_new_tokens=256, temperature=0.2, top_p=0.9)  # authors' demo


@dataclass
class EngineConfig:
    """How a turn is decoded and voiced."""

    sampling: SamplingConfig = field(default_factory=_default_sampling)  # text
    # echo decoder; None = its config's decoding (`t2c.beams`) and default unit cap
    unit_sampling: SamplingConfig | None = None
    stream: bool = True  # False: synthesise after the text is complete
    whole_response: bool = False  # without streaming: one echo segment, not trigger cuts
    workers: int = 1  # speech worker threads
    use_cache: bool = True
    chunk_units: int = 40  # units per audio chunk after a segment's first; 0 = whole segments
    first_chunk_units: int = 20  # a segment's first chunk: small, for early audio
    crossfade_ms: float = 10.0  # blend at each chunk join
    context_units: int | None = None  # left-context units per chunk; None = the vocoder's

    def __post_init__(self) -> None:
        for name in ("sampling", "unit_sampling"):  # a dict or "greedy" failed mid-turn
            value = getattr(self, name)
            if not isinstance(value, SamplingConfig) and not (name == "unit_sampling" and value is None):
                raise ConfigError(f"engine.{name} must be an echox.model.generation.SamplingConfig"
                                  f"{' or None' if name == 'unit_sampling' else ''}, got "
                                  f"{type(value).__name__} {value!r:.60}")
        for name in ("stream", "whole_response", "use_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"engine.{name} must be True or False, got {getattr(self, name)!r}")
        _check_int("workers", self.workers, 1)
        _check_int("chunk_units", self.chunk_units, 0)
        _check_int("first_chunk_units", self.first_chunk_units, 1)
        if self.context_units is not None:
            _check_int("context_units", self.context_units, 0)
        if (isinstance(self.crossfade_ms, bool) or not isinstance(self.crossfade_ms, (int, float))
                or not 0 <= self.crossfade_ms < float("inf")):
            raise ConfigError(f"engine.crossfade_ms must be a number >= 0, got "
                              f"{self.crossfade_ms!r}")
        if self.whole_response and self.stream:
            raise ConfigError("engine.whole_response needs stream=False (a streamed answer is "
                              "voiced segment by segment)")

    @classmethod
    def greedy(cls, max_new_tokens: int = 256, **kw: object) -> EngineConfig:
        return cls(sampling=SamplingConfig(max_new_tokens=max_new_tokens), **kw)  # type: ignore[arg-type]

    def chunk_size(self, n_chunks: int) -> int:
        """Units in a segment's chunk after `n_chunks` chunks; 0 = all that remain."""
        if self.chunk_units == 0:
            return 0
        return self.first_chunk_units if n_chunks == 0 else self.chunk_units


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"engine.{name} must be an int >= {minimum}, got {value!r}")


# ----------------------------------------------------------------------------- events


@dataclass
class TextDelta:
    text: str
    token_ids: list[int]  # the tokens this piece of text covers


@dataclass
class Segment:
    """A response span [start, end) (token indices) cut for speech."""

    index: int
    start: int
    end: int
    text: str


@dataclass
class AudioChunk:
    """A piece of one segment's speech. A segment's pieces come in order (`part` 0, 1, ...),
    the one with `last` set closes it; joined they are the segment's audio."""

    index: int  # = the Segment index it voices
    audio: np.ndarray  # [S] float32 (may be empty, e.g. for a segment without units)
    sample_rate: int
    units: list[int] = field(default_factory=list)  # units first rendered in this piece
    part: int = 0  # position within the segment
    last: bool = True


@dataclass
class LatencyStats:
    """Latency of one turn, measured from the `respond` call (prompt encoding included)."""

    prefix_tokens: int = 0  # prompt length fed to the LLM (speech frames included)
    text_tokens: int = 0
    first_text_tokens: int | None = None  # tokens decoded when the first text was yielded
    first_text_ms: float | None = None
    first_segment_tokens: int | None = None  # tokens decoded when the first segment closed
    first_audio_tokens: int | None = None  # tokens decoded when the first audio piece came
    first_audio_ms: float | None = None
    total_ms: float = 0.0
    audio_seconds: float = 0.0
    rtf: float | None = None  # processing time / audio duration
    segments: int = 0

    def format(self) -> str:
        def f(v: float | None, unit: str = "") -> str:
            if v is None:
                return "-"
            return f"{v:.1f}{unit}" if isinstance(v, float) else f"{v}{unit}"

        return (f"prompt {self.prefix_tokens} tok | text {self.text_tokens} tok | "
                f"first text {f(self.first_text_tokens)} tok / {f(self.first_text_ms, ' ms')} | "
                f"first segment {f(self.first_segment_tokens)} tok | first audio "
                f"{f(self.first_audio_tokens)} tok / {f(self.first_audio_ms, ' ms')} | total "
                f"{f(self.total_ms, ' ms')} | audio {self.audio_seconds:.2f} s | RTF "
                f"{'-' if self.rtf is None else f'{self.rtf:.2f}'} | segments {self.segments}")


@dataclass
class Final:
    text: str
    audio: np.ndarray  # [S] float32, all chunks concatenated
    sample_rate: int
    stats: LatencyStats
    token_ids: list[int] = field(default_factory=list)
    segments: list[tuple[int, int]] = field(default_factory=list)


Event = TextDelta | Segment | AudioChunk | Final


@dataclass
class SpeechPiece:
    """One piece of a segment's speech, as `Engine.stream_segment` makes it."""

    part: int
    audio: np.ndarray  # [S] float32
    tokens: list[int]  # echo-decoder tokens decoded since the previous piece
    units: list[int]  # units handed to the vocoder since the previous piece
    last: bool


@dataclass
class SegmentSpeech:
    """All of one segment's speech (its pieces joined)."""

    tokens: list[int]  # echo-decoder tokens (unit language or raw units)
    units: list[int]
    audio: np.ndarray  # [S] float32
