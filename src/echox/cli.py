"""`echox` command line: one table of commands, one entry point.

Every command is a row of `COMMANDS`: its words (`echox units extract`), the module that
implements it, the function there that adds its options to a parser, and the function that
runs it. Modules never register themselves; this table is the one place that lists what
`echox` can do. Only the module of the command being run is imported (`echox --help` and
`echox demo` do not load the training stack).

Errors that users can cause (a bad config, a missing checkpoint, bad audio) are `EchoXError`s:
one clear line on stderr and exit status 2; `--debug` shows the traceback. SIGTERM stops a
command as Ctrl-C does, its `finally` and `with` blocks run, with one line and status 143 (a
systemd unit of `echox serve` sets `SuccessExitStatus=143`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import select
import signal
import sys
import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable

from echox import __version__
from echox.errors import EchoXError
from echox.fileio import disk_full
from echox.signals import handled


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]  # ("units", "extract") for `echox units extract`
    module: str  # where the command lives
    options: str  # module function(parser) that adds the command's options
    run: str  # module function(args) -> exit status
    help: str
    doc: bool = False  # show the module's docstring as the command's description
    defaults: dict[str, Any] = field(default_factory=dict)  # fixed arguments (train's stage)


GROUPS: dict[str, str] = {
    "train": "train a stage of EchoX: s2t, t2c, echo; export a slim checkpoint",
    "units": "speech units: k-means, extraction, unit language",
    "data": "build corpora and check manifests",
    "vocoder": "train, distil and export unit vocoders",
    "convert": "import checkpoints made elsewhere",
}

COMMANDS: tuple[Command, ...] = (
    Command(("demo",), "echox.infer.demo", "demo_options", "cmd_demo",
            "answer a spoken question with speech, offline", doc=True),
    Command(("chat",), "echox.infer.chat", "chat_options", "cmd_chat",
            "talk to a model bundle (speech or text in, speech out)", doc=True),
    Command(("serve",), "echox.serve.cli", "serve_options", "cmd_serve",
            "serve the model: streaming speech API and web page", doc=True),
    Command(("eval",), "echox.eval.run", "eval_options", "cmd_eval",
            "spoken QA accuracy (text / s2t / s2s), UltraEval-Audio match", doc=True),
    Command(("bundle",), "echox.infer.bundle", "bundle_options", "cmd_bundle",
            "pack a checkpoint, a vocoder and a unit language into one folder"),
    *(Command(("train", stage), "echox.train.run", "stage_options", "cmd_train", what, doc=True,
              defaults={"stage": stage})
      for stage, what in (("s2t", "Stage I: speech to text (adapter + LoRA)"),
                          ("t2c", "Stage II: text to units"),
                          ("echo", "Stage III: echo training on the S2T model's hidden states"))),
    Command(("train", "export"), "echox.train.export", "export_options", "cmd_export",
            "a slim float16 copy of a checkpoint: only the parts a stage trained", doc=True),
    Command(("units", "train-kmeans"), "echox.units.cli", "train_kmeans_options", "cmd_train_kmeans",
            "fit k-means on frame features of manifests' audio"),
    Command(("units", "extract"), "echox.units.cli", "extract_options", "cmd_extract",
            "fill `units` of a TTS manifest from its audio (cached)"),
    Command(("units", "attach"), "echox.units.cli", "attach_options", "cmd_attach",
            "give dialogues' assistant turns the units of their TTS records"),
    Command(("units", "train-language"), "echox.units.cli", "train_language_options",
            "cmd_train_language", "learn the unit language (BPE over units)"),
    Command(("units", "stats"), "echox.units.cli", "stats_options", "cmd_stats",
            "compression of unit languages at several vocabulary sizes"),
    Command(("data", "validate"), "echox.data.cli", "validate_options", "cmd_validate",
            "check manifests line by line (and their audio files)"),
    Command(("data", "build-tiny"), "echox.data.tiny_corpus", "build_tiny_options", "cmd_build_tiny",
            "build the tiny recipe's spoken-QA corpus", doc=True),
    Command(("data", "s2t-mix"), "echox.data.s2t_mix", "s2t_mix_options", "cmd_s2t_mix",
            "ASR turns and a further training voice for Stage I", doc=True),
    Command(("vocoder", "train"), "echox.train.vocoder_cmd", "train_options", "cmd_train_vocoder",
            "train the unit->mel model in front of the pretrained HiFi-GAN"),
    Command(("vocoder", "distill"), "echox.train.vocoder_cmd", "distill_options",
            "cmd_train_hifigan", "distil the packaged HiFi-GAN V1 into a V2-size generator"),
    Command(("vocoder", "onnx"), "echox.train.vocoder_cmd", "onnx_options", "cmd_onnx_vocoder",
            "run a unit->mel vocoder's HiFi-GAN on ONNX Runtime (optionally int8) for faster "
            "CPU synthesis"),
    Command(("convert", "official"), "echox.convert.official", "official_options",
            "cmd_convert_official",
            "import a released EchoX checkpoint (EchoX-3B / EchoX-8B) as an EchoX bundle", doc=True),
)


def versions() -> str:
    """`echox X` and the installed versions of the packages that decide what a model computes."""
    lines = [f"echox {__version__}"]
    for name in ("torch", "transformers", "onnxruntime"):
        try:
            lines.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            lines.append(f"{name} (not installed)")
    return "\n".join(lines + [f"python {sys.version.split()[0]}"])


class _VersionAction(argparse.Action):
    """`--version`: prints `versions()` as is (argparse's own action re-wraps the lines)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help=None):  # type: ignore[no-untyped-def]
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        print(versions(), flush=True)  # a closed pipe fails here, where main() catches it
        parser.exit()


def _function(module: Any, name: str) -> Callable[..., Any]:
    fn = getattr(module, name, None)
    if not callable(fn):  # a table row that does not fit its module: a bug, caught by the tests
        raise AttributeError(f"{module.__name__} has no function {name}")
    return fn


def _selected(argv: list[str]) -> tuple[str, ...] | None:
    """The words of the command that `argv` runs, or None (help, a typo: argparse answers)."""
    words = tuple(a for a in argv if not a.startswith("-"))[:2]
    for cmd in COMMANDS:
        if words[:len(cmd.words)] == cmd.words:
            return cmd.words
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `echox` parser. With `argv`, only the command it runs gets its options (and its
    module imported); the others are listed with their help. Without, every command is whole."""
    only = _selected(argv) if argv is not None else None
    p = argparse.ArgumentParser(prog="echox", description="EchoX speech-to-speech LLM")
    p.add_argument("--version", action=_VersionAction,
                   help="show the versions of echox and of its key dependencies and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    top = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, Any] = {}
    for cmd in COMMANDS:
        whole = argv is None or cmd.words == only
        *group, name = cmd.words
        sub = top
        if group:
            (g,) = group
            if g not in groups:
                gp = top.add_parser(g, help=GROUPS[g], description=GROUPS[g])
                groups[g] = gp.add_subparsers(dest=f"{g}_command", required=True, metavar="COMMAND")
            sub = groups[g]
        kw: dict[str, Any] = {"help": cmd.help, "description": cmd.help}
        if not whole:
            sub.add_parser(name, **kw)
            continue
        module = importlib.import_module(cmd.module)
        if cmd.doc and module.__doc__:
            kw.update(description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        cp = sub.add_parser(name, **kw)
        _function(module, cmd.options)(cp)
        # also after the command's words (`echox chat q.wav --debug`); SUPPRESS keeps a
        # --debug given before them
        cp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
        cp.set_defaults(func=_function(module, cmd.run), **cmd.defaults)
    return p


def _stdout_reader_gone(e: BaseException) -> bool:
    """Whether `e` is stdout's pipe having lost its reader (`echox --version | head -1`), and
    not another pipe or socket breaking: the write end of a pipe whose reader closed polls
    POLLERR."""
    if not isinstance(e, BrokenPipeError):
        return False
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # a stdout of no file descriptor
        return False


def _reader_gone() -> int:
    """The exit of a program whose output pipe closed (as one killed by SIGPIPE): quietly,
    with what is left unwritten sent nowhere (its flush at exit would print a traceback)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # the command's module is imported here (torch, transformers: seconds)
        parser = build_parser(argv)
        args = parser.parse_args(argv)
    except KeyboardInterrupt:  # Ctrl-C while starting: the line any other interrupt gets
        print("echox: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError as e:  # `echox --version | head -1`
        if _stdout_reader_gone(e):
            return _reader_gone()
        raise
    func: Callable[[argparse.Namespace], int] = args.func
    shown = warnings.formatwarning
    if not args.debug:  # one line per warning, as errors are (not the source line under it)
        warnings.formatwarning = _one_line_warning
    logs = _OneLineLog()  # and the library's logged notices in the same form
    logging.getLogger("echox").addHandler(logs)
    try:
        with handled((signal.SIGTERM,), _raise_terminated):
            rc = func(args)
            sys.stdout.flush()  # a closed pipe fails here, not in the flush at exit
            return rc
    except EchoXError as e:
        if args.debug:
            raise
        print(f"echox: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("echox: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("echox: stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    except Exception as e:  # what the file system refuses, wherever it is first touched
        if _stdout_reader_gone(e):  # `echox eval --compare A B | head`: the reader stopped
            return _reader_gone()
        if args.debug:
            raise
        line = _file_system_error(e)
        if line is None:
            raise
        print(f"echox: error: {line}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = shown
        logging.getLogger("echox").removeHandler(logs)


def _file_system_error(e: Exception) -> str | None:
    """One line for what the file system refuses (a name too long, a full disk, a path this
    user may not write); None for any other error (a traceback)."""
    if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:
        name = str(e.filename or "")
        short = name if len(name) <= 80 else f"{name[:40]}...{name[-30:]}"
        return f"a file name too long for this file system: {short}"
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        where = f": {e.filename}" if e.filename else ""
        return (f"{e.strerror or e}{where} (a read-only folder or file system, or one of another "
                "user); give a path this user can write, or change its permissions")
    if disk_full(e):
        if isinstance(e, OSError):
            what = f"{e.strerror}" + (f" writing {e.filename}" if e.filename else "")
        else:
            what = str(e)
        return (f"the disk is full ({what}); free some room and run the command again (a "
                "training run resumes from its last checkpoint with --resume)")
    return None


class Terminated(BaseException):
    """SIGTERM, raised where the command is (as Ctrl-C raises KeyboardInterrupt), so that its
    cleanup runs: half-written files are removed, a server shuts down, a run saves."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, line: str | None = None) -> str:
    _clear_progress_bars()
    return f"echox: warning: {message}\n"


class _OneLineLog(logging.Handler):
    """The library's log records at WARNING and above, as `echox: warning: ...` lines on stderr,
    the form `warnings` and errors take (without a handler Python printed the bare message).
    A record's traceback (a server's failed turn) follows its line."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = f"echox: {record.levelname.lower()}: {record.getMessage()}"
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            _clear_progress_bars()
            sys.stderr.write(text + "\n")
        except Exception:  # a record that cannot be shown must not stop the command
            self.handleError(record)


def _clear_progress_bars() -> None:
    """Blank the line of each progress bar being drawn, so that the warning written next starts
    a line of its own (`units:  0%|...| 0/5 [00:00<?, ?utt/s]echox: warning: ...` was one
    line); the bar is drawn again at its next update."""
    tqdm = sys.modules.get("tqdm.std")  # no bar without it
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        if not getattr(bar, "disable", True):
            with contextlib.suppress(Exception):  # a bar on a closed stream: nothing to clear
                bar.clear()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
