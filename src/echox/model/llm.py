"""Any Hugging Face causal LM with a chat template, plus LoRA through `peft`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from echox.config import LLMConfig
from echox.errors import CheckpointError, ConfigError, loading
from echox.model.generation import cache_kwargs, output_cache
from echox.hub.bars import no_loading_bar

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LLMOutput:
    logits: torch.Tensor  # [B, L, V]
    hidden: torch.Tensor  # [B, L, D] last-layer hidden state (after the final norm)
    past_key_values: Any = None  # the KV cache (transformers' `cache`) when use_cache


def with_lora(model: Any, lora: Any) -> Any:
    """`model` (a transformers causal LM) wrapped by peft in the LoRA layers `lora` (an
    `LLMConfig.lora`) names. peft reads a property transformers has deprecated while it wraps;
    that FutureWarning is silenced here, where every user of the Python API saw it."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(model, PeftLoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))


def load_tokenizer(folder: str | Path, audio_token: str):
    """The LLM's tokenizer with the audio placeholder added as one special token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if tok.chat_template is None:
        raise ValueError(
            f"the tokenizer in {folder} has no chat template; EchoX needs a chat (instruct) model"
        )
    if audio_token not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [audio_token]},
                               replace_extra_special_tokens=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


class LLM(nn.Module):
    """Wraps a causal LM (optionally LoRA-wrapped). Keeps no state between calls."""

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: LLMConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.audio_token_id: int = tokenizer.convert_tokens_to_ids(cfg.audio_token)
        self.trainable = cfg.trainable

    @classmethod
    def from_folder(cls, folder: str | Path, cfg: LLMConfig, tokenizer: Any | None = None,
                    device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> "LLM":
        """`device`: load the weights straight onto it (e.g. cuda) instead of the CPU;
        `dtype` replaces `cfg.dtype` (the weights are read in it, never in float32 first)."""
        from transformers import AutoModelForCausalLM

        if tokenizer is None:
            with loading(folder, "tokenizer"):
                tokenizer = load_tokenizer(folder, cfg.audio_token)
        tok = tokenizer
        extra: dict[str, Any] = {}
        if device is not None and torch.device(device).type != "cpu":
            extra["device_map"] = {"": str(torch.device(device))}
        with loading(folder, "LLM"), no_loading_bar():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or _DTYPES[cfg.dtype],
                                                         **extra)
        if cfg.resize_embeddings:
            _fit_vocab(model, len(tok))
        else:
            rows = model.get_input_embeddings().weight.shape[0]
            audio_id = tok.convert_tokens_to_ids(cfg.audio_token)
            if audio_id is None or audio_id >= rows:
                raise CheckpointError(f"llm.resize_embeddings is false but the LLM in {folder} has "
                                      f"{rows} embedding rows and {cfg.audio_token!r} is token {audio_id}")
        model.requires_grad_(False)
        if cfg.use_lora:
            targets = list(cfg.lora.target_modules)
            names = [n for n, _ in model.named_modules()]
            if not any(
                    n == t or n.endswith("." + t) for t in targets for n in names):
                raise ConfigError(f"llm.lora.target_modules: none of {targets} names a module "
                                  f"of the LLM in {folder}")  # (peft's error, a traceback)
            model = with_lora(model, cfg.lora)
            for n, p in model.named_parameters():
                p.requires_grad_(cfg.trainable and "lora_" in n)
        else:
            model.requires_grad_(cfg.trainable)
        return cls(model, tok, cfg)

    def set_lora_dropout(self, p: float) -> int:
        """Set the dropout before every LoRA layer (0: peft's identity, no masks drawn).

        Returns how many LoRA layers changed; the config records the new value."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {p}")
        n = 0
        for module in self.model.modules():
            drops = getattr(module, "lora_dropout", None)
            if isinstance(drops, nn.ModuleDict):
                for name in list(drops.keys()):
                    drops[name] = nn.Dropout(p) if p > 0 else nn.Identity()
                    n += 1
        self.cfg.lora.dropout = p
        return n

    # ---- helpers -------------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        """The underlying transformers model (LoRA layers stay injected)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def hidden_size(self) -> int:
        return int(self.base.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.base.get_input_embeddings().weight.shape[0])

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [..., D] from the LLM's input table."""
        return self.base.get_input_embeddings()(ids)

    @property
    def stop_ids(self) -> list[int]:
        """End-of-turn ids: the tokenizer's eos plus the generation config's eos list."""
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.base, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(eos)
        return sorted(i for i in ids if i is not None)

    @property
    def added_token_ids(self) -> list[int]:
        return [self.audio_token_id]

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> LLMOutput:
        """`logits_to_keep`: 0 = logits everywhere; a 1-D tensor of positions = only there
        (training needs them only where there are labels: the vocabulary projection is a
        large share of the cost of a small LLM)."""
        dtype = self.base.get_input_embeddings().weight.dtype
        out = self.model(
            inputs_embeds=inputs_embeds.to(dtype),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            output_hidden_states=True,
            return_dict=True,
            logits_to_keep=logits_to_keep,
            # transformers >= 5.24 calls it `cache` (`past_key_values` is deprecated there)
            **cache_kwargs(self.base, past_key_values),
        )
        return LLMOutput(out.logits, out.hidden_states[-1], output_cache(out) if use_cache else None)


def _fit_vocab(model: nn.Module, n_tokens: int) -> None:
    """Grow the embedding tables for added tokens; new rows = mean of the old ones.

    Deterministic (no random init), so a reloaded checkpoint rebuilds the same rows.
    """
    emb = model.get_input_embeddings()
    old = emb.weight.shape[0]
    if n_tokens <= old:
        return
    model.resize_token_embeddings(n_tokens, mean_resizing=False)
    with torch.no_grad():
        emb = model.get_input_embeddings()
        emb.weight[old:] = emb.weight[:old].mean(0, keepdim=True)
        head = model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != emb.weight.data_ptr():
            head.weight[old:] = head.weight[:old].mean(0, keepdim=True)
