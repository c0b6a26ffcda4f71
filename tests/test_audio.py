"""Tests for echox.audio: real files written with soundfile in tmp_path, no mocks of the codecs."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import soundfile as sf

from echox.audio import (
    AudioInfo,
    AudioWarning,
    audio_duration,
    audio_info,
    load_audio,
    save_audio,
    split_audio,
)
from echox.errors import AudioError


def sine(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)  # [T]


def peak_hz(wav: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.fft.rfftfreq(len(wav), 1 / sr)[np.argmax(spec)])


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    ("suffix", "subtype", "atol"),
    [
        (".wav", "PCM_16", 1e-4),
        (".flac", "PCM_16", 1e-4),
        (".wav", "FLOAT", 0.0),
        (".ogg", "VORBIS", None),
    ],
)
def test_round_trip(tmp_path: Path, suffix: str, subtype: str, atol: float | None) -> None:
    x = sine(440.0, 0.5, 16000)
    path = save_audio(tmp_path / f"a{suffix}", x, 16000, subtype=subtype)
    y = load_audio(path, 16000)
    assert y.dtype == np.float32 and y.ndim == 1
    assert y.shape == x.shape
    if atol is None:  # lossy Vorbis: same tone, close waveform
        assert abs(peak_hz(y, 16000) - 440.0) < 3.0
        assert np.corrcoef(x, y)[0, 1] > 0.95
    else:
        np.testing.assert_allclose(y, x, atol=atol)


def test_bytes_and_str_path(tmp_path: Path) -> None:
    x = sine(300.0, 0.25, 16000)
    path = save_audio(tmp_path / "b.flac", x, 16000)
    from_bytes = load_audio(path.read_bytes(), 16000)
    from_str = load_audio(str(path), 16000)
    np.testing.assert_array_equal(from_bytes, from_str)


def test_stereo_file_downmix(tmp_path: Path) -> None:
    left = sine(440.0, 0.2, 16000, amp=0.4)
    right = np.full_like(left, 0.2)
    sf.write(tmp_path / "st.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    y = load_audio(tmp_path / "st.wav", 16000)
    np.testing.assert_allclose(y, (left + right) / 2, atol=1e-6)


def test_array_channel_rule() -> None:
    left = sine(440.0, 0.1, 8000)
    right = -0.5 * left
    tc = np.stack([left, right], axis=1)  # [T, C]
    ct = tc.T.copy()  # [C, T]
    a = load_audio(tc, 8000, orig_sr=8000)
    b = load_audio(ct, 8000, orig_sr=8000)
    np.testing.assert_allclose(a, (left + right) / 2, atol=1e-7)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(AudioError, match="ambiguous"):
        load_audio(np.ones((3, 3), np.float32), 8000, orig_sr=8000)
    with pytest.raises(AudioError, match="3-D"):
        load_audio(np.ones((2, 3, 400), np.float32), 8000, orig_sr=8000)


def test_int16_array_is_scaled_not_normalised() -> None:
    x = np.array([0, 16384, -32768, 8192], dtype=np.int16)
    y = load_audio(x, 16000, orig_sr=16000)
    np.testing.assert_allclose(y, [0.0, 0.5, -1.0, 0.25])


def test_resample_keeps_duration_and_frequency(tmp_path: Path) -> None:
    x = sine(1000.0, 1.0, 22050)
    sf.write(tmp_path / "r.wav", x, 22050, subtype="FLOAT")
    y = load_audio(tmp_path / "r.wav", 16000)
    assert y.shape == (16000,)
    assert abs(peak_hz(y, 16000) - 1000.0) <= 1.0
    # amplitude preserved (no hidden normalisation), away from the filter edges
    assert abs(np.abs(y[2000:-2000]).max() - 0.5) < 0.01


def test_array_resample_up() -> None:
    y = load_audio(sine(500.0, 0.5, 8000), 16000, orig_sr=8000)
    assert y.shape == (8000,)
    assert abs(peak_hz(y, 16000) - 500.0) <= 2.0


def test_orig_sr_must_match_file(tmp_path: Path) -> None:
    path = save_audio(tmp_path / "m.wav", sine(440.0, 0.1, 16000), 16000)
    assert load_audio(path, 16000, orig_sr=16000).shape == (1600,)
    with pytest.raises(AudioError, match="disagrees"):
        load_audio(path, 16000, orig_sr=22050)


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="not found") as exc:
        load_audio(tmp_path / "nope.wav")
    assert "nope.wav" in str(exc.value)


def test_a_name_the_file_system_refuses_is_an_audio_error(tmp_path: Path) -> None:
    """Path.exists() raises for a name over the file system's limit (Python 3.11): an OSError
    that callers catching AudioError let through."""
    with pytest.raises(AudioError, match="cannot read it"):
        load_audio(tmp_path / ("x" * 300 + ".wav"))


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="not a regular file"):
        load_audio(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty \(0 bytes\)"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(AudioError, match="empty"):
        load_audio(b"")


def test_non_audio_bytes(tmp_path: Path) -> None:
    junk = b"this is definitely not a RIFF header" * 10
    (tmp_path / "junk.wav").write_bytes(junk)
    with pytest.raises(AudioError, match="junk.wav.*not a readable audio file"):
        load_audio(tmp_path / "junk.wav")
    with pytest.raises(AudioError, match="not a readable audio file"):
        load_audio(junk)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_array(bad: float) -> None:
    x = sine(440.0, 0.1, 16000)
    x[10] = bad
    with pytest.raises(AudioError, match="non-finite"):
        load_audio(x, orig_sr=16000)


def test_nan_in_float_wav_file(tmp_path: Path) -> None:
    x = sine(440.0, 0.1, 16000)
    x[5] = np.nan
    sf.write(tmp_path / "nan.wav", x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav.*1 NaN"):
        load_audio(tmp_path / "nan.wav")


def test_zero_length(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="zero length"):
        load_audio(np.zeros(0, np.float32), orig_sr=16000)
    sf.write(tmp_path / "zero.wav", np.zeros(0, np.float32), 16000)
    assert (tmp_path / "zero.wav").stat().st_size > 0  # a valid header with no frames
    with pytest.raises(AudioError, match="zero.wav.*zero length"):
        load_audio(tmp_path / "zero.wav")


def test_too_long_error_and_truncate(tmp_path: Path) -> None:
    x = sine(440.0, 3.0, 8000)
    sf.write(tmp_path / "long.wav", x, 8000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"3\.00 s.*limit of 2 s"):
        load_audio(tmp_path / "long.wav", 16000, max_seconds=2.0)
    with pytest.raises(AudioError, match=r"3\.00 s.*limit of 2 s"):
        load_audio(x, 16000, max_seconds=2.0, orig_sr=8000)
    y = load_audio(tmp_path / "long.wav", 16000, max_seconds=2.0, on_too_long="truncate")
    assert y.shape == (32000,)
    z = load_audio(x, 8000, max_seconds=2.0, orig_sr=8000, on_too_long="truncate")
    np.testing.assert_array_equal(z, x[:16000])
    assert load_audio(x, 8000, max_seconds=None, orig_sr=8000).shape == (24000,)
    # exactly at the limit passes
    assert load_audio(x[:16000], 8000, max_seconds=2.0, orig_sr=8000).shape == (16000,)


@pytest.mark.parametrize("rate", [0, -16000, 16000.0, True])
def test_bad_sample_rates(rate: object) -> None:
    x = sine(440.0, 0.1, 16000)
    with pytest.raises(AudioError, match="sample rate"):
        load_audio(x, rate, orig_sr=16000)  # type: ignore[arg-type]
    with pytest.raises(AudioError, match="sample rate"):
        load_audio(x, 16000, orig_sr=rate)  # type: ignore[arg-type]


def test_bad_arguments() -> None:
    x = sine(440.0, 0.1, 16000)
    with pytest.raises(AudioError, match="orig_sr is required"):
        load_audio(x)
    with pytest.raises(AudioError, match="on_too_long"):
        load_audio(x, orig_sr=16000, on_too_long="drop")  # type: ignore[arg-type]
    with pytest.raises(AudioError, match="max_seconds"):
        load_audio(x, orig_sr=16000, max_seconds=0)
    with pytest.raises(AudioError, match="unsupported audio source"):
        load_audio(123)  # type: ignore[arg-type]
    with pytest.raises(AudioError, match="dtype"):
        load_audio(np.array(["a", "b"]), orig_sr=16000)


def test_audio_error_is_value_error() -> None:
    assert issubclass(AudioError, ValueError)
    assert issubclass(AudioWarning, UserWarning)


def test_silence_warns_not_errors(tmp_path: Path) -> None:
    with pytest.warns(AudioWarning, match="silent"):
        y = load_audio(np.zeros(1600, np.float32), orig_sr=16000)
    assert y.shape == (1600,) and not y.any()
    sf.write(tmp_path / "quiet.wav", np.full(800, 1e-5, np.float32), 16000, subtype="FLOAT")
    with pytest.warns(AudioWarning, match="quiet.wav"):
        load_audio(tmp_path / "quiet.wav")
    with warnings.catch_warnings():
        warnings.simplefilter("error", AudioWarning)
        load_audio(sine(440.0, 0.1, 16000), orig_sr=16000)  # a real signal does not warn


# ----------------------------------------------------------------------------- split


def test_split_audio_lengths() -> None:
    wav = np.arange(25, dtype=np.float32)
    parts = split_audio(wav, sr=10, max_seconds=1.0)
    assert [len(p) for p in parts] == [10, 10, 5]
    np.testing.assert_array_equal(np.concatenate(parts), wav)

    parts = split_audio(wav, sr=10, max_seconds=1.0, overlap_seconds=0.5)
    assert [int(p[0]) for p in parts] == [0, 5, 10, 15]
    assert [len(p) for p in parts] == [10, 10, 10, 10]

    assert [len(p) for p in split_audio(wav[:10], 10, 1.0)] == [10]
    assert [len(p) for p in split_audio(wav[:3], 10, 1.0)] == [3]

    parts[0][0] = 99.0  # chunks are copies
    assert wav[0] == 0.0


def test_split_audio_errors() -> None:
    wav = np.zeros(100, np.float32)
    with pytest.raises(AudioError, match="overlap_seconds"):
        split_audio(wav, 10, 1.0, overlap_seconds=1.0)
    with pytest.raises(AudioError, match="max_seconds"):
        split_audio(wav, 10, 0.0)
    with pytest.raises(AudioError, match="1-D"):
        split_audio(np.zeros((2, 50)), 10, 1.0)
    with pytest.raises(AudioError, match="zero-length"):
        split_audio(np.zeros(0), 10, 1.0)
    with pytest.raises(AudioError, match="shorter than one sample"):
        split_audio(wav, 10, 0.01)


# ----------------------------------------------------------------------------- save / info


def test_save_creates_dirs_and_is_16bit_by_default(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "out.wav"
    out = save_audio(target, sine(440.0, 0.1, 16000), 16000)
    assert out == target and target.is_file()
    info = audio_info(target)
    assert info == AudioInfo(
        sample_rate=16000, frames=1600, channels=1, format="WAV", subtype="PCM_16"
    )
    save_audio(target, sine(440.0, 0.1, 16000), 16000, subtype="float")
    assert audio_info(target).subtype == "FLOAT"


def test_save_atomic_replace_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "x.wav"
    save_audio(target, np.zeros(100, np.float32), 8000)
    save_audio(target, sine(440.0, 0.5, 8000), 8000)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.wav"]
    assert audio_info(target).frames == 4000


def test_save_failure_keeps_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "keep.wav"
    save_audio(target, np.full(100, 0.25, np.float32), 8000)
    before = target.read_bytes()

    def broken_write(fh: BinaryIO, *args: object, **kwargs: object) -> None:
        fh.write(b"RIFF partial")  # a crash half-way through writing
        raise OSError("disk full")

    monkeypatch.setattr("echox.audio.sf.write", broken_write)
    with pytest.raises(AudioError, match="keep.wav.*cannot be written.*disk full"):
        save_audio(target, sine(440.0, 0.5, 8000), 8000)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.wav"]


def test_save_refuses_bad_input(tmp_path: Path) -> None:
    x = sine(440.0, 0.1, 16000)
    bad = x.copy()
    bad[3] = np.nan
    with pytest.raises(AudioError, match="non-finite"):
        save_audio(tmp_path / "n.wav", bad, 16000)
    with pytest.raises(AudioError, match="zero-length"):
        save_audio(tmp_path / "z.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="suffix"):
        save_audio(tmp_path / "a.mp4", x, 16000)
    with pytest.raises(AudioError, match="not valid for FLAC"):
        save_audio(tmp_path / "a.flac", x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="sample rate"):
        save_audio(tmp_path / "a.wav", x, 0)
    assert list(tmp_path.iterdir()) == []


def test_save_out_of_range_needs_clip(tmp_path: Path) -> None:
    x = np.array([0.0, 1.5, -2.0, 0.5] * 10, np.float32)
    with pytest.raises(AudioError, match="peak 2.000"):
        save_audio(tmp_path / "c.wav", x, 8000)
    save_audio(tmp_path / "c.wav", x, 8000, clip=True)
    y, _ = sf.read(tmp_path / "c.wav", dtype="float32")
    assert y.max() <= 1.0 and y.min() >= -1.0 and y[1] > 0.99 and y[2] == -1.0
    save_audio(tmp_path / "f.wav", x, 8000, subtype="FLOAT")  # float keeps the range
    np.testing.assert_array_equal(sf.read(tmp_path / "f.wav", dtype="float32")[0], x)


def test_audio_duration(tmp_path: Path) -> None:
    path = save_audio(tmp_path / "d.flac", sine(440.0, 1.25, 16000), 16000)
    assert audio_duration(path) == pytest.approx(1.25)
    with pytest.raises(AudioError, match="not found"):
        audio_duration(tmp_path / "missing.wav")
    (tmp_path / "bad.wav").write_bytes(b"garbage" * 20)
    with pytest.raises(AudioError, match="bad.wav.*not a readable audio file"):
        audio_duration(tmp_path / "bad.wav")
    (tmp_path / "empty.flac").write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        audio_duration(tmp_path / "empty.flac")


# ----------------------------------------------------------------------------- truncated WAV


def _wav_bytes(x: np.ndarray, sr: int = 16000, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def test_truncated_wav_is_refused(tmp_path: Path) -> None:
    whole = _wav_bytes(sine(440.0, 1.0, 16000))  # 16000 samples, 32000 bytes of PCM_16
    assert len(whole) == 44 + 32000
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole[:44 + 16000])  # the second half is missing
    with pytest.raises(AudioError, match=r"cut\.wav.*truncated.*header says 16000 samples"
                                         r".*file holds 8000") as exc:
        load_audio(cut)
    assert "\n" not in str(exc.value)
    with pytest.raises(AudioError, match="truncated"):
        load_audio(whole[:44 + 16000])  # the same as bytes
    (tmp_path / "head.wav").write_bytes(whole[:44])  # a header and no samples at all
    with pytest.raises(AudioError, match=r"head\.wav.*truncated.*file holds 0"):
        load_audio(tmp_path / "head.wav")
    # stereo float: counted in frames of both channels
    st = _wav_bytes(np.stack([sine(440.0, 0.5, 8000)] * 2, axis=1), 8000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"header says 4000 samples.*holds 3999"):
        load_audio(st[:-1])


def test_a_cut_mp3_is_refused_and_a_whole_one_loads(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """libsndfile decodes what is left of a cut MP3 and keeps the header's length: half a
    question was answered as if it were the whole one. libmpg123's own "Warning: Xing stream
    size off ..." lines no longer come before the one-line error."""
    x = sine(440.0, 2.0, 16000)
    whole = _wav_bytes(x, 16000, fmt="MP3", subtype="MPEG_LAYER_III")
    wav = load_audio(whole)
    assert wav.ndim == 1 and abs(wav.size - x.size) <= 0.01 * x.size
    (tmp_path / "cut.mp3").write_bytes(whole[: len(whole) // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AudioError, match=r"cut\.mp3': truncated audio file: the header says "
                                             r"2\.00 s, 0\.\d\d s could be decoded"):
            load_audio(tmp_path / "cut.mp3")
    (tmp_path / "cut5.mp3").write_bytes(whole[: len(whole) // 5])
    capfd.readouterr()
    for read in (load_audio, audio_info):
        try:
            read(tmp_path / "cut5.mp3")
        except AudioError:
            pass
    assert "Xing" not in capfd.readouterr().err


def test_wav_cut_inside_its_header_is_a_clear_error(tmp_path: Path) -> None:
    """Every prefix of a WAV file is refused with an AudioError (never a struct.error), by
    load_audio and by audio_info, which also refuses a file cut inside its samples."""
    from echox.audio import audio_info

    whole = _wav_bytes(sine(440.0, 0.1, 16000))
    for n in range(1, 44):
        with pytest.raises(AudioError):
            load_audio(whole[:n])
    (tmp_path / "cut.wav").write_bytes(whole[:100])
    with pytest.raises(AudioError, match=r"cut\.wav.*truncated WAV file"):
        audio_info(tmp_path / "cut.wav")
    (tmp_path / "ok.wav").write_bytes(whole)
    assert audio_info(tmp_path / "ok.wav").frames == 1600


def test_save_audio_turns_os_errors_into_one_line(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import echox.audio as audio_mod

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audio_mod, "atomic_open", full_disk)
    with pytest.raises(AudioError, match=r"a\.wav.*cannot be written \(No space left on device\)"):
        save_audio(tmp_path / "a.wav", sine(440.0, 0.1, 16000), 16000)


@pytest.mark.parametrize(
    ("fmt", "subtype"),
    [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("WAV", "PCM_24"), ("WAVEX", "PCM_16"),
     ("RF64", "PCM_16"), ("WAV", "ULAW")],
)
def test_complete_wavs_still_load(tmp_path: Path, fmt: str, subtype: str) -> None:
    x = sine(440.0, 0.3, 16000)
    data = _wav_bytes(x, fmt=fmt, subtype=subtype)
    (tmp_path / "ok.wav").write_bytes(data)
    assert load_audio(tmp_path / "ok.wav").shape == x.shape
    assert load_audio(data).shape == x.shape
    if fmt == "RF64":  # an RF64 cut short is caught through its ds64 size as well
        with pytest.raises(AudioError, match="truncated"):
            load_audio(data[:-200])


def test_wav_with_trailing_chunk_and_streamed_size(tmp_path: Path) -> None:
    x = sine(440.0, 0.25, 16000)
    data = bytearray(_wav_bytes(x))
    # a LIST chunk after the samples (odd length: padded) is not a truncation
    extra = b"LIST" + (5).to_bytes(4, "little") + b"INFO!" + b"\x00"
    tail = bytes(data) + extra
    tail = tail[:4] + (len(tail) - 8).to_bytes(4, "little") + tail[8:]
    assert load_audio(tail).shape == x.shape
    # written to a pipe: RIFF and data sizes unknown (0xFFFFFFFF); libsndfile reads to the end
    streamed = bytearray(data)
    streamed[4:8] = b"\xff\xff\xff\xff"
    streamed[40:44] = b"\xff\xff\xff\xff"
    (tmp_path / "stream.wav").write_bytes(bytes(streamed))
    np.testing.assert_allclose(load_audio(tmp_path / "stream.wav"), load_audio(bytes(data)))
    # an odd-sized data chunk without its pad byte loses no sample
    odd = _wav_bytes(np.full(101, 0.25, np.float32), 8000, subtype="PCM_U8")
    assert len(odd) == 44 + 101 + 1
    assert load_audio(odd[:-1], 8000).shape == (101,)


# ----------------------------------------------------------------------------- question checks


def test_check_question_length() -> None:
    from echox.audio import MIN_QUESTION_SECONDS, check_question_length

    assert MIN_QUESTION_SECONDS == 0.1
    check_question_length(1600, 16000)  # exactly 0.1 s passes
    check_question_length(800, 8000)
    with pytest.raises(AudioError, match=r"^question audio is 0\.00 s long; a question needs "
                                         r"at least 0\.1 s of audio$"):
        check_question_length(1, 16000)
    with pytest.raises(AudioError, match=r"^'q\.wav' is 0\.0999 s long"):
        check_question_length(1599, 16000, "'q.wav'")


def test_check_output_path(tmp_path: Path) -> None:
    from echox.audio import check_output_path

    assert check_output_path(tmp_path / "new" / "deeper" / "a.wav") == tmp_path / "new/deeper/a.wav"
    assert check_output_path(tmp_path / "a.FLAC").suffix == ".FLAC"
    with pytest.raises(AudioError, match=r"unsupported suffix '\.mp3'"):
        check_output_path(tmp_path / "a.mp3")
    (tmp_path / "d.wav").mkdir()
    with pytest.raises(AudioError, match="is a folder"):
        check_output_path(tmp_path / "d.wav")
    (tmp_path / "file").write_text("x")
    with pytest.raises(AudioError, match="is not a folder"):
        check_output_path(tmp_path / "file" / "a.wav")


@pytest.mark.parametrize("shape", [(2, 0), (0, 2)])
def test_empty_two_d_arrays(shape: tuple[int, int], tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="zero length"):
        load_audio(np.zeros(shape, np.float32), orig_sr=16000)
    with pytest.raises(AudioError, match="zero-length"):
        save_audio(tmp_path / "e.wav", np.zeros(shape, np.float32), 16000)
    assert list(tmp_path.iterdir()) == []


def test_absurd_sample_rates_are_refused_not_resampled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resampling from 10^12 Hz would build a filter of ~10^9 taps: the process ran out of
    memory and was killed."""
    x = sine(440.0, 0.1, 16000)

    def no_resampling(*_: object) -> None:
        raise AssertionError("resampled an absurd rate instead of refusing it")

    with monkeypatch.context() as m:
        m.setattr("echox.audio.resample_poly", no_resampling)
        with pytest.raises(AudioError, match="sample rate"):
            load_audio(x, orig_sr=10**12)
        with pytest.raises(AudioError, match="sample rate"):
            load_audio(x, 10**9, orig_sr=16000)
    assert load_audio(sine(440.0, 0.1, 768000), 16000, orig_sr=768000).shape == (1600,)



def test_rates_that_resample_only_at_a_huge_cost_are_refused(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """999,983 Hz -> 16 kHz is a polyphase filter of ~20 million taps: 10 s and a gigabyte for
    a 0.6 MB file. A rate is judged by that cost, not by its size: 352.8 kHz (441/20 of 16 kHz)
    and every rate up to 192 kHz still convert."""
    x = sine(440.0, 0.05, 999_983)
    sf.write(tmp_path / "odd.wav", x, 999_983)

    def no_resampling(*_: object) -> None:
        raise AssertionError("resampled instead of refusing")

    with monkeypatch.context() as m:
        m.setattr("echox.audio.resample_poly", no_resampling)
        for source, kw in ((tmp_path / "odd.wav", {}), (x, {"orig_sr": 999_983})):
            with pytest.raises(AudioError, match="a sample rate of 999983 Hz is not read"):
                load_audio(source, **kw)
    assert load_audio(sine(440.0, 0.1, 352_800), orig_sr=352_800).shape == (1600,)
    assert abs(load_audio(sine(440.0, 0.1, 191_999), orig_sr=191_999).size - 1600) <= 1


@pytest.mark.parametrize("peak", [200.0, 20000.0, 1e10, 1e30])
def test_samples_far_beyond_full_scale_are_refused(tmp_path: Path, peak: float) -> None:
    """Finite samples of 1e30 went through, and the model's features overflowed into NaN: a
    traceback from the sampler in `echox chat`. Int16 samples given as floats (peaks of
    thousands) were taken, and the model answered another question."""
    x = sine(440.0, 0.2, 16000) * peak
    sf.write(tmp_path / "loud.wav", x, 16000, subtype="FLOAT")
    for source, kw in ((tmp_path / "loud.wav", {}), (x, {"orig_sr": 16000})):
        with pytest.raises(AudioError, match="far outside the \\[-1, 1\\] of float audio"):
            load_audio(source, **kw)
    assert np.abs(load_audio(sine(440.0, 0.2, 16000) * 4.0, orig_sr=16000)).max() > 1.9  # hot
    assert np.abs(load_audio((sine(440.0, 0.2, 16000) * 16000).astype(np.int16),
                             orig_sr=16000)).max() < 0.5  # the integer array itself: scaled


def test_a_file_with_no_length_is_refused(tmp_path: Path) -> None:
    """A FLAC written to a pipe has no total in its header (libsndfile: 2^63 - 1 frames):
    reading it tried to allocate that many, or called it 10^14 s too long."""
    sf.write(tmp_path / "q.flac", sine(440.0, 0.5, 16000), 16000, format="FLAC", subtype="PCM_16")
    data = bytearray((tmp_path / "q.flac").read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO comes first
    data[18:26] = (int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)).to_bytes(8, "big")
    (tmp_path / "piped.flac").write_bytes(bytes(data))
    for max_seconds in (30.0, None):
        with pytest.raises(AudioError, match="piped.flac': the file does not give its length"):
            load_audio(tmp_path / "piped.flac", max_seconds=max_seconds)

def test_save_errors_from_libsndfile_are_one_line(tmp_path: Path) -> None:
    x = sine(440.0, 0.1, 16000)
    with pytest.raises(AudioError, match="with 1600 channel"):  # [C, T] given for [T, C]
        save_audio(tmp_path / "ct.wav", np.stack([x, x]), 16000)
    with pytest.raises(AudioError, match="FLAC"):
        save_audio(tmp_path / "hi.flac", x, 1_000_000)  # a rate FLAC cannot store
    with pytest.raises(AudioError, match="sample rate"):
        save_audio(tmp_path / "huge.wav", x, 10**12)
    assert list(tmp_path.iterdir()) == []
    save_audio(tmp_path / "half.wav", x.astype(np.float16), 16000)  # any float dtype is written
    assert sf.info(str(tmp_path / "half.wav")).frames == x.size


def test_saving_clips_loud_samples_that_reading_refuses(tmp_path: Path) -> None:
    """The peak limit is for reading: `save_audio(clip=True)` still clips samples of 3e9 (a
    model's runaway output) to full scale instead of refusing them."""
    x = sine(440.0, 0.1, 16000) * 6e9  # peak 3e9
    save_audio(tmp_path / "a.wav", x, 16000, clip=True)
    assert np.abs(sf.read(tmp_path / "a.wav")[0]).max() > 0.99
    with pytest.raises(AudioError, match="far outside"):
        load_audio(x, orig_sr=16000)


def test_a_limit_too_large_to_count_in_frames_allows_any_length() -> None:
    """`max_seconds=1e308` overflowed counting frames (an OverflowError traceback from
    `--max-audio-seconds 1e308`); it now means no limit, as in the encoder, which counts the
    same way."""
    from echox.model.encoder import check_speech_length

    x = sine(440.0, 0.2, 16000)
    assert load_audio(x, orig_sr=16000, max_seconds=1e308).size == 3200
    check_speech_length(10**12, 1e308)  # no error
