"""`echox` entry point: what every command shares."""

import os
import signal

import pytest

from echox import cli


def test_sigterm_stops_a_command_with_one_line_and_its_cleanup_runs(capsys, monkeypatch):
    """SIGTERM killed any command at once (status 143, no word, no `finally`): a half-written
    file stayed behind. It now stops the command as Ctrl-C does, with its own line."""
    cleaned = []

    def killed(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not stop the command")
        finally:
            cleaned.append(True)

    def unhandled(signum, frame):  # in place of the default, which would kill pytest
        raise AssertionError("SIGTERM reached the test: echox did not handle it")

    monkeypatch.setattr("echox.infer.demo.cmd_demo", killed)
    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        assert cli.main(["demo"]) == 143
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the handler it found, put back
    finally:
        signal.signal(signal.SIGTERM, before)
    assert cleaned == [True]
    assert [x for x in capsys.readouterr().err.splitlines() if x.startswith("echox")] == \
        ["echox: stopped by SIGTERM"]


def test_ctrl_c_while_the_command_is_imported_is_one_line(capsys, monkeypatch):
    """The command's module (torch, transformers) is imported before the command runs: a
    Ctrl-C then printed a traceback of 40-80 lines instead of the usual line."""
    def interrupted(argv=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["chat", "--text", "hi"]) == 130
    assert capsys.readouterr().err == "echox: interrupted\n"


def test_a_full_disk_is_one_line_and_other_errors_keep_their_traceback(capsys, monkeypatch):
    """A full disk (CI's conversion of SmolLM2 met one) printed a traceback of 60 lines; it
    is one line now, whether Python's OSError or a Rust writer's text says it."""
    import errno

    import pytest
    from safetensors import SafetensorError

    raised: list[BaseException] = []

    def failing(args):
        raise raised[-1]

    monkeypatch.setattr("echox.infer.demo.cmd_demo", failing)
    raised.append(OSError(errno.ENOSPC, "No space left on device", "/data/ckpt/model.safetensors"))
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("echox: error: the disk is full (")
    assert "/data/ckpt/model.safetensors" in err and "--resume" in err

    raised.append(SafetensorError("Error while serializing: I/O error: No space left on device "
                                  f"(os error {errno.ENOSPC})"))
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err

    # a folder this user may not write (convert official into a read-only folder): one line
    for code in (errno.EACCES, errno.EPERM, errno.EROFS):
        raised.append(OSError(code, os.strerror(code), "/ro/.out.tmp-1"))
        assert cli.main(["demo"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "/ro/.out.tmp-1 (a read-only folder" in err, err
    raised.append(OSError(errno.EIO, "Input/output error", "/x"))
    with pytest.raises(OSError):  # a failing device, not the user's to fix: the traceback
        cli.main(["demo"])
    raised.append(ValueError("(os error 5)"))
    with pytest.raises(ValueError):
        cli.main(["demo"])


def test_logged_warnings_print_as_one_echox_warning_line(capsys, monkeypatch):
    """The library's log.warning notices (bundle's vocoder/unit-count notice, a skipped broken
    checkpoint) printed bare through Python's last-resort handler, without the
    `echox: warning:` that warnings and errors carry, glued to a progress bar's line; INFO
    stays quiet, and the handler is gone when main returns."""
    import logging
    import sys

    from tqdm import tqdm

    def logs(args):
        log = logging.getLogger("echox.infer.bundle")
        with tqdm(total=2, desc="units", file=sys.stderr) as bar:
            bar.update(1)
            log.warning("the unit language is over %d units", 500)
            log.info("an info line")
            bar.update(1)
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("echox.serve").error("turn failed", exc_info=True)
        return 0

    monkeypatch.setattr("echox.infer.demo.cmd_demo", logs)
    assert cli.main(["demo"]) == 0
    err = capsys.readouterr().err
    lines = err.replace("\r", "\n").splitlines()
    assert lines.count("echox: warning: the unit language is over 500 units") == 1, lines
    assert "an info line" not in err
    assert "echox: error: turn failed" in lines and "ValueError: boom" in err
    assert not logging.getLogger("echox").handlers


def test_a_warning_during_a_progress_bar_gets_a_line_of_its_own(capsys, monkeypatch):
    """`units extract` printed `units:   0%|...| 0/5 [00:00<?, ?utt/s]echox: warning: skipping
    'bad1': ...`: the warning glued to the bar's line, where a grep for it at a line start
    missed it."""
    import sys
    import warnings

    from tqdm import tqdm

    def warns(args):
        with tqdm(total=3, desc="units", file=sys.stderr) as bar:
            bar.update(1)
            warnings.warn("skipping 'bad1': not a WAV file", UserWarning)
            bar.update(2)
        return 0

    monkeypatch.setattr("echox.infer.demo.cmd_demo", warns)
    def show(message, category, filename, lineno, file=None, line=None):
        # what Python's own showwarning does (pytest records warnings instead of showing them)
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        assert cli.main(["demo"]) == 0
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert "echox: warning: skipping 'bad1': not a WAV file" in lines, lines


def test_a_closed_output_pipe_ends_quietly():
    """`echox --version | head -1` printed a BrokenPipeError traceback and exited 1."""
    import subprocess
    import sys

    for argv in (["--version"], ["units", "--help"]):
        p = subprocess.Popen([sys.executable, "-c", "import sys; from echox.cli import main; "
                              "sys.exit(main(sys.argv[1:]))", *argv],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p.stdout.close()  # the reader is gone before anything is written
        err = p.stderr.read().decode()
        assert p.wait() in (141, 0) and "Traceback" not in err and "BrokenPipe" not in err, err


def test_another_broken_pipe_is_not_taken_for_a_closed_stdout(monkeypatch):
    """Only stdout's reader going away ends quietly (141); a pipe or socket of the command's own
    that breaks was swallowed the same way, with no message."""
    import echox.infer.demo as demo
    from echox.cli import main

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(demo, "cmd_demo", broken)
    with pytest.raises(BrokenPipeError):
        main(["demo"])
