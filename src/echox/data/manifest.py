"""Manifests and datasets: the JSONL / data.json / HF `datasets` records each stage trains on.

Three record schemas, one per kind of data:

* :class:`AsrRecord` ``{"audio", "text", "id"?, "duration"?}`` - speech and its transcript.
* :class:`TtsRecord` ``{"text", "audio"?, "units"?, "id"?}`` - Stage II; ``units`` are the
  precomputed speech units of ``audio`` (the T2C's targets).
* :class:`DialogueRecord` ``{"id"?, "conversations": [{"from", "value", "audio"?,
  "transcript"?, "wer"?, "units"?}]}`` - the EchoX-Dialogues layout: ``from`` is
  user/assistant (ShareGPT's human/gpt are mapped), and for a user turn with audio ``value`` is
  the transcript of that audio. Assistant ``units`` are the speech units of the response.

Audio paths are relative to the manifest's folder unless absolute. Records read from the HF
hub may hold the encoded file bytes instead of a path (see `echox.data.hf.load_hf_asr`).

Every reader names ``file:line`` (or ``source row N``) of a bad entry: with
``on_error="stop"`` it raises :class:`ManifestError`, with ``"skip"`` it logs a warning, keeps
going and reports the bad lines, and with ``"report"`` it only reports them (for a caller that
prints the report itself, as ``echox data validate`` does). The HF loaders (:mod:`echox.data.hf`) and the torch datasets
and collators that turn records into the batches of ``echox.model.batch``
(:mod:`echox.data.datasets`) live in their own modules.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union

import numpy as np

from echox.audio import audio_info, load_audio
from echox.errors import AudioError, ManifestError
from echox.fileio import atomic_open, json_lines
from echox.model.prompt import Turn

__all__ = ["AudioRef", "AsrRecord", "TtsRecord", "DialogueMessage", "DialogueRecord", "SCHEMAS",
           "ManifestReport", "ValidationReport", "read_jsonl", "iter_jsonl", "write_jsonl",
           "read_dialogues_json", "validate_manifest"]

log = logging.getLogger(__name__)

#: A path (str, relative to the manifest folder unless absolute) or an encoded audio file.
AudioRef = Union[str, bytes]
OnError = Literal["stop", "skip", "report"]
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


# --------------------------------------------------------------------------- field checks


def _req_str(obj: Mapping[str, Any], key: str, where: str, allow_empty: bool = False) -> str:
    if key not in obj or obj[key] is None:
        raise ManifestError(f"{where}: missing required key {key!r}")
    v = obj[key]
    if not isinstance(v, str):
        raise ManifestError(f"{where}: {key!r} must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise ManifestError(f"{where}: {key!r} is empty")
    return v


def _opt_str(obj: Mapping[str, Any], key: str, where: str) -> str | None:
    v = obj.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise ManifestError(f"{where}: {key!r} must be a string, got {type(v).__name__}")
    return v


def _opt_id(obj: Mapping[str, Any], where: str) -> str | None:
    """Ids may be strings or integers (common in exports); they are kept as strings."""
    v = obj.get("id")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise ManifestError(f"{where}: 'id' must be a string or integer, got {type(v).__name__}")
    return str(v)


def _opt_float(obj: Mapping[str, Any], key: str, where: str) -> float | None:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ManifestError(f"{where}: {key!r} must be a non-negative number, got {v!r}")
    return float(v)


def _opt_units(obj: Mapping[str, Any], where: str) -> list[int] | None:
    v = obj.get("units")
    if v is None:
        return None
    if not isinstance(v, (list, tuple, np.ndarray)) or not all(
        isinstance(u, (int, np.integer)) and not isinstance(u, bool) and 0 <= u < 2**63 for u in v
    ):  # (< 2**63: a unit id beyond int64 is no unit, and no tensor holds it)
        raise ManifestError(f"{where}: 'units' must be a list of non-negative integers")
    return [int(u) for u in v]


def _opt_audio(obj: Mapping[str, Any], key: str, where: str, required: bool) -> AudioRef | None:
    v = obj.get(key)
    if v is None:
        if required:
            raise ManifestError(f"{where}: missing required key {key!r}")
        return None
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    if not isinstance(v, str) or not v.strip():
        raise ManifestError(f"{where}: {key!r} must be a non-empty path string, got {v!r}")
    return v


def _path_json(audio: AudioRef | None, where: str) -> str | None:
    if isinstance(audio, bytes):
        raise ManifestError(
            f"{where}: the audio is held in memory as bytes and has no path; pass audio_dir= to "
            "the HF loader so it writes the files, then write the manifest"
        )
    return audio


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def resolve_audio(ref: AudioRef, base_dir: str | os.PathLike | None) -> str | bytes | Path:
    """A loadable source for `ref`: bytes as is, a relative path joined to `base_dir`."""
    if isinstance(ref, bytes):
        return ref
    p = Path(ref).expanduser()
    return p if p.is_absolute() or base_dir is None else Path(base_dir) / p


# --------------------------------------------------------------------------- schemas


@dataclass
class AsrRecord:
    """Speech and its transcript (Stage I alignment data, CTC targets)."""

    audio: AudioRef
    text: str
    id: str | None = None
    duration: float | None = None  # seconds, if known (for bucketing without reading headers)
    kind: ClassVar[str] = "asr"

    @classmethod
    def from_json(cls, obj: Any, where: str) -> AsrRecord:
        obj = _as_object(obj, where)
        return cls(audio=_opt_audio(obj, "audio", where, True), text=_req_str(obj, "text", where),
                   id=_opt_id(obj, where), duration=_opt_float(obj, "duration", where))

    def to_json(self) -> dict[str, Any]:
        return _drop_none({"id": self.id, "audio": _path_json(self.audio, f"record {self.id}"),
                           "text": self.text, "duration": self.duration})

    def audio_refs(self) -> list[AudioRef]:
        return [self.audio]


@dataclass
class TtsRecord:
    """Text and the units of its spoken form (Stage II); units may come later from `audio`."""

    text: str
    audio: AudioRef | None = None
    units: list[int] | None = None
    id: str | None = None
    kind: ClassVar[str] = "tts"

    @classmethod
    def from_json(cls, obj: Any, where: str) -> TtsRecord:
        obj = _as_object(obj, where)
        return cls(text=_req_str(obj, "text", where), audio=_opt_audio(obj, "audio", where, False),
                   units=_opt_units(obj, where), id=_opt_id(obj, where))

    def to_json(self) -> dict[str, Any]:
        return _drop_none({"id": self.id, "text": self.text,
                           "audio": _path_json(self.audio, f"record {self.id}"), "units": self.units})

    def audio_refs(self) -> list[AudioRef]:
        return [self.audio] if self.audio is not None else []


@dataclass
class DialogueMessage:
    """One turn of a dialogue record; `role` is already normalised to user/assistant."""

    role: str
    value: str
    audio: AudioRef | None = None
    transcript: str | None = None
    wer: float | None = None
    units: list[int] | None = None
    # a user turn's text beside its audio, e.g. an instruction ("Transcribe this audio.")
    prompt: str | None = None

    @classmethod
    def from_json(cls, obj: Any, where: str) -> DialogueMessage:
        obj = _as_object(obj, where)
        # ShareGPT's from/value, or the OpenAI-style role/content some exports use
        raw_role = obj.get("from", obj.get("role"))
        if raw_role is None:
            raise ManifestError(f"{where}: missing required key 'from'")
        if not isinstance(raw_role, str) or raw_role.lower() not in _ROLES:
            raise ManifestError(f"{where}: unknown role 'from'={raw_role!r}; expected one of "
                                f"{sorted(_ROLES)}")
        role = _ROLES[raw_role.lower()]
        key = "value" if "value" in obj or "content" not in obj else "content"
        audio = _opt_audio(obj, "audio", where, False)
        # a user turn with audio may have an empty value (transcript unknown)
        value = _req_str(obj, key, where, allow_empty=role == "user" and audio is not None)
        return cls(role=role, value=value, audio=audio, transcript=_opt_str(obj, "transcript", where),
                   wer=_opt_float(obj, "wer", where), units=_opt_units(obj, where),
                   prompt=_opt_str(obj, "prompt", where))

    def to_json(self) -> dict[str, Any]:
        return _drop_none({"from": self.role, "value": self.value,
                           "audio": _path_json(self.audio, "dialogue message"),
                           "transcript": self.transcript, "wer": self.wer, "units": self.units,
                           "prompt": self.prompt})


@dataclass
class DialogueRecord:
    """A (spoken) dialogue in the EchoX-Dialogues layout."""

    conversations: list[DialogueMessage]
    id: str | None = None
    kind: ClassVar[str] = "dialogue"

    @classmethod
    def from_json(cls, obj: Any, where: str) -> DialogueRecord:
        obj = _as_object(obj, where)
        conv = obj.get("conversations")
        if conv is None:
            raise ManifestError(f"{where}: missing required key 'conversations'")
        if not isinstance(conv, (list, tuple)) or not conv:
            raise ManifestError(f"{where}: 'conversations' must be a non-empty list")
        msgs = [DialogueMessage.from_json(m, f"{where}: conversations[{i}]") for i, m in enumerate(conv)]
        return cls(conversations=msgs, id=_opt_id(obj, where))

    def to_json(self) -> dict[str, Any]:
        return _drop_none({"id": self.id, "conversations": [m.to_json() for m in self.conversations]})

    def audio_refs(self) -> list[AudioRef]:
        return [m.audio for m in self.conversations if m.audio is not None and m.role == "user"]

    @property
    def response_units(self) -> list[list[int]] | None:
        """Units of every assistant turn, in order; None unless all of them carry units."""
        units = [m.units for m in self.conversations if m.role == "assistant"]
        return None if not units or any(u is None for u in units) else units  # type: ignore[misc]

    def to_turns(self, base_dir: str | os.PathLike | None,
                 load_audio_fn: Callable[[Any], np.ndarray] = load_audio) -> list[Turn]:
        """Prompt turns: a user turn with audio becomes speech with `value` as its transcript.

        Assistant audio (the spoken response) is not a model input and is ignored here.
        """
        turns = []
        for m in self.conversations:
            if m.role == "user" and m.audio is not None:
                wav = load_audio_fn(resolve_audio(m.audio, base_dir))
                transcript = m.transcript if m.transcript is not None else (m.value or None)
                turns.append(Turn(role="user", audio=wav, transcript=transcript, text=m.prompt or None))
            else:
                turns.append(Turn(role=m.role, text=m.value))
        return turns


Record = Union[AsrRecord, TtsRecord, DialogueRecord]
R = TypeVar("R", AsrRecord, TtsRecord, DialogueRecord)
SCHEMAS: dict[str, type] = {"asr": AsrRecord, "tts": TtsRecord, "dialogue": DialogueRecord}


def _schema(schema: type[R] | str) -> type[R]:
    if isinstance(schema, str):
        if schema not in SCHEMAS:
            raise ManifestError(f"unknown manifest schema {schema!r}; known: {sorted(SCHEMAS)}")
        return SCHEMAS[schema]  # type: ignore[return-value]
    return schema


def _as_object(obj: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise ManifestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


# --------------------------------------------------------------------------- reading / writing


@dataclass
class ManifestReport:
    """Records read from a manifest, with the line (or list index) each came from."""

    path: Path
    records: list[Any]
    lines: list[int]  # 1-based line of each record (item index + 1 for data.json)
    bad_lines: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.records)

    @property
    def base_dir(self) -> Path:
        """Folder that relative audio paths are resolved against."""
        return self.path.parent


SHOWN_BAD_LINES = 5  # per file, in skip mode: a binary file given as a manifest is one short notice


def _bad(path: Path, line: int, reason: str, on_error: OnError, report: ManifestReport) -> None:
    if on_error == "stop":
        raise ManifestError(f"{path}:{line}: {reason}")
    if on_error == "skip":
        n = len(report.bad_lines)
        if n < SHOWN_BAD_LINES:
            log.warning("%s:%d: %s (skipped)", path, line, reason)
        elif n == SHOWN_BAD_LINES:
            log.warning("%s: more bad lines are skipped; their count follows", path)
    report.bad_lines.append((line, reason))


def _strip_where(err: ManifestError, where: str) -> str:
    msg = str(err)
    return msg[len(where) + 2:] if msg.startswith(where + ": ") else msg


def _check_on_error(on_error: str) -> None:
    if on_error not in ("stop", "skip", "report"):
        raise ManifestError(f"on_error must be 'stop', 'skip' or 'report', got {on_error!r}")


def _scan_jsonl(path: Path, cls: type[R], on_error: OnError,
                report: ManifestReport) -> Iterator[tuple[int, R]]:
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file not found")
    for lineno, obj, error in json_lines(path):
        if error is not None:
            _bad(path, lineno, error, on_error, report)
            continue
        where = f"{path}:{lineno}"
        try:
            yield lineno, cls.from_json(obj, where)
        except ManifestError as err:
            _bad(path, lineno, _strip_where(err, where), on_error, report)


def iter_jsonl(path: str | os.PathLike, schema: type[R] | str,
               on_error: OnError = "stop") -> Iterator[R]:
    """Stream records from a JSONL manifest (bad lines raise, or are logged and skipped)."""
    _check_on_error(on_error)
    p = Path(path)
    rep = ManifestReport(p, [], [])
    for _, rec in _scan_jsonl(p, _schema(schema), on_error, rep):
        yield rec
    if len(rep.bad_lines) > SHOWN_BAD_LINES and on_error == "skip":
        log.warning("%s: %d bad line(s) skipped", p, len(rep.bad_lines))


def read_jsonl(path: str | os.PathLike, schema: type[R] | str,
               on_error: OnError = "stop") -> ManifestReport:
    """Read a whole JSONL manifest; blank lines are ignored, bad lines raise or are reported."""
    _check_on_error(on_error)
    p = Path(path)
    rep = ManifestReport(p, [], [])
    for lineno, rec in _scan_jsonl(p, _schema(schema), on_error, rep):
        rep.records.append(rec)
        rep.lines.append(lineno)
    if rep.bad_lines and on_error == "skip":
        log.warning("%s: %d record(s) read, %d bad line(s) skipped", p, len(rep), len(rep.bad_lines))
    return rep


def read_dialogues_json(path: str | os.PathLike, on_error: OnError = "stop") -> ManifestReport:
    """Read an EchoX-Dialogues ``data.json`` (a JSON list), or the shard folder holding it.

    ``bad_lines`` and ``lines`` hold 1-based item positions in the list.
    """
    _check_on_error(on_error)
    p = Path(path)
    if p.is_dir():
        p = p / "data.json"
    if not p.is_file():
        raise ManifestError(f"{p}: data.json not found (extract the tar shard first)")
    try:
        items = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # also a number too long, a list too deep
        raise ManifestError(f"{p}: not a readable JSON file ({err})") from err
    if not isinstance(items, list):
        raise ManifestError(f"{p}: expected a JSON list of dialogues, got {type(items).__name__}")
    rep = ManifestReport(p, [], [])
    for i, obj in enumerate(items, start=1):
        where = f"{p}:{i}"
        try:
            rep.records.append(DialogueRecord.from_json(obj, where))
            rep.lines.append(i)
        except ManifestError as err:
            if on_error == "stop":
                raise ManifestError(f"{p}: item {i}: {_strip_where(err, where)}") from err
            _bad(p, i, _strip_where(err, where), on_error, rep)
    return rep


def write_jsonl(path: str | os.PathLike, records: Iterable[Record | Mapping[str, Any]]) -> Path:
    """Write records as JSONL atomically (temp file + os.replace): readers never see half a file."""
    p = Path(path)
    with atomic_open(p, "w") as f:
        for rec in records:
            obj = dict(rec) if isinstance(rec, Mapping) else rec.to_json()
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return p


@dataclass
class ValidationReport:
    """What `validate_manifest` found; `summary()` is what the CLI prints."""

    path: Path
    schema: str
    n_records: int
    bad_lines: list[tuple[int, str]]
    audio_issues: list[tuple[int, str]]  # (line, problem) for missing/unreadable/too long audio
    n_audio: int = 0
    audio_seconds: float = 0.0
    fits: list[str] = field(default_factory=list)  # other schemas its lines fit, when none fit this one

    @property
    def ok(self) -> bool:
        return self.n_records > 0 and not self.bad_lines and not self.audio_issues

    def summary(self) -> str:
        out = [f"{self.path} ({self.schema}): {self.n_records} record(s), "
               f"{len(self.bad_lines)} bad line(s), {self.n_audio} audio file(s) "
               f"({self.audio_seconds / 3600:.2f} h), {len(self.audio_issues)} audio issue(s)"]
        out += [f"  line {n}: {r}" for n, r in self.bad_lines]
        out += [f"  line {n}: {r}" for n, r in self.audio_issues]
        if self.n_records == 0:
            out.append("  no usable records" + (
                ": its lines fit " + " or ".join(f"--schema {k}" for k in self.fits) if self.fits else ""))
        return "\n".join(out)


def validate_manifest(path: str | os.PathLike, schema: type[R] | str, check_audio: bool = True,
                      max_audio_seconds: float | None = None) -> ValidationReport:
    """Check every line (never stops) and, with `check_audio`, that each audio file is readable.

    Audio is checked from its header only (`echox.audio.audio_info`), so this is cheap. A
    ``.json`` file or a folder is read as an EchoX-Dialogues ``data.json``.
    """
    p = Path(path)
    cls = _schema(schema)
    if p.is_dir() or p.suffix == ".json":
        rep = read_dialogues_json(p, on_error="report")
    else:
        rep = read_jsonl(p, cls, on_error="report")
    issues: list[tuple[int, str]] = []
    n_audio, seconds = 0, 0.0
    checked = zip(rep.records, rep.lines) if check_audio else iter(())
    for rec, line in checked:
        for ref in rec.audio_refs():
            if isinstance(ref, bytes):
                continue
            src = resolve_audio(ref, rep.base_dir)
            try:
                info = audio_info(src)  # type: ignore[arg-type]
            except AudioError as err:
                issues.append((line, str(err)))
                continue
            except (OSError, ValueError) as err:  # a name too long, a NUL byte in it
                issues.append((line, f"'{src}': cannot read it ({getattr(err, 'strerror', None) or err})"))
                continue
            n_audio += 1
            seconds += info.duration
            if info.frames == 0:
                issues.append((line, f"'{src}': audio has zero length"))
            elif max_audio_seconds is not None and info.duration > max_audio_seconds:
                issues.append((line, f"'{src}': {info.duration:.2f} s is over the "
                                     f"{max_audio_seconds:g} s limit"))
            dur = getattr(rec, "duration", None)
            if dur is not None and abs(dur - info.duration) > 0.1:
                issues.append((line, f"'{src}': manifest says {dur:.2f} s, file is "
                                     f"{info.duration:.2f} s"))
    bad = list(rep.bad_lines)  # and a repeated id: ids name cache entries and unit records
    first: dict[str, int] = {}
    for rec, line in zip(rep.records, rep.lines):
        rid = getattr(rec, "id", None)
        if rid is not None and rid in first:
            bad.append((line, f"id {rid!r} again (first on line {first[rid]})"))
        elif rid is not None:
            first[rid] = line
    fits = []
    if not len(rep) and rep.bad_lines and not (p.is_dir() or p.suffix == ".json"):
        for kind, other in SCHEMAS.items():  # a manifest checked as the wrong kind
            if other is not cls:
                try:
                    theirs = read_jsonl(p, other, on_error="report")
                except ManifestError:
                    continue
                if len(theirs) and not theirs.bad_lines:
                    fits.append(kind)
    return ValidationReport(rep.path, cls.kind, len(rep), sorted(bad), issues, n_audio, seconds, fits)
