"""transformers' loading bar, off while EchoX reads a local folder.

transformers 5 draws a "Loading weights" bar for every model it reads. EchoX hands
`from_pretrained` local folders only (`echox.hub.resolve` downloads first), which load in about a
second, so the bar is only noise: in a log it is hundreds of carriage-return lines. Downloads
happen before, in `resolve`, and keep their bars.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def no_loading_bar() -> Iterator[None]:
    """transformers' progress bars off inside, back as they were after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
