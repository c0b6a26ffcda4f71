"""The EchoX cache folder: `$ECHOX_CACHE`, else `~/.cache/echox`."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable

from echox.errors import ConversionError
from echox.fileio import check_out_path, disk_full

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = os.environ.get("ECHOX_CACHE") or os.path.join(Path.home(), ".cache", "echox")
    return Path(root)


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def cached_conversion(name: str, convert: Callable[[Path], object]) -> Path:
    """`cache_dir()/packaged/<name>`, made by `convert(dst)` the first time."""
    dst = cache_dir() / "packaged" / name
    if not (dst / "config.json").is_file():
        # before the conversion's minutes: a cache path that is (or lies below) a file
        check_out_path(dst, "$ECHOX_CACHE" if os.environ.get("ECHOX_CACHE") else "the cache")
        if dst.is_dir() and not dst.is_symlink():  # damaged (its config.json lost): made again
            log.warning("%s has no config.json: converting it again", dst)
            shutil.rmtree(dst)
        log.warning("converting the packaged %s into %s (once)", name, dst)
        try:
            convert(dst)
        except Exception as e:
            if disk_full(e):  # the half-written copy is gone (an atomic folder)
                free = shutil.disk_usage(_existing_parent(dst)).free / 1e6
                raise ConversionError(
                    f"the disk is full: converting the packaged {name} into {dst} failed "
                    f"({free:,.0f} MB free there); free some room, or set $ECHOX_CACHE to a "
                    "folder on another disk") from e
            if not isinstance(e, ConversionError):
                raise
            # Two processes started at once (e.g. two training jobs on a new machine): the
            # other one's conversion landed between our check and our write. Use it.
            if not (dst / "config.json").is_file():
                raise
            log.warning("another process converted %s first; using its %s", name, dst)
    return dst
