"""The EchoX cache folder: `$ECHOX_CACHE`, else `~/.cache/echox`."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable

from echox.errors import ConversionError
from echox.fileio import check_out_path

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = os.environ.get("ECHOX_CACHE") or os.path.join(Path.home(), ".cache", "echox")
    return Path(root)


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
        except ConversionError:
            # Two processes started at once (e.g. two training jobs on a new machine): the
            # other one's conversion landed between our check and our write. Use it.
            if not (dst / "config.json").is_file():
                raise
            log.warning("another process converted %s first; using its %s", name, dst)
    return dst
