"""`echox` command line: one entry point, one subcommand per job.

Errors that users can cause (bad config, missing checkpoint, bad audio) print one clear line
and exit with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import Callable

from echox import __version__


class UserError(Exception):
    """An error caused by input; printed without a traceback."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from echox.audio import AudioError
    from echox.config import ConfigError
    from echox.data.manifest import ManifestError
    from echox.eval.asr import ASRError
    from echox.eval.benchmarks import BenchmarkError
    from echox.eval.run import EvalError
    from echox.hub import ResolveError
    from echox.model.encoder import CheckpointError
    from echox.model.prompt import PromptError
    from echox.model.vocoder import VocoderError
    from echox.train.stages import StageError
    from echox.units.kmeans import UnitError

    return (UserError, ConfigError, ResolveError, CheckpointError, PromptError, StageError,
            AudioError, ManifestError, UnitError, BenchmarkError, ASRError, VocoderError, EvalError)


def versions() -> str:
    """`echox X` and the installed versions of the packages that decide what a model computes."""
    from importlib.metadata import PackageNotFoundError, version

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
        print(versions())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="echox", description="EchoX speech-to-speech LLM")
    p.add_argument("--version", action=_VersionAction,
                   help="show the versions of echox and of its key dependencies and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    # Each command group lives beside the code it drives and registers itself here.
    for module in ("echox.infer.demo", "echox.infer.chat", "echox.train.run", "echox.units.cli",
                   "echox.data.cli", "echox.infer.bundle", "echox.eval.run", "echox.convert.cli",
                   "echox.serve.cli"):
        importlib.import_module(module).add_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except _user_errors() as e:
        if args.debug:
            raise
        print(f"echox: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("echox: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
