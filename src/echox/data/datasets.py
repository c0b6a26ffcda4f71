"""Torch datasets and collators over manifest records, one per training stage.

`S2TDataset` + `make_s2t_collator` (Stages I and III: spoken dialogues -> `S2TBatch`) and
`T2CDataset` + `collate_t2c_examples` (Stage II: text tokens -> unit targets, `T2CBatch`).
(`echox.data.manifest` holds the records they read.)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from torch.utils.data import Dataset

from echox.audio import load_audio
from echox.data.manifest import DialogueRecord, TtsRecord, resolve_audio
from echox.errors import AudioError, ManifestError, UnitError
from echox.model.batch import S2TBatch, T2CBatch, collate_s2t, collate_t2c
from echox.model.prompt import PromptBuilder, Turn

__all__ = ["S2TExample", "S2TDataset", "ConcatDataset", "perturb_audio", "make_s2t_collator", "T2CExample", "T2CDataset",
           "collate_t2c_examples"]

log = logging.getLogger("echox.data.manifest")


@dataclass
class S2TExample:
    """One dialogue as prompt turns, with the units of its responses when the record has them."""

    turns: list[Turn]
    units: list[list[int]] | None = None  # per assistant turn, in order
    id: str | None = None


class S2TDataset(Dataset):
    """Spoken dialogues for Stages I and III; audio is read lazily in ``__getitem__``."""

    def __init__(self, records: Sequence[DialogueRecord], base_dir: str | os.PathLike | None,
                 max_audio_seconds: float | None = 30.0,
                 on_too_long: Literal["error", "truncate"] = "error",
                 max_wer: float | None = None,
                 perturb: Sequence[tuple[float, float]] | None = None) -> None:
        """`max_wer` drops dialogues whose user audio has a larger recorded WER (its `wer`).

        `perturb`: (speed, gain) pairs; each time a dialogue is read, each of its clips gets
        one pair at random (Python's `random`, which the trainer seeds and restores on
        resume). Speed s resamples the clip to 1/s of its length (tempo and pitch, as in
        Kaldi's speed perturbation); gain scales it (clipped to [-1, 1]). A short fixed set
        keeps the encoder cache useful: each clip has only that many versions.
        """
        for sp, gain in perturb or []:
            if not (0.5 <= sp <= 2.0 and 0.0 < gain <= 8.0):
                raise ManifestError(f"perturb: ({sp}, {gain}) needs speed in [0.5, 2] and gain in (0, 8]")
        keep = [r for r in records if max_wer is None
                or all(m.wer is None or m.wer <= max_wer for m in r.conversations)]
        if not keep:
            raise ManifestError(f"no dialogues to train on ({len(records)} given, "
                                f"{len(records) - len(keep)} dropped by max_wer={max_wer})")
        for i, r in enumerate(keep):
            if not any(m.role == "assistant" for m in r.conversations):
                raise ManifestError(f"dialogue {r.id or i}: no assistant turn, so nothing to learn")
            for m in r.conversations:  # a missing file stopped the run when its batch came
                if m.role == "user" and m.audio is not None and not isinstance(m.audio, bytes):
                    path = resolve_audio(m.audio, base_dir)
                    if not Path(path).is_file():
                        raise ManifestError(f"dialogue {r.id or i}: audio file not found: {path}")
        self.records = keep
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.max_audio_seconds = max_audio_seconds
        self.on_too_long = on_too_long
        self.perturb = [(float(a), float(b)) for a, b in perturb] if perturb else None

    def __len__(self) -> int:
        return len(self.records)

    def length(self, i: int) -> int:
        """A cheap size of dialogue `i` (characters of its turns' text), for length grouping."""
        return sum(len(m.value or "") + len(m.transcript or "") for m in self.records[i].conversations)

    def transcripts(self) -> list[str]:
        """The transcript of every user audio turn (the CTC targets), without reading audio."""
        return [m.transcript if m.transcript is not None else m.value
                for r in self.records for m in r.conversations
                if m.role == "user" and m.audio is not None
                and (m.transcript if m.transcript is not None else m.value)]

    def _load(self, src: Any) -> np.ndarray:
        wav = load_audio(src, 16000, max_seconds=self.max_audio_seconds, on_too_long=self.on_too_long)
        if self.perturb:
            import random

            wav = perturb_audio(wav, *random.choice(self.perturb), max_seconds=self.max_audio_seconds)
        return wav

    def __getitem__(self, i: int) -> S2TExample:
        rec = self.records[i]
        try:
            turns = rec.to_turns(self.base_dir, self._load)
        except AudioError as err:
            raise ManifestError(f"dialogue {rec.id or i}: {err}") from err
        return S2TExample(turns, rec.response_units, rec.id)


class ConcatDataset(Dataset):
    """Several datasets read as one (e.g. QA dialogues + ASR turns); keeps `length(i)`."""

    def __init__(self, parts: Sequence[Dataset]) -> None:
        self.parts = [p for p in parts if len(p) > 0]  # type: ignore[arg-type]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts]).tolist()  # type: ignore[arg-type]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, i: int) -> tuple[Dataset, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[k], i - int(self.offsets[k])

    def __getitem__(self, i: int) -> Any:
        part, j = self._locate(i)
        return part[j]

    def length(self, i: int) -> int:
        part, j = self._locate(i)
        return part.length(j)  # type: ignore[attr-defined]

    def transcripts(self) -> list[str]:
        return [t for p in self.parts for t in p.transcripts()]  # type: ignore[attr-defined]


def perturb_audio(wav: np.ndarray, speed: float, gain: float,
                  max_seconds: float | None = None, sample_rate: int = 16000) -> np.ndarray:
    """`wav` played `speed` times faster (resampled) and scaled by `gain`. A slowed clip that
    would pass `max_seconds` is left at its speed."""
    from fractions import Fraction

    out = wav
    if speed != 1.0:
        f = Fraction(1.0 / speed).limit_denominator(32)
        if max_seconds is None or wav.size * f <= max_seconds * sample_rate:
            from scipy.signal import resample_poly

            out = resample_poly(wav, f.numerator, f.denominator).astype(np.float32)
    if gain != 1.0:
        out = np.clip(out * np.float32(gain), -1.0, 1.0).astype(np.float32)
    return out


def make_s2t_collator(prompt_builder: PromptBuilder, tokenizer: Any,
                      add_generation_prompt: bool = False,
                      units: Literal["auto", "require", "ignore"] = "auto",
                      ) -> Callable[[Sequence[S2TExample | list[Turn]]], S2TBatch]:
    """A DataLoader `collate_fn`: dialogues (S2TExample or plain turn lists) -> S2TBatch.

    `units`: "auto" attaches response units when every dialogue of the batch has them (else
    the batch gets none, so Stage III decodes pseudo-labels online); "require" raises on a
    dialogue without them (e.g. the gold-unit baseline); "ignore" never attaches them (Stage I).
    """
    if units not in ("auto", "require", "ignore"):
        raise ManifestError(f"units must be 'auto', 'require' or 'ignore', got {units!r}")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ManifestError("the tokenizer has no pad token; set tokenizer.pad_token")
    warned = False

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def collate(examples: Sequence[S2TExample | list[Turn]]) -> S2TBatch:
        nonlocal warned
        exs = [e if isinstance(e, S2TExample) else S2TExample(list(e)) for e in examples]
        if not exs:
            raise ManifestError("cannot collate an empty batch")
        enc = [prompt_builder.encode(e.turns, add_generation_prompt) for e in exs]
        missing = [e.id or str(i) for i, e in enumerate(exs) if e.units is None]
        if units == "require" and missing:
            raise ManifestError(f"dialogue(s) {', '.join(missing[:3])} have no units on every "
                                "assistant turn, but units='require'")
        if units == "auto" and missing and len(missing) < len(exs) and not warned:
            log.warning("a batch mixes dialogues with and without response units; such batches "
                        "get no units (pseudo-labels are decoded online)")
            warned = True
        per_example = None
        if units != "ignore" and not missing:
            per_example = [e.units for e in exs]
            for e, en in zip(exs, enc):
                if len(e.units or []) != len(en.response_spans):
                    raise ManifestError(f"dialogue {e.id}: {len(e.units or [])} unit sequences "
                                        f"for {len(en.response_spans)} responses")
        return collate_s2t(enc, pad_id, tokenize, units=per_example)  # type: ignore[arg-type]

    return collate


class T2CExample(NamedTuple):
    text_ids: list[int]  # LLM token ids of the text
    unit_ids: list[int]  # units, or unit-language ids when a unit encoder is given


class T2CDataset(Dataset):
    """Stage II pairs: the text's LLM token ids and its (encoded) precomputed units."""

    def __init__(self, records: Sequence[TtsRecord], tokenizer: Any,
                 unit_encoder: Callable[[list[int]], list[int]] | None = None,
                 max_positions: int | None = None,
                 row_length: Callable[[list[int], int], int] | None = None,
                 vocab_size: int | None = None) -> None:
        """`unit_encoder`, e.g. ``UnitLanguage.encode``, maps raw units to the T2C's vocabulary.
        With `vocab_size` (the T2C's), every pair's ids are checked against it now, each bad
        record named (a unit of another k-means stopped the run when its batch came).

        With `max_positions`, a pair whose row (`row_length(text ids, unit count)`, by default
        text tokens + units + 2) is longer is left out with a warning: a runaway line (a whole
        book on one manifest line) would otherwise ask attention memory for its square when its
        batch comes, and the T2C never sees positions past its limit when it speaks."""
        if not records:
            raise ManifestError("no TTS records given")
        missing = [r.id or str(i) for i, r in enumerate(records) if not r.units]
        if missing:
            raise ManifestError(
                f"{len(missing)} of {len(records)} TTS records have no 'units' (first: "
                f"{', '.join(missing[:3])}); extract units from their audio first"
            )
        self.records = list(records)
        self.tokenizer = tokenizer
        self.unit_encoder = unit_encoder
        self.vocab_size = vocab_size
        if max_positions is not None:
            self._drop_too_long(max_positions, row_length or (lambda ids, n: len(ids) + n + 2))
        elif vocab_size is not None:
            for i in range(len(self.records)):
                self[i]

    def _drop_too_long(self, limit: int, row_length: Callable[[list[int], int], int]) -> None:
        keep, long = [], []
        for i, rec in enumerate(self.records):
            ex = self[i]  # also refuses an empty pair now rather than when its batch comes
            (keep if row_length(ex.text_ids, len(ex.unit_ids)) <= limit else long).append(rec)
        if long:
            log.warning("%d of %d TTS records are longer than the T2C's %d positions and are left "
                        "out (first: %s)", len(long), len(self.records), limit,
                        ", ".join(r.id or "?" for r in long[:3]))
        if not keep:
            raise ManifestError(f"no TTS record fits the T2C's {limit} positions "
                                f"({len(self.records)} given)")
        self.records = keep

    def __len__(self) -> int:
        return len(self.records)

    def length(self, i: int) -> int:
        """A cheap size of pair `i` (text characters + units), for length grouping."""
        rec = self.records[i]
        return len(rec.text) + len(rec.units or [])

    def __getitem__(self, i: int) -> T2CExample:
        rec = self.records[i]
        text_ids = self.tokenizer(rec.text, add_special_tokens=False)["input_ids"]
        units = list(rec.units or [])
        try:
            unit_ids = list(self.unit_encoder(units)) if self.unit_encoder is not None else units
        except UnitError as e:  # a unit outside the unit language
            raise ManifestError(f"TTS record {rec.id or i}: {e}") from e
        if not text_ids or not unit_ids:
            raise ManifestError(f"TTS record {rec.id or i}: empty text ids or unit ids")
        if self.vocab_size is not None and not all(0 <= u < self.vocab_size for u in unit_ids):
            bad = next(u for u in unit_ids if not 0 <= u < self.vocab_size)
            raise ManifestError(f"TTS record {rec.id or i}: unit {bad} is outside the T2C's "
                                f"[0, {self.vocab_size}) (units of another k-means or unit "
                                "language?)")
        return T2CExample(list(text_ids), unit_ids)


def collate_t2c_examples(examples: Sequence[T2CExample | tuple[list[int], list[int]]]) -> T2CBatch:
    """A DataLoader `collate_fn` for :class:`T2CDataset`."""
    return collate_t2c([list(e[0]) for e in examples], [list(e[1]) for e in examples])
