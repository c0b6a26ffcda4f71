"""The EchoX cache folder: `$ECHOX_CACHE`, else `~/.cache/echox`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = os.environ.get("ECHOX_CACHE") or os.path.join(Path.home(), ".cache", "echox")
    return Path(root)


def cached_conversion(name: str, convert: Callable[[Path], object]) -> Path:
    """`cache_dir()/packaged/<name>`, made by `convert(dst)` the first time."""
    dst = cache_dir() / "packaged" / name
    if not (dst / "config.json").is_file():
        log.warning("converting the packaged %s into %s (once)", name, dst)
        convert(dst)
    return dst
