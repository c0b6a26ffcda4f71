"""The unit-vocoder interface, streaming, and what every vocoder shares.

`Vocoder` is what EchoX needs from a unit vocoder: an output `sample_rate` and `synthesize`
(units -> float32 mono audio). Streaming is shared: chunks of units are rendered one by one,
each with some left-context units, and joined with a short crossfade (`StreamCrossfader`).

The helpers below serve every vocoder module: `eval_mode` (render in eval mode, then restore
the mode), `skipped_chunk` (the empty audio of a chunk without valid ids), `read_json` (a
config file, with errors that name it) and `save_weights` / `load_weights` (safetensors).
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from echox.errors import (
    VocoderCheckpointError,
    VocoderConfigError,
    VocoderFileNotFoundError,
    VocoderInputError,
)
from echox.fileio import save_tensors


def crossfade(
    tail: np.ndarray, head: np.ndarray, curve: Literal["linear", "equal_power"] = "linear"
) -> np.ndarray:
    """Blend `tail` (fading out) into `head` (fading in); both [N].

    Linear keeps the amplitude of correlated signals (two renderings of the same audio);
    equal-power keeps the loudness of unrelated ones.
    """
    if tail.shape != head.shape:
        raise VocoderInputError(f"crossfade needs equal lengths, got {tail.shape} and {head.shape}")
    t = (np.arange(len(tail), dtype=np.float64) + 0.5) / max(len(tail), 1)  # [N] in (0, 1)
    if curve == "linear":
        fade_in, fade_out = t, 1.0 - t
    elif curve == "equal_power":
        fade_in, fade_out = np.sin(0.5 * np.pi * t), np.cos(0.5 * np.pi * t)
    else:
        raise VocoderInputError(f"unknown crossfade curve {curve!r}")
    return (tail * fade_out + head * fade_in).astype(np.float32)


@dataclass
class ChunkAudio:
    """Audio of one streamed chunk. The first `preroll` samples re-render the end of the left
    context (the audio just before the chunk) so that they can be crossfaded in place."""

    audio: np.ndarray  # [S] float32
    preroll: int = 0


class StreamCrossfader:
    """Joins chunk audio into one stream; the explicit state of `Vocoder.synthesize_stream`.

    It holds back the last `fade_samples` of what it has seen. When the next chunk comes with
    a preroll, the held tail and the preroll cover the same time span and are blended
    linearly: the stream keeps its length. Without a preroll the held tail overlaps the
    chunk's first samples (equal-power), which shortens the stream by the overlap per join.
    """

    def __init__(self, fade_samples: int) -> None:
        if fade_samples < 0:
            raise VocoderInputError(f"fade_samples must be >= 0, got {fade_samples}")
        self.fade_samples = fade_samples
        self._tail: np.ndarray | None = None  # [<= fade_samples]

    def push(self, audio: np.ndarray, preroll: int = 0) -> np.ndarray:
        """Add one chunk's audio; return the samples that are final now."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)  # [S]
        preroll = min(max(preroll, 0), len(audio))
        tail = self._tail
        if tail is None:
            seg = audio[preroll:]
        elif preroll > 0:
            k = min(preroll, len(tail))
            blended = crossfade(tail[len(tail) - k :], audio[preroll - k : preroll], "linear")
            seg = np.concatenate([tail[: len(tail) - k], blended, audio[preroll:]])
        else:
            k = min(self.fade_samples, len(tail), len(audio))
            blended = crossfade(tail[len(tail) - k :], audio[:k], "equal_power")
            seg = np.concatenate([tail[: len(tail) - k], blended, audio[k:]])
        hold = min(self.fade_samples, len(seg))
        self._tail = seg[len(seg) - hold :]
        return seg[: len(seg) - hold]

    def flush(self) -> np.ndarray:
        """Return the held tail at the end of the stream."""
        tail = self._tail if self._tail is not None else np.zeros(0, dtype=np.float32)
        self._tail = None
        return tail


class Vocoder(ABC):
    """What EchoX needs from a unit vocoder (`CodeHiFiGAN`, `UnitMelVocoder`).

    Implementations give `sample_rate` and `synthesize`. To stream smoothly they can also
    override `synthesize_chunk` to render a chunk with left context and return a preroll;
    the default ignores the context, and joins are then plain overlapping crossfades.
    """

    sample_rate: int  # output Hz; an attribute or a property of the implementation
    default_context_units: int = 0  # left-context units passed to `synthesize_chunk`

    @abstractmethod
    def synthesize(self, units: Sequence[int]) -> np.ndarray:
        """Render one unit sequence to float32 mono audio [S]."""

    def synthesize_chunk(
        self, units: Sequence[int], left_context: Sequence[int], preroll: int, **kwargs: Any
    ) -> ChunkAudio:
        """Render `units` given the units already rendered before them (default: no context)."""
        return ChunkAudio(self.synthesize(units, **kwargs), 0)

    def synthesize_stream(
        self,
        unit_chunks: Iterable[Sequence[int]],
        crossfade_ms: float = 10.0,
        context_units: int | None = None,
        **kwargs: Any,
    ) -> Iterator[np.ndarray]:
        """Render chunks as they arrive, yielding float32 audio pieces; empty chunks are skipped.

        Each chunk is rendered with up to `context_units` preceding units as left context
        (default `default_context_units`), and `crossfade_ms` of audio at each join is
        crossfaded. The last `crossfade_ms` of a chunk is held back until the next chunk (or
        the end). Extra keyword options go to the implementation's `synthesize_chunk`.
        """
        if not (isinstance(crossfade_ms, numbers.Real) and 0 <= crossfade_ms < math.inf):
            raise VocoderInputError(f"crossfade_ms must be a finite number >= 0, "
                                    f"got {crossfade_ms!r}")
        if context_units is not None and (isinstance(context_units, bool) or not isinstance(
                context_units, numbers.Integral) or context_units < 0):
            raise VocoderInputError(f"context_units must be an integer >= 0, got {context_units!r}")
        n_ctx = self.default_context_units if context_units is None else int(context_units)
        fader = StreamCrossfader(int(round(crossfade_ms * self.sample_rate / 1000.0)))
        history: list[int] = []
        for i, chunk in enumerate(unit_chunks):
            chunk = unit_ids(chunk, f"unit chunk {i}")
            if not chunk:
                continue
            context = history[max(0, len(history) - n_ctx) :] if n_ctx > 0 else []
            out = self.synthesize_chunk(chunk, context, fader.fade_samples, **kwargs)
            piece = fader.push(out.audio, out.preroll)
            history = (history + chunk)[max(0, len(history) + len(chunk) - n_ctx) :]
            if piece.size:
                yield piece
        tail = fader.flush()
        if tail.size:
            yield tail


# ----------------------------------------------------------------------------- shared helpers


def unit_ids(units: Any, what: str = "units") -> list[int]:
    """`units` (a list, numpy array or tensor of integer ids [T]) as a list of ints; anything
    else (floats, bools, a string, a 2-D array) is a `VocoderInputError` naming `what`. Range
    checks are the vocoder's own (it drops ids outside its codebook)."""
    given = type(units).__name__
    try:
        if isinstance(units, torch.Tensor):
            units = units.detach().cpu()
        elif not isinstance(units, (np.ndarray, list, tuple)):
            units = list(units)  # an iterator of ids (a string becomes characters: refused)
        arr = np.asarray(units)
    except (TypeError, ValueError) as exc:  # not iterable, a ragged list, ...
        raise VocoderInputError(f"{what} must be integer ids [T], got {given}") from exc
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise VocoderInputError(f"{what} must be integer ids [T], got {given} of {arr.dtype} "
                                f"{arr.shape}")
    return [int(u) for u in arr.tolist()]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run the block with `module` in eval mode (dropout off), then restore its mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def skipped_chunk(units: Sequence[int]) -> ChunkAudio:
    """The empty audio of a streamed chunk without valid unit ids, with a warning, so that one
    bad chunk does not end a stream. Called from a `synthesize_chunk`, whose caller's caller
    the warning names."""
    warnings.warn(f"skipped a chunk without valid unit ids ({len(units)})", stacklevel=4)
    return ChunkAudio(np.zeros(0, dtype=np.float32), 0)


def read_json(path: Path, what: str) -> Any:
    """The parsed JSON file `path`; `what` names it in the not-found error."""
    if not path.is_file():
        raise VocoderFileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise VocoderConfigError(f"{path}: not valid JSON ({exc})") from exc


def save_weights(module: nn.Module, path: Path, dtype: torch.dtype | None = None) -> None:
    """`module`'s state dict as safetensors; `dtype` (e.g. float16) stores floating tensors
    smaller, and `load_weights` casts them back."""
    state = {k: _stored(v, dtype) for k, v in module.state_dict().items()}
    save_tensors(state, path, metadata={"format": "pt"})


def load_weights(module: nn.Module, path: Path) -> None:
    """Load a `save_weights` file into `module` strictly; errors name the file."""
    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several error types
        raise VocoderCheckpointError(f"cannot read {path}: {exc}") from exc
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise VocoderCheckpointError(f"{path} does not fit its config: {str(exc)[:400]}") from exc


def _stored(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A detached CPU copy for safetensors, floating tensors cast to `dtype` when given."""
    t = t.detach().cpu()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous().clone()
