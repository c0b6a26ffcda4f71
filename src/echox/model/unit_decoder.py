"""T2C (text-to-codec/unit) decoder, also used as the echo decoder.

A small decoder-only Llama (`transformers` LlamaModel). The condition is a sequence of vectors
in the LLM's embedding space: the frozen LLM token embeddings of the text (T2C, Stage II) or
Adapter(H) from the S2T model's hidden states (echo decoder, Stage III). Sequence:

    [text prefix] Linear(cond_1..n) [unit prefix] unit_1 .. unit_m [eos]

The loss covers the unit positions and EOS only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from echox.config import T2CConfig
from echox.errors import UnitError
from echox.model.generation import (
    DecodeResult,
    SamplingConfig,
    beam_results,
    beam_search_steps,
    iter_beam_tokens,
    cache_kwargs,
    decode,
    iter_decode,
    output_cache,
)
from echox.model.losses import guided_attention_loss
from echox.model.prompt import IGNORE


@dataclass
class UnitOutput:
    logits: torch.Tensor  # [B, L, V_units + specials]
    labels: torch.Tensor  # [B, L], next-token targets already aligned (no shift needed)
    # the guided-attention cost (t2c.align_weight > 0, teacher forcing), unweighted; else None
    align: torch.Tensor | None = None
    attentions: tuple[torch.Tensor, ...] | None = None  # per layer [B, H, L, L], when asked


def teacher_forced(model: nn.Module, lm_head: nn.Module, embs: list[torch.Tensor],
                   labs: list[torch.Tensor], attentions: bool = False) -> UnitOutput:
    """Per-row decoder inputs [L_i, H] and labels [L_i] -> logits of the right-padded batch
    (shared by the T2C layouts of `UnitDecoder` and the authors' `AuthorsUnitDecoder`).
    `attentions` also returns the attention maps (the model must use eager attention)."""
    b, width = len(embs), max(e.shape[0] for e in embs)
    x = embs[0].new_zeros(b, width, embs[0].shape[-1])
    labels = torch.full((b, width), IGNORE, dtype=torch.long, device=x.device)
    mask = torch.zeros(b, width, dtype=torch.long, device=x.device)
    for i, (e, lb) in enumerate(zip(embs, labs)):
        x[i, : e.shape[0]] = e
        labels[i, : lb.shape[0]] = lb
        mask[i, : e.shape[0]] = 1
    if attentions:
        out = model(inputs_embeds=x, attention_mask=mask, use_cache=False, output_attentions=True)
        if not out.attentions:
            raise RuntimeError("the unit decoder returned no attention maps (it needs eager attention)")
        return UnitOutput(lm_head(out.last_hidden_state), labels, attentions=tuple(out.attentions))
    out = model(inputs_embeds=x, attention_mask=mask, use_cache=False)
    return UnitOutput(lm_head(out.last_hidden_state), labels)


def decoder_step(model: nn.Module, lm_head: nn.Module, embeds: torch.Tensor, mask: torch.Tensor,
                 pos: torch.Tensor, cache: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """One cached decoding step of a unit decoder: (logits, hidden, cache)."""
    out = model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
        use_cache=cache is not None or embeds.shape[1] > 0, **cache_kwargs(model, cache),
    )
    h = out.last_hidden_state
    return lm_head(h), h, output_cache(out)


def left_pad(embs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [L_i, H] -> left-padded inputs [B, L, H] and their mask [B, L] (batched decoding)."""
    b, width = len(embs), max(e.shape[0] for e in embs)
    x = embs[0].new_zeros(b, width, embs[0].shape[-1])
    mask = torch.zeros(b, width, dtype=torch.long, device=x.device)
    for i, e in enumerate(embs):
        x[i, width - e.shape[0]:] = e
        mask[i, width - e.shape[0]:] = 1
    return x, mask


def beam_rows(step: Any, embed: Any, embs: list[torch.Tensor], eos_id: int,
              sampling: list[SamplingConfig], use_cache: bool = True,
              suppress_ids: list[int] | None = None) -> list[list[int]]:
    """Beam search for each row's inputs [L_i, H] with its own settings, all rows in one
    batch (each row's units are those it gets alone)."""
    x, mask = left_pad(embs)
    steps = beam_search_steps(step, embed, x, mask, [eos_id], sampling, use_cache, suppress_ids)
    return [r.tokens for r in beam_results(steps)]


def generate_rows(step: Any, embed: Any, embs: list[torch.Tensor], cond_lens: list[int], eos_id: int,
                  sampling: SamplingConfig | None, default: Any, use_cache: bool = True,
                  suppress_ids: list[int] | None = None) -> list[list[int]]:
    """A unit decoder's `generate`: each row's inputs [L_i, H] (the condition of `cond_lens[i]`
    vectors, with the decoder's own specials), decoded to EOS (not included). `sampling=None`:
    `default(cond_len)`, the decoder's config, each row with its own unit budget (greedy or
    sampled rows decode in one batch to the longest condition's, then each row is cut to its
    own: a row that never stops gets the units it gets alone, whatever it is batched with)."""
    rows = [sampling or default(n) for n in cond_lens]
    if rows[0].num_beams > 1:  # one batch; by default each row has its own unit budget
        return beam_rows(step, embed, embs, eos_id, rows, use_cache, suppress_ids)
    x, mask = left_pad(embs)
    res: DecodeResult = decode(step, embed, x, mask, stop_ids=[eos_id],
                               sampling=sampling or default(max(cond_lens)), use_cache=use_cache,
                               suppress_ids=suppress_ids)
    return [units[: r.max_new_tokens] for units, r in zip(res.tokens, rows)]


def iter_row(step: Any, embed: Any, emb: torch.Tensor, eos_id: int, sampling: SamplingConfig,
             use_cache: bool = True, suppress_ids: list[int] | None = None) -> Iterator[int]:
    """`generate_rows` for one row [L, H], yielding each unit as soon as it is sampled (with
    beams: once every hypothesis still in the running agrees on it). A single row needs no
    padding, so the steps (and a seeded sampler's draws) are those of the batched call."""
    if sampling.num_beams > 1:
        yield from iter_beam_tokens(step, embed, emb[None], [eos_id], sampling, use_cache, suppress_ids)
        return
    mask = torch.ones(1, emb.shape[0], dtype=torch.long, device=emb.device)
    for st in iter_decode(step, embed, emb[None], mask, stop_ids=[eos_id], sampling=sampling,
                          use_cache=use_cache, suppress_ids=suppress_ids):
        if bool(st.emitted[0]):
            yield int(st.ids[0])


class _ReadsTokenText(nn.Module):
    """A module that reads the bytes of each token's text: `token_text(id)` gives the text (the
    owner, EchoX, sets it from its tokenizer); each token's first `max_chars` bytes (+ 1, so 0
    can pad) are looked up once."""

    def __init__(self, max_chars: int) -> None:
        super().__init__()
        self.max_chars = max_chars
        self.token_text: Any = None  # Callable[[int], str]
        self._bytes: dict[int, list[int]] = {}

    def token_bytes(self, i: int) -> list[int]:
        b = self._bytes.get(i)
        if b is None:
            if self.token_text is None:
                raise RuntimeError(f"{type(self).__name__}.token_text is not set (EchoX sets it from its tokenizer)")
            b = self._bytes[i] = [x + 1 for x in self.token_text(i).encode("utf-8")[: self.max_chars]]
        return b


class SpellingEncoder(_ReadsTokenText):
    """What each text token spells, as a vector added to its condition (`t2c.spelling_dim`).

    The bytes of a token's text (up to `max_chars`) are embedded with their positions, go
    through two width-3 convolutions and are max-pooled over the token, then projected to the
    condition size. The projection starts at zero, so a T2C trained without it starts from
    where it was. `token_text(id)` gives a token's text; the owner (EchoX) sets it from its
    tokenizer, and each token's bytes are looked up once.
    """

    def __init__(self, d_out: int, dim: int, max_chars: int = 24) -> None:
        super().__init__(max_chars)
        self.chars = nn.Embedding(257, dim, padding_idx=0)  # byte + 1; 0 pads
        self.pos = nn.Embedding(max_chars, dim)
        self.conv1 = nn.Conv1d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, 3, padding=1)
        self.out = nn.Linear(dim, d_out)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _spell(self, ids: list[int]) -> torch.Tensor:
        rows = torch.zeros(len(ids), self.max_chars, dtype=torch.long)
        for r, i in enumerate(ids):
            b = self.token_bytes(i)
            rows[r, : len(b)] = torch.tensor(b, dtype=torch.long)
        return rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [n] -> [n, d_out]."""
        uniq, inv = torch.unique(ids, return_inverse=True)
        c = self._spell(uniq.tolist()).to(self.out.weight.device)  # [u, L]
        x = self.chars(c) + self.pos.weight[None]
        x = nn.functional.gelu(self.conv1(x.transpose(1, 2)))
        x = nn.functional.gelu(self.conv2(x)).transpose(1, 2)  # [u, L, dim]
        has = c > 0
        x = x.masked_fill(~has[..., None], float("-inf")).amax(1)
        x = torch.where(has.any(1, keepdim=True), x, torch.zeros_like(x))  # a token with no text
        return self.out(x)[inv]


class CharCondition(_ReadsTokenText):
    """The condition one byte of text at a time (`t2c.char_condition`).

    Each token's condition vector [D] is repeated once per byte of the token's text (up to
    `max_chars`; a token with no text keeps one row), and each row gets the embedding of its
    byte and of its place in the token. `token_text(id)` gives a token's text (EchoX sets it
    from its tokenizer); each token's bytes are looked up once.
    """

    def __init__(self, d: int, max_chars: int = 16) -> None:
        super().__init__(max_chars)
        self.chars = nn.Embedding(257, d)  # byte + 1; 0: a token with no text
        self.pos = nn.Embedding(max_chars, d)
        nn.init.normal_(self.chars.weight, std=0.1)  # about the size of an LLM embedding's entries
        nn.init.normal_(self.pos.weight, std=0.1)

    def forward(self, cond: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """cond [n, D] for the tokens `ids` -> [sum of their byte counts, D]."""
        if cond.shape[0] != len(ids):
            raise ValueError(f"{cond.shape[0]} condition rows for {len(ids)} token ids")
        spelled = [self.token_bytes(int(i)) or [0] for i in ids]
        dev = self.chars.weight.device
        counts = torch.tensor([len(b) for b in spelled], device=cond.device)
        chars = torch.tensor([c for b in spelled for c in b], dtype=torch.long, device=dev)
        pos = torch.tensor([j for b in spelled for j in range(len(b))], dtype=torch.long, device=dev)
        rows = cond.repeat_interleave(counts, dim=0)
        return rows + (self.chars(chars) + self.pos(pos)).to(rows.dtype)


class UnitDecoder(nn.Module):
    def __init__(self, cfg: T2CConfig, d_cond: int) -> None:
        from transformers import LlamaConfig, LlamaModel

        super().__init__()
        self.cfg = cfg
        self.trainable = cfg.trainable
        self.num_units = cfg.unit_vocab_size
        self.eos_id = self.num_units
        self.text_prefix_id = self.num_units + 1
        self.unit_prefix_id = self.num_units + 2
        self.pad_id = self.num_units + 3
        vocab = self.num_units + 4
        self.adapter = nn.Linear(d_cond, cfg.hidden_size)
        self.model = LlamaModel(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=cfg.hidden_size,
                intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
                num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
                max_position_embeddings=cfg.max_positions,
                rope_theta=cfg.rope_theta,
                attention_dropout=cfg.dropout,
                pad_token_id=self.pad_id,
                bos_token_id=self.text_prefix_id,
                eos_token_id=self.eos_id,
            )
        )
        if cfg.align_weight > 0:  # the guided-attention loss reads the attention maps
            self.model.set_attn_implementation("eager")
        self.lm_head = nn.Linear(cfg.hidden_size, vocab, bias=False)
        self.spelling = (SpellingEncoder(d_cond, cfg.spelling_dim, cfg.spelling_chars)
                         if cfg.spelling_dim > 0 else None)
        self.char_condition = CharCondition(d_cond, cfg.char_max) if cfg.char_condition else None
        self.requires_grad_(cfg.trainable)

    def expand(self, cond: list[torch.Tensor], ids: list[list[int]] | None) -> list[torch.Tensor]:
        """Token-level conditions -> what the decoder reads: byte-level with `char_condition`
        (then `ids`, each condition's token ids, are needed), else unchanged."""
        if self.char_condition is None:
            return cond
        if ids is None or len(ids) != len(cond):
            raise UnitError("this decoder reads its condition by bytes (t2c.char_condition): give "
                            "the token ids of each condition (e.g. `units_from_hidden(gen.hidden, "
                            "ids=gen.token_ids)`)" + ("" if ids is None else
                                                   f"; got {len(ids)} id lists for {len(cond)}"))
        for k, (c, i) in enumerate(zip(cond, ids, strict=True)):
            if c.shape[0] != len(i):  # the byte reader's ValueError said nothing of the fix
                raise UnitError(f"condition {k} has {c.shape[0]} rows but {len(i)} token ids: "
                                "give each segment's own ids, one per hidden state (e.g. "
                                "`units_from_hidden(gen.hidden, ids=gen.token_ids)`)")
        return [self.char_condition(c, list(i)) for c, i in zip(cond, ids, strict=True)]

    def row_length(self, text_ids: list[int], n_units: int) -> int:
        """Positions a teacher-forced row of these text tokens and `n_units` units takes:
        the text prefix, the condition (a row per byte with `char_condition`), the unit prefix
        and the units. Stage II refuses rows longer than `max_positions`."""
        if self.char_condition is None:
            cond = len(text_ids)
        else:
            cond = sum(len(self.char_condition.token_bytes(int(i))) or 1 for i in text_ids)
        return 2 + cond + n_units

    # ---- sequence building ---------------------------------------------------------------
    def _special(self, idx: int, device: torch.device) -> torch.Tensor:
        return self.model.embed_tokens(torch.tensor([idx], device=device))  # [1, H]

    def _rows(
        self, cond: list[torch.Tensor], units: list[list[int]] | None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-row embeddings [L_i, H] and aligned next-token labels [L_i]."""
        device = self.lm_head.weight.device
        embs, labs = [], []
        for i, c in enumerate(cond):
            if c.ndim != 2 or c.shape[0] == 0:
                raise ValueError(f"condition {i}: expected a non-empty [n, D] tensor, got {tuple(c.shape)}")
            proj = self.adapter(c.to(device, self.adapter.weight.dtype))  # [n, H]
            parts = [self._special(self.text_prefix_id, device), proj,
                     self._special(self.unit_prefix_id, device)]
            lab = [IGNORE] * (proj.shape[0] + 1)
            if units is not None:
                u = torch.as_tensor(units[i], dtype=torch.long, device=device)
                if u.numel() and (u.min() < 0 or u.max() >= self.num_units):
                    raise UnitError(f"units of row {i} fall outside [0, {self.num_units}): "
                                    "the data's units are not this model's (another k-means "
                                    "or unit language?)")
                parts.append(self.model.embed_tokens(u))
                lab += u.tolist() + [self.eos_id]  # unit prefix predicts u_1, ..., u_m predicts eos
            else:
                lab.append(IGNORE)
            embs.append(torch.cat(parts))
            labs.append(torch.tensor(lab, dtype=torch.long, device=device))
        return embs, labs

    def forward(self, cond: list[torch.Tensor], units: list[list[int]]) -> UnitOutput:
        """Teacher-forced logits; rows are right-padded. With `align_weight` > 0, also the
        guided-attention cost of the unit queries (the unit prefix .. the last unit) over the
        condition positions (1 .. n) in `UnitOutput.align` (in training mode only)."""
        embs, labs = self._rows(cond, units)
        if self.cfg.align_weight <= 0 or not self.training:  # eval losses stay plain CE
            return teacher_forced(self.model, self.lm_head, embs, labs)
        out = teacher_forced(self.model, self.lm_head, embs, labs, attentions=True)
        spans = [(1, c.shape[0], c.shape[0] + 1, len(u) + 1) for c, u in zip(cond, units)]
        out.align = guided_attention_loss(out.attentions, spans, self.cfg.align_heads,
                                          self.cfg.align_sigma)
        out.attentions = None  # [B, H, L, L] per layer: not kept past the loss
        return out

    # ---- generation ----------------------------------------------------------------------
    def _step(self, embeds, mask, pos, cache):  # type: ignore[no-untyped-def]
        return decoder_step(self.model, self.lm_head, embeds, mask, pos, cache)

    @property
    def _suppress_ids(self) -> list[int]:
        return [self.text_prefix_id, self.unit_prefix_id, self.pad_id]

    def default_sampling(self, cond_len: int) -> SamplingConfig:
        """The config's decoding (greedy, or `beams` > 1) with a unit budget proportional to
        the condition's length."""
        budget = self.cfg.max_units_per_token * cond_len + 16
        return SamplingConfig(max_new_tokens=min(self.cfg.max_positions // 2, budget),
                              num_beams=self.cfg.beams, length_penalty=self.cfg.length_penalty)

    @torch.no_grad()
    def generate(
        self, cond: list[torch.Tensor], sampling: SamplingConfig | None = None, use_cache: bool = True
    ) -> list[list[int]]:
        """Units for each condition sequence (EOS-terminated, specials never emitted)."""
        embs, _ = self._rows(cond, None)
        fit = self._fitting(max(e.shape[0] for e in embs))
        return generate_rows(self._step, self.model.embed_tokens, embs, [c.shape[0] for c in cond],
                             self.eos_id, sampling and fit(sampling),
                             lambda n: fit(self.default_sampling(n)), use_cache, self._suppress_ids)

    def _fitting(self, row_len: int) -> Callable[[SamplingConfig], SamplingConfig]:
        """A decoding whose units fit in `max_positions` after a condition row of `row_len`
        positions: a larger `max_new_tokens` (a caller's own, or the default's for a long
        condition) is cut to the room left; it ran past the positions (a call asking for
        100,000 units did not end in 8 minutes)."""
        room = self.cfg.max_positions - row_len
        if room < 1:
            raise UnitError(f"a condition of {row_len} positions leaves no room for units in "
                            f"the decoder's {self.cfg.max_positions} positions: voice shorter "
                            "segments")

        def fit(s: SamplingConfig) -> SamplingConfig:
            return s if s.max_new_tokens <= room else dataclasses.replace(s, max_new_tokens=room)
        return fit

    @torch.no_grad()
    def iter_generate(
        self, cond: torch.Tensor, sampling: SamplingConfig | None = None, use_cache: bool = True
    ) -> Iterator[int]:
        """`generate` for one condition [n, D], yielding each unit as soon as it is sampled
        (the same units; closing the iterator stops decoding; with beam search a unit comes
        once every hypothesis still in the running agrees on it)."""
        (emb,), _ = self._rows([cond], None)
        fit = self._fitting(emb.shape[0])
        yield from iter_row(self._step, self.model.embed_tokens, emb, self.eos_id,
                            fit(sampling or self.default_sampling(cond.shape[0])), use_cache,
                            self._suppress_ids)
