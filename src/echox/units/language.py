"""Unit language: frequent unit n-grams merged into "words" (docs/units.md).

Zhang et al. 2025 (arXiv 2505.15333) shorten speech-unit sequences by merging frequent n-grams
into tokens; EchoX's T2C predicts such tokens, each written like `837_81_194`, and splits them
back into units before the vocoder. The paper gives no algorithm or size, so this module uses
BPE merges learned with the HF `tokenizers` library over deduplicated unit sequences.

Encoding trick: unit id u becomes the private-use character chr(0xE000 + u), so one utterance is
one string of K-ary symbols. There is no normaliser and no pre-tokeniser, so merges may form
anywhere in the utterance; their length is capped in units.

Token ids are stable by construction: ids 0..num_units-1 are the single units (id == unit id),
merged tokens follow in merge order. With vocab_size == num_units the language is the identity.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from echox.errors import UnitError
from echox.fileio import atomic_open
from echox.units.kmeans import dedup

# Unicode Private Use Area U+E000..U+F8FF: 6400 code points, never touched by normalisers.
UNIT_CHAR_BASE = 0xE000
MAX_UNITS = 0xF8FF - UNIT_CHAR_BASE + 1  # 6400
# Far beyond any useful unit language (its tokens are rows of the T2C's embedding), and still
# a table the BPE trainer can allocate: it sizes one by the asked vocabulary, and a larger one
# aborted the process (a Rust allocation failure, no Python error)
MAX_VOCAB = 1 << 20

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "unit_language.json"
FORMAT_NAME = "echox-unit-language"
FORMAT_VERSION = 1

_INT_RE = re.compile(r"[0-9]+")  # ASCII digits only; `\d` would also match other scripts


def _ids(values: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
    """Integer ids as int64 [N]: one sequence ([N], or [1, N] as a model's batch of one).
    Floats, bools, strings and None are a `UnitError` (casting them would truncate 1.7 to 1 or
    read "12" as id 12), and so are several sequences at once, which were read as one."""
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UnitError(f"{what} must be integer ids, got {type(values).__name__}") from exc
    if arr.size and arr.dtype.kind not in "iu":
        of = f" of {arr.dtype}" if arr.ndim else ""
        raise UnitError(f"{what} must be integer ids, got {type(values).__name__}{of}")
    if arr.ndim > 1 and int(np.prod(arr.shape[:-1])) != 1:
        raise UnitError(f"{what} must be one sequence [N], got shape {tuple(arr.shape)} (for "
                        "many sequences, give them one at a time or to encode_batch)")
    return arr.astype(np.int64).reshape(-1)


def units_to_text(units: Sequence[int] | np.ndarray, num_units: int) -> str:
    """Unit ids -> one private-use character per unit; rejects ids outside [0, num_units)."""
    arr = _ids(units, "units")
    if arr.size and (arr.min() < 0 or arr.max() >= num_units):
        bad = int(arr[(arr < 0) | (arr >= num_units)][0])
        raise UnitError(f"unit id {bad} is outside [0, {num_units})")
    return "".join(map(chr, (arr + UNIT_CHAR_BASE).tolist()))


def text_to_units(text: str) -> list[int]:
    """Inverse of `units_to_text`."""
    return [ord(ch) - UNIT_CHAR_BASE for ch in text]


def parse_unit_strings(strs: str | Iterable[str], num_units: int) -> list[int]:
    """Units from token strings: `837_81_194`, or the released `<|unit_▁837_81|>` form.

    As in the authors' decoder (their inference code), every integer inside is taken and ids >=
    num_units are dropped.
    """
    if isinstance(strs, str):
        strs = [strs]
    units: list[int] = []
    for s in strs:
        units.extend(v for v in (int(m) for m in _INT_RE.findall(s)) if v < num_units)
    return units


class UnitLanguage:
    """A BPE vocabulary over units; `encode` shortens unit sequences, `decode` restores them."""

    def __init__(self, tokenizer: Any, num_units: int, max_token_units: int) -> None:
        """Wrap a `tokenizers.Tokenizer` whose vocab follows the stable-id layout (validated)."""
        if not 1 <= num_units <= MAX_UNITS:
            raise UnitError(f"num_units must be in [1, {MAX_UNITS}], got {num_units}")
        self._tokenizer = tokenizer
        self._num_units = int(num_units)
        self.max_token_units = int(max_token_units)
        vocab: dict[str, int] = tokenizer.get_vocab()
        size = len(vocab)
        if sorted(vocab.values()) != list(range(size)):
            raise UnitError("unit-language vocabulary ids are not contiguous from 0")
        table: list[tuple[int, ...]] = [()] * size
        for text, tid in vocab.items():
            units = text_to_units(text)
            if not units or min(units) < 0 or max(units) >= num_units:
                raise UnitError(f"unit-language token {tid} is not a string of units < {num_units}")
            table[tid] = tuple(units)
        if size < num_units or any(table[u] != (u,) for u in range(num_units)):
            raise UnitError("unit-language ids 0..num_units-1 must be the single units")
        self._token_units = table  # token id -> units

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _build_tokenizer(num_units: int, merges: list[tuple[str, str]]) -> Any:
        """A BPE tokenizer with vocab = single units (id == unit), then each merge's product."""
        from tokenizers import Tokenizer, models

        vocab = {chr(UNIT_CHAR_BASE + u): u for u in range(num_units)}
        for a, b in merges:
            vocab.setdefault(a + b, len(vocab))
        return Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))

    @classmethod
    def identity(cls, num_units: int) -> UnitLanguage:
        """The language with no merges: a token is a unit."""
        return cls(cls._build_tokenizer(num_units, []), num_units, max_token_units=1)

    @classmethod
    def train(
        cls,
        sequences: Iterable[Sequence[int] | np.ndarray],
        num_units: int,
        vocab_size: int,
        max_token_units: int = 8,
        min_frequency: int = 2,
        deduplicate: bool = True,
        progress: bool = False,
    ) -> UnitLanguage:
        """Learn up to `vocab_size - num_units` BPE merges over (deduplicated) unit sequences.

        The result may hold fewer tokens than `vocab_size` when too few n-grams reach
        `min_frequency`; `vocab_size` of the result is the real size.
        """
        from tokenizers import Tokenizer, models, trainers

        if not 1 <= num_units <= MAX_UNITS:
            raise UnitError(f"num_units must be in [1, {MAX_UNITS}], got {num_units}")
        if vocab_size < num_units:
            raise UnitError(f"vocab_size ({vocab_size}) must be >= num_units ({num_units})")
        if vocab_size > MAX_VOCAB:
            raise UnitError(f"vocab_size must be <= {MAX_VOCAB}, got {vocab_size}")
        if not 1 <= max_token_units <= MAX_VOCAB:
            raise UnitError(f"max_token_units must be in [1, {MAX_VOCAB}], got {max_token_units}")
        if not 0 <= min_frequency < 2**63:
            raise UnitError(f"min_frequency must be in [0, 2**63), got {min_frequency}")
        if vocab_size == num_units or max_token_units == 1:
            return cls.identity(num_units)

        def texts() -> Iterable[str]:
            for seq in sequences:
                yield units_to_text(dedup(seq) if deduplicate else seq, num_units)

        n_new = vocab_size - num_units
        alphabet = [chr(UNIT_CHAR_BASE + u) for u in range(num_units)]
        # The trainer's length cap is approximate (its test is a strict `<`, and it does not
        # apply to first-round pairs), so ask for a slightly longer cap and a few spare merges,
        # then enforce the exact cap below.
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size + n_new // 10 + 16,
            min_frequency=min_frequency,
            show_progress=progress,
            special_tokens=[],
            initial_alphabet=alphabet,
            max_token_length=max_token_units + 1,
        )
        raw = Tokenizer(models.BPE())  # no normaliser, no pre-tokeniser: one "word" per utterance
        raw.train_from_iterator(texts(), trainer=trainer)
        raw_merges = json.loads(raw.to_str())["model"]["merges"]

        known = set(alphabet)
        merges: list[tuple[str, str]] = []
        added = 0
        for m in raw_merges:
            a, b = (m.split(" ") if isinstance(m, str) else m)  # old versions: "a b" strings
            product = a + b
            if a not in known or b not in known or len(product) > max_token_units:
                continue
            if product not in known:
                if added == n_new:
                    break
                known.add(product)
                added += 1
            merges.append((a, b))
        return cls(cls._build_tokenizer(num_units, merges), num_units, max_token_units)

    # ------------------------------------------------------------------ properties
    @property
    def num_units(self) -> int:
        return self._num_units

    @property
    def vocab_size(self) -> int:
        return len(self._token_units)

    @property
    def tokenizer(self) -> Any:
        """The underlying `tokenizers.Tokenizer` (unit chars in, token ids out)."""
        return self._tokenizer

    # ------------------------------------------------------------------ encode / decode
    @property
    def fingerprint(self) -> str:
        """What the language's tokens say, in 16 hex digits: two languages with the same
        fingerprint turn every token id into the same units. Checkpoints record it, so that a
        decoder is not trained on, or bundled with, another language's ids."""
        table = [list(self.token_units(t)) for t in range(self.vocab_size)]
        return hashlib.sha256(json.dumps([self.num_units, table]).encode()).hexdigest()[:16]

    def encode(self, units: Sequence[int] | np.ndarray) -> list[int]:
        """Units -> token ids in [0, vocab_size). Repeats and unseen units round-trip exactly."""
        text = units_to_text(units, self._num_units)
        if not text:
            return []
        return list(self._tokenizer.encode(text).ids)

    def encode_batch(self, batch: Sequence[Sequence[int] | np.ndarray]) -> list[list[int]]:
        """Encode many sequences at once (the tokenizer runs them in parallel)."""
        texts = [units_to_text(u, self._num_units) for u in batch]
        encs = self._tokenizer.encode_batch(texts)
        return [list(e.ids) if t else [] for e, t in zip(encs, texts)]

    def decode(self, token_ids: Sequence[int] | np.ndarray) -> list[int]:
        """Token ids -> units."""
        out: list[int] = []
        table = self._token_units
        for tid in _ids(token_ids, "token ids").tolist():
            if not 0 <= tid < len(table):
                raise UnitError(f"token id {tid} is outside [0, {len(table)})")
            out.extend(table[tid])
        return out

    def token_units(self, token_id: int) -> tuple[int, ...]:
        """The units one token stands for."""
        if isinstance(token_id, bool) or not isinstance(token_id, numbers.Integral):
            raise UnitError(f"a token id must be an integer, got {token_id!r}")
        if not 0 <= token_id < len(self._token_units):
            raise UnitError(f"token id {token_id} is outside [0, {len(self._token_units)})")
        return self._token_units[token_id]

    def token_str(self, token_id: int) -> str:
        """The paper's written form of a token, e.g. `837_81_194`."""
        return "_".join(str(u) for u in self.token_units(token_id))

    def tokens_to_str(self, token_ids: Sequence[int] | np.ndarray) -> list[str]:
        return [self.token_str(t) for t in _ids(token_ids, "token ids").tolist()]

    def units_from_strings(self, strs: str | Iterable[str]) -> list[int]:
        """Units from written tokens (`837_81_194` or `<|unit_▁837_81|>`); ids >= num_units dropped."""
        return parse_unit_strings(strs, self._num_units)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> None:
        """Write `tokenizer.json` (a standard HF tokenizer) and `unit_language.json`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(directory / TOKENIZER_FILE))
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "num_units": self._num_units,
            "vocab_size": self.vocab_size,
            "max_token_units": self.max_token_units,
            "unit_char_base": UNIT_CHAR_BASE,
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> UnitLanguage:
        from tokenizers import Tokenizer

        directory = Path(directory)
        meta_path, tok_path = directory / META_FILE, directory / TOKENIZER_FILE
        for p in (meta_path, tok_path):
            if not p.is_file():
                raise UnitError(f"unit language file not found: {p}")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            num_units = int(meta["num_units"])
            max_token_units = int(meta.get("max_token_units", 0))
            vocab_size = int(meta["vocab_size"]) if "vocab_size" in meta else None
        except (ValueError, OverflowError, RecursionError, KeyError, TypeError) as exc:
            raise UnitError(f"{meta_path}: corrupt unit-language metadata ({exc})") from exc
        if meta.get("format") != FORMAT_NAME or meta.get("unit_char_base") != UNIT_CHAR_BASE:
            raise UnitError(f"{meta_path}: not an {FORMAT_NAME} file")
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise UnitError(f"{tok_path}: corrupt tokenizer file ({exc})") from exc
        lang = cls(tokenizer, num_units, max_token_units)
        if vocab_size is not None and vocab_size != lang.vocab_size:
            raise UnitError(
                f"{directory}: metadata says vocab_size {meta['vocab_size']}, "
                f"tokenizer has {lang.vocab_size}"
            )
        return lang

    def __repr__(self) -> str:
        return (
            f"UnitLanguage(num_units={self._num_units}, vocab_size={self.vocab_size}, "
            f"max_token_units={self.max_token_units})"
        )


def compression_stats(
    lang: UnitLanguage, sequences: Iterable[Sequence[int] | np.ndarray], deduplicate: bool = True
) -> dict[str, float]:
    """How much the language shortens sequences: units per token and length percentiles."""
    unit_lens: list[int] = []
    token_lens: list[int] = []
    for seq in sequences:
        units = dedup(seq) if deduplicate else list(np.asarray(seq).reshape(-1).tolist())
        unit_lens.append(len(units))
        token_lens.append(len(lang.encode(units)))
    if not unit_lens or sum(token_lens) == 0:
        raise UnitError("compression_stats needs at least one non-empty sequence")
    u, t = np.asarray(unit_lens), np.asarray(token_lens)
    stats: dict[str, float] = {
        "vocab_size": float(lang.vocab_size),
        "num_sequences": float(len(u)),
        "total_units": float(u.sum()),
        "total_tokens": float(t.sum()),
        "units_per_token": float(u.sum() / t.sum()),
    }
    for q in (50, 90, 99):
        stats[f"units_p{q}"] = float(np.percentile(u, q))
        stats[f"tokens_p{q}"] = float(np.percentile(t, q))
    return stats


def plot_stats(rows: Sequence[Mapping[str, float]], path: str | Path) -> None:
    """PNG of compression (units per token) and median length vs vocabulary size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise UnitError("plot_stats needs at least one row")
    rows = sorted(rows, key=lambda r: r["vocab_size"])
    sizes = [r["vocab_size"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(sizes, [r["units_per_token"] for r in rows], "o-")
    ax1.set_xlabel("vocabulary size")
    ax1.set_ylabel("units per token (compression)")
    ax1.grid(True, alpha=0.3)
    if all("tokens_p50" in r and "units_p50" in r for r in rows):
        ax2.plot(sizes, [r["tokens_p50"] for r in rows], "o-", label="tokens p50")
        ax2.plot(sizes, [r["units_p50"] for r in rows], "--", label="units p50 (dedup)")
        if all("tokens_p90" in r for r in rows):
            ax2.plot(sizes, [r["tokens_p90"] for r in rows], "s-", label="tokens p90")
        ax2.set_xlabel("vocabulary size")
        ax2.set_ylabel("sequence length")
        ax2.legend()
        ax2.grid(True, alpha=0.3)
    else:
        ax2.axis("off")
    fig.suptitle("Unit language: compression vs vocabulary size")
    fig.tight_layout()
    path = Path(path)
    try:  # atomically: a failed or killed write leaves an older plot whole
        with atomic_open(path, "wb") as fh:
            fig.savefig(fh, dpi=100, format=path.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
