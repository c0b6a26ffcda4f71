"""fileio.atomic_dir: a folder is replaced in one rename, and nothing is left beside it."""

from __future__ import annotations

import os
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
