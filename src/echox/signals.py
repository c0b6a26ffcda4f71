"""Signal handlers that a command installs for a while and then puts back.

`echox` installs its SIGTERM handler for every command (`cli.main`), and `echox train` installs
its stop-after-this-step handler for SIGINT and SIGTERM (`train.run`); both go through
`handled`, so both leave an ignored signal ignored (a background job inherits SIGINT ignored,
and `nohup` SIGHUP) and both leave the handlers alone outside the main thread, where Python
cannot set them.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def handled(signals: tuple[int, ...], handler: Callable[[int, Any], None]) -> Iterator[None]:
    """`handler` for those of `signals` that this process does not ignore, while inside. Only
    the main thread can set handlers: in another one the signals keep theirs. On the way out
    every signal gets back the handler it had (SIG_DFL where Python did not know it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in signals}
    try:  # a signal between two of these still finds every handler put back
        for s, was in before.items():
            if was is not signal.SIG_IGN:
                signal.signal(s, handler)
        yield
    finally:
        for s, was in before.items():
            signal.signal(s, signal.SIG_DFL if was is None else was)
