"""The released T2C's unit vocabulary: `<|unit_...|>` tokens appended to the LLM tokenizer.

The released EchoX checkpoints (see `echox.model.unit_decoder_authors`) predict `unit_vocab_size`
tokens written `<|unit_X|>` after the LLM vocabulary. X holds SentencePiece-style `▁` markers
and underscore-joined km1000 ids, e.g. `<|unit_▁837_81|>`. The authors' decoder (facts read off
their public `inference/echox_stream.py`) joins the X of all generated unit
tokens into one string, takes every integer in it and drops ids >= 1000. Because the string is
joined first, a number may run across a token boundary (`▁83` + `7_81` reads 837, 81), so
streaming decoding holds back a trailing run of digits until the next token shows where it
ends (`UnitTokenStream`).

One difference, by choice: when no generated token holds a `▁`, the authors take the digits of
the whole decoded text, LLM tokens included; here only unit tokens ever give units.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from echox.errors import UnitError
from echox.fileio import read_json_object

META_FILE = "unit_tokens.json"
FORMAT_NAME = "echox-unit-tokens"
FORMAT_VERSION = 1
_UNIT_TOKEN = re.compile(r"^<\|unit_(.*)\|>$", re.DOTALL)
_DIGITS = re.compile(r"[0-9]+")


def unit_token_texts(tokenizer: Any) -> dict[int, str]:
    """{token id: inner text} of every `<|unit_...|>` token the tokenizer holds."""
    out = {}
    for tok, i in tokenizer.get_vocab().items():
        m = _UNIT_TOKEN.match(tok)
        if m:
            out[int(i)] = m.group(1)
    return out


class UnitTokens:
    """Token ids `offset .. offset + len(texts) - 1` are the unit tokens; `texts` their X."""

    def __init__(self, texts: Sequence[str], offset: int, num_units: int = 1000) -> None:
        if offset < 0 or num_units < 1 or not texts:
            raise UnitError(f"bad unit-token vocabulary: {len(texts)} tokens at {offset}, "
                            f"{num_units} units")
        self.texts = list(texts)
        self.offset = int(offset)
        self._num_units = int(num_units)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, offset: int, count: int, num_units: int = 1000) -> "UnitTokens":
        """The `count` unit tokens from id `offset` on; any other layout is an error."""
        found = unit_token_texts(tokenizer)
        # the ids are distinct: count of them from offset on, without a list of count ids
        # (a config's unit_vocab_size of 2**31 - 1 was killed for memory building one)
        if len(found) != count or (found and (min(found) != offset or max(found) != offset + count - 1)):
            have = f"{len(found)} at ids {min(found)}..{max(found)}" if found else "none"
            raise UnitError(f"the tokenizer's <|unit_...|> tokens ({have}) are not the {count} "
                            f"tokens from id {offset} on that the checkpoint's config describes")
        return cls([found[i] for i in range(offset, offset + count)], offset, num_units)

    @property
    def vocab_size(self) -> int:
        """Token ids it can read: LLM tokens (ignored) and the unit tokens."""
        return self.offset + len(self.texts)

    @property
    def num_units(self) -> int:
        """The vocoder's unit ids are 0 .. num_units - 1; larger ones are dropped."""
        return self._num_units

    def text(self, token_ids: Iterable[int]) -> str:
        """The joined X of the unit tokens among `token_ids` (other tokens are skipped)."""
        n = len(self.texts)
        return "".join(self.texts[t - self.offset] for t in map(int, token_ids)
                       if 0 <= t - self.offset < n)

    def units_in(self, text: str) -> list[int]:
        return [v for v in map(int, _DIGITS.findall(text)) if v < self._num_units]

    def decode(self, token_ids: Iterable[int]) -> list[int]:
        """All units of a whole output, by the authors' rule."""
        return self.units_in(self.text(token_ids))

    def stream(self) -> "UnitTokenStream":
        return UnitTokenStream(self)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / META_FILE).write_text(json.dumps({
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "offset": self.offset,
            "num_units": self._num_units, "texts": self.texts}, ensure_ascii=False, indent=0),
            encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> "UnitTokens":
        p = Path(directory) / META_FILE
        try:
            meta = read_json_object(p, UnitError)
        except FileNotFoundError as e:
            raise UnitError(f"cannot read {p}: {e}") from e
        version = meta.get("format_version", 0)
        if meta.get("format") != FORMAT_NAME or not isinstance(version, int) or version > FORMAT_VERSION:
            raise UnitError(f"{p}: not an {FORMAT_NAME} file of version <= {FORMAT_VERSION}")
        texts, offset, num_units = meta.get("texts"), meta.get("offset"), meta.get("num_units")
        if not (isinstance(texts, list) and all(isinstance(t, str) for t in texts)
                and isinstance(offset, int) and isinstance(num_units, int)):
            raise UnitError(f"{p}: expected \"texts\" (a list of strings), \"offset\" and "
                            "\"num_units\" (whole numbers)")
        return cls(texts, offset, num_units)

    def __repr__(self) -> str:
        return (f"UnitTokens({len(self.texts)} <|unit_...|> tokens from id {self.offset}, "
                f"units < {self._num_units})")


class UnitTokenStream:
    """Streaming `UnitTokens.decode`: `push` returns the units that are complete so far, a
    trailing digit run waits for the next token; `flush` ends the output. The units of all
    pushes plus the flush equal `decode` of the whole output."""

    def __init__(self, vocab: UnitTokens) -> None:
        self.vocab = vocab
        self._tail = ""  # digits at the end of the joined text, perhaps not yet complete

    def push(self, token_id: int) -> list[int]:
        text = self._tail + self.vocab.text([token_id])
        end = len(text)
        while end and text[end - 1].isdigit() and text[end - 1].isascii():
            end -= 1
        self._tail = text[end:]
        return self.vocab.units_in(text[:end])

    def flush(self) -> list[int]:
        tail, self._tail = self._tail, ""
        return self.vocab.units_in(tail)
