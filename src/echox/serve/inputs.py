"""What a client may send, checked before any model work: audio files, raw PCM, text, history.

Every refusal is an `ApiError` with an HTTP status, a short machine-readable `code` and a
message that says what was wrong; the app turns it into a JSON error (HTTP) or an `error`
event (WebSocket) and goes on serving.
"""

from __future__ import annotations

import io
import math
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile as sf

from echox.audio import MIN_SPEECH_RATE, AudioWarning, check_question_length, load_audio
from echox.errors import AudioError, EchoXError
from echox.model.prompt import Turn, is_unicode

__all__ = ["AUDIO_FORMATS", "ApiError", "AudioBuffer", "Limits", "PCM_FORMATS", "check_history",
           "check_text", "decode_file", "pcm_s16le", "shown"]

#: Raw PCM layouts a WebSocket client may stream: numpy dtype and bytes per sample (mono).
PCM_FORMATS: dict[str, tuple[str, int]] = {"pcm_s16le": ("<i2", 2), "pcm_f32le": ("<f4", 4)}
#: "file": the bytes of a wav/flac/ogg file, possibly split over several frames.
AUDIO_FORMATS = ("file", *PCM_FORMATS)
MIN_RATE, MAX_RATE = MIN_SPEECH_RATE, 192000
#: Channels of `MAX_RATE` audio a file may decode to, for `max_audio_seconds`: a few KB of
#: compressed silence (FLAC, Ogg) can hold minutes of many-channel audio, gigabytes decoded.
DECODE_CHANNELS = 2


def shown(value: Any, limit: int = 40) -> str:
    """A client's value as an error message quotes it: short (a client may send megabytes)."""
    if value is not None and not isinstance(value, (str, int, float)):
        return f"a JSON {type(value).__name__}"
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class ApiError(EchoXError):
    """A request the server refuses; `status` is the HTTP status it maps to."""

    def __init__(self, status: int, code: str, message: str,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "code": self.code, "message": self.message}
        if self.retry_after is not None:
            out["retry_after"] = self.retry_after
        return out


@dataclass(frozen=True)
class Limits:
    """Per-request limits (see `ServeConfig`)."""

    max_upload_bytes: int
    max_audio_seconds: float
    max_text_chars: int
    history_turns: int = 8  # user + assistant pairs a client may send to POST /v1/chat

    @property
    def max_decoded_samples(self) -> int:
        """Samples (all channels) an audio file may decode to."""
        samples = self.max_audio_seconds * MAX_RATE * DECODE_CHANNELS
        return math.ceil(samples) if math.isfinite(samples) else sys.maxsize  # Limits made directly

    def too_long(self, seconds: float) -> ApiError:
        """A client cannot raise the limit: the message names the server's own setting."""
        return ApiError(413, "audio_too_long", f"the audio is {seconds:.2f} s long, over the "
                        f"limit of {self.max_audio_seconds:g} s (this server's "
                        "limits.max_audio_seconds in GET /v1/models; its operator sets it with "
                        "echox serve --max-audio-seconds)")

    def too_short(self, wav: np.ndarray, sr: int, name: str) -> None:
        """Refuse a question shorter than `MIN_QUESTION_SECONDS` (400 audio_too_short)."""
        try:
            check_question_length(wav.size, sr, name)
        except AudioError as e:
            raise ApiError(400, "audio_too_short", str(e)) from e

    def too_large(self, size: int) -> ApiError:
        return ApiError(413, "too_large", f"the upload is {size} bytes, over the limit of "
                        f"{self.max_upload_bytes} bytes")


def check_text(text: Any, limits: Limits, what: str = "text") -> str | None:
    """A user's typed text: None when absent or blank; refused when not a string, too long or
    not valid Unicode."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise ApiError(400, "bad_request", f"{what} must be a string, got {type(text).__name__}")
    if len(text) > limits.max_text_chars:
        raise ApiError(413, "text_too_long", f"{what} is {len(text)} characters long, over the "
                       f"limit of {limits.max_text_chars}")
    if not is_unicode(text):  # JSON's "\ud800"
        raise ApiError(400, "bad_request", f"{what} is not valid Unicode text (it holds a "
                       "lone surrogate code point, such as \\ud800)")
    return text if text.strip() else None


def _load(source: bytes | np.ndarray, limits: Limits, sr: int, name: str,
          orig_sr: int | None = None) -> np.ndarray:
    """load_audio with the server's duration limit; its errors become 400s."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AudioWarning)  # silence is the model's business
            return load_audio(source, sr, max_seconds=None, orig_sr=orig_sr)
    except AudioError as e:
        raise ApiError(400, "bad_audio", f"{name}: {_strip_name(str(e))}") from e


def _strip_name(message: str) -> str:
    """load_audio names in-memory input '<N bytes>: ...'; the client knows what it sent."""
    head, sep, tail = message.partition(": ")
    return tail if sep and head.startswith("<") else message


def decode_file(data: bytes, limits: Limits, sr: int = 16000, name: str = "audio") -> np.ndarray:
    """The bytes of an audio file (wav/flac/ogg, any rate, any channels) -> float32 mono `sr`.

    Refuses: empty input, more than `max_upload_bytes`, anything libsndfile cannot read
    (including a file cut inside its header), a WAV shorter than its header says, zero
    samples, audio shorter than `MIN_QUESTION_SECONDS`, whatever else `load_audio` refuses
    (samples beyond `echox.audio.MAX_PEAK`, a rate that would take a huge resampling filter, a
    header with no length), and, from the header before decoding: audio longer than
    `max_audio_seconds` and more samples than `Limits.max_decoded_samples` (many channels).
    """
    if len(data) == 0:
        raise ApiError(400, "empty_audio", f"{name}: the audio is empty (0 bytes)")
    if len(data) > limits.max_upload_bytes:
        raise limits.too_large(len(data))
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, frames, channels = int(f.samplerate), int(f.frames), int(f.channels)
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as e:
        why = re.sub(r"^Error opening <[^>]*>: ", "", str(e)).strip() or type(e).__name__
        raise ApiError(400, "bad_audio", f"{name}: not a readable audio file (wav, flac or ogg): "
                       f"{why}") from e
    if rate < MIN_RATE:  # 1 Hz: ten samples became ten seconds of question (high rates are
        # refused by their resampling cost, in load_audio)
        raise ApiError(400, "bad_audio", f"{name}: the header gives a sample rate of {rate} Hz; "
                       f"this server takes {MIN_RATE} Hz and more")
    known = 0 <= frames < 1 << 62  # else no length (2^63 - 1): load_audio refuses it, a 400
    if known and frames / rate > limits.max_audio_seconds:
        raise limits.too_long(frames / rate)
    if known and frames * max(channels, 1) > limits.max_decoded_samples:
        raise ApiError(413, "too_large", f"{name}: the audio is {frames} frames of {channels} "
                       f"channels, more than this server decodes ({limits.max_decoded_samples} "
                       f"samples: {limits.max_audio_seconds:g} s of stereo at {MAX_RATE} Hz)")
    wav = _load(data, limits, sr, name)
    if wav.size / sr > limits.max_audio_seconds + 1e-3:  # headers that do not give a length
        raise limits.too_long(wav.size / sr)
    limits.too_short(wav, sr, name)
    return wav


class AudioBuffer:
    """One WebSocket turn's audio, as it arrives in binary frames.

    `fmt` is "file" (the frames are pieces of one audio file) or a `PCM_FORMATS` key (mono
    samples at `sample_rate`). Size and, for PCM, duration are checked as frames arrive, so
    a client streaming too much is told at once.
    """

    def __init__(self, fmt: str, sample_rate: int | None, limits: Limits) -> None:
        if fmt not in AUDIO_FORMATS:
            raise ApiError(400, "bad_request", f"unknown audio format {shown(fmt)}; use one of "
                           f"{', '.join(AUDIO_FORMATS)}")
        if fmt in PCM_FORMATS:
            if isinstance(sample_rate, float) and sample_rate.is_integer():
                sample_rate = int(sample_rate)  # 16000.0: how some JSON clients write 16000
            if (isinstance(sample_rate, bool) or not isinstance(sample_rate, int)
                    or not MIN_RATE <= sample_rate <= MAX_RATE):
                raise ApiError(400, "bad_request", f"{fmt} needs an integer sample_rate between "
                               f"{MIN_RATE} and {MAX_RATE}, got {shown(sample_rate)}")
        self.fmt = fmt
        self.sample_rate = sample_rate
        self.limits = limits
        self.data = bytearray()

    @property
    def seconds(self) -> float:
        """Audio received so far (PCM only; 0 for files)."""
        if self.fmt not in PCM_FORMATS or not self.sample_rate:
            return 0.0
        return len(self.data) / PCM_FORMATS[self.fmt][1] / self.sample_rate

    def add(self, chunk: bytes) -> None:
        if len(self.data) + len(chunk) > self.limits.max_upload_bytes:
            raise self.limits.too_large(len(self.data) + len(chunk))
        self.data += chunk
        if self.seconds > self.limits.max_audio_seconds + 1e-3:
            raise self.limits.too_long(self.seconds)

    def decode(self, sr: int = 16000) -> np.ndarray:
        """The turn's audio as float32 mono at `sr`."""
        if not self.data:
            raise ApiError(400, "empty_audio", "the turn's audio is empty (no binary frames "
                           "came before the end message)")
        if self.fmt == "file":
            return decode_file(bytes(self.data), self.limits, sr)
        dtype, width = PCM_FORMATS[self.fmt]
        if len(self.data) % width:
            raise ApiError(400, "bad_audio", f"truncated {self.fmt} stream: {len(self.data)} "
                           f"bytes is not a whole number of {width}-byte samples")
        samples = np.frombuffer(bytes(self.data), dtype=dtype)
        assert self.sample_rate is not None
        name = f"{self.fmt} stream"
        wav = _load(samples, self.limits, sr, name, orig_sr=self.sample_rate)
        self.limits.too_short(wav, sr, name)
        return wav


def check_history(items: Any, limits: Limits) -> list[Turn]:
    """POST /v1/chat `history`: earlier text turns, [{"role": "user"|"assistant", "text": ...}]."""
    if items is None:
        return []
    if not isinstance(items, list):
        raise ApiError(400, "bad_request", "history must be a list of {role, text} objects")
    if len(items) > 2 * limits.history_turns:
        raise ApiError(413, "history_too_long", f"history has {len(items)} turns, over the limit "
                       f"of {2 * limits.history_turns}")
    turns = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or item.get("role") not in ("user", "assistant"):
            raise ApiError(400, "bad_request", f"history[{i}] must be an object with role "
                           "'user' or 'assistant' and a text")
        text = check_text(item.get("text"), limits, f"history[{i}].text")
        if text is None:
            raise ApiError(400, "bad_request", f"history[{i}].text is missing or empty")
        turns.append(Turn(item["role"], text=text))
    return turns


def pcm_s16le(audio: np.ndarray) -> bytes:
    """float32 [-1, 1] samples -> little-endian int16 bytes (clipped)."""
    if audio.size == 0:
        return b""
    clipped = np.clip(np.nan_to_num(audio, nan=0.0), -1.0, 1.0)
    return (clipped * 32767.0).round().astype("<i2").tobytes()


def wav_bytes(audio: np.ndarray, sr: int) -> bytes:
    """A 16-bit PCM wav file of `audio` (clipped)."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0) if audio.size else np.zeros(0, np.float32), sr,
             format="WAV", subtype="PCM_16")
    return buf.getvalue()

