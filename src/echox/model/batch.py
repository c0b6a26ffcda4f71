"""Batches for the three stages. Collators are plain functions of encoded examples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from echox.model.prompt import IGNORE, EncodedDialogue


@dataclass
class S2TBatch:
    input_ids: torch.Tensor  # [B, L] right-padded
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L] IGNORE outside assistant turns
    audio: list[np.ndarray]  # N waveforms, in placeholder order (dialogue 0's turns first)
    ctc_targets: torch.Tensor  # [N, S] transcript ids padded with IGNORE (all IGNORE: none)
    response_spans: list[list[tuple[int, int]]]  # per dialogue, token ranges of responses
    # Stage III: units per response (or per segment), in response order; None = online labels
    units: list[list[int]] | None = None
    segments: list[list[tuple[int, int]]] | None = None  # per response, [start, end) in tokens
    # Stage III with a frozen S2T model: its hidden states H per response, precomputed
    # (`echox.train.stages.precompute_states`); the step then skips the S2T forward
    states: list[torch.Tensor] | None = None

    def to(self, device: torch.device | str) -> "S2TBatch":
        for name in ("input_ids", "attention_mask", "labels", "ctc_targets"):
            setattr(self, name, getattr(self, name).to(device))
        return self


@dataclass
class T2CBatch:
    text_ids: list[list[int]]  # LLM token ids of each text
    units: list[list[int]]  # unit (or unit-language token) ids

    def to(self, device: torch.device | str) -> "T2CBatch":
        return self


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def collate_s2t(
    examples: list[EncodedDialogue],
    pad_id: int,
    tokenize: Callable[[str], list[int]],
    units: list[list[list[int]]] | None = None,
) -> S2TBatch:
    """Right-pad dialogues; tokenise each audio's transcript into a CTC target row.

    `units`, if given, holds per example the unit sequences of its responses.
    """
    ids = _pad([e.input_ids for e in examples], pad_id)
    labels = _pad([e.labels for e in examples], IGNORE)
    mask = _pad([[1] * len(e.input_ids) for e in examples], 0)
    audio = [a for e in examples for a in e.audio]
    ctc_rows = [tokenize(t) if t else [] for e in examples for t in e.transcripts]
    ctc = _pad(ctc_rows, IGNORE) if ctc_rows else torch.full((0, 1), IGNORE, dtype=torch.long)
    flat_units = [u for per in units for u in per] if units is not None else None
    return S2TBatch(
        input_ids=ids, attention_mask=mask, labels=labels, audio=audio, ctc_targets=ctc,
        response_spans=[list(e.response_spans) for e in examples], units=flat_units,
    )


def collate_t2c(text_ids: list[list[int]], units: list[list[int]]) -> T2CBatch:
    if len(text_ids) != len(units):
        raise ValueError(f"{len(text_ids)} texts but {len(units)} unit sequences")
    return T2CBatch(text_ids=[list(t) for t in text_ids], units=[list(u) for u in units])
