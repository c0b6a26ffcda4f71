"""The T2C / echo decoder as the released EchoX checkpoints compute it (`t2c.layout=authors`).

Our own `UnitDecoder` (t2u.py) has a small token space of its own. The released T2C
(`unit_translator` in the authors' checkpoints; facts read off their public model code,
`models/t2ullama_cr_online.py`) lives in the LLM's token space instead:

* Inputs are vectors of the LLM's width: the rows of an LLM-vocabulary embedding table (the
  LLM's own, or a copy stored with the T2C) for LLM tokens, and the rows of `unit_embedding`
  for the `<|unit_...|>` tokens that follow the LLM vocabulary. Every input, the condition
  included, goes through `adapter` (LLM width -> T2C width).
* Sequence: `text_prefix` tokens, the condition (Adapter(H) from the denoiser on the echo
  path), `unit_prefix` tokens, then the generated tokens.
* `lm_head` scores every LLM token and every unit token; decoding is greedy and stops at the
  LLM tokenizer's end token. Nothing is suppressed, so LLM tokens can come out too (the unit
  vocabulary, `echox.units.unit_tokens`, ignores them, as the authors' decoder does).

The prefixes are token strings of the LLM tokenizer (config), resolved to ids here, so no
token id is written into the code.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from echox.config import T2CConfig
from echox.errors import CheckpointError
from echox.model.generation import SamplingConfig
from echox.model.prompt import IGNORE
from echox.model.unit_decoder import UnitOutput, decoder_step, generate_rows, iter_row, teacher_forced


def token_ids(tokenizer: Any, tokens: list[str], what: str) -> list[int]:
    """Ids of `tokens` in `tokenizer`; a token it does not hold is an error (no silent unk)."""
    ids = []
    for t in tokens:
        i = tokenizer.convert_tokens_to_ids(t)
        if i is None or tokenizer.convert_ids_to_tokens(i) != t:
            raise CheckpointError(f"{what}: the tokenizer has no token {t!r}")
        ids.append(int(i))
    return ids


class AuthorsUnitDecoder(nn.Module):
    """Same interface as `UnitDecoder` (forward / generate / iter_generate); token ids are
    those of the LLM tokenizer: LLM tokens below `llm_vocab`, unit tokens from there on."""

    def __init__(self, cfg: T2CConfig, d_llm: int, llm_vocab: int, tokenizer: Any,
                 llm_embedding: nn.Embedding | None = None) -> None:
        from transformers import LlamaConfig, LlamaModel

        super().__init__()
        if cfg.layout != "authors":
            raise ValueError(f"AuthorsUnitDecoder needs t2c.layout=authors, got {cfg.layout!r}")
        self.cfg = cfg
        self.trainable = cfg.trainable
        self.llm_vocab = int(llm_vocab)
        self.num_units = self.llm_vocab + cfg.unit_vocab_size  # every token it can predict
        self.text_prefix_ids = token_ids(tokenizer, cfg.text_prefix, "t2c.text_prefix")
        self.unit_prefix_ids = token_ids(tokenizer, cfg.unit_prefix, "t2c.unit_prefix")
        (self.eos_id,) = token_ids(tokenizer, [cfg.eos_token], "t2c.eos_token")
        hidden, heads = cfg.hidden_size, cfg.num_heads
        self.model = LlamaModel(LlamaConfig(
            vocab_size=1,  # its table is replaced below: inputs come as embeddings
            hidden_size=hidden,
            intermediate_size=cfg.intermediate_size or 4 * hidden,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=heads,
            num_key_value_heads=cfg.num_kv_heads or heads,
            head_dim=hidden // heads,
            max_position_embeddings=cfg.max_positions,
            rope_theta=cfg.rope_theta,
            rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None,
            rms_norm_eps=cfg.rms_norm_eps,
            attention_dropout=cfg.dropout,
            bos_token_id=None, eos_token_id=None, pad_token_id=None,
        ))
        if cfg.shared_embedding:
            if llm_embedding is None:
                raise ValueError("t2c.shared_embedding needs the LLM's input embeddings")
            self.model.embed_tokens = None
            self._shared = [llm_embedding]  # the LLM's table, kept out of this module's parameters
        else:  # a copy of an LLM-vocabulary table, stored with the T2C (as released)
            self.model.embed_tokens = nn.Embedding(self.llm_vocab, d_llm)
            self._shared = []
        self.unit_embedding = nn.Linear(d_llm, cfg.unit_vocab_size, bias=False)  # [U, D_llm] rows
        self.adapter = nn.Linear(d_llm, hidden)
        self.lm_head = nn.Linear(hidden, self.num_units, bias=False)
        self.requires_grad_(cfg.trainable)

    # ---- inputs --------------------------------------------------------------------------
    def text_table(self) -> torch.Tensor:
        """[V_llm, D_llm] rows of the LLM tokens."""
        return self._shared[0].weight if self._shared else self.model.embed_tokens.weight

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] (LLM or unit tokens) -> [..., D_llm], before the adapter."""
        v = self.llm_vocab
        text = F.embedding(ids.clamp(max=v - 1), self.text_table())
        unit = F.embedding((ids - v).clamp(min=0), self.unit_embedding.weight)
        return torch.where((ids >= v)[..., None], unit.to(text.dtype), text)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> decoder inputs [..., H]."""
        return self.adapter(self.embed_ids(ids).to(self.adapter.weight.dtype))

    def prefix_length(self) -> int:
        return len(self.text_prefix_ids) + len(self.unit_prefix_ids)

    def _rows(self, cond: list[torch.Tensor], units: list[list[int]] | None
              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per row: decoder inputs [L_i, H] and aligned next-token labels [L_i]."""
        dev, dtype = self.adapter.weight.device, self.adapter.weight.dtype
        pre = self.embed_ids(torch.tensor(self.text_prefix_ids, dtype=torch.long, device=dev))
        post = self.embed_ids(torch.tensor(self.unit_prefix_ids, dtype=torch.long, device=dev))
        embs, labs = [], []
        for i, c in enumerate(cond):
            if c.ndim != 2 or c.shape[0] == 0:
                raise ValueError(f"condition {i}: expected a non-empty [n, D] tensor, got {tuple(c.shape)}")
            parts = [pre.to(dtype), c.to(dev, dtype), post.to(dtype)]
            lab = [IGNORE] * (pre.shape[0] + c.shape[0] + post.shape[0] - 1)
            if units is not None:
                u = torch.as_tensor(units[i], dtype=torch.long, device=dev)
                if u.numel() and (u.min() < 0 or u.max() >= self.num_units):
                    raise ValueError(f"tokens of row {i} fall outside [0, {self.num_units})")
                parts.append(self.embed_ids(u).to(dtype))
                lab += u.tolist() + [self.eos_id]  # the unit prefix predicts u_1; u_m predicts eos
            else:
                lab.append(IGNORE)
            embs.append(self.adapter(torch.cat(parts)))  # [L_i, H]: the adapter reads every input
            labs.append(torch.tensor(lab, dtype=torch.long, device=dev))
        return embs, labs

    def row_length(self, text_ids: list[int], n_units: int) -> int:
        """Positions a teacher-forced row of these text tokens and `n_units` units takes."""
        return len(self.text_prefix_ids) + len(text_ids) + len(self.unit_prefix_ids) + n_units

    def forward(self, cond: list[torch.Tensor], units: list[list[int]]) -> UnitOutput:
        """Teacher-forced logits over LLM + unit tokens; rows are right-padded."""
        return teacher_forced(self.model, self.lm_head, *self._rows(cond, units))

    # ---- generation ----------------------------------------------------------------------
    def _step(self, embeds, mask, pos, cache):  # type: ignore[no-untyped-def]
        return decoder_step(self.model, self.lm_head, embeds, mask, pos, cache)

    def default_sampling(self, cond_len: int) -> SamplingConfig:
        """Greedy as released (unless the config sets `beams`): at most `max_positions` new
        tokens (the authors' 2048) and at most `max_units_per_token` per condition vector (+16)."""
        budget = self.cfg.max_units_per_token * cond_len + 16
        return SamplingConfig(max_new_tokens=max(1, min(self.cfg.max_positions, budget)),
                              num_beams=self.cfg.beams, length_penalty=self.cfg.length_penalty)

    @torch.no_grad()
    def generate(self, cond: list[torch.Tensor], sampling: SamplingConfig | None = None,
                 use_cache: bool = True) -> list[list[int]]:
        """Tokens for each condition [n, D_llm] (EOS-terminated, EOS not included)."""
        embs, _ = self._rows(cond, None)
        return generate_rows(self._step, self.embed, embs, [c.shape[0] for c in cond], self.eos_id,
                             sampling, self.default_sampling, use_cache)

    @torch.no_grad()
    def iter_generate(self, cond: torch.Tensor, sampling: SamplingConfig | None = None,
                      use_cache: bool = True) -> Iterator[int]:
        """`generate` for one condition [n, D_llm], yielding each token as it is sampled."""
        (emb,), _ = self._rows([cond], None)
        yield from iter_row(self._step, self.embed, emb, self.eos_id,
                            sampling or self.default_sampling(cond.shape[0]), use_cache)


def authors_t2c_sizes(llm_config: dict[str, Any]) -> dict[str, int]:
    """The released T2C's sizes from the LLM config's `unit_model` (authors' rule, their
    `t2ullama_cr_online.py` of 2025-09-19): "large" = 2 layers of the LLM's own width,
    heads and FFN; "small" = 4 x 512, 8 heads, FFN 2048; any other value = 8 x 768, 12 heads
    (12 KV heads), FFN 2048; no `unit_model` at all = 6 x 512, 8 heads, FFN 2048. Where a size
    is not set, the LLM's value stays (KV heads)."""
    c = llm_config
    kv = int(c.get("num_key_value_heads") or c["num_attention_heads"])
    if "unit_model" not in c:
        return dict(num_layers=6, hidden_size=512, num_heads=8, num_kv_heads=kv, intermediate_size=2048)
    if c["unit_model"] == "large":
        return dict(num_layers=2, hidden_size=int(c["hidden_size"]), num_heads=int(c["num_attention_heads"]),
                    num_kv_heads=kv, intermediate_size=int(c["intermediate_size"]))
    if c["unit_model"] == "small":
        return dict(num_layers=4, hidden_size=512, num_heads=8, num_kv_heads=kv, intermediate_size=2048)
    return dict(num_layers=8, hidden_size=768, num_heads=12, num_kv_heads=12, intermediate_size=2048)
