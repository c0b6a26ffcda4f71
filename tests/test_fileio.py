"""fileio.atomic_dir: a folder is replaced in one rename, and nothing is left beside it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from echox import fileio
from echox.fileio import atomic_dir


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("old", ["folder", "file", "none"])
def test_atomic_dir_replaces_and_leaves_nothing_beside(tmp_path: Path, old: str) -> None:
    dst = tmp_path / "out"
    if old == "folder":
        dst.mkdir()
        (dst / "stale.txt").write_text("old")
    elif old == "file":
        dst.write_text("a file where the folder goes")
    with atomic_dir(dst) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _names(tmp_path) == ["out"]  # no .out.old-PID or .out.tmp-PID left
    assert _names(dst) == ["new.txt"]


def test_atomic_dir_syncs_its_files_before_the_rename(tmp_path: Path, monkeypatch) -> None:
    """Without an fsync before the rename, a power loss soon after a save could leave the
    renamed `model/` or `best/` with empty files: the rename reaches the disk before the data."""
    import echox.fileio as fileio

    synced: set[int] = set()
    at_rename: dict[str, set[int]] = {}
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.add(os.fstat(fd).st_ino)
        return real_fsync(fd)

    def replace(src, dst):
        at_rename[Path(src).name] = set(synced)
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    monkeypatch.setattr(fileio.os, "replace", replace)
    dst = tmp_path / "out"
    with atomic_dir(dst) as tmp:
        (tmp / "weights.bin").write_bytes(b"w" * 1000)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "vocab.json").write_text("{}")
        inodes = {p.stat().st_ino for p in tmp.rglob("*")}
        scratch = tmp.name
    assert inodes <= at_rename[scratch]
    assert (dst / "sub" / "vocab.json").read_text() == "{}"


def test_a_failure_inside_keeps_the_old_folder(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(dst) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("killed mid-way")
    assert _names(tmp_path) == ["out"] and _names(dst) == ["keep.txt"]


def test_a_failed_final_rename_puts_the_old_folder_back(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    real = os.replace
    calls: list[tuple[str, str]] = []

    def replace(src: object, to: object) -> None:
        calls.append((Path(src).name, Path(to).name))  # type: ignore[arg-type]
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError("disk full")
        real(src, to)  # type: ignore[arg-type]

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"), atomic_dir(dst) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _names(tmp_path) == ["out"] and _names(dst) == ["keep.txt"]
    assert len(calls) == 3  # out -> .old, the failed .tmp -> out, .old -> out


def test_json_lines_costs_a_bad_line_only(tmp_path: Path) -> None:
    from echox.fileio import json_lines

    p = tmp_path / "rows.jsonl"
    p.write_bytes(b'{"a": 1}\n\n  \nnot json\n\xff\xfe\n' + b"[" * 5000 + b"]" * 5000
                  + b'\n[1, 2]\n{"torn": \n{"n": ' + b"9" * 5000 + b"}\n")
    got = list(json_lines(p))
    assert [g.lineno for g in got] == [1, 4, 5, 6, 7, 8, 9]  # blank lines are skipped
    assert got[6].error == "malformed JSON (a number too long to read)"
    assert got[0].value == {"a": 1} and got[0].error is None and got[4].value == [1, 2]
    assert got[1].error.startswith("malformed JSON (Expecting value at column 1")
    assert got[2].error.startswith("not UTF-8 text (invalid start byte at byte 0")
    assert got[3].error == "malformed JSON (nested too deeply)"
    assert got[5].value is None and got[5].error.startswith("malformed JSON")
    with pytest.raises(FileNotFoundError):
        list(json_lines(tmp_path / "none.jsonl"))
    # a byte order mark (Windows editors write one) starts the file only: read past there
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\xef\xbb\xbf{"b": 2}\n')
    got = list(json_lines(p))
    assert got[0].value == {"a": 1} and got[1].error.startswith("malformed JSON")


def test_json_objects_skips_damaged_lines_of_a_resume_file(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A results or labels cache keeps what it can read; anything else is done again."""
    from echox.fileio import json_objects

    p = tmp_path / "done.jsonl"
    p.write_bytes(b'{"id": "a", "x": 1}\n[1]\n{"id": ["unhashable"]}\n{"x": 2}\n\xff\n'
                  b'{"id": 7}\n{"id": "b"')
    assert [(n, r["id"]) for n, r in json_objects(p, "id")] == [(1, "a"), (6, 7)]
    assert [r.message.split(":")[1] for r in caplog.records] == ["2", "3", "4", "5", "7"]
    assert list(json_objects(tmp_path / "none.jsonl", "id")) == []


def test_json_object_lines_names_the_first_bad_line(tmp_path: Path) -> None:
    from echox.errors import ManifestError
    from echox.fileio import json_object_lines

    p = tmp_path / "rows.jsonl"
    p.write_text('{"a": 1}\n\n{"b": 2}\n')
    assert json_object_lines(p, ManifestError) == [(1, {"a": 1}), (3, {"b": 2})]
    for text, words in (('{"a": 1}\n[1]\n', "line 2: expected a JSON object, got list"),
                        ('{"a": 1}\n{"b": \n', "line 2: malformed JSON")):
        p.write_text(text)
        with pytest.raises(ManifestError, match=words):
            json_object_lines(p, ManifestError)


def test_read_json_object_names_the_file_and_why(tmp_path: Path) -> None:
    """A damaged whole JSON file (a write cut short, another encoding, a list) is one error
    naming the file, in the words of the JSON-lines reader; a missing file stays a
    FileNotFoundError, for the caller to say what belongs there."""
    from echox.errors import UnitError
    from echox.fileio import read_json_object

    p = tmp_path / "meta.json"
    p.write_text('{"a": [1, 2]}\n')
    assert read_json_object(p, UnitError) == {"a": [1, 2]}
    cases = {b"": "empty file (expected a JSON object)",
             b'{"a": [1,': "malformed JSON (Expecting value at line 1 column 10)",
             b'{\n"a" 1}': "malformed JSON (Expecting ':' delimiter at line 2 column 5)",
             b"\xff\xfe{}": "not UTF-8 text (invalid start byte at byte 0)",
             b"[]": "expected a JSON object, got list", b"3": "expected a JSON object, got int",
             b"null": "expected a JSON object, got null",
             b"[" * 100_000: "malformed JSON (nested too deeply)",
             b'{"n": ' + b"9" * 5000 + b"}": "malformed JSON (a number too long to read)"}
    for raw, why in cases.items():
        p.write_bytes(raw)
        with pytest.raises(UnitError) as err:
            read_json_object(p, UnitError, "unit side file")
        assert str(err.value) == f"unit side file {p}: {why}"
    with pytest.raises(FileNotFoundError):
        read_json_object(tmp_path / "none.json", UnitError)
    with pytest.raises(UnitError, match="cannot read it"):
        read_json_object(tmp_path, UnitError)


def test_clear_interrupted_removes_scratch_and_puts_back_a_folder_moved_aside(tmp_path):
    """A kill inside `atomic_dir` leaves its scratch copy, and between its two renames the old
    folder moved aside with nothing in its place."""
    from echox.fileio import clear_interrupted

    (tmp_path / ".model.tmp-123").mkdir()
    (tmp_path / ".model.old-123").mkdir()
    (tmp_path / ".model.old-123" / "w").write_text("kept")
    (tmp_path / "best").mkdir()
    (tmp_path / ".best.old-7").mkdir()
    (tmp_path / ".other.tmp-1").mkdir()
    clear_interrupted(tmp_path, "model")
    clear_interrupted(tmp_path, "best")
    assert (tmp_path / "model" / "w").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1", "best", "model"]


def test_a_missing_folder_names_the_version_a_cut_short_save_moved_aside(tmp_path):
    """A kill between `atomic_dir`'s two renames leaves no `model/` and its previous version as
    `.model.old-<pid>`; loading said only "not found", as if nothing was there."""
    from echox.errors import CheckpointError
    from echox.fileio import moved_aside_hint
    from echox.model.checkpoint import verify_checkpoint

    assert moved_aside_hint(tmp_path / "model") == ""
    (tmp_path / ".model.old-4242").mkdir()
    hint = moved_aside_hint(tmp_path / "model")
    assert str(tmp_path / ".model.old-4242") in hint and "rename it to model" in hint
    with pytest.raises(CheckpointError) as e:
        verify_checkpoint(tmp_path / "model")
    assert str(e.value) == f"checkpoint folder not found: {tmp_path / 'model'}{hint}"
    assert "\n" not in str(e.value)


def test_save_tensors_gives_the_usual_permissions(tmp_path: Path) -> None:
    """safetensors creates its file 0600: weights another user (a shared model folder, a
    container's user) could not read, beside a config they could."""
    import os

    import torch
    from safetensors.torch import load_file

    from echox.fileio import save_tensors

    old = os.umask(0o022)
    try:
        path = save_tensors({"w": torch.arange(3.0)}, tmp_path / "w.safetensors", {"format": "pt"})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert torch.equal(load_file(path)["w"], torch.arange(3.0))


# A whole-file JSON reader that caught only JSONDecodeError let two damaged files through as
# tracebacks: an integer of 4300+ digits (a plain ValueError) and nesting deeper than the
# recursion limit (RecursionError). Each reader below must turn both into its one-line error.
_TOO_LONG = '{"format_version": ' + "7" * 5000 + "}"
_TOO_DEEP = "[" * 100_000 + "]" * 100_000


def _eval_summary(d):
    from echox.eval.run import read_summary

    (d / "summary.json").write_text(d.joinpath("payload").read_text())
    read_summary(d)


def _eval_settings(d):
    from echox.eval.run import check_run_settings

    (d / "eval.json").write_text(d.joinpath("payload").read_text())
    (d / "items.jsonl").write_text('{"id": "q1", "hit": true}\n')
    check_run_settings(d, {"mode": "s2t"})


def _vocoder_json(d):
    from echox.vocoder.base import read_json

    (d / "x.json").write_text(d.joinpath("payload").read_text())
    read_json(d / "x.json", "vocoder config")


def _hifigan_config(d):
    from echox.vocoder.hifigan import HiFiGANConfig

    (d / "config.json").write_text(d.joinpath("payload").read_text())
    HiFiGANConfig.from_json(d / "config.json")


def _unit2mel_meta(d):
    from echox.vocoder.unit2mel import Unit2Mel

    (d / "config.json").write_text(d.joinpath("payload").read_text())
    (d / "model.safetensors").write_bytes(b"")
    Unit2Mel.read_meta(d)


def _unit_language(d):
    from echox.units.language import UnitLanguage

    (d / "unit_language.json").write_text(d.joinpath("payload").read_text())
    (d / "tokenizer.json").write_text("{}")
    UnitLanguage.load(d)


def _train_recipe(d):
    from echox.train.trainer import check_run_folder

    (d / "recipe.json").write_text(d.joinpath("payload").read_text())
    check_run_folder(d)


def _safetensors_header(d):
    from echox.convert.tensor_files import read_safetensors_header

    head = d.joinpath("payload").read_bytes()
    (d / "w.safetensors").write_bytes(len(head).to_bytes(8, "little") + head)
    read_safetensors_header(d / "w.safetensors")


def _whisper_vocabulary(d):
    from echox.hub.whisper_ct2 import _token_ids

    (d / "vocabulary.json").write_text(d.joinpath("payload").read_text())
    _token_ids(d)


def _official_index(d):
    from echox.convert.official import _shards

    (d / "model.safetensors.index.json").write_text(d.joinpath("payload").read_text())
    _shards(d)


@pytest.mark.parametrize("payload", [_TOO_LONG, _TOO_DEEP], ids=["number-too-long", "too-deep"])
@pytest.mark.parametrize(("reader", "error", "says"), [
    (_eval_summary, "EvalError", "not a readable JSON file"),
    (_eval_settings, "EvalError", "not a readable JSON file"),
    (_vocoder_json, "VocoderConfigError", "not valid JSON"),
    (_hifigan_config, "VocoderCheckpointError", "cannot read HiFi-GAN config"),
    (_unit2mel_meta, "VocoderCheckpointError", "not valid JSON"),
    (_unit_language, "UnitError", "corrupt unit-language metadata"),
    (_train_recipe, "ConfigError", "was not written by `echox train`"),
    (_safetensors_header, "CheckpointError", "corrupt safetensors header"),
    (_whisper_vocabulary, "ConversionError", "not a Whisper vocabulary"),
    (_official_index, "ConversionError", "not a weight index"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_whole_file_json_readers_refuse_numbers_too_long_and_nesting_too_deep(
        tmp_path, payload, reader, error, says):
    from echox import errors

    (tmp_path / "payload").write_text(payload)
    with pytest.raises(getattr(errors, error), match=re.escape(says)) as info:
        reader(tmp_path)
    assert "\n" not in str(info.value)  # one line


def test_folder_config_is_an_object_or_none(tmp_path):
    """What savers read to tell an earlier save of their kind: never raises on a damaged file."""
    from echox.fileio import folder_config

    assert folder_config(tmp_path) is None  # missing
    for text in ("[1]", "{cut", "", "\xff", "1" * 5000, "[" * 100_000):
        (tmp_path / "config.json").write_text(text, encoding="utf-8", errors="surrogateescape")
        assert folder_config(tmp_path) is None, text[:10]
    (tmp_path / "config.json").write_text('{"format": "echox"}')
    assert folder_config(tmp_path) == {"format": "echox"}
    assert folder_config(tmp_path, "other.json") is None


def test_atomic_dir_clears_what_a_killed_save_in_its_pid_space_left(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save killed midway left `.out.tmp-<pid space>-<pid>` (for a converted 8B model, up to
    16 GB) that no later save removed; a running save's is kept, and so is one of another
    machine or container (same host name, another PID namespace: its PIDs are not ours)."""
    if not fileio._PID_SPACE:
        pytest.skip("no /proc: scratch folders are never judged dead here")
    alive = {111: False, 222: True}
    monkeypatch.setattr(fileio, "_pid_alive", lambda pid: alive.get(pid, True))
    left = tmp_path / f".out.tmp-{fileio._PID_SPACE}-111"
    running = tmp_path / f".out.tmp-{fileio._PID_SPACE}-222"
    elsewhere = tmp_path / ".out.tmp-0badcafe.4-111"  # the same PID in another PID space
    for d in (left, running, elsewhere):
        d.mkdir()
        (d / "weights").write_bytes(b"x" * 10)
    with atomic_dir(tmp_path / "out") as tmp:
        assert tmp.name == f".out.tmp-{fileio._PID_SPACE}-{os.getpid()}"
        (tmp / "new.txt").write_text("new")
    assert _names(tmp_path) == sorted(["out", running.name, elsewhere.name])


def test_no_output_goes_inside_the_packaged_assets(tmp_path: Path) -> None:
    """An --out inside the installed package's assets (the shipped model's folder) was
    written there; nothing checked it."""
    from echox.errors import ConfigError
    from echox.fileio import check_out_path
    from echox.infer.bundle import shipped_bundle

    for out, folder in ((shipped_bundle() / "eval", True), (shipped_bundle() / "x.json", False)):
        with pytest.raises(ConfigError, match="inside the installed package's assets"):
            check_out_path(out, "--out", folder=folder)
    assert check_out_path(tmp_path / "eval") == tmp_path / "eval"
