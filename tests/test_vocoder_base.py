"""The vocoder interface (`echox.vocoder.base`): crossfades and the default streaming."""

from __future__ import annotations

import numpy as np
import pytest

from echox.errors import VocoderInputError
from echox.vocoder.base import ChunkAudio, StreamCrossfader, Vocoder, crossfade


def test_crossfade_helpers() -> None:
    x = np.random.default_rng(0).standard_normal(32).astype(np.float32)
    np.testing.assert_allclose(crossfade(x, x, "linear"), x, atol=1e-6)  # same audio stays put
    ramp = crossfade(np.ones(4, np.float32), np.zeros(4, np.float32), "linear")
    assert np.all(np.diff(ramp) < 0)
    fader = StreamCrossfader(4)
    out = [fader.push(np.arange(10, dtype=np.float32)), fader.push(np.arange(10, 20, dtype=np.float32) + 100, 0)]
    out.append(fader.flush())
    stream = np.concatenate(out)
    assert len(stream) == 20 - 4  # overlapping join without preroll shortens by the fade
    np.testing.assert_array_equal(stream[:6], np.arange(6))


class _Counting(Vocoder):
    """Ten samples of 0.5 per unit at 1 kHz."""

    @property
    def sample_rate(self) -> int:
        return 1000

    def synthesize(self, units: list[int]) -> np.ndarray:
        return np.full(len(units) * 10, 0.5, dtype=np.float32)


def test_generic_vocoder_default_stream() -> None:
    """A vocoder that implements only `synthesize` streams with overlapping crossfades."""
    voc = _Counting()
    out = np.concatenate(list(voc.synthesize_stream([[1, 2], [3, 4, 5]], crossfade_ms=4.0)))
    assert len(out) == 50 - 4
    assert isinstance(voc.synthesize_chunk([1], [0], 4), ChunkAudio)
    with pytest.raises(VocoderInputError):
        list(voc.synthesize_stream([[1]], crossfade_ms=-1))


@pytest.mark.parametrize("chunk", [[1.5, 2.7], "12", [[1, 2], [3, 4]], None, 7, [True]])
def test_stream_refuses_chunks_that_are_not_integer_ids(chunk: object) -> None:
    """`int()` would truncate 1.5 to unit 1 and read the string "12" as units 1, 2."""
    with pytest.raises(VocoderInputError, match="unit chunk 1 must be integer ids"):
        list(_Counting().synthesize_stream([[1, 2], chunk]))  # type: ignore[list-item]


def test_stream_accepts_int_arrays_and_refuses_bad_options() -> None:
    import torch

    chunks = [np.array([1, 2], np.int32), torch.tensor([3, 4]), (5,), [], iter([6])]
    assert sum(len(p) for p in _Counting().synthesize_stream(chunks, crossfade_ms=0)) == 60
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(VocoderInputError, match="crossfade_ms"):
            list(_Counting().synthesize_stream([[1]], crossfade_ms=bad))
    for ctx in (-1, 2.5):
        with pytest.raises(VocoderInputError, match="context_units"):
            list(_Counting().synthesize_stream([[1]], context_units=ctx))  # type: ignore[arg-type]
