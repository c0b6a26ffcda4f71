"""Model bundles: everything `echox chat` needs to turn speech into speech, in one folder.

Layout::

    config.json, model.safetensors, tokenizer/, checksums.json   an EchoX checkpoint
    vocoder/             optional: a UnitMelVocoder folder (`echox.vocoder.io.save_vocoder`)
                         or a fairseq CodeHiFiGAN (`g_00500000` + `vocoder_config.json`)
    unit_language/       optional: the unit language the T2C speaks (`UnitLanguage.save`), or
                         the released T2C's `<|unit_...|>` tokens (`UnitTokens.save`)
    llm/                 optional: the LLM itself, named "llm" in config.json (an imported
                         released model, `echox convert official`)

When the bundle has a unit language, the echo decoder emits its tokens and
`Bundle.units(tokens)` splits them back into units; otherwise the tokens are raw units.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from echox.config import MAX_BEAMS
from echox.errors import CheckpointError, ConfigError, NoBundleError, UnitError
from echox.fileio import check_out_path, moved_aside_hint
from echox.hub import cache_dir
from echox.model.checkpoint import check_device as check_model_device
from echox.model.checkpoint import DTYPES, checkpoint_folder, folder_overlap, parse_dtype
from echox.model.echox import EchoX
from echox.model.precision import slow_on_cpu
from echox.units.language import UnitLanguage
from echox.units.unit_tokens import META_FILE, UnitTokens
from echox.vocoder.base import Vocoder
from echox.vocoder.code_hifigan import CodeHiFiGAN
from echox.vocoder.io import load_named_generator, load_vocoder, save_vocoder
from echox.vocoder.unit_mel import UnitMelVocoder

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import argparse

VOCODER_DIR = "vocoder"
UNIT_LANGUAGE_DIR = "unit_language"
ENV_MODEL = "ECHOX_MODEL"


@dataclass
class Bundle:
    """A loaded bundle: the EchoX model plus the optional speech-output parts."""

    model: EchoX
    vocoder: Vocoder | None = None
    unit_language: UnitLanguage | None = None
    path: Path | None = None

    def units(self, tokens: list[int]) -> list[int]:
        """Echo-decoder tokens -> vocoder units (unit-language tokens are split back)."""
        if self.unit_language is None:
            return [int(t) for t in tokens]
        if hasattr(self.unit_language, "stream"):  # UnitTokens: the authors' rule, whole output
            return self.unit_language.decode(tokens)
        n = self.unit_language.vocab_size  # the T2C vocabulary may be larger: unused ids
        return self.unit_language.decode([t for t in tokens if 0 <= t < n])

    def unit_stream(self) -> Any:
        """A decoder of one output, token by token: `push(token) -> units`, `flush() -> units`.
        Unit-language tokens each give their own units; the released `<|unit_...|>` tokens
        may split a number, so a trailing digit run waits for the next token."""
        if self.unit_language is not None and hasattr(self.unit_language, "stream"):
            return self.unit_language.stream()
        return _TokenwiseUnits(self)


class _TokenwiseUnits:
    """`Bundle.unit_stream` when each token's units do not depend on its neighbours."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle

    def push(self, token: int) -> list[int]:
        return self.bundle.units([token])

    def flush(self) -> list[int]:
        return []


def shipped_bundle() -> Path:
    """The embedded tiny model inside the package (see its MODEL_CARD.md)."""
    return Path(str(resources.files("echox") / "assets" / "models" / "tiny"))


DEFAULT_MODEL_HELP = ("(default: $ECHOX_MODEL, then ~/.cache/echox/models/tiny, then the "
                      "embedded tiny model)")


def bundle_folder(model: str | os.PathLike | None) -> Path:
    """The bundle a `--model` option names, or `default_bundle()` without one; an empty one
    (`--model "$UNSET"`) is an error, not the default."""
    if model is None:
        return default_bundle()
    if not str(model).strip():
        raise CheckpointError("--model is empty; give a model bundle folder, or leave the option "
                              "out for the default model")
    return Path(model).expanduser()


def default_bundle() -> Path:
    """Where `echox chat`, `demo`, `eval` and `serve` find a model without `--model`:
    $ECHOX_MODEL, then ~/.cache/echox/models/tiny, then the embedded tiny model."""
    looked: list[str] = []
    env = os.environ.get(ENV_MODEL)
    if env:  # the user named it: another model in its place would answer unasked
        if Path(env).expanduser().is_dir():
            return Path(env).expanduser()
        raise CheckpointError(f"${ENV_MODEL}={env} is not a model folder; fix or unset it, or "
                              "pass --model FOLDER")
    cached = cache_dir() / "models" / "tiny"
    if (cached / "config.json").is_file():
        return cached
    looked.append(str(cached))
    shipped = shipped_bundle()
    if (shipped / "config.json").is_file():
        return shipped
    looked.append(str(shipped))
    raise NoBundleError(
        f"no EchoX model bundle found (looked in {', '.join(looked)}); pass --model FOLDER, "
        f"set ${ENV_MODEL}, or build one with `bash recipes/tiny/pipeline.sh` (training + `echox bundle`)"
    )


def _load_unit_language(folder: Path) -> UnitLanguage:
    try:
        if (folder / META_FILE).is_file():
            return UnitTokens.load(folder)  # type: ignore[return-value]
        return UnitLanguage.load(folder)
    except UnitError as e:
        raise CheckpointError(f"cannot load the unit language in {folder}: {e}") from e


def load_bundle(
    path: str | Path,
    vocoder: Vocoder | str | Path | None = None,
    unit_language: UnitLanguage | str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    base_models: dict[str, str] | None = None,
) -> Bundle:
    """Load a bundle folder. `vocoder` / `unit_language` (objects or folders) replace the
    bundle's own; without them the `vocoder/` and `unit_language/` subfolders are used if
    present. The model is returned in eval mode on `device` (default: CPU), its weights read
    straight onto it (`EchoX.from_pretrained`); `dtype` (bf16 / fp16 / fp32 or a torch dtype)
    holds every model weight in it (default: the config's dtypes). The vocoder stays float32.
    `base_models` ({"llm": folder or hub id, "encoder": ...}) reads the frozen base models from
    elsewhere than the bundle's config names them (their folder moved, a local copy of a hub id)."""
    folder = checkpoint_folder(path, "model bundle folder")
    if folder.is_file():
        raise CheckpointError(f"{folder} is a file, not a model bundle folder")
    if not folder.is_dir():
        raise CheckpointError(f"model bundle folder not found: {folder}{moved_aside_hint(folder)}")
    if device is not None:
        check_device(str(device))
    for name, given, kinds in (("vocoder", vocoder, (Vocoder,)),
                               ("unit_language", unit_language, (UnitLanguage, UnitTokens))):
        if given is not None and not isinstance(given, (str, os.PathLike, *kinds)):
            raise CheckpointError(f"{name} must be a folder path or a loaded "
                                  f"{' / '.join(k.__name__ for k in kinds)}, got "
                                  f"{type(given).__name__}")
        if isinstance(given, (str, os.PathLike)) and not Path(given).is_dir():  # before the load
            what = "a file, not a folder" if Path(given).is_file() else "not found"
            raise CheckpointError(f"{name.replace('_', ' ')} folder {given}: {what}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    model = EchoX.from_pretrained(folder, device=dev, dtype=parse_dtype(dtype),
                                  base_models=base_models).eval()
    held = parse_dtype(dtype) or DTYPES.get(model.config.llm.dtype)
    if dev.type == "cpu" and slow_on_cpu(held):
        log.warning("the LLM's weights are held in %s, which this CPU computes only by emulation "
                    "(no native half precision): answers will be many times slower than with "
                    "--dtype fp32", str(held).removeprefix("torch."))

    replaced = vocoder is not None or unit_language is not None
    if vocoder is None and (folder / VOCODER_DIR).is_dir():
        vocoder = folder / VOCODER_DIR
    voc = load_vocoder(vocoder, dev) if isinstance(vocoder, (str, os.PathLike)) else vocoder

    if unit_language is None and (folder / UNIT_LANGUAGE_DIR).is_dir():
        unit_language = folder / UNIT_LANGUAGE_DIR
    lang = (_load_unit_language(Path(unit_language))
            if isinstance(unit_language, (str, os.PathLike)) else unit_language)
    bundle = Bundle(model, voc, lang, folder)
    check_bundle(bundle)
    if replaced:  # a bundle's own pair was warned about when it was made
        _warn_unit_counts(folder, voc, lang)
    return bundle


def add_device_options(p: Any, default_device: str = "cpu") -> None:
    """`--device` and `--dtype`, shared by `echox chat`, `echox eval` and `echox serve`."""
    p.add_argument("--device", default=default_device,
                   help=f"torch device to run on: cpu, cuda, cuda:1, ... (default {default_device}); "
                        "the weights are read straight onto it")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                   help="hold every model weight in this dtype (default: the bundle's config, "
                        "e.g. a bfloat16 LLM with float32 speech parts); bf16 or fp16 on a GPU (a CPU "
                        "without native half precision runs them many times slower)")


def add_text_decoding_options(p: Any) -> None:
    """How text answers are decoded beside greedy/sampling: guards against looping answers
    (`--repetition-penalty`, `--no-repeat-ngram`) and beam search (`--text-beams`)."""
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="text: divide a generated token's logit by this when it comes again "
                        "(> 1 discourages repeats; 1 = off)")
    p.add_argument("--no-repeat-ngram", type=int, default=0, metavar="N",
                   help="text: never generate the same N tokens twice in one answer (0 = off)")
    p.add_argument("--text-beams", type=int, default=1, metavar="N",
                   help="text answers by beam search over N hypotheses (1 = greedy); spoken "
                        "answers then start once the search has ended")
    p.add_argument("--text-length-penalty", type=float, default=1.0, metavar="A",
                   help="with --text-beams: a hypothesis scores its log-probability / length ** A")


DEFAULT_TEMPERATURE = 0.2  # echox chat / serve: a little sampling, unless beams are asked for


def add_sampling_options(p: Any) -> None:
    """`--temperature` and `--top-p` of `echox chat` / `echox serve`."""
    p.add_argument("--temperature", type=float, default=None,
                   help=f"text sampling; 0 = greedy (default {DEFAULT_TEMPERATURE}, or 0 with --text-beams)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")


def sampling_temperature(args: Any) -> float:
    """`--temperature`, or its default: beam search is deterministic, so 0 with `--text-beams`."""
    if args.temperature is not None:
        return float(args.temperature)
    return 0.0 if getattr(args, "text_beams", 1) > 1 else DEFAULT_TEMPERATURE


def text_decoding(args: Any) -> dict[str, Any]:
    """The `SamplingConfig` fields `add_text_decoding_options` set."""
    return {"repetition_penalty": args.repetition_penalty, "no_repeat_ngram_size": args.no_repeat_ngram,
            "num_beams": args.text_beams, "length_penalty": args.text_length_penalty}


def check_device(device: str) -> None:
    """A clear error for a device this torch cannot use (e.g. cuda on a CPU build)."""
    check_model_device(device, "--device")


def check_bundle(bundle: Bundle) -> None:
    """The echo decoder's vocabulary must fit the unit language, and its units the vocoder."""
    n_tokens = bundle.model.echo.num_units
    where = bundle.path or "<bundle>"
    if bundle.unit_language is not None and bundle.unit_language.vocab_size > n_tokens:
        raise CheckpointError(
            f"{where}: the unit language has {bundle.unit_language.vocab_size} tokens but the "
            f"echo decoder predicts {n_tokens} (t2c.unit_vocab_size)")
    spoken = bundle.model.config.t2c.unit_language  # recorded when the decoder was trained
    if spoken and bundle.unit_language is None:
        raise CheckpointError(f"{where}: the echo decoder predicts tokens of a unit language "
                              f"(fingerprint {spoken}) but the bundle has none; give it "
                              "(--unit-language DIR)")
    if spoken:  # (released unit tokens have no fingerprint)
        theirs = getattr(bundle.unit_language, "fingerprint", None)
        if theirs != spoken:
            raise CheckpointError(f"{where}: the unit language (fingerprint {theirs}) is not the "
                                  f"one the echo decoder was trained on ({spoken})")
    n_units = (bundle.unit_language.num_units if bundle.unit_language is not None else n_tokens)
    voc_units = _vocoder_units(bundle.vocoder)
    if voc_units is not None and voc_units < n_units:
        hint = (f"; if its decoder predicts unit-language tokens ({n_tokens}) over the "
                f"vocoder's {voc_units} units, give that language (--unit-language DIR)"
                if bundle.unit_language is None else "")
        raise CheckpointError(f"{where}: the model makes {n_units} distinct units but the vocoder "
                              f"only knows {voc_units}{hint}")


def _warn_unit_counts(where: Any, vocoder: Vocoder | None, lang: Any) -> None:
    """A vocoder of more units than the unit language: maybe the same k-means (a language
    learned without --num-units counts the units its data used, the largest + 1), maybe
    another, whose ids each name another sound."""
    voc_units = _vocoder_units(vocoder)
    if voc_units is not None and lang is not None and voc_units > lang.num_units:
        log.warning("%s: the unit language is over %d units but the vocoder was trained on %d: "
                    "if they come from different k-means, the speech will be garbled", where,
                    lang.num_units, voc_units)


def _vocoder_units(vocoder: Vocoder | None) -> int | None:
    if isinstance(vocoder, CodeHiFiGAN):
        return vocoder.config.num_embeddings
    u2m = getattr(vocoder, "unit2mel", None)
    return int(u2m.config.num_units) if u2m is not None else None


def save_bundle(
    folder: str | Path,
    model: EchoX,
    vocoder: Vocoder | None = None,
    unit_language: UnitLanguage | None = None,
    extra_files: dict[str, str] | None = None,
    slim: bool = False,
    replace: bool = False,
) -> Path:
    """Write model + vocoder + unit language atomically; all files go into checksums.json.
    `replace`: replace a `folder` that is neither a checkpoint nor empty (`--force`).

    `slim` writes what inference needs, in float16: no T2C (only training uses it), and the
    vocoder's weights halved too. Loading casts back to float32, so a slim bundle answers
    like the full one up to float16 rounding of the weights.
    """
    folder = Path(folder)
    dtype = torch.float16 if slim else None

    def write_parts(tmp: Path) -> None:
        if vocoder is not None:
            save_vocoder(vocoder, tmp / VOCODER_DIR, dtype=dtype)
        if unit_language is not None:
            unit_language.save(tmp / UNIT_LANGUAGE_DIR)

    bundle = Bundle(model, vocoder, unit_language, folder)
    check_bundle(bundle)
    _warn_unit_counts(folder, vocoder, unit_language)
    model.save_pretrained(folder, extra_files=extra_files, extra_writer=write_parts,
                          omit_parts=("t2c",) if slim else (), dtype=dtype, replace=replace)
    return folder


def bundle_info(bundle: Bundle) -> dict[str, Any]:
    """A short description for logs and `--stats`."""
    return {
        "path": str(bundle.path) if bundle.path else None,
        "vocoder": type(bundle.vocoder).__name__ if bundle.vocoder is not None else None,
        "sample_rate": bundle.vocoder.sample_rate if bundle.vocoder is not None else None,
        "unit_language": repr(bundle.unit_language) if bundle.unit_language else None,
        "trained_stages": list(bundle.model.trained_stages),
    }


def cmd_bundle(args: Any) -> int:
    """`echox bundle`: an EchoX checkpoint + vocoder + unit language -> one bundle folder."""
    check_out_path(args.out)  # not an empty path (Path("") is the working folder)
    out = Path(args.out).expanduser()
    check_out_path(out)  # a bundle is a folder, not a file
    if out.exists() and not args.force:  # checked before the load; nothing is replaced unasked
        raise CheckpointError(f"--out {out}: a folder of that name exists; pass --force to "
                              "replace it")
    src = Path(args.model)
    # a bundle given as --model keeps its own vocoder and unit language unless others are named
    vocoder_path = args.vocoder or (src / VOCODER_DIR if (src / VOCODER_DIR).is_dir() else None)
    language_path = args.unit_language or (
        src / UNIT_LANGUAGE_DIR if (src / UNIT_LANGUAGE_DIR).is_dir() else None)
    hifigan = args.hifigan if args.hifigan and Path(args.hifigan).exists() else None
    for source in (args.model, vocoder_path, language_path, hifigan):
        # --force replaces --out whole: it must not be a source, hold one or lie inside one
        # (the --model's vocoder/ or tokenizer/)
        how = folder_overlap(out.resolve(), Path(source).resolve()) if source else None
        if how:
            raise CheckpointError(f"--out {out} {how} {source}: replacing it would delete what "
                                  "the bundle is made from; give another --out")
    model = EchoX.from_pretrained(args.model)
    for name, given, used in (("vocoder", args.vocoder, vocoder_path),
                              ("unit language", args.unit_language, language_path)):
        if used is not None and given is None:
            print(f"echox bundle: keeping the {name} of {src} ({used})", file=sys.stderr)
    if "echo" not in model.trained_stages:
        print(f"echox: warning: {args.model} was not trained with stage echo "
              f"({model.trained_stages}); its speech output is untrained", file=sys.stderr)
    vocoder = load_vocoder(vocoder_path) if vocoder_path else None
    if args.hifigan:
        if not isinstance(vocoder, UnitMelVocoder):
            raise CheckpointError("--hifigan needs a unit->mel --vocoder (not a CodeHiFiGAN)")
        try:
            generator = load_named_generator(args.hifigan)
        except Exception as e:  # noqa: BLE001 - checkpoint and missing-file errors
            raise CheckpointError(f"cannot load the HiFi-GAN {args.hifigan}: {e}") from e
        from echox.vocoder.onnx import OnnxHiFiGAN, OnnxSpec, cached_onnx_generator

        spec = vocoder.onnx  # a packaged HiFi-GAN's stages and calibration mels
        if spec is None and isinstance(vocoder.generator, OnnxHiFiGAN):  # a converted local one
            if vocoder.generator.meta.get("int8_stages"):  # its calibration mels are not kept
                warnings.warn(f"{args.hifigan} runs in torch, not on ONNX Runtime as "
                              f"{vocoder_path}'s int8 HiFi-GAN did; `echox vocoder onnx "
                              "--calibrate ...` on the bundle's vocoder/ converts it")
            else:
                spec = OnnxSpec((), [])
        if spec is not None:  # the new HiFi-GAN runs as the vocoder's did, on ONNX Runtime
            generator = cached_onnx_generator(generator, spec)
            print(f"echox bundle: {args.hifigan} runs on ONNX Runtime as {vocoder_path}'s HiFi-GAN "
                  f"did (int8 stages {list(spec.int8_stages)})", file=sys.stderr)
        vocoder = UnitMelVocoder(vocoder.unit2mel, generator, vocoder.output_sr,
                                 vocoder.default_context_units, hifigan=args.hifigan, onnx=spec)
    lang = None
    if language_path:
        try:
            lang = _load_unit_language(Path(language_path))
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - UnitError and OS errors
            raise CheckpointError(f"cannot load the unit language {language_path}: {e}") from e
    set_unit_decoding(model, args.unit_beams, args.unit_length_penalty, args.max_units_per_token)
    out = save_bundle(out, model, vocoder, lang, slim=args.slim, replace=args.force)
    print(json.dumps({"bundle": str(out), **bundle_info(Bundle(model, vocoder, lang, out))}))
    return 0


def set_unit_decoding(model: EchoX, beams: int | None, length_penalty: float | None,
                      max_units_per_token: int | None = None) -> None:
    """Store how the T2C and echo decoders decode by default (`t2c.beams`,
    `t2c.length_penalty`, the unit budget `t2c.max_units_per_token`; both decoders read this
    config object); None keeps the checkpoint's setting."""
    cfg = model.config.t2c
    if max_units_per_token is not None:
        if not 1 <= max_units_per_token <= cfg.max_positions:
            raise ConfigError(f"--max-units-per-token must be in [1, {cfg.max_positions}], got "
                              f"{max_units_per_token}")
        cfg.max_units_per_token = max_units_per_token
    if beams is not None:
        if not 1 <= beams <= MAX_BEAMS:
            raise ConfigError(f"--unit-beams must be in [1, {MAX_BEAMS}], got {beams}")
        cfg.beams = beams
    if length_penalty is not None:
        if not math.isfinite(length_penalty):
            raise ConfigError(f"--unit-length-penalty must be a finite number, got {length_penalty}")
        cfg.length_penalty = length_penalty


def bundle_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="EchoX checkpoint (e.g. runs/tiny/echo/model)")
    p.add_argument("--vocoder", help="vocoder folder (unit->mel model, or fairseq g_* + "
                   "vocoder_config.json; default: --model's own vocoder/ when it is a bundle)")
    p.add_argument("--unit-language", help="unit language folder (echox units train-language; "
                   "default: --model's own unit_language/ when it is a bundle)")
    p.add_argument("--hifigan", help="replace the unit->mel vocoder's HiFi-GAN: universal, "
                                     "LJSpeech, small, or a generator folder/file")
    p.add_argument("--slim", action="store_true",
                   help="inference only: leave out the T2C and store float16 weights")
    p.add_argument("--unit-beams", type=int, help="speech units by beam search over N hypotheses "
                   "(1 = greedy; default: the checkpoint's t2c.beams)")
    p.add_argument("--unit-length-penalty", type=float,
                   help="beam score = log-probability / length ** this (default: the checkpoint's)")
    p.add_argument("--max-units-per-token", type=int, metavar="N",
                   help="the longest spoken answer, in speech tokens per condition position "
                        "(a text token, or a character with t2c.char_condition) + 16; an answer "
                        "that reaches it is cut (default: the checkpoint's "
                        "t2c.max_units_per_token; over text tokens raw units need about 2.2x a "
                        "unit language's)")
    p.add_argument("--out", required=True, help="bundle folder to write (a new one)")
    p.add_argument("--force", action="store_true",
                   help="replace --out if it exists (the whole folder: what else it holds is lost)")

