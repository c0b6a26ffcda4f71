"""transformers' progress bars, off while EchoX reads or writes a local folder.

transformers 5 draws a "Loading weights" bar for every model it reads (and a "Writing model
shards" bar for every one it saves). EchoX hands `from_pretrained` local folders only
(`echox.hub.resolve` downloads first), which load in about a second, so the bar is only noise:
in a log it is hundreds of carriage-return lines. Downloads happen before, in `resolve`, and
keep their bars.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def no_loading_bar() -> Iterator[None]:
    """transformers' own progress bars off inside, back as they were after. Only its flag is
    touched: `transformers.utils.logging.disable_progress_bar` would also reset
    huggingface_hub's bar settings, which a user may have set. The flag is process-wide:
    loads are not run from several threads at once."""
    from transformers.utils import logging as hf_logging

    if not hasattr(hf_logging, "_tqdm_active"):  # another transformers: its bar stays
        yield
        return
    was = hf_logging._tqdm_active
    hf_logging._tqdm_active = False
    try:
        yield
    finally:
        hf_logging._tqdm_active = was
