"""`echox.signals.handled`: the one install-and-restore of signal handlers that `cli.main` and
`echox train` share."""

import signal
import threading

from echox.signals import handled


def _mark(signum, frame):  # pragma: no cover - never delivered here
    pass


def test_a_handler_is_set_inside_and_the_old_one_put_back():
    old = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        with handled((signal.SIGUSR1,), _mark):
            assert signal.getsignal(signal.SIGUSR1) is _mark
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_an_ignored_signal_stays_ignored():
    """A background job inherits SIGINT ignored; the handler must not take it back."""
    old = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        with handled((signal.SIGUSR1, signal.SIGUSR2), _mark):
            assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGUSR2) is _mark
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_handlers_come_back_after_an_exception():
    before = signal.getsignal(signal.SIGUSR2)
    try:
        with handled((signal.SIGUSR2,), _mark):
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert signal.getsignal(signal.SIGUSR2) is before


def test_outside_the_main_thread_nothing_is_touched():
    """Python sets handlers only in the main thread (a ValueError elsewhere)."""
    before = signal.getsignal(signal.SIGUSR1)
    seen, errors = [], []

    def worker():
        try:
            with handled((signal.SIGUSR1,), _mark):
                seen.append(signal.getsignal(signal.SIGUSR1))
        except BaseException as e:  # noqa: BLE001 - shown by the assertion below
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert errors == [] and seen == [before]
