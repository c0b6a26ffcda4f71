"""Audio I/O: load, resample, split and save waveforms.

Every model part of EchoX (Whisper encoder, unit extractor, vocoder) expects float32 mono at a
fixed rate, so this module is the single gate that turns user input (files, raw bytes, arrays)
into that form. It fails loudly with :class:`AudioError` on anything it cannot use, and it never
clips or normalises silently.
"""

from __future__ import annotations

import contextlib
import io
import math
import numbers
import os
import struct
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from echox.errors import AudioError
from echox.fileio import atomic_open

__all__ = [
    "AudioWarning",
    "AudioInfo",
    "AudioSource",
    "MAX_SAMPLE_RATE",
    "MIN_SPEECH_RATE",
    "MIN_QUESTION_SECONDS",
    "SILENCE_PEAK",
    "audio_info",
    "check_output_path",
    "check_question_length",
    "audio_duration",
    "load_audio",
    "split_audio",
    "save_audio",
]

AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray]

#: Peak amplitude below which an input is treated as silence (warned about, not rejected).
SILENCE_PEAK = 1e-4

#: Highest sample rate accepted, in Hz (768 kHz is the highest in common use). Resampling
#: from a much higher rate would build a filter of billions of taps and run out of memory.
MAX_SAMPLE_RATE = 1_000_000

#: Largest up or down factor of a resampling (192 kHz -> 16 kHz is 12): the filter grows with
#: it, so 999,983 Hz -> 16 kHz (a factor of 999,983) would take seconds and a gigabyte. Every
#: rate up to this many Hz converts to any rate up to it.
MAX_RESAMPLE_FACTOR = 192_000

#: Largest sample magnitude read. Float audio is in [-1, 1] (a hot recording goes somewhat
#: past it); samples of thousands are integer PCM given as floats (int16 cast without dividing
#: by 32768), whose features are not speech's: the model answered another question, silently.
#: Finite values far beyond it (1e20) overflowed the features into NaN.
MAX_PEAK = 64.0

#: Shortest spoken question accepted, in seconds: less is a click, not a question.
MIN_QUESTION_SECONDS = 0.1
#: Telephone speech's rate: below it a file holds no intelligible speech (a 1 Hz header made
#: five samples into five seconds of question).
MIN_SPEECH_RATE = 8000

# Container formats this module writes, keyed by file suffix.
_WRITE_FORMATS: dict[str, str] = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG"}


class AudioWarning(UserWarning):
    """Usable but suspicious audio (e.g. silence-only input)."""


@dataclass(frozen=True)
class AudioInfo:
    """Header facts of an audio file, read without decoding the samples."""

    sample_rate: int
    frames: int
    channels: int
    format: str
    subtype: str

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.frames / self.sample_rate


# --------------------------------------------------------------------------- validation helpers


def _check_rate(value: object, name: str) -> int:
    """Return ``value`` as a positive int; rejects bools, floats and non-positive rates."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise AudioError(f"{name} must be a positive integer sample rate in Hz, got {value!r}")
    rate = int(value)
    if not 0 < rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"{name} must be a sample rate in (0, {MAX_SAMPLE_RATE}] Hz, got {rate}")
    return rate


def _describe(source: AudioSource) -> str:
    """A short name for ``source`` to put in error messages."""
    if isinstance(source, np.ndarray):
        return f"<array shape={source.shape} dtype={source.dtype}>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    return f"<{type(source).__name__}>"


def _check_finite(wav: np.ndarray, where: str) -> None:
    """Reject NaN/inf: they poison every downstream feature (log-mel, units) silently."""
    if not np.all(np.isfinite(wav)):
        n_nan = int(np.isnan(wav).sum())
        n_inf = int(np.isinf(wav).sum())
        raise AudioError(f"{where}: audio contains non-finite samples ({n_nan} NaN, {n_inf} inf)")


def _check_peak(wav: np.ndarray, where: str) -> None:
    """Reject finite samples beyond `MAX_PEAK` on reading: they overflow the features into NaN
    (a traceback from the sampler, once). Writing clips them instead (`save_audio(clip=True)`)."""
    peak = float(np.max(np.abs(wav))) if wav.size else 0.0
    if peak > MAX_PEAK:
        raise AudioError(f"{where}: samples reach {peak:.3g}, far outside the [-1, 1] of float "
                         "audio: integer PCM given as floats? (divide int16 samples by 32768, or "
                         "give the integer array itself)")


def _check_resample(rate: int, sr: int, where: str) -> None:
    """Refuse a conversion whose polyphase filter would be huge (`MAX_RESAMPLE_FACTOR`)."""
    if rate != sr and max(rate, sr) // math.gcd(rate, sr) > MAX_RESAMPLE_FACTOR:
        raise AudioError(f"{where}: a sample rate of {rate} Hz is not read: converting it to "
                         f"{sr} Hz would take seconds and gigabytes (any rate up to "
                         f"{MAX_RESAMPLE_FACTOR} Hz is read; resample the file)")


def max_frames(max_seconds: float, sr: int) -> int:
    """Frames allowed in ``max_seconds`` at ``sr`` (tiny epsilon so 30.0 s of audio passes); a
    limit too large to count in frames (``1e308`` s) allows any length."""
    frames = max_seconds * sr + 1e-6
    return int(math.floor(frames)) if math.isfinite(frames) else sys.maxsize


# --------------------------------------------------------------------------- reading


def audio_info(path: str | os.PathLike | bytes | bytearray | memoryview) -> AudioInfo:
    """Read an audio file's header (rate, frames, channels) without decoding it; `path` may
    also be the file's bytes.

    Raises:
        AudioError: the file is missing, empty, not a format soundfile can read, or a WAV
            file shorter than its header says.
    """
    if isinstance(path, (bytes, bytearray, memoryview)):
        if len(path) == 0:
            raise AudioError("audio bytes are empty")
        handle: str | io.BytesIO = io.BytesIO(bytes(path))
        name = "audio bytes"
    else:
        handle = str(_existing_file(path))
        name = f"'{handle}'"
    try:
        with _native_stderr_quiet():
            info = sf.info(handle)
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError(f"{name}: not a readable audio file ({err})") from err
    if info.samplerate <= 0:
        raise AudioError(f"{name}: header gives an invalid sample rate {info.samplerate}")
    if isinstance(handle, io.BytesIO):
        handle.seek(0)
    check_wav_complete(handle, name)  # libsndfile's frame count trusts a cut file
    return AudioInfo(
        sample_rate=int(info.samplerate),
        frames=int(info.frames),
        channels=int(info.channels),
        format=str(info.format),
        subtype=str(info.subtype),
    )


def audio_duration(path: str | os.PathLike) -> float:
    """Length of an audio file in seconds, from its header only (cheap for dataset filtering)."""
    return audio_info(path).duration


def _existing_file(path: str | os.PathLike) -> Path:
    """Check that ``path`` is a non-empty regular file, with a clear error otherwise."""
    p = Path(path)
    try:
        if not p.exists():
            raise AudioError(f"'{p}': audio file not found")
        if not p.is_file():
            raise AudioError(f"'{p}': not a regular file")
        empty = p.stat().st_size == 0
    except OSError as e:  # a name too long for the file system, a path through a file, ...
        raise AudioError(f"'{p}': cannot read it ({e.strerror or e})") from e
    if empty:
        raise AudioError(f"'{p}': audio file is empty (0 bytes)")
    return p


# A WAV data chunk size that means "unknown length" (a stream written to a pipe).
_UNKNOWN_SIZE = 0xFFFFFFFF


def _wav_shortfall(fh: io.BufferedIOBase | io.BytesIO, total: int) -> tuple[int, int, int] | None:
    """``(bytes the header claims, bytes the file holds, block align)`` of a RIFF/RIFX/RF64
    WAVE file whose data chunk runs past the end of the file; None for a complete file, one
    whose data size is unknown (0 or 0xFFFFFFFF: streamed), or anything that is not a WAVE.

    libsndfile reads such a file without a word, shortening it to what is there, so a
    cut-off download or copy would be answered as if it were the whole question.
    """
    head = fh.read(12)
    if len(head) < 12 or head[8:12] != b"WAVE" or head[:4] not in (b"RIFF", b"RIFX", b"RF64"):
        return None
    order = ">" if head[:4] == b"RIFX" else "<"
    data64: int | None = None  # RF64: the real data size lives in the ds64 chunk
    align = 0
    pos = 12
    while pos + 8 <= total:
        fh.seek(pos)
        cid = fh.read(4)
        (size,) = struct.unpack(order + "I", fh.read(4))
        body = pos + 8
        if cid in (b"ds64", b"fmt ") and body + min(size, 24) > total:
            return None  # cut inside its header: libsndfile refuses it with its own message
        if cid == b"ds64" and size >= 24:
            data64 = struct.unpack("<QQ", fh.read(16))[1]
        elif cid == b"fmt " and size >= 14:
            align = struct.unpack(order + "H", fh.read(14)[12:14])[0]
        elif cid == b"data":
            if size == _UNKNOWN_SIZE and data64 is not None:
                size = data64
            if size in (0, _UNKNOWN_SIZE):
                return None
            have = total - body
            # a shortfall of less than one frame (a missing pad byte) loses no sample
            if (have // align < size // align) if align else have < size:
                return size, have, align
            return None
        pos = body + size + (size & 1)  # chunks are padded to an even length
    return None


def check_wav_complete(handle: str | io.BytesIO, name: str) -> None:
    """Refuse a WAV file that is shorter than its header says (a truncated file); other
    formats and complete files pass. Reads chunk headers only."""
    if isinstance(handle, io.BytesIO):
        total = handle.getbuffer().nbytes
        short = _wav_shortfall(handle, total)
        handle.seek(0)
    else:
        try:
            with open(handle, "rb") as fh:
                short = _wav_shortfall(fh, os.fstat(fh.fileno()).st_size)
        except OSError as err:
            raise AudioError(f"{name}: cannot read the file ({err})") from err
    if short is None:
        return
    size, have, align = short
    if align:
        raise AudioError(
            f"{name}: truncated WAV file: the header says {size // align} samples "
            f"({size} bytes of audio), the file holds {have // align} ({have} bytes)"
        )
    raise AudioError(
        f"{name}: truncated WAV file: the header says {size} bytes of audio, "
        f"the file holds {have}"
    )


@contextlib.contextmanager
def _native_stderr_quiet() -> Iterator[None]:
    """Native decoders' own stderr lines muted while a file is opened and decoded: libmpg123
    prints "Warning: Xing stream size off by more than 1%, ..." for a cut MP3, twice, ahead of
    the one-line error that says it is cut. Only on the main thread (the descriptor is the
    process's: another thread's lines would go too). Native code writes to descriptor 2,
    whatever `sys.stderr` is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fd = 2
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
        saved = os.dup(fd)
    except (OSError, ValueError):  # no descriptor 2 (a daemon started with it closed)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def _decode(
    handle: str | io.BytesIO,
    name: str,
    max_seconds: float | None,
    on_too_long: Literal["error", "truncate"],
    sr: int,
) -> tuple[np.ndarray, int]:
    """Decode a file or in-memory file to ``[T, C]`` float32, checking length before reading.

    The header is checked first so an over-long file is refused (or truncated) without
    decoding all of it, and so are a rate that would not resample to ``sr`` at a sane cost
    and a header with no length.
    """
    try:
        with _native_stderr_quiet(), sf.SoundFile(handle) as f:
            rate = int(f.samplerate)
            if not 0 < rate <= MAX_SAMPLE_RATE:
                raise AudioError(f"{name}: header gives an invalid sample rate {rate}")
            _check_resample(rate, sr, name)
            if not 0 <= f.frames < 1 << 62:  # libsndfile's 2^63 - 1: reading allocated that
                # many (or called it seconds too long); its read() cannot reach such a file's
                # end either ("Internal psf_fseek() failed")
                raise AudioError(f"{name}: the file does not give its length (a FLAC written "
                                 "to a pipe?); write it with its length, or as a WAV")
            frames = -1
            if max_seconds is not None and f.frames > max_frames(max_seconds, rate):
                if on_too_long == "error":
                    raise _too_long(name, f.frames / rate, max_seconds)
                frames = max_frames(max_seconds, rate)
            data = f.read(frames=frames, dtype="float32", always_2d=True)  # [T, C]
            want, fmt = (f.frames if frames == -1 else frames), f.format
    except (sf.SoundFileError, RuntimeError) as err:
        raise AudioError(f"{name}: not a readable audio file ({err})") from err
    # a cut compressed file (MP3) keeps its header's length and decodes what is left: half a
    # question was answered as the whole one. Complete files decode to their header's count
    # (an MP3 only where a Xing/Info/VBRI frame gives it; without one the count is a guess from
    # the file's size, too large for a file with a tag at its end)
    exact = fmt != "MP3" or _mp3_states_its_length(handle)
    if exact and want - data.shape[0] > max(0.01 * want, 0.05 * rate):
        raise AudioError(f"{name}: truncated audio file: the header says {want / rate:.2f} s, "
                         f"{data.shape[0] / rate:.2f} s could be decoded")
    return data, rate


def _read_at(handle: str | io.BytesIO, offset: int, size: int) -> bytes:
    if isinstance(handle, io.BytesIO):
        return bytes(handle.getbuffer()[offset:offset + size])
    with open(handle, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def _mp3_states_its_length(handle: str | io.BytesIO) -> bool:
    """Whether an MP3's first frame is a Xing, Info or VBRI frame (which gives the length),
    after any ID3v2 tag."""
    try:
        head = _read_at(handle, 0, 10)
        offset = 0
        if len(head) == 10 and head[:3] == b"ID3":  # a tag of syncsafe size, maybe a footer
            offset = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(head[6:10]))
            offset += 10 if head[5] & 0x10 else 0
        frame = _read_at(handle, offset, 4096)
    except OSError:
        return False
    return any(tag in frame for tag in (b"Xing", b"Info", b"VBRI"))


def _too_long(name: str, seconds: float, max_seconds: float) -> AudioError:
    return AudioError(
        f"{name}: audio is {seconds:.2f} s long, over the limit of {max_seconds:g} s "
        "(pass on_too_long='truncate', a larger max_seconds, or split it with split_audio)"
    )


def _array_to_2d(arr: np.ndarray, name: str) -> np.ndarray:
    """Turn a user array into ``[T, C]`` float32.

    Channel rule for 2-D input: the *shorter* axis is the channel axis, so both
    soundfile-style ``[T, C]`` and torch-style ``[C, T]`` work. A square array with more than
    one row is ambiguous and rejected. Integer PCM is scaled by ``2**(bits-1)`` into [-1, 1);
    that is a format conversion, not a normalisation.
    """
    if arr.dtype.kind in ("i", "u"):
        info = np.iinfo(arr.dtype)
        if arr.dtype.kind == "u":  # unsigned PCM (e.g. 8-bit wav) is offset-binary
            mid = (int(info.max) + 1) // 2
            arr = (arr.astype(np.float64) - mid) / mid
        else:
            arr = arr.astype(np.float64) / (int(info.max) + 1)
    elif arr.dtype.kind != "f":
        raise AudioError(f"{name}: expected a float or integer sample array, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[:, None]  # [T, 1]
    elif arr.ndim == 2:
        rows, cols = arr.shape
        if rows == cols and rows > 1:
            raise AudioError(
                f"{name}: square 2-D array is ambiguous; pass [T, C] with T > C or a 1-D array"
            )
        if rows < cols:
            arr = arr.T  # [C, T] -> [T, C]
    else:
        raise AudioError(f"{name}: expected a 1-D [T] or 2-D [T, C]/[C, T] array, got {arr.ndim}-D")
    return np.asarray(arr, dtype=np.float32)  # [T, C]


def load_audio(
    source: AudioSource,
    sr: int = 16000,
    *,
    max_seconds: float | None = 30.0,
    orig_sr: int | None = None,
    on_too_long: Literal["error", "truncate"] = "error",
) -> np.ndarray:
    """Load ``source`` as float32 mono at ``sr`` Hz.

    Args:
        source: a path (wav/flac/ogg or anything libsndfile reads), the raw bytes of such a file,
            or a sample array (then ``orig_sr`` is required; see :func:`_array_to_2d` for the
            2-D channel rule: the shorter axis is channels).
        sr: target sample rate.
        max_seconds: longest input accepted (the Whisper encoder sees 30 s); ``None`` = no limit.
        orig_sr: sample rate of an array source. For files it must match the header if given.
        on_too_long: ``"error"`` raises, ``"truncate"`` keeps the first ``max_seconds``.

    Returns:
        ``[T]`` float32 array. Channels are averaged; resampling is polyphase
        (``scipy.signal.resample_poly``) with the exact rational ratio ``sr / orig_sr``.

    Raises:
        AudioError: missing/empty/undecodable file, a WAV file shorter than its header says
            (truncated), a header with no length, zero-length or non-finite audio, samples
            beyond ``MAX_PEAK``, a bad sample rate or one that resamples to ``sr`` only at a huge
            cost (``MAX_RESAMPLE_FACTOR``), or input longer than ``max_seconds`` with
            ``on_too_long="error"``.
    Warns:
        AudioWarning: the audio is silence only (peak below ``SILENCE_PEAK``).
    """
    sr = _check_rate(sr, "sr")
    if on_too_long not in ("error", "truncate"):
        raise AudioError(f"on_too_long must be 'error' or 'truncate', got {on_too_long!r}")
    if max_seconds is not None and not (max_seconds > 0 and math.isfinite(max_seconds)):
        raise AudioError(
            f"max_seconds must be a positive finite number or None, got {max_seconds!r}"
        )
    name = _describe(source)

    if isinstance(source, np.ndarray):
        if orig_sr is None:
            raise AudioError(f"{name}: orig_sr is required when passing a sample array")
        rate = _check_rate(orig_sr, "orig_sr")
        _check_resample(rate, sr, name)
        data = _array_to_2d(source, name)  # [T, C]
        if max_seconds is not None and data.shape[0] > max_frames(max_seconds, rate):
            if on_too_long == "error":
                raise _too_long(name, data.shape[0] / rate, max_seconds)
            data = data[: max_frames(max_seconds, rate)]
    else:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise AudioError(f"{name}: audio bytes are empty")
            handle: str | io.BytesIO = io.BytesIO(bytes(source))
        elif isinstance(source, (str, os.PathLike)):
            handle = str(_existing_file(source))
        else:
            raise AudioError(
                f"unsupported audio source type {type(source).__name__}; "
                "expected a path, bytes or a numpy array"
            )
        check_wav_complete(handle, name)
        data, rate = _decode(handle, name, max_seconds, on_too_long, sr)  # [T, C]
        if orig_sr is not None and _check_rate(orig_sr, "orig_sr") != rate:
            raise AudioError(f"{name}: orig_sr={orig_sr} disagrees with the file's rate {rate} Hz")

    if data.size == 0:  # [0, C], or a [C, 0] array read as C frames of no channel
        raise AudioError(f"{name}: audio has zero length")
    _check_finite(data, name)
    _check_peak(data, name)

    wav = data.mean(axis=1, dtype=np.float64) if data.shape[1] > 1 else data[:, 0]  # [T]
    if rate != sr:
        g = math.gcd(sr, rate)
        wav = resample_poly(wav.astype(np.float64), sr // g, rate // g)  # [T * sr / rate]
        if max_seconds is not None:  # rounding in resample_poly may add one sample
            wav = wav[: max_frames(max_seconds, sr)]
    wav = np.ascontiguousarray(wav, dtype=np.float32)  # [T']

    peak = float(np.max(np.abs(wav))) if wav.size else 0.0
    if peak < SILENCE_PEAK:
        warnings.warn(
            f"{name}: audio is silent (peak {peak:.2e} < {SILENCE_PEAK:g})",
            AudioWarning,
            stacklevel=2,
        )
    return wav


def check_question_length(n_samples: int, sr: int, what: str = "question audio") -> None:
    """Refuse a spoken question shorter than :data:`MIN_QUESTION_SECONDS`.

    The one check shared by every place question audio enters (``echox chat``, ``echox demo``,
    the engine, the server); ``what`` names the input in the one-line message.
    """
    if n_samples < math.ceil(MIN_QUESTION_SECONDS * sr - 1e-6):
        shown = f"{n_samples / sr:.2f}"
        if float(shown) >= MIN_QUESTION_SECONDS:  # just under: show enough digits to see it
            shown = f"{n_samples / sr:.4f}"
        raise AudioError(
            f"{what} is {shown} s long; a question needs at least "
            f"{MIN_QUESTION_SECONDS:g} s of audio"
        )


# --------------------------------------------------------------------------- splitting


def split_audio(
    wav: np.ndarray, sr: int, max_seconds: float, overlap_seconds: float = 0.0
) -> list[np.ndarray]:
    """Cut a long ``[T]`` waveform into chunks of at most ``max_seconds``.

    Consecutive chunks start ``max_seconds - overlap_seconds`` apart; the last chunk may be
    shorter and is never fully contained in the one before it. Chunks are copies.
    """
    sr = _check_rate(sr, "sr")
    if not (max_seconds > 0 and math.isfinite(max_seconds)):
        raise AudioError(f"max_seconds must be a positive finite number, got {max_seconds!r}")
    if not (0 <= overlap_seconds < max_seconds):
        raise AudioError(
            f"overlap_seconds must be in [0, max_seconds={max_seconds:g}), got {overlap_seconds!r}"
        )
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise AudioError(f"split_audio expects a 1-D [T] waveform, got shape {wav.shape}")
    if wav.size == 0:
        raise AudioError("split_audio got a zero-length waveform")
    chunk = max_frames(max_seconds, sr)
    hop = chunk - int(round(overlap_seconds * sr))
    if chunk < 1 or hop < 1:
        raise AudioError(
            f"max_seconds={max_seconds:g} / overlap_seconds={overlap_seconds:g} at {sr} Hz "
            "give a chunk or hop shorter than one sample"
        )
    pieces: list[np.ndarray] = []
    start = 0
    while True:
        end = min(start + chunk, wav.shape[0])
        pieces.append(wav[start:end].copy())  # [<= chunk]
        if end >= wav.shape[0]:
            return pieces
        start += hop


# --------------------------------------------------------------------------- writing


def check_output_path(path: str | os.PathLike) -> Path:
    """Check, before any slow work, that :func:`save_audio` could write ``path``.

    The suffix must be one it writes, the path must not be a folder, and the nearest existing
    folder above it must be a writable folder (missing folders are created on save).
    """
    p = Path(path)
    if p.is_dir():  # before the suffix: `-o answers/` is a folder, not a file of suffix ''
        raise AudioError(f"'{p}': is a folder, not an audio file path")
    if p.suffix.lower() not in _WRITE_FORMATS:
        raise AudioError(
            f"'{p}': unsupported suffix {p.suffix!r}; use one of {sorted(_WRITE_FORMATS)}"
        )
    parent = p.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise AudioError(f"'{p}': cannot be written: '{parent}' is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):  # save_audio writes a temp file there
        raise AudioError(f"'{p}': cannot be written: no write permission in '{parent}'")
    return p


def save_audio(
    path: str | os.PathLike,
    wav: np.ndarray,
    sr: int,
    *,
    subtype: str | None = None,
    clip: bool = False,
) -> Path:
    """Write ``wav`` (``[T]`` or ``[T, C]``) to ``path`` atomically and return the path.

    The container comes from the suffix (.wav, .flac, .ogg). ``subtype`` defaults to
    ``"PCM_16"`` for wav/flac (``"FLOAT"`` keeps full precision in wav). The data goes to a
    temp file in the same folder, then ``os.replace`` moves it in place, so a reader never sees
    a half-written file. Integer subtypes refuse samples outside [-1, 1] unless ``clip=True``:
    libsndfile would otherwise wrap or clip them without telling anyone.
    """
    p = Path(path)
    sr = _check_rate(sr, "sr")
    fmt = _WRITE_FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise AudioError(
            f"'{p}': unsupported suffix {p.suffix!r}; use one of {sorted(_WRITE_FORMATS)}"
        )
    if subtype is None:
        subtype = "PCM_16" if fmt in ("WAV", "FLAC") else sf.default_subtype(fmt)
    subtype = subtype.upper()
    if not sf.check_format(fmt, subtype):
        raise AudioError(f"'{p}': subtype {subtype!r} is not valid for {fmt}")

    data = np.asarray(wav)
    if data.dtype.kind != "f":
        raise AudioError(f"'{p}': expected float samples in [-1, 1], got dtype {data.dtype}")
    if data.ndim not in (1, 2):
        raise AudioError(f"'{p}': expected a [T] or [T, C] array, got shape {data.shape}")
    if data.size == 0:
        raise AudioError(f"'{p}': refusing to write zero-length audio (shape {data.shape})")
    _check_finite(data, f"'{p}'")
    if data.dtype not in (np.float32, np.float64):  # what libsndfile takes; float16 -> float32
        data = data.astype(np.float32 if data.dtype.itemsize < 4 else np.float64)
    if subtype.startswith(("PCM", "ULAW", "ALAW")):
        peak = float(np.max(np.abs(data)))
        if peak > 1.0:
            if not clip:
                raise AudioError(
                    f"'{p}': peak {peak:.3f} exceeds 1.0 for integer subtype {subtype}; "
                    "pass clip=True or subtype='FLOAT'"
                )
            data = np.clip(data, -1.0, 1.0)

    try:
        with atomic_open(p, "wb") as fh:
            sf.write(fh, data, sr, format=fmt, subtype=subtype)
    except OSError as err:  # a read-only or full disk, a path that turned into a folder, ...
        raise AudioError(f"'{p}': cannot be written ({err.strerror or err})") from err
    except sf.SoundFileError as err:  # a rate or channel count the format cannot hold
        channels = data.shape[1] if data.ndim == 2 else 1
        raise AudioError(f"'{p}': cannot be written as {fmt} with {channels} channel(s) at "
                         f"{sr} Hz ({err})") from err
    return p
