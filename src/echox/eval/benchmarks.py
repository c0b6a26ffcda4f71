"""Spoken-QA benchmark loaders: Llama Questions, Web Questions, TriviaQA, or your own JSONL.

All sources become the same record, :class:`QAItem`, so the evaluation loop never looks at a
column name. The benchmark is chosen with one string, ``spec``:

``llama-questions`` | ``web-questions`` | ``trivia-qa``
    The hub copies used by UltraEval-Audio (``TwinkStart/llama-questions``,
    ``TwinkStart/speech-web-questions``, ``TwinkStart/speech-triavia-qa``; split ``test``),
    loaded with ``datasets.load_dataset``. Needs a reachable hub or a warm HF cache.
``NAME=PATH``
    The same benchmark from a local copy in the hub schema, e.g. ``web-questions=/data/wq``.
    ``PATH`` may be a ``save_to_disk`` folder (a ``Dataset`` or a ``DatasetDict``), one
    ``.parquet`` file, a folder of parquet shards (a hub snapshot: ``data/test-*.parquet``), or
    a ``.jsonl`` file whose audio column holds file paths.
``local:PATH``
    A JSONL file of ``{"audio": path, "question": str, "answers": [str] | str, "id": str?}``
    lines; audio paths are absolute or relative to the JSONL's folder.

Audio is decoded with soundfile from the stored bytes or path (the ``audio`` column is cast to
``datasets.Audio(decode=False)``, so neither torchcodec nor torchaudio is needed), mixed down
to mono float32, and returned at its original sampling rate: resampling belongs to the model's
feature extractor, not here.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from echox.audio import MAX_SAMPLE_RATE, audio_info, check_wav_complete
from echox.errors import AudioError, EvalError
from echox.fileio import json_object_lines
from echox.hub import hub_unresolvable
from echox.model.prompt import is_unicode

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkSchema",
    "QAItem",
    "load_benchmark",
    "open_benchmark",
    "parse_answers",
]


@dataclass
class QAItem:
    """One spoken question with its gold answers (the unit the QA evaluation scores)."""

    id: str
    question: str
    answers: list[str]
    audio: np.ndarray | None  # [T] float32 mono, None when decode_audio=False
    sampling_rate: int | None
    audio_path: str | None  # a real file on disk, when the audio came from one


# Column names seen in the hub copies and in exports of them; tried in order.
_QUESTION_COLS = ("question", "Question", "Questions", "questions", "QuestionText",
                  "question_text", "query", "prompt", "text")
_ANSWER_COLS = ("answers", "answer", "Answer", "Answers", "gold", "target", "reference")
_AUDIO_COLS = ("audio", "Audio", "wav", "speech", "audio_path", "audio_filepath", "WavPath",
               "path", "file")
_ID_COLS = ("id", "ID", "Id", "idx", "question_id", "qid", "conversationID")


@dataclass(frozen=True)
class BenchmarkSchema:
    """Where a benchmark lives on the hub and which of its columns to prefer."""

    name: str
    hub_id: str | None
    question_cols: tuple[str, ...]
    answer_cols: tuple[str, ...]
    default_split: str = "test"
    aliases: tuple[str, ...] = ()


# Hub ids and answer columns of the UltraEval-Audio protocol the paper uses; the question columns are those of the
# hub copies (Llama Questions names it "Questions").
BENCHMARKS: dict[str, BenchmarkSchema] = {
    s.name: s
    for s in (
        BenchmarkSchema("llama-questions", "TwinkStart/llama-questions",
                        ("Questions", "Question", "QuestionText"), ("Answer",),
                        aliases=("llama_questions", "llamaq")),
        BenchmarkSchema("web-questions", "TwinkStart/speech-web-questions",
                        ("question",), ("answers",),
                        aliases=("web_questions", "speech-web-questions", "webq")),
        BenchmarkSchema("trivia-qa", "TwinkStart/speech-triavia-qa",
                        ("question",), ("answer",),
                        aliases=("trivia_qa", "triviaqa", "speech-triavia-qa")),
    )
}
_LOCAL = BenchmarkSchema("local", None, ("question",), ("answers", "answer"))


def _lookup(name: str) -> BenchmarkSchema:
    """Find a benchmark by name, alias or hub id (case-insensitive)."""
    key = name.strip().lower()
    for schema in BENCHMARKS.values():
        names = {schema.name, *schema.aliases, (schema.hub_id or "").lower()}
        if key in names:
            return schema
    known = ", ".join(BENCHMARKS)
    raise EvalError(f"unknown benchmark {name!r}; known: {known} (each also as NAME=PATH, a "
                    "local copy in its own schema), or local:PATH.jsonl")


def parse_answers(value: Any, where: str = "answers") -> list[str]:
    """Turn an answer cell (a string, a list, or a JSON / Python list literal) into a list."""
    if value is None:
        raise EvalError(f"{where}: the answer is missing (None)")
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise EvalError(f"{where}: the gold answer is empty")
        if text.startswith("[") and text.endswith("]"):
            parsed: Any = None
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                try:
                    parsed = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    parsed = None
            if isinstance(parsed, list):
                return parse_answers(parsed, where)
        return [value]
    if isinstance(value, (list, tuple, np.ndarray)):
        answers = [_answer_text(v, where) for v in value if v is not None]
        answers = [a for a in answers if a.strip()]  # "" is in every answer: a hit for anything
        if not answers:
            raise EvalError(f"{where}: the gold answer list is empty")
        return answers
    if isinstance(value, (bool, np.bool_, int, float, np.integer, np.floating)):
        return parse_answers([value], where)
    raise EvalError(f"{where}: cannot read answers from a {type(value).__name__}: {value!r}")


def _answer_text(value: Any, where: str) -> str:
    """One gold answer as text: a whole float (a year read from a float column) as an integer,
    as it is spoken ("1990", not "1990.0", which no answer ever matches); a true/false is no
    answer."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (float, np.floating))
                                                and not math.isfinite(value)):
        raise EvalError(f"{where}: a gold answer must be text or a number, got {value!r}")
    if isinstance(value, (float, np.floating)) and value == int(value):  # finite, as checked
        return str(int(value))
    return str(value)


def _pick(columns: Sequence[str], preferred: Sequence[str], what: str, source: str) -> str:
    """First preferred column present; a clear error naming the columns that exist."""
    for col in preferred:
        if col in columns:
            return col
    looked = list(dict.fromkeys(preferred))  # a schema's names and the common ones overlap
    raise EvalError(f"{source}: no {what} column; looked for {looked}, found {list(columns)}")


def _not_a_file(path: Path) -> str | None:
    """Why `path` is no audio file to read ("does not exist", "is a folder, not a file", ...),
    or None when it is one."""
    try:
        if path.is_file():
            return None
        if not path.exists():
            return "does not exist"
        return "is a folder, not a file" if path.is_dir() else "is not a regular file"
    except OSError as e:  # a name too long, a symlink loop
        return f"cannot be read ({e.strerror or e})"


def _read_audio_file(path: Path, where: str) -> tuple[np.ndarray, int]:
    why = _not_a_file(path)
    if why:
        raise EvalError(f"{where}: audio file {path} {why}")
    try:
        check_wav_complete(str(path), f"{where}: audio file {path}")
    except AudioError as err:
        raise EvalError(str(err)) from err
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # [T, C]
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise EvalError(f"{where}: cannot decode audio file {path}: {err}") from err
    return data.mean(axis=1), int(sr)  # [T]


def _read_audio_bytes(blob: bytes, where: str) -> tuple[np.ndarray, int]:
    try:
        check_wav_complete(io.BytesIO(blob), f"{where}: the stored audio bytes")
    except AudioError as err:
        raise EvalError(str(err)) from err
    try:
        data, sr = sf.read(io.BytesIO(blob), dtype="float32", always_2d=True)  # [T, C]
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise EvalError(f"{where}: cannot decode the stored audio bytes: {err}") from err
    return data.mean(axis=1), int(sr)  # [T]


class Benchmark:
    """A lazily decoded benchmark: ``len()`` is cheap, audio is read item by item.

    Holds the rows (a ``datasets.Dataset`` with undecoded audio, or parsed JSONL dicts) and the
    resolved column names; :meth:`__getitem__` builds one :class:`QAItem`.
    """

    def __init__(self, name: str, source: str, rows: Any, columns: Sequence[str],
                 schema: BenchmarkSchema, *, base_dir: Path | None, limit: int | None,
                 decode_audio: bool, line_numbers: list[int] | None = None) -> None:
        self.name = name
        self.source = source
        self._rows = rows
        self._base_dir = base_dir
        self._decode = decode_audio
        self._lines = line_numbers
        self.question_col = _pick(columns, (*schema.question_cols, *_QUESTION_COLS),
                                  "question", source)
        self.answer_col = _pick(columns, (*schema.answer_cols, *_ANSWER_COLS), "answer", source)
        # text mode reads no audio: a question file without an audio column serves it too
        audio_cols = _audio_candidates(rows, columns)
        self.audio_col: str | None = (_pick(columns, audio_cols, "audio", source)
                                      if decode_audio or any(c in columns for c in audio_cols) else None)
        self.id_col = next((c for c in _ID_COLS if c in columns), None)
        self._len = len(rows) if limit is None else min(limit, len(rows))

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[QAItem]:
        for i in range(self._len):
            yield self[i]

    def __repr__(self) -> str:
        return f"Benchmark(name={self.name!r}, source={self.source!r}, items={self._len})"

    def _where(self, index: int) -> str:
        if self._lines is not None:
            return f"{self.source} line {self._lines[index]}"
        return f"{self.source} row {index}"

    def texts(self) -> Iterator[QAItem]:
        """The items without their audio (`audio` None): ids, questions and answers, read in a
        moment, as a run checks them before its model loads. Where the audio is decoded, an
        audio file named by path must exist and have a readable header (its samples are not read
        here)."""
        for i in range(self._len):
            row = self._rows[i]  # read once (a hub row holds its audio bytes)
            item = self._item(i, audio=False, row=row)
            if self._decode and self.audio_col is not None:
                value = row.get(self.audio_col)
                if isinstance(value, dict) and value.get("array") is None and not value.get("bytes"):
                    value = value.get("path")
                if isinstance(value, (str, Path)):
                    self._audio(str(value), self._where(i), decode=False)
            yield item

    def __getitem__(self, index: int) -> QAItem:
        return self._item(index, audio=True)

    def _item(self, index: int, audio: bool, row: Any = None) -> QAItem:
        if not -self._len <= index < self._len:
            raise IndexError(f"item {index} out of range for {self._len} items")
        index %= self._len
        row = self._rows[index] if row is None else row
        where = self._where(index)
        question = row.get(self.question_col)
        if not isinstance(question, str):
            raise EvalError(f"{where}: question must be a string, got {question!r}")
        if not question.strip():
            raise EvalError(f"{where}: the question is empty")
        if not is_unicode(question):  # JSON's "\ud800"
            raise EvalError(f"{where}: the question is not valid Unicode text (it holds a lone "
                            "surrogate code point, such as \\ud800)")
        answers = parse_answers(row.get(self.answer_col), where)
        raw_id = row.get(self.id_col) if self.id_col else None
        item_id = str(raw_id) if raw_id not in (None, "") else f"{self.name}-{index}"
        audio, sr, path = (None, None, None) if self.audio_col is None or not audio else \
            self._audio(row.get(self.audio_col), where)
        return QAItem(id=item_id, question=question.strip(), answers=answers, audio=audio,
                      sampling_rate=sr, audio_path=path)

    def _resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        if not p.is_absolute() and self._base_dir is not None:
            p = self._base_dir / p
        return p

    def _audio(self, value: Any, where: str, decode: bool | None = None
               ) -> tuple[np.ndarray | None, int | None, str | None]:
        """Decode one audio cell: a path string, or a dict with array / bytes / path. Without
        `decode` (text mode) a path is only recorded, and only if its file exists; `decode`
        False checks that it does."""
        if value is None:
            raise EvalError(f"{where}: the audio cell is empty")
        if isinstance(value, (str, Path)):
            path = self._resolve(str(value))
            if decode is False:
                why = _not_a_file(path)
                if why:
                    raise EvalError(f"{where}: audio file {path} {why}")
                try:  # its header (a cut or undecodable file stopped the run only at its turn)
                    audio_info(path)
                except AudioError as err:
                    raise EvalError(f"{where}: {err}") from err
                return None, None, str(path)
            if not self._decode:  # text mode reads no audio: a missing file is no error
                return None, None, str(path) if path.is_file() else None
            audio, sr = _read_audio_file(path, where)
            return audio, sr, str(path)
        if not isinstance(value, dict):
            raise EvalError(f"{where}: cannot read audio from a {type(value).__name__}")
        stored = value.get("path")
        if stored and not isinstance(stored, str):
            raise EvalError(f"{where}: the audio path must be a string, got {stored!r}")
        on_disk = self._resolve(stored) if stored else None
        real_path = str(on_disk) if on_disk is not None and on_disk.is_file() else None
        if value.get("array") is not None:  # already decoded (older datasets, hand-made rows)
            sr = value.get("sampling_rate")
            if sr is None:
                raise EvalError(f"{where}: audio array without a sampling_rate")
            rate = float(sr) if isinstance(sr, (int, float, np.number)) \
                and not isinstance(sr, bool) else float("nan")  # (2**70 is a float too)
            if not (0 < rate <= MAX_SAMPLE_RATE and rate == int(rate)):
                raise EvalError(f"{where}: the audio sampling_rate must be a number of Hz in (0, "
                                f"{MAX_SAMPLE_RATE}], got {sr!r}")
            try:
                arr = np.asarray(value["array"], dtype=np.float32)
            except (TypeError, ValueError) as err:  # strings, ragged lists, dicts
                raise EvalError(f"{where}: the audio array is not an array of numbers ({err})") \
                    from None
            if arr.ndim == 2:  # [T, C] or [C, T]: average over the shorter (channel) axis
                arr = arr.mean(axis=int(np.argmin(arr.shape)))  # [T]
            return (arr if self._decode else None), (int(sr) if self._decode else None), real_path
        if value.get("bytes"):
            if not isinstance(value["bytes"], (bytes, bytearray)):  # JSON holds no bytes
                raise EvalError(f"{where}: the audio bytes must be bytes, got a "
                                f"{type(value['bytes']).__name__}")
            if not self._decode:
                return None, None, real_path
            audio, sr = _read_audio_bytes(value["bytes"], where)
            return audio, sr, real_path
        if on_disk is not None:
            return self._audio(str(on_disk), where)
        raise EvalError(f"{where}: the audio cell has neither array, bytes nor path")


def _audio_candidates(rows: Any, columns: Sequence[str]) -> tuple[str, ...]:
    """Columns typed ``datasets.Audio`` first, then the usual audio column names."""
    typed: list[str] = []
    features = getattr(rows, "features", None)
    if features is not None:
        import datasets

        typed = [c for c, f in features.items() if isinstance(f, datasets.Audio)]
    return (*typed, *_AUDIO_COLS)


def _undecoded(ds: Any) -> Any:
    """Cast every Audio column to decode=False, so rows carry raw {bytes, path}."""
    import datasets

    for col, feat in ds.features.items():
        if isinstance(feat, datasets.Audio) and feat.decode:
            ds = ds.cast_column(col, datasets.Audio(decode=False))
    return ds


def _choose_split(splits: Sequence[str], split: str | None, default: str, source: str) -> str:
    if split is not None:
        if split not in splits:
            raise EvalError(f"{source}: no split {split!r}; available: {list(splits)}")
        return split
    if len(splits) == 1:
        return splits[0]
    if default in splits:
        return default
    raise EvalError(f"{source}: several splits {list(splits)}; pass split=...")


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """Parse a JSONL file into dicts, naming the line of any malformed entry."""
    got = json_object_lines(path, EvalError)
    rows, lines = [obj for _, obj in got], [n for n, _ in got]
    if not rows:
        raise EvalError(f"{path}: the file has no entries")
    return rows, lines


def _check_jsonl_columns(bench: Benchmark, rows: list[dict[str, Any]], lines: list[int]) -> None:
    """Every line must carry the question, answer and audio keys found in the first (no audio
    key where the file has none and its audio is not decoded)."""
    for row, lineno in zip(rows, lines):
        for col in (bench.question_col, bench.answer_col, bench.audio_col):
            if col is not None and col not in row:
                raise EvalError(f"{bench.source} line {lineno}: missing key {col!r}")
    # the id column of any line (a line without an id is named by its number): the ids of
    # later lines were ignored when the first line had none
    if bench.id_col is None:
        bench.id_col = next((c for c in _ID_COLS if any(c in row for row in rows)), None)


def _load_parquet(paths: list[Path]) -> Any:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.table import InMemoryTable

    try:
        tables = [pq.read_table(str(p), memory_map=True) for p in paths]
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    except (pa.ArrowException, OSError) as err:
        raise EvalError(f"cannot read parquet {paths[0]}: {err}") from err
    return datasets.Dataset(InMemoryTable(table))


def _parquet_split(path: Path) -> str:
    """Split of a hub parquet shard: ``data/test-00000-of-00001.parquet`` or ``test/0000.parquet``."""
    stem = path.name.split("-")[0].split(".")[0]
    return path.parent.name if stem.isdigit() else stem


def _open_local_dataset(path: Path, schema: BenchmarkSchema, split: str | None) -> Any:
    """A ``datasets.Dataset`` from a save_to_disk folder, a parquet file or parquet shards."""
    import datasets

    if path.is_dir() and any((path / f).is_file() for f in
                             ("dataset_dict.json", "state.json", "dataset_info.json")):
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as err:
            raise EvalError(f"{path}: not a readable save_to_disk folder: {err}") from err
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[_choose_split(list(loaded), split, schema.default_split, str(path))]
        return loaded
    if path.is_file():
        return _load_parquet([path])
    shards = sorted(path.rglob("*.parquet"))
    if not shards:
        raise EvalError(
            f"{path}: no save_to_disk files (dataset_dict.json / state.json) and no .parquet files"
        )
    by_split: dict[str, list[Path]] = {}
    for shard in shards:
        by_split.setdefault(_parquet_split(shard), []).append(shard)
    chosen = _choose_split(sorted(by_split), split, schema.default_split, str(path))
    return _load_parquet(by_split[chosen])


def _open_hub(schema: BenchmarkSchema, split: str | None) -> Any:
    import datasets

    if schema.hub_id is None:
        raise EvalError(f"{schema.name} has no hub id; pass a path")
    unresolved = hub_unresolvable()
    try:
        with _cache_only(unresolved is not None):
            return datasets.load_dataset(schema.hub_id, split=split or schema.default_split)
    except Exception as err:  # noqa: BLE001 - hub/network/cache errors come in many types
        where = (f"the hub's host {unresolved} does not resolve here, and it could not be "
                 "loaded from the Hugging Face cache" if unresolved else "from the hub")
        raise EvalError(
            f"cannot load {schema.hub_id}: {where} ({type(err).__name__}: {err}); "
            f"download it elsewhere and pass '{schema.name}=PATH' (a save_to_disk folder, "
            f"parquet file or folder)"
        ) from err


@contextlib.contextmanager
def _cache_only(on: bool) -> Iterator[None]:
    """datasets and huggingface_hub in offline mode inside, as HF_HUB_OFFLINE=1 before their
    import would set it: the cached copy at once, instead of about 27 s of retries first. The
    flags are process-wide: a benchmark is opened by one thread at a time."""
    if not on:
        yield
        return
    import datasets
    import huggingface_hub.constants as hub_constants

    was = hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = was


def open_benchmark(spec: str, *, limit: int | None = None, split: str | None = None,
                   decode_audio: bool = True) -> Benchmark:
    """Open a benchmark lazily (see the module docstring for ``spec``).

    ``limit`` keeps the first N items; ``split`` picks a split of multi-split sources (default
    ``test``) and is ignored by single-split files; ``decode_audio=False`` skips reading audio
    (for text-only runs) and leaves ``audio`` and ``sampling_rate`` as None.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise EvalError(f"empty benchmark spec {spec!r}")
    if limit is not None and limit < 0:
        raise EvalError(f"limit must be >= 0, got {limit}")
    spec = spec.strip()
    if spec.startswith("local:"):
        name, schema, raw_path = "local", _LOCAL, spec[len("local:"):]
    elif "=" in spec:
        raw_name, raw_path = spec.split("=", 1)
        schema = _lookup(raw_name)
        name = schema.name
    else:
        schema = _lookup(spec)
        ds = _undecoded(_open_hub(schema, split))
        return Benchmark(schema.name, schema.hub_id or schema.name, ds, ds.column_names, schema,
                         base_dir=None, limit=limit, decode_audio=decode_audio)

    if not raw_path.strip():
        raise EvalError(f"benchmark spec {spec!r} names no path")
    path = Path(raw_path.strip()).expanduser()
    if not path.exists():
        raise EvalError(f"benchmark path {path} does not exist")
    if schema is _LOCAL or path.suffix.lower() in (".jsonl", ".json"):
        if path.is_dir():
            raise EvalError(f"{path}: expected a JSONL file, got a folder")
        rows, lines = _read_jsonl(path)
        bench = Benchmark(name, str(path), rows, list(rows[0]), schema, base_dir=path.parent,
                          limit=limit, decode_audio=decode_audio, line_numbers=lines)
        _check_jsonl_columns(bench, rows, lines)
        return bench
    ds = _undecoded(_open_local_dataset(path, schema, split))
    base = path if path.is_dir() else path.parent
    return Benchmark(name, str(path), ds, ds.column_names, schema, base_dir=base, limit=limit,
                     decode_audio=decode_audio)


def load_benchmark(spec: str, *, limit: int | None = None, split: str | None = None,
                   decode_audio: bool = True) -> list[QAItem]:
    """Load every item of a benchmark into memory (see :func:`open_benchmark`)."""
    return list(open_benchmark(spec, limit=limit, split=split, decode_audio=decode_audio))
