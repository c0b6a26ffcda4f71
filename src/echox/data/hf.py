"""Manifests from Hugging Face `datasets`: a hub id or a local copy (saved dataset, parquet/
arrow shards, or a folder of them) becomes ASR or dialogue records.

Records read from the hub may hold the encoded file bytes instead of a path; with `audio_dir`
they are written there once (named by content hash) and the records point at the files.
Split out of `echox.data.manifest`, which re-exports `load_hf_asr` and `load_hf_dialogues`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from echox.data.manifest import (
    AsrRecord,
    AudioRef,
    DialogueRecord,
    OnError,
    R,
    _check_on_error,
    resolve_audio,
)
from echox.errors import ManifestError
from echox.fileio import atomic_write_bytes

__all__ = ["load_hf_asr", "load_hf_dialogues"]

log = logging.getLogger("echox.data.manifest")  # one logger for every manifest reader


def _undecoded(ds: Any) -> Any:
    """Cast every (possibly nested) ``datasets.Audio`` feature to decode=False.

    Rows then carry the raw ``{bytes, path}``, decoded later with soundfile: neither torchcodec
    nor torchaudio is needed.
    """
    import datasets

    feats = copy.deepcopy(ds.features)
    changed = False

    def walk(f: Any) -> None:
        nonlocal changed
        if isinstance(f, datasets.Audio):
            changed |= bool(f.decode)
            f.decode = False
        elif isinstance(f, Mapping):
            for v in f.values():
                walk(v)
        elif isinstance(f, (list, tuple)):
            for v in f:
                walk(v)
        elif hasattr(f, "feature"):  # Sequence / List / LargeList
            walk(f.feature)

    walk(feats)
    return ds.cast(feats) if changed else ds


def _one_line(err: BaseException) -> str:
    """`err` as one line (pyarrow and datasets messages may span several)."""
    return " ".join(str(err).split())


# the names of a dataset's splits; parquet shards grouped under another name (a folder of
# 0000.parquet files, say) are one unnamed split, read whatever split is asked for
_SPLIT_NAMES = {"train", "test", "validation", "valid", "dev", "eval", "evaluation"}


def _split_of(shard: Path) -> str:
    """``data/train-00000-of-00002.parquet`` -> train; ``train.clean.100-00000-of-00001.parquet``
    -> train.clean.100 (a split name may hold dots and dashes: LibriSpeech's); ``train/0000.parquet``
    -> train."""
    name = shard.name.removesuffix(".parquet")
    sharded = re.match(r"(.+?)-\d+-of-\d+(?:-.*)?$", name)  # also -of-00002-<hash>
    stem = sharded.group(1) if sharded else name.split("-")[0]
    return shard.parent.name if stem.isdigit() else stem


def _open_hf(name_or_path: str | os.PathLike, split: str,
             name: str | None = None) -> tuple[Any, Path | None, str]:
    """(dataset, folder for relative paths or None, source label) for a hub id or local copy.
    `name`: the hub dataset's configuration (e.g. LibriSpeech's ``clean``); local copies have
    none."""
    import datasets

    p = Path(name_or_path).expanduser()
    src = f"{name_or_path}[{split}]" if name is None else f"{name_or_path}/{name}[{split}]"
    if p.exists():
        if p.is_dir() and any((p / f).is_file() for f in ("dataset_dict.json", "state.json")):
            try:
                ds = datasets.load_from_disk(str(p))
            except Exception as err:  # a damaged json/arrow file raises all sorts of errors
                raise ManifestError(f"{p}: not a readable save_to_disk folder "
                                    f"({type(err).__name__}: {_one_line(err)})") from err
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ManifestError(f"{p}: no split {split!r}; available: {list(ds)}")
                ds = ds[split]
            return ds, p, src
        shards = [p] if p.is_file() else sorted(p.rglob("*.parquet"))
        if not shards or shards[0].suffix != ".parquet":
            raise ManifestError(f"{p}: expected a save_to_disk folder or parquet file(s)")
        if p.is_dir():
            groups: dict[str, list[Path]] = {}
            for s in shards:
                groups.setdefault(_split_of(s), []).append(s)
            if split in groups:
                shards = groups[split]
            elif len(groups) > 1 or {g.split(".")[0] for g in groups} & _SPLIT_NAMES:
                # one group named as another split (train-*.parquet for split test) was read
                # as the split asked for: the eval set was the training data, without a word
                raise ManifestError(f"{p}: no parquet shards for split {split!r}; "
                                    f"found {sorted(groups)}")
        import pyarrow as pa
        import pyarrow.parquet as pq
        from datasets.table import InMemoryTable

        try:
            table = pa.concat_tables([pq.read_table(str(s), memory_map=True) for s in shards])
        except (pa.ArrowException, OSError) as err:
            raise ManifestError(f"{p}: cannot read parquet ({_one_line(err)})") from err
        return datasets.Dataset(InMemoryTable(table)), (p if p.is_dir() else p.parent), src
    try:
        return datasets.load_dataset(str(name_or_path), name, split=split), None, src
    except Exception as err:
        raise ManifestError(
            f"cannot load dataset {name_or_path!r} split {split!r} ({type(err).__name__}: {_one_line(err)}); "
            "pass a local save_to_disk folder or parquet file(s) instead"
        ) from err


def _audio_cell(cell: Any, base: Path | None, audio_dir: Path | None, where: str) -> AudioRef | None:
    """A raw audio cell (path string or ``{bytes, path}``) as a path or encoded bytes."""
    if cell is None:
        return None
    if isinstance(cell, str):
        return _audio_path(cell, base, where)
    if not isinstance(cell, Mapping):
        raise ManifestError(f"{where}: cannot read audio from a {type(cell).__name__}")
    blob, path = cell.get("bytes"), cell.get("path")
    if blob is not None and not isinstance(blob, (bytes, bytearray, memoryview)):
        raise ManifestError(f"{where}: the audio cell's bytes are a {type(blob).__name__}")
    if path is not None and not isinstance(path, str):
        raise ManifestError(f"{where}: the audio cell's path is a {type(path).__name__}")
    if blob:
        if audio_dir is None:
            return bytes(blob)
        suffix = Path(path).suffix if path else ""
        if not (1 < len(suffix) <= 10 and suffix[1:].isalnum()):  # a name the disk accepts
            suffix = ".wav"
        out = audio_dir.absolute() / f"{hashlib.sha1(blob).hexdigest()[:20]}{suffix}"
        if not out.is_file():
            atomic_write_bytes(out, bytes(blob))
        return str(out)
    if path:
        return _audio_path(path, base, where)
    if cell.get("array") is not None:
        raise ManifestError(f"{where}: decoded audio arrays are not supported; keep the audio "
                            "column as a datasets.Audio feature or file paths")
    raise ManifestError(f"{where}: the audio cell has neither bytes nor a path")


def _audio_path(path: str, base: Path | None, where: str) -> str:
    """An audio cell's path, absolute; an empty one (it would name the dataset's folder) or
    one with a NUL byte (no file can have it) is the row's error."""
    if not path.strip():
        raise ManifestError(f"{where}: the audio path is empty")
    if "\0" in path:
        raise ManifestError(f"{where}: the audio path holds a NUL byte")
    return str(Path(resolve_audio(path, base)).absolute())


def _first(columns: Sequence[str], wanted: Sequence[str], what: str, src: str) -> str:
    for c in wanted:
        if c in columns:
            return c
    raise ManifestError(f"{src}: no {what} column; looked for {list(wanted)}, found {list(columns)}")


def _rows(ds: Any, src: str, cls: type[R], to_obj: Callable[[Mapping[str, Any], str], dict],
          on_error: OnError) -> Iterator[R]:
    for i, row in enumerate(ds):
        where = f"{src} row {i}"
        try:
            yield cls.from_json(to_obj(row, where), where)
        except ManifestError as err:
            if on_error == "stop":
                raise
            log.warning("%s (skipped)", err)


def load_hf_asr(name_or_path: str | os.PathLike, split: str = "train", *,
                audio_column: str | None = None, text_column: str | None = None,
                audio_dir: str | os.PathLike | None = None,
                on_error: OnError = "stop", name: str | None = None) -> Iterator[AsrRecord]:
    """ASR records from a hub id, a ``save_to_disk`` folder or parquet file(s).

    Audio cells become absolute paths (relative ones joined to the local folder) or, for
    embedded audio, the encoded bytes; with `audio_dir` the bytes are written there once (named
    by content hash) so the records can be saved as a JSONL manifest. The dataset is opened
    here (errors surface now); rows are converted lazily as the iterator is consumed.
    """
    _check_on_error(on_error)
    ds, base, src = _open_hf(name_or_path, split, name)
    ds = _undecoded(ds)
    cols = list(ds.column_names)
    import datasets

    typed = [c for c, f in ds.features.items() if isinstance(f, datasets.Audio)]
    a_col = audio_column or _first(cols, [*typed, "audio", "audio_path", "audio_filepath",
                                          "path", "file", "wav"], "audio", src)
    t_col = text_column or _first(cols, ["text", "transcript", "transcription", "sentence",
                                         "normalized_text", "raw_text"], "text", src)
    for col, what in ((a_col, "audio"), (t_col, "text")):
        if col not in cols:
            raise ManifestError(f"{src}: no {what} column {col!r}; found {cols}")
    i_col = next((c for c in ("id", "utt_id", "key", "segment_id") if c in cols), None)
    d_col = next((c for c in ("duration", "audio_duration") if c in cols), None)
    adir = Path(audio_dir) if audio_dir is not None else None

    def to_obj(row: Mapping[str, Any], where: str) -> dict[str, Any]:
        return {"audio": _audio_cell(row.get(a_col), base, adir, where), "text": row.get(t_col),
                "id": row.get(i_col) if i_col else None, "duration": row.get(d_col) if d_col else None}

    return _rows(ds, src, AsrRecord, to_obj, on_error)


def load_hf_dialogues(name_or_path: str | os.PathLike, split: str = "train", *,
                      audio_dir: str | os.PathLike | None = None,
                      on_error: OnError = "stop", name: str | None = None) -> Iterator[DialogueRecord]:
    """Dialogue records from a hub id, a ``save_to_disk`` folder or parquet file(s).

    Rows hold a ``conversations`` list of ``{from, value, audio?, ...}``; the per-turn audio may
    be a path or a (nested) ``datasets.Audio`` feature, handled as in :func:`load_hf_asr`.
    (A JSONL manifest or an EchoX-Dialogues data.json: use read_jsonl / read_dialogues_json.)
    """
    _check_on_error(on_error)
    ds, base, src = _open_hf(name_or_path, split, name)
    ds = _undecoded(ds)
    c_col = _first(list(ds.column_names), ["conversations", "conversation", "messages"],
                   "conversations", src)
    adir = Path(audio_dir) if audio_dir is not None else None

    def to_obj(row: Mapping[str, Any], where: str) -> dict[str, Any]:
        conv = row.get(c_col)
        if isinstance(conv, (list, tuple)):
            conv = [{**m, "audio": _audio_cell(m.get("audio"), base, adir, f"{where} turn {j}")}
                    if isinstance(m, Mapping) else m for j, m in enumerate(conv)]
        return {"id": row.get("id"), "conversations": conv}

    return _rows(ds, src, DialogueRecord, to_obj, on_error)
