"""The one error family of EchoX.

Every error a user can cause (a bad config, a missing or half-written checkpoint, unusable
audio, a malformed manifest line) is an `EchoXError`. Its message names the file, key or value
at fault. The `echox` command line catches this one class, prints the message on one line and
exits with status 2; anything else is a bug and keeps its traceback.

Each class also derives from the built-in exception a caller would expect (`ValueError` for a bad
value, `FileNotFoundError` for a missing file), so code that catches those keeps working.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from os import PathLike


class EchoXError(Exception):
    """Base of every error caused by input, config or files rather than by a bug."""


# --------------------------------------------------------------------------- settings and files
class ConfigError(EchoXError, ValueError):
    """A configuration value is missing, has the wrong type or is out of range."""


class ResolveError(EchoXError, FileNotFoundError):
    """A model name could not be turned into a local folder."""


class PackagedModelMissingError(ResolveError):
    """The pip package that ships an offline pretrained part is not installed."""


class CheckpointError(EchoXError, RuntimeError):
    """A checkpoint file is missing, corrupt or does not fit the model; names the file."""


class NoBundleError(CheckpointError):
    """No model bundle was found in any of the default places (none was named)."""


class ConversionError(CheckpointError):
    """A source checkpoint cannot be converted (wrong architecture, missing tensor, ...)."""


# --------------------------------------------------------------------------- inputs
class AudioError(EchoXError, ValueError):
    """Input audio that cannot be used; the message names the file and the problem."""


class AudioTooLongError(AudioError):
    """Speech longer than the accepted limit; the message names the option that raises it."""


class PromptError(EchoXError, ValueError):
    """A dialogue cannot be rendered with this tokenizer's chat template."""


class EngineClosedError(EchoXError, RuntimeError):
    """An inference engine (or a session of it) was used after `close()`."""


class ManifestError(EchoXError, ValueError):
    """A data manifest (JSON lines) is missing, malformed or points at missing files."""


class UnitError(EchoXError, ValueError):
    """Speech units, their k-means, cache or unit language cannot be used."""


# --------------------------------------------------------------------------- components
class VocoderError(EchoXError):
    """Base of all vocoder errors."""


class VocoderConfigError(VocoderError, ValueError):
    """A vocoder config is invalid or asks for an unsupported feature."""


class VocoderInputError(VocoderError, ValueError):
    """The units (or audio) given to a vocoder cannot be used."""


class VocoderCheckpointError(VocoderError, CheckpointError):
    """A vocoder checkpoint is unreadable or does not fit the vocoder it is loaded into."""


class VocoderFileNotFoundError(VocoderError, FileNotFoundError):
    """A vocoder checkpoint or config file does not exist."""


# --------------------------------------------------------------------------- jobs
class StageError(EchoXError, RuntimeError):
    """A training stage cannot run as asked (missing init, wrong data for the stage, ...)."""


class DataBuildError(EchoXError, RuntimeError):
    """A corpus build step failed (a missing TTS program, a failed synthesis, ...)."""


class EvalError(EchoXError, ValueError):
    """An evaluation cannot run: a bad benchmark file, a missing ASR model, a bad option."""


@contextlib.contextmanager
def loading(folder: str | PathLike, what: str) -> Iterator[None]:
    """A library's loader that fails on a damaged folder (a cut or lost weights file, a
    malformed config.json) raises CheckpointError naming the folder, in one line."""
    try:
        yield
    except EchoXError:
        raise
    except (OSError, ValueError) as e:
        raise CheckpointError(_damaged(folder, what, e)) from e
    except Exception as e:  # safetensors' SafetensorError derives from Exception alone
        if type(e).__name__ != "SafetensorError":
            raise
        raise CheckpointError(_damaged(folder, what, e)) from e


def _damaged(folder: str | PathLike, what: str, e: BaseException) -> str:
    why = " ".join(str(e).split())[:300]
    return (f"{folder}: cannot load the {what} ({type(e).__name__}: {why}); if the folder is "
            "damaged, restore it (a cached conversion is made again once its folder is deleted)")
