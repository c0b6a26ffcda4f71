"""EchoX checkpoint folders: safetensors + config + tokenizer, written atomically.

Layout::

    config.json          {"format": "echox", "format_version": 1, "config": {...}}
    model.safetensors    the trained parts only (speech adapter, LoRA, T2C, echo, denoiser,
                         rows of added tokens); frozen base weights are named in the config.
                         A shipped bundle may leave out the T2C ("omitted_parts") and store
                         float16 ("weights_dtype"); loading casts to the model's dtype
    tokenizer/           the LLM tokenizer with EchoX's added tokens
    checksums.json       sha256 of every file above, checked on load
    <extra files>        e.g. training_args.json
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path, PurePath
from typing import Any, Callable

import torch

from echox import __version__
from echox.config import EchoXConfig
from echox.errors import CheckpointError, ConfigError
from echox.fileio import (atomic_dir, check_replaceable, folder_config, moved_aside_hint,
                          read_json_object, save_tensors, sha256_file)
from echox.hub import LOCAL_PREFIXES
from echox.model.llm import load_tokenizer

# The functions take the EchoX model (echox.model.echox) duck-typed, so this module never
# imports it: EchoX imports this one.
EchoX = torch.nn.Module

FORMAT_VERSION = 1
log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CHECKSUMS = "checksums.json"
ADDED = "_added_rows."


def is_base_key(model: EchoX, key: str) -> bool:
    """Frozen pretrained weights that the config names and that are not saved."""
    if key.startswith("encoder."):
        return not model.config.encoder.trainable
    if key.startswith("llm."):
        if model.config.llm.use_lora:
            return "lora_" not in key
        return not model.config.llm.trainable
    return False


def trained_state(model: EchoX, full_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores. `full_state`: a state dict gathered by the caller
    (FSDP / ZeRO-3 shard parameters, so `model.state_dict()` alone is not the whole model)."""
    full_state = model.state_dict() if full_state is None else full_state
    sd = {k: v for k, v in full_state.items() if not is_base_key(model, k)}
    ids = torch.tensor(model.llm.added_token_ids)
    base = model.llm.base
    sd[ADDED + "embed"] = _weight(model, base.get_input_embeddings(), full_state)[ids]
    head = base.get_output_embeddings()
    if head is not None:
        sd[ADDED + "lm_head"] = _weight(model, head, full_state)[ids]
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def _weight(model: EchoX, module: torch.nn.Module, full_state: dict[str, torch.Tensor]) -> torch.Tensor:
    """`module.weight` as `full_state` has it. Under FSDP the live weight is a shard (FSDP2:
    a DTensor, whose indexing is a collective that hangs when only rank 0 saves)."""
    for name, m in model.named_modules():
        if m is module:
            key = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
            if f"{key}.weight" in full_state:
                return full_state[f"{key}.weight"]
    return module.weight


# Parts a checkpoint may leave out: the T2C (inference never runs it; it only labels Stage
# III's data), the echo decoder and denoiser while no echo stage has trained them (a Stage I
# warm start), and the speech adapter and the LLM's own weights (LoRA) while no s2t stage has
# trained them (a Stage II model kept alone). An omitted part keeps its initial weights on load.
OMITTABLE = ("t2c", "echo", "denoiser", "adapter", "llm")


def save_checkpoint(
    model: EchoX,
    folder: Path,
    extra_files: dict[str, str] | None = None,
    extra_writer: Callable[[Path], None] | None = None,
    full_state: dict[str, torch.Tensor] | None = None,
    omit_parts: tuple[str, ...] = (),
    dtype: torch.dtype | None = None,
    replace: bool = False,
) -> Path:
    """Write the checkpoint atomically; `extra_writer(tmp)` may add files (e.g. optimizer
    state) that are renamed into place together with the weights. An existing `folder` must
    be a checkpoint or empty (`check_save_folder`) unless `replace` (e.g. `--force`).

    For shipping, `omit_parts=("t2c",)` leaves out the T2C (its stage is then no longer
    recorded as trained) and `dtype=torch.float16` halves the file; loading casts back to the
    model's dtype.
    """
    if not replace:
        check_save_folder(folder)
    if isinstance(omit_parts, str):
        raise CheckpointError(f"omit_parts must be a tuple of part names, got {omit_parts!r}")
    # a part the model was loaded without holds initial weights: its copy leaves it out too
    omit_parts = tuple(dict.fromkeys((*omit_parts, *getattr(model, "omitted_parts", ()))))
    dtype = parse_dtype(dtype)  # a floating torch.dtype, or bf16 / fp16 / fp32 as loading takes
    reserved = {CONFIG, WEIGHTS, CHECKSUMS, "tokenizer"}
    if extra_files is not None and not isinstance(extra_files, dict):
        raise CheckpointError(f"extra_files must be a dict of file name -> text, got "
                              f"{type(extra_files).__name__}")
    for name, text in (extra_files or {}).items():
        if not isinstance(name, str) or Path(name).name != name or name in reserved \
                or name in ("", ".", ".."):
            raise CheckpointError(f"extra file name {name!r} must be a plain file name other "
                                  f"than {sorted(reserved)}")
        if not isinstance(text, str):  # a dict was pathlib's TypeError, after the weights
            raise CheckpointError(f"extra file {name!r}: its content must be text (str), got "
                                  f"{type(text).__name__}; give json.dumps(...) of a mapping")
    bad = sorted(set(omit_parts) - set(OMITTABLE))
    if bad:
        raise CheckpointError(f"cannot omit {bad}: only {list(OMITTABLE)} can be left out")
    if {"echo", "denoiser"} & set(omit_parts) and "echo" in model.trained_stages:
        raise CheckpointError("cannot omit the echo decoder or the denoiser of a model trained "
                              "with stage echo")
    if {"adapter", "llm"} & set(omit_parts) and "s2t" in model.trained_stages:
        raise CheckpointError("cannot omit the speech adapter or the LLM's weights of a model "
                              "trained with stage s2t")
    if model.t2c is model.echo:  # one module (t2c.layout=authors), stored once, under echo
        if "echo" in omit_parts and "t2c" in model.trained_stages and "t2c" not in omit_parts:
            raise CheckpointError("cannot omit echo: with t2c.layout=authors it is the trained T2C")
        if "t2c" not in omit_parts:
            omit_parts = (*omit_parts, "t2c")
    state = trained_state(model, full_state)
    drop = tuple(f"{p}." for p in omit_parts)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
             for k, v in state.items() if not k.startswith(drop)}
    stages = [s for s in model.trained_stages if s not in omit_parts or model.t2c is model.echo]
    try:
        _write_checkpoint(model, folder, state, stages, omit_parts, dtype, extra_files, extra_writer)
    except OSError as e:  # a read-only folder, a full disk, a parent that is a file, ...
        raise CheckpointError(f"cannot write the checkpoint {folder}: {e.strerror or e}") from e
    return folder


def checkpoint_folder(folder: Any, what: str = "checkpoint folder") -> Path:
    """`folder` as a Path; anything but a str or os.PathLike (None, a dict of weights, a
    model) is a `CheckpointError` naming what was given, not a TypeError from deep inside."""
    if isinstance(folder, bytes) or not isinstance(folder, (str, os.PathLike)) or not str(folder):
        raise CheckpointError(f"a {what} must be a path (str or os.PathLike), got "
                              f"{type(folder).__name__}{' (empty)' if folder == '' else ''}")
    return Path(folder).expanduser()


# the folders a checkpoint or bundle holds besides its files at the top
FOLDER_PARTS = ("tokenizer", "vocoder", "unit_language", "llm", "encoder")


def folder_overlap(out: Path, source: Path) -> str | None:
    """How resolved `out` overlaps resolved `source` ("is", "holds", "lies inside": one of the
    source's own parts, such as its vocoder/), or None. Another folder inside the source (an
    earlier bundle at `<model>/bundle`) is no part of it: replacing it deletes nothing used."""
    if out == source:
        return "is"
    if out in source.parents:
        return "holds"
    if source not in out.parents:
        return None
    first = out.relative_to(source).parts[0]
    try:
        listed = {Path(k).parts[0] for k in json.loads((source / CHECKSUMS).read_text())}
    except (OSError, ValueError, RecursionError, TypeError, AttributeError):
        listed = set()
    return "lies inside" if first in {*FOLDER_PARTS, *listed} else None


def check_save_folder(folder: Path) -> None:
    """Refuse to save over anything but an EchoX checkpoint or an empty folder: saving
    replaces the whole folder, which would delete a file or unrelated files there."""
    check_replaceable(folder, "saving a checkpoint", is_earlier_save=_holds_checkpoint,
                      error=CheckpointError)


def _holds_checkpoint(folder: Path) -> bool:
    """Whether `folder` has an EchoX config.json (a checkpoint saved before, or a bundle)."""
    return (folder_config(folder, CONFIG) or {}).get("format") == "echox"


def _write_checkpoint(model: EchoX, folder: Path, state: dict[str, torch.Tensor],
                      stages: list[str], omit_parts: tuple[str, ...], dtype: torch.dtype | None,
                      extra_files: dict[str, str] | None,
                      extra_writer: Callable[[Path], None] | None) -> None:
    with atomic_dir(folder) as tmp:
        save_tensors(state, tmp / WEIGHTS, metadata={"format": "pt"})
        meta: dict[str, Any] = {
            "format": "echox", "format_version": FORMAT_VERSION, "echox_version": __version__,
            "config": model.config.to_dict(),
            "trained_stages": stages,
        }
        if omit_parts:
            meta["omitted_parts"] = sorted(omit_parts)
        if dtype is not None:
            meta["weights_dtype"] = str(dtype).removeprefix("torch.")
        unhashed = _carry_base_models(model, tmp, meta)
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2))
        model.tokenizer.save_pretrained(tmp / "tokenizer")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if extra_writer is not None:
            extra_writer(tmp)
        sums = {
            str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*"))
            if p.is_file() and str(p.relative_to(tmp)) not in unhashed
        }
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=2))


def _json_kind(value: object) -> str:
    """A parsed JSON value as an error message shows it: 'a list: []', 'a number: 3'."""
    if value is None:
        return "null"
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", dict: "an object"}
    shown = json.dumps(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f"{kinds.get(type(value), type(value).__name__)}: {shown}"


def option_folder(option: str, path: str | Path) -> Path:
    """The checkpoint folder that a command-line option names, refused in one line when it is a
    file or does not exist (before `verify_checkpoint` looks inside)."""
    path = Path(path)
    if path.is_file():
        raise CheckpointError(f"{option} {path} is a file, not a checkpoint folder")
    if not path.is_dir():
        raise CheckpointError(f"{option} {path}: checkpoint folder not found{moved_aside_hint(path)}")
    return path


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """Check presence and checksums; return the parsed config.json."""
    if folder.is_file():  # "not found" sent the user looking for a file that is there
        raise CheckpointError(f"{folder} is a file, not a checkpoint folder (config.json, "
                              "model.safetensors, checksums.json)")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}{moved_aside_hint(folder)}")
    sums_path = folder / CHECKSUMS
    for required in (CONFIG, WEIGHTS, CHECKSUMS):
        if (folder / required).is_dir():
            raise CheckpointError(f"{folder / required} is a folder, not the checkpoint's file")
        if not (folder / required).is_file():
            raise CheckpointError(f"checkpoint file missing: {folder / required}"
                                  f"{_other_kind_of_folder(folder)}")
    try:
        sums = json.loads(sums_path.read_text())
    except (ValueError, RecursionError) as e:  # also a number too long, a list too deep
        raise CheckpointError(f"corrupt checkpoint file {sums_path}: {e}") from e
    if not isinstance(sums, dict):
        raise CheckpointError(f"corrupt checkpoint file {sums_path}: expected a JSON object of "
                              f"file name -> sha256, got {_json_kind(sums)}")
    odd = next((k for k, v in sums.items() if not isinstance(v, str)), None)
    if odd is not None:
        raise CheckpointError(f"corrupt checkpoint file {sums_path}: the checksum of {odd!r} is "
                              f"not a sha256 string ({_json_kind(sums[odd])})")
    unlisted = [n for n in (CONFIG, WEIGHTS) if n not in sums]
    if unlisted:  # e.g. `{}`: nothing would be verified
        raise CheckpointError(f"corrupt checkpoint file {sums_path}: it lists no checksum for "
                              f"{', '.join(unlisted)}")
    for name, digest in sums.items():
        p = folder / name
        # a name inside the folder, judged by the name: a file may be a link elsewhere (a
        # Hugging Face cache snapshot links each file into its blobs/), its checksum still holds
        parts = PurePath(name).parts
        if not parts or PurePath(name).is_absolute() or ".." in parts:
            raise CheckpointError(f"corrupt checkpoint file {sums_path}: {name!r} is not a file "
                                  "inside the checkpoint folder")
        if not p.is_file():
            raise CheckpointError(f"checkpoint file missing: {p}")
        if sha256_file(p) != digest:
            raise CheckpointError(f"checkpoint file corrupt or half-written (checksum mismatch): {p}")
    try:
        meta = json.loads((folder / CONFIG).read_text())
    except (ValueError, RecursionError) as e:  # also a number too long, a list too deep
        raise CheckpointError(f"corrupt checkpoint file {folder / CONFIG}: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{folder / CONFIG} is not an EchoX checkpoint config: expected a "
                              f"JSON object, got {_json_kind(meta)}")
    if meta.get("format") != "echox" or "config" not in meta:
        raise CheckpointError(f"{folder / CONFIG} is not an EchoX checkpoint config")
    if not isinstance(meta["config"], dict):
        raise CheckpointError(f"{folder / CONFIG}: \"config\" must be a JSON object, got "
                              f"{_json_kind(meta['config'])}")
    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{folder / CONFIG}: format_version must be an integer, got "
                              f"{version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{folder / CONFIG}: format version {meta['format_version']} is newer than this "
            f"EchoX ({__version__}) supports"
        )
    return meta


def _local_base_models(folder: Path, config: EchoXConfig
                       ) -> tuple[EchoXConfig, dict[str, tuple[str, Path]]]:
    """`config` with base models that the checkpoint folder holds itself (a relative
    `name_or_path` such as "llm", written by `echox convert official`) made absolute, and
    those parts as {part: (relative name, absolute folder)}."""
    data = config.to_dict()
    carried = {}
    for part in ("encoder", "llm"):
        name = data[part]["name_or_path"]
        if not Path(name).is_absolute() and not name.startswith(("builtin:", "packaged:")) \
                and (folder / name / "config.json").is_file():
            data[part]["name_or_path"] = str((folder / name).resolve())
            carried[part] = (name, (folder / name).resolve())
    return EchoXConfig.from_dict(data), carried


def _carry_base_models(model: EchoX, tmp: Path, meta: dict[str, Any]) -> set[str]:
    """Put the base models the loaded folder held itself (`model.carried_base`) into the new
    folder `tmp` too, as hard links under the same relative names (no second copy of an LLM's
    gigabytes), and name them so in `meta`; returns their weights' paths, which checksums leave
    out (hashing gigabytes on every load would take longer than loading them; safetensors
    checks their sizes as it reads)."""
    unhashed: set[str] = set()
    for part, (rel, src) in model.carried_base.items():
        cfg = meta["config"][part]
        if cfg.get("name_or_path") != str(src) or not src.is_dir():
            continue  # pointed elsewhere since the load: nothing to carry
        try:
            for f in sorted(src.rglob("*")):
                if f.is_file():
                    dst = tmp / rel / f.relative_to(src)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.link(f, dst)
        except OSError as e:
            # another file system: a copy per save (each training checkpoint) would cost an
            # LLM's gigabytes, so the save names the folder by its path instead
            shutil.rmtree(tmp / rel, ignore_errors=True)
            log.warning("%s: cannot link the %s into the save (%s); the save names that folder "
                        "by its path: keep it", src, part, e.strerror or e)
            continue
        unhashed |= {str(p.relative_to(tmp)) for p in (tmp / rel).rglob("*.safetensors")}
        cfg["name_or_path"] = rel
    return unhashed


def _checkpoint_tokenizer(folder: Path, audio_token: str) -> Any:
    """The tokenizer saved in the checkpoint; a missing or unreadable one is a CheckpointError
    (a folder whose checksums do not list its tokenizer files is not caught by them)."""
    tdir = folder / "tokenizer"
    if not tdir.is_dir() or not any((tdir / n).is_file()
                                    for n in ("tokenizer.json", "tokenizer_config.json")):
        raise CheckpointError(f"{tdir}: the checkpoint's tokenizer is missing (the folder is "
                              "incomplete: copy it again, or save the model again)")
    try:
        return load_tokenizer(tdir, audio_token)
    except (OSError, ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{tdir}: the checkpoint's tokenizer cannot be read "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e})"
                              ) from e


DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """bf16 / fp16 / fp32 (or their long names, or a floating torch dtype) -> torch dtype;
    None stays."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise CheckpointError(f"dtype must be a floating torch.dtype such as torch.float16, "
                                  f"or bf16 / fp16 / fp32, got {dtype!r}")
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose bf16, fp16 or fp32 (or a "
                              "floating torch.dtype)")
    return DTYPES[dtype]


def check_device(device: Any, option: str = "device") -> None:
    """A clear error for a device this torch cannot use (cuda on a CPU build, a typo)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"{option} {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"{option} {device}: this torch build or machine has no CUDA device "
                              f"(torch {torch.__version__})")
    if dev.type == "meta":  # shapes without data: no weights can be read onto it
        raise CheckpointError(f"{option} {device}: the meta device holds no weights; give cpu or "
                              "a GPU (cuda, cuda:1, ...)")
    try:  # mps without Apple's GPU, cuda:7 on a machine of one GPU: a torch error deep in the load
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise CheckpointError(f"{option} {device}: this machine or torch build cannot use it "
                              f"({' '.join(str(e).split())[:160]})") from e


def add_base_model_options(p: Any) -> None:
    """`--base-llm` and `--base-encoder`: where the frozen base models are now."""
    for part, what in (("llm", "LLM"), ("encoder", "Whisper encoder")):
        p.add_argument(f"--base-{part}", metavar="FOLDER",
                       help=f"read the model's frozen base {what} from this folder (or hub id) "
                            "instead of where its config names it: the folder moved, or a local "
                            "copy of a hub id")


def base_models_of(args: Any) -> dict[str, str] | None:
    """The `base_models` of `load_bundle` from `add_base_model_options`' flags (None: none)."""
    given = {}
    for part in ("llm", "encoder"):
        where = getattr(args, f"base_{part}", None)
        if where is None:
            continue
        if not where.strip():
            raise CheckpointError(f"--base-{part}: give a folder or hub id, not an empty string")
        why = _not_a_base_folder(where)
        if why:
            raise CheckpointError(f"--base-{part} {where}: {why}")
        given[part] = local_or_hub(where)
    return given or None


def local_or_hub(name: str) -> str:
    """A base model's `name_or_path` as recorded: an existing local folder as an absolute path
    (a relative one did not resolve from the next stage's working folder), else as given."""
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


def _not_a_base_folder(name: str) -> str | None:
    """Why `name`, a base model's folder or hub id, names no folder ("folder not found", "a
    file, not a folder"); None for a folder, or for a hub id (it resolves when loaded)."""
    try:
        p = Path(name).expanduser()
        if p.is_dir():
            return None
        if p.exists():
            return "a file, not a folder"
    except (OSError, RuntimeError) as e:  # `~nosuchuser/x`, a name too long
        return f"not a usable path ({e})"
    return "folder not found" if name.startswith(LOCAL_PREFIXES) else None


def _other_kind_of_folder(folder: Path) -> str:
    """"; it is a vocoder folder: ..." where `folder` holds another EchoX part than a model."""
    try:
        meta = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError, RecursionError):
        return ""
    if isinstance(meta, dict) and "vocoder" in meta and "config" not in meta:
        return "; it is a vocoder folder: give the model (bundle) folder"
    return ""


def load_checkpoint(cls: Any, folder: Path, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None,
                    base_models: dict[str, str] | None = None) -> EchoX:
    """Load a checkpoint folder. `device`: the LLM's weights are read straight onto it and the
    other parts are moved there once their weights are in; `dtype`: every floating weight in it
    (the LLM read in it directly, the rest cast on the CPU before the move). Default: CPU,
    the config's dtypes. `base_models` ({"llm": ..., "encoder": ...}) reads the frozen base
    models from elsewhere than the config names (their folder moved, a hub id's local copy)."""
    meta = verify_checkpoint(folder)
    try:
        config = EchoXConfig.from_dict(meta["config"])
    except ConfigError as e:
        raise CheckpointError(f"{folder / CONFIG}: invalid config: {e}") from e
    tok = _checkpoint_tokenizer(folder, config.llm.audio_token)
    # (base models the folder holds itself are read from it; a save passes them on)
    config, carried = _local_base_models(folder, config)
    for part, where in (base_models or {}).items():
        if part not in ("llm", "encoder") or not isinstance(where, str) or not where.strip():
            raise CheckpointError(f"base_models: {part}={where!r}: give llm or encoder and a "
                                  "folder or hub id")
        getattr(config, part).name_or_path = where
        carried.pop(part, None)
    for part in ("llm", "encoder"):
        name, what = getattr(config, part).name_or_path, "LLM" if part == "llm" else "encoder"
        why = _not_a_base_folder(name)
        if why is None:
            continue
        if part in (base_models or {}):
            raise CheckpointError(f"base {what} {name}: {why}")
        raise CheckpointError(
            f"{folder}: its base {what} {name}: {why} (moved?): read it from where it is "
            f"now with base_models={{'{part}': FOLDER}} (the CLI: --base-{part} FOLDER; echox "
            f"train --init: --set model.{part}.name_or_path=FOLDER)")
    model = cls.build(config, tokenizer=tok, device=device, dtype=dtype)
    model.carried_base = carried
    model.omitted_parts = _omitted_parts(folder, meta)
    load_weights(model, folder, verified=True, omitted=_unstored_parts(model, model.omitted_parts))
    stages = meta.get("trained_stages", [])
    if not isinstance(stages, list) or not all(isinstance(x, str) for x in stages):
        raise CheckpointError(f"{folder / CONFIG}: trained_stages must be a list of stage "
                              f"names, got {stages!r}")
    model.trained_stages = list(stages)
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model


def _config_of(folder: Path) -> dict[str, Any]:
    """A checkpoint's config.json, read without verifying the folder again."""
    try:
        return read_json_object(folder / CONFIG, CheckpointError, "checkpoint config")
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder / CONFIG} is missing") from e


def _omitted_parts(folder: Path, meta: dict[str, Any]) -> tuple[str, ...]:
    """The parts a checkpoint's config says its weights file leaves out ("omitted_parts")."""
    omitted = meta.get("omitted_parts") or []
    if not isinstance(omitted, list) or set(omitted) - set(OMITTABLE):
        raise CheckpointError(f"{folder / CONFIG}: bad omitted_parts {omitted!r}")
    return tuple(omitted)


def trained_parts_left_out(model: EchoX, folder: Path) -> list[str]:
    """The parts `model` trains (any trainable weight) that checkpoint `folder` leaves out: a
    resume from it would train them on from their initial weights. (echox before 2026-12-07
    saved a stage's checkpoints without a part its slim --init had left out.)"""
    return [p for p in _omitted_parts(folder, _config_of(folder))
            if any(w.requires_grad for w in getattr(model, p).parameters())]


def _unstored_parts(model: EchoX, omitted: tuple[str, ...]) -> tuple[str, ...]:
    """`omitted` plus "t2c" where the model's T2C is its echo decoder (one module, stored under
    echo.)."""
    return tuple(sorted(set(omitted) | {"t2c"})) if model.t2c is model.echo else omitted


def load_weights(model: EchoX, folder: Path, parts: list[str] | None = None,
                 verified: bool = False, omitted: tuple[str, ...] | None = None) -> None:
    """Load a checkpoint's trained weights into an existing model (all, or only `parts`,
    e.g. ["t2c"] to take the T2C of a Stage II run); `omitted` parts are not in the file and
    keep their initial weights (default: those the checkpoint's config names, as in a
    training checkpoint of a model started from a slim one). Tensors are cast to the model's
    dtypes."""
    from safetensors.torch import load_file

    meta = None if verified else verify_checkpoint(folder)
    if omitted is None:
        omitted = _unstored_parts(model, _omitted_parts(
            folder, meta if meta is not None else _config_of(folder)))
    try:
        sd = load_file(str(folder / WEIGHTS))
    except Exception as e:  # noqa: BLE001 - safetensors raises several error types
        raise CheckpointError(f"cannot read {folder / WEIGHTS}: {e}") from e
    added = {k[len(ADDED):]: sd.pop(k) for k in list(sd) if k.startswith(ADDED)}
    skip = tuple(f"{p}." for p in omitted)
    expected = {k for k in model.state_dict()
                if not is_base_key(model, k) and not (skip and k.startswith(skip))}
    if parts is not None:
        keep = tuple(f"{p}." for p in parts)
        sd = {k: v for k, v in sd.items() if k.startswith(keep)}
        expected = {k for k in expected if k.startswith(keep)}
        added = {} if "llm" not in parts else added
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder / WEIGHTS} does not fit the model of its config: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        )
    bad = [k for k, v in sd.items() if v.shape != model.state_dict()[k].shape]
    if bad:
        raise CheckpointError(f"{folder / WEIGHTS}: shapes differ from the model for {bad[:5]}")
    base = model.llm.base
    emb = base.get_input_embeddings().weight
    head = base.get_output_embeddings()
    rows = len(model.llm.added_token_ids)
    # (an LLM whose folder holds the added tokens' rows, as an imported released model's, has
    # nothing to add: llm.resize_embeddings false)
    if (parts is None or "llm" in parts) and rows and model.config.llm.resize_embeddings \
            and "embed" not in added:
        raise CheckpointError(f"{folder / WEIGHTS}: no {ADDED}embed (the rows of the tokens "
                              "EchoX adds to the LLM, e.g. its audio placeholder)")
    for name, table in (("embed", emb), ("lm_head", None if head is None else head.weight)):
        if name in added and (table is None or tuple(added[name].shape) != (rows, table.shape[1])):
            raise CheckpointError(
                f"{folder / WEIGHTS}: {ADDED}{name} is {list(added[name].shape)}, the model's "
                f"{rows} added tokens need {[rows, None if table is None else table.shape[1]]}")
    model.load_state_dict(sd, strict=False)
    with torch.no_grad():
        ids = torch.tensor(model.llm.added_token_ids, device=emb.device)
        if "embed" in added:
            emb[ids] = added["embed"].to(emb.device, emb.dtype)
        if head is not None and "lm_head" in added:
            head.weight[ids] = added["lm_head"].to(head.weight.device, head.weight.dtype)
