"""Unit extraction: audio -> frame features -> k-means ids -> deduplicated runs (docs/units.md).

Two feature sources share one interface, :class:`FeatureExtractor`:

- :class:`HubertFeatures`: a `transformers` HuBERT / wav2vec2-style model, one hidden layer
  (mHuBERT layer 11 with km1000 at full scale, as in the paper).
- :class:`WhisperLayerFeatures`: a hidden layer of the Whisper encoder, on the same code path
  as the EchoX speech encoder. The middle layers of tiny.en make usable units
  (docs/units.md), which is what runs offline here.

:class:`UnitExtractor` adds the k-means and the deduplication. :func:`extract_corpus` runs it
over a corpus with one small cache file per utterance, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from echox.audio import load_audio
from echox.errors import UnitError
from echox.fileio import atomic_write_text
from echox.hub import resolve
from echox.model.checkpoint import sha256_file
from echox.model.encoder import LogMelFrontEnd, WhisperSpeechEncoder
from echox.hub.bars import no_loading_bar
from echox.units.kmeans import UnitKMeans, dedup_with_counts

__all__ = [
    "SAMPLE_RATE", "UnitCacheWarning", "FeatureExtractor",
    "HubertFeatures", "WhisperLayerFeatures", "UnitSequence", "UnitExtractor",
    "extract_corpus", "sample_features", "train_kmeans_on_corpus",
]

SAMPLE_RATE = 16000
CACHE_META = "extractor.json"  # fingerprint of the extractor that filled a cache folder
_CACHE_FORMAT = 1
_WHISPER_HOP = 320  # samples per Whisper encoder frame: mel hop 160 x conv stride 2


class UnitCacheWarning(UserWarning):
    """A cache file was unreadable; the utterance is recomputed."""


def _pick_device(device: str | torch.device | None) -> torch.device:
    """`None` means the GPU when there is one; never hard-code CUDA."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_wavs(wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each input must be a non-empty, finite, mono float waveform at 16 kHz."""
    if isinstance(wavs, np.ndarray):
        raise UnitError("pass a list of 1-D waveforms, not one array")
    out = []
    for i, w in enumerate(wavs):
        a = np.asarray(w, dtype=np.float32)
        if a.ndim != 1 or a.size == 0:
            raise UnitError(f"waveform {i}: expected a non-empty 1-D array, got shape {a.shape}")
        if not np.isfinite(a).all():
            raise UnitError(f"waveform {i}: contains NaN or inf samples")
        out.append(a)
    return out


class FeatureExtractor(ABC):
    """Frame features of 16 kHz waveforms: one `[T_i, D]` array per input, valid frames only."""

    @property
    @abstractmethod
    def frame_rate(self) -> float:
        """Frames per second of the output (50 for HuBERT and Whisper)."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Feature size D."""

    @abstractmethod
    def __call__(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Batched features: `wavs[i]` [S_i] -> [T_i, D] float32, no padding frames."""

    def describe(self) -> dict[str, Any]:
        """What makes these features these features; caches are keyed on it."""
        return {"type": type(self).__name__, "frame_rate": self.frame_rate, "dim": self.dim}


# ----------------------------------------------------------------------------- HuBERT


class HubertFeatures(FeatureExtractor):
    """Hidden layer `layer` of a HuBERT / wav2vec2-style model (`hidden_states[layer]`).

    `layer` counts like fairseq's `output_layer`: 0 is the input of the first Transformer
    layer, L the output of layer L (mHuBERT units use 11). Models whose feature encoder uses
    layer norm (and whose preprocessor asks for attention masks) run as one padded batch with a
    mask. Group-norm models (HuBERT base) normalise over time in their first conv, so zero
    padding would change every frame: they run one utterance per forward, which keeps the
    features identical to unbatched ones.
    """

    def __init__(
        self, name_or_path: str | Path, layer: int, device: str | torch.device | None = None
    ) -> None:
        from transformers import (
            AutoConfig,
            AutoFeatureExtractor,
            AutoModel,
            Wav2Vec2FeatureExtractor,
        )

        self.name = str(name_or_path)
        folder = resolve(self.name)
        try:
            cfg = AutoConfig.from_pretrained(folder)
        except Exception as exc:  # noqa: BLE001 - HF raises many kinds here
            raise UnitError(f"{folder}: no readable model config ({exc})") from exc
        if not hasattr(cfg, "conv_stride") or not hasattr(cfg, "conv_kernel"):
            raise UnitError(
                f"{folder}: model type {cfg.model_type!r} is not a HuBERT / wav2vec2-style "
                "speech model (its config has no conv feature encoder)"
            )
        if not 0 <= layer <= cfg.num_hidden_layers:
            raise UnitError(
                f"layer {layer} out of range: {folder} has {cfg.num_hidden_layers} layers (give "
                f"0..{cfg.num_hidden_layers})"
            )
        try:
            with no_loading_bar():
                model = AutoModel.from_pretrained(folder)
        except Exception as exc:  # noqa: BLE001
            raise UnitError(f"{folder}: cannot load the speech model ({exc})") from exc
        layer_norm = getattr(cfg, "feat_extract_norm", "group") == "layer"
        if (folder / "preprocessor_config.json").is_file():
            fe = AutoFeatureExtractor.from_pretrained(folder)
        else:  # the HF convention: layer-norm (large) models normalise and take masks
            fe = Wav2Vec2FeatureExtractor(do_normalize=layer_norm, return_attention_mask=layer_norm)
        if getattr(fe, "sampling_rate", SAMPLE_RATE) != SAMPLE_RATE:
            raise UnitError(f"{folder}: model expects {fe.sampling_rate} Hz, not {SAMPLE_RATE}")
        self.layer = layer
        self.do_normalize = bool(getattr(fe, "do_normalize", False))
        self.use_mask = layer_norm and bool(getattr(fe, "return_attention_mask", False))
        self.kernels = [int(k) for k in cfg.conv_kernel]
        self.strides = [int(s) for s in cfg.conv_stride]
        self.device = _pick_device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self._dim = int(cfg.hidden_size)

    @property
    def frame_rate(self) -> float:
        return SAMPLE_RATE / math.prod(self.strides)

    @property
    def dim(self) -> int:
        return self._dim

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model": self.name, "layer": self.layer}

    def num_frames(self, num_samples: int) -> int:
        """Output frames of the conv feature encoder: floor((n - k) / s) + 1 per conv layer."""
        n = num_samples
        for k, s in zip(self.kernels, self.strides):
            n = (n - k) // s + 1
            if n <= 0:
                return 0
        return n

    def _prepare(self, wav: np.ndarray) -> np.ndarray:
        # Zero-mean unit-variance per utterance over its own samples, as Wav2Vec2FeatureExtractor
        # does with do_normalize (computed here per utterance, so padding never enters the stats).
        if not self.do_normalize:
            return wav
        return ((wav - wav.mean()) / np.sqrt(wav.var() + 1e-7)).astype(np.float32)

    @torch.inference_mode()
    def __call__(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        wavs = _check_wavs(wavs)
        lengths = [self.num_frames(w.size) for w in wavs]
        for i, (w, n) in enumerate(zip(wavs, lengths)):
            if n == 0:
                raise UnitError(
                    f"waveform {i}: {w.size} samples is shorter than the model's receptive field"
                )
        inputs = [self._prepare(w) for w in wavs]
        groups = [list(range(len(wavs)))] if self.use_mask else [[i] for i in range(len(wavs))]
        out: list[np.ndarray] = [np.empty(0)] * len(wavs)
        for group in groups:
            width = max(inputs[i].size for i in group)
            x = torch.zeros(len(group), width)  # [B, S]
            mask = torch.zeros(len(group), width, dtype=torch.long)  # [B, S]
            for row, i in enumerate(group):
                x[row, : inputs[i].size] = torch.from_numpy(inputs[i])
                mask[row, : inputs[i].size] = 1
            res = self.model(
                x.to(self.device),
                attention_mask=mask.to(self.device) if self.use_mask else None,
                output_hidden_states=True,
            )
            hidden = res.hidden_states[self.layer].float().cpu()  # [B, T, D]
            for row, i in enumerate(group):
                out[i] = hidden[row, : lengths[i]].numpy()
        return out


# ----------------------------------------------------------------------------- Whisper


class WhisperLayerFeatures(FeatureExtractor):
    """`hidden_states[layer]` of the Whisper encoder, 50 Hz, ceil(samples / 320) frames.

    0 is the embedding output, L < N the output of layer L, N the final (layer-normed) output.
    Only the first L + 1 layers are kept: the rest would run for nothing. Each utterance gets
    its own padded window (packing several utterances into one window gave worse units: WER
    1.08 against 0.75 for the final layer, in the measurement of docs/units.md). Longer utterances are cut into whole windows (`on_too_long="split"`) whose
    frames are concatenated, or refused (`"error"`).

    `window_seconds` below Whisper's native 30 s pads each utterance to a shorter window (as
    the EchoX encoder does, `encoder.window_seconds`): fewer padded frames to run, at the price
    of slightly different features (padding is attended to). Its units are not those of a
    k-means trained on 30 s windows unless measured to agree (docs/units.md); caches key on it.
    """

    def __init__(
        self,
        name_or_path: str | Path,
        layer: int,
        device: str | torch.device | None = None,
        on_too_long: Literal["split", "error"] = "split",
        window_seconds: float | None = None,
    ) -> None:
        if on_too_long not in ("split", "error"):
            raise UnitError(f"on_too_long must be 'split' or 'error', got {on_too_long!r}")
        self.name = str(name_or_path)
        folder = resolve(self.name)
        try:
            enc = WhisperSpeechEncoder.from_folder(folder, window_seconds=window_seconds)
        except ValueError as err:
            raise UnitError(str(err)) from err
        self.window_seconds = None if enc.native_window else float(window_seconds)  # type: ignore[arg-type]
        n_layers = len(enc.whisper.layers)
        if not 0 <= layer <= n_layers:
            raise UnitError(f"layer {layer} out of range: {folder} has {n_layers} layers (give "
                          f"0..{n_layers})")
        # Keep one layer past `layer`: only the last entry of hidden_states gets the final
        # LayerNorm, so hidden_states[layer] stays that layer's raw output, as in the full model.
        if layer < n_layers:
            enc.whisper.layers = nn.ModuleList(list(enc.whisper.layers)[: layer + 1])
        self.layer = layer
        self.on_too_long = on_too_long
        self.front = LogMelFrontEnd(folder, enc.num_mel_bins, enc.window_frames)
        self.device = _pick_device(device)
        self.encoder = enc.eval().to(self.device)
        self._dim = enc.d_model

    @property
    def frame_rate(self) -> float:
        return SAMPLE_RATE / _WHISPER_HOP

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def window_samples(self) -> int:
        """Longest utterance one encoder window holds (480,000 samples = 30 s for real Whisper)."""
        return self.front.max_samples

    def describe(self) -> dict[str, Any]:
        d = {**super().describe(), "model": self.name, "layer": self.layer}
        if self.window_seconds is not None:  # the native window keeps older caches' key
            d["window_seconds"] = self.window_seconds
        return d

    def _windows(self, i: int, wav: np.ndarray) -> list[np.ndarray]:
        if wav.size <= self.window_samples:
            return [wav]
        if self.on_too_long == "error":
            raise UnitError(
                f"waveform {i}: {wav.size / SAMPLE_RATE:.2f} s is longer than the Whisper window "
                f"of {self.front.max_seconds:.2f} s (use on_too_long='split' or split the audio)"
            )
        # The window is a whole number of 320-sample frames, so the pieces' frames add up to
        # ceil(samples / 320) exactly.
        return [wav[lo : lo + self.window_samples] for lo in range(0, wav.size, self.window_samples)]

    @torch.inference_mode()
    def __call__(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        wavs = _check_wavs(wavs)
        pieces = [(i, p) for i, w in enumerate(wavs) for p in self._windows(i, w)]
        frames: list[list[np.ndarray]] = [[] for _ in wavs]
        step = max(1, len(wavs))  # windows per forward: as many as the caller's batch
        for lo in range(0, len(pieces), step):
            chunk = pieces[lo : lo + step]
            mel = self.front([p for _, p in chunk])
            n_valid = self.encoder.output_lengths(mel.lengths)  # [B]
            dtype = next(self.encoder.parameters()).dtype
            res = self.encoder.whisper(mel.features.to(self.device, dtype), output_hidden_states=True)
            hidden = res.hidden_states[self.layer].float().cpu()  # [B, window / 2, D]
            for row, (i, _) in enumerate(chunk):
                frames[i].append(hidden[row, : int(n_valid[row])].numpy())
        return [np.concatenate(f, axis=0) for f in frames]


# ----------------------------------------------------------------------------- units


@dataclass(frozen=True)
class UnitSequence:
    """Deduplicated units with run lengths in frames (the vocoder's duration targets)."""

    units: list[int]
    counts: list[int]
    frame_rate: float

    def __post_init__(self) -> None:
        if len(self.units) != len(self.counts):
            raise UnitError(f"{len(self.units)} units but {len(self.counts)} counts")
        if any(c < 1 for c in self.counts):
            raise UnitError("run lengths must be >= 1")

    @property
    def num_frames(self) -> int:
        return int(sum(self.counts))

    @property
    def duration(self) -> float:
        """Seconds of audio these units cover."""
        return self.num_frames / self.frame_rate

    def frames(self) -> np.ndarray:
        """Undo the deduplication: one unit per frame, int64 [num_frames]."""
        return np.repeat(np.asarray(self.units, dtype=np.int64), self.counts)

    def to_dict(self) -> dict[str, Any]:
        return {"units": list(self.units), "counts": list(self.counts), "frame_rate": self.frame_rate}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnitSequence:
        units, counts = d["units"], d["counts"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in [*units, *counts]):
            raise UnitError("units and counts must be integers")
        return cls(list(units), list(counts), float(d["frame_rate"]))


class UnitExtractor:
    """Features -> nearest k-means centroid per frame -> runs of equal units."""

    def __init__(
        self, features: FeatureExtractor, kmeans: UnitKMeans, deduplicate: bool = True
    ) -> None:
        if features.dim != kmeans.dim:
            raise UnitError(
                f"feature dim {features.dim} does not match the k-means dim {kmeans.dim} "
                "(was the k-means trained on another model or layer?)"
            )
        self.features = features
        self.kmeans = kmeans
        self.deduplicate = deduplicate

    def __call__(self, wavs: Sequence[np.ndarray]) -> list[UnitSequence]:
        out = []
        for feats in self.features(wavs):  # [T, D] each
            ids = self.kmeans.predict(feats)  # [T]
            if self.deduplicate:
                units, counts = dedup_with_counts(ids)
            else:
                units, counts = [int(u) for u in ids], [1] * int(ids.size)
            out.append(UnitSequence(units, counts, self.features.frame_rate))
        return out

    def fingerprint(self) -> dict[str, Any]:
        """Features, k-means centroids (hashed) and dedup flag: all that decides the units."""
        centroids = np.ascontiguousarray(self.kmeans.centroids, dtype=np.float32)
        return {
            "format": _CACHE_FORMAT,
            "features": self.features.describe(),
            "kmeans_sha1": hashlib.sha1(centroids.tobytes()).hexdigest(),
            "n_clusters": self.kmeans.n_clusters,
            "deduplicate": self.deduplicate,
        }


# ----------------------------------------------------------------------------- corpus


def _cache_path(cache_dir: Path, item_id: str) -> Path:
    """One JSON file per utterance, sharded by hash so no folder gets huge; ids can be anything."""
    h = hashlib.sha1(item_id.encode("utf-8")).hexdigest()
    return cache_dir / h[:2] / f"{h}.json"


def _audio_digest(path: Path) -> str | None:
    """`sha256_file` of an utterance's audio file (None when it cannot be read: the
    extraction then reports it)."""
    try:
        return sha256_file(Path(path))
    except OSError:
        return None


def _read_cached(path: Path, item_id: str, audio: Path | None = None,
                 num_units: int | None = None) -> UnitSequence | None:
    """The cached units of `item_id`, or None: none cached, or cached from other audio than
    `audio` now holds (an id whose clip was spoken anew or now names another file). Entries
    written before the audio digest was kept are taken as they are. An entry whose units lie
    outside [0, `num_units`) or whose run lengths do not fit them (an edit, a damaged disk)
    is recomputed."""
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        if d.get("id") != item_id:
            raise UnitError(f"holds id {d.get('id')!r}")
        if audio is not None and "audio_sha256" in d and d["audio_sha256"] != _audio_digest(audio):
            return None
        seq = UnitSequence.from_dict(d)
        if num_units is not None and not (
                len(seq.units) == len(seq.counts) and all(0 <= u < num_units for u in seq.units)
                and all(c >= 1 for c in seq.counts)):
            raise UnitError(f"holds units outside [0, {num_units}) or run lengths that do not fit them")
        return seq
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as exc:
        warnings.warn(
            f"unit cache file {path} for {item_id!r} is unreadable ({exc}); recomputing",
            UnitCacheWarning,
            stacklevel=3,
        )
        return None


def _check_cache_meta(cache_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse to mix units of two extractors in one cache folder. A folder of no units yet (a
    run that failed on its first batch) is taken over by the new extractor."""
    meta = cache_dir / CACHE_META
    if meta.is_file():
        try:
            old = json.loads(meta.read_text(encoding="utf-8"))
        except (ValueError, RecursionError):
            old = None
        if old == json.loads(json.dumps(fingerprint)):  # as JSON stores it (tuples as lists)
            return
        if any(cache_dir.glob("??/*.json")):  # `_cache_path`'s shards
            raise UnitError(
                f"{cache_dir} holds units of another extractor (see {meta}): "
                f"cached {old}, now {fingerprint}. Use a new cache_dir or delete the old one."
            )
    atomic_write_text(meta, json.dumps(fingerprint, indent=1))


def _batches(seq: list[Any], size: int) -> Iterator[list[Any]]:
    for lo in range(0, len(seq), size):
        yield seq[lo : lo + size]


def _load_items(
    batch: list[tuple[str, Path]], on_error: Literal["raise", "skip"]
) -> tuple[list[str], list[np.ndarray]]:
    ids, wavs = [], []
    for item_id, path in batch:
        try:
            wavs.append(load_audio(path, sr=SAMPLE_RATE, max_seconds=None))
        except Exception as exc:  # noqa: BLE001 - AudioError and OS errors alike
            if on_error == "raise":
                raise
            warnings.warn(f"skipping {item_id!r}: {exc}", UserWarning, stacklevel=3)
            continue
        ids.append(item_id)
    return ids, wavs


def _extract_batch(extractor: UnitExtractor, ids: list[str], wavs: list[np.ndarray],
                   on_error: Literal["raise", "skip"]) -> list[tuple[str, UnitSequence]]:
    """The units of one batch. A clip the model cannot take (shorter than HuBERT's receptive
    field, say) fails the whole batch: then each clip goes alone, so the error names the
    utterance, and with `on_error="skip"` only that one is left out, with a warning."""
    try:
        return list(zip(ids, extractor(wavs)))
    except UnitError as exc:
        if len(wavs) > 1:
            return [pair for i, w in zip(ids, wavs) for pair in _extract_batch(extractor, [i], [w], on_error)]
        why = re.sub(r"^waveform \d+: ", "", str(exc))  # the clip is named instead
        if on_error == "raise":
            raise UnitError(f"{ids[0]!r}: {why}") from exc
        warnings.warn(f"skipping {ids[0]!r}: {why}", UserWarning, stacklevel=3)
        return []


def _as_items(items: Iterable[tuple[Any, str | Path]]) -> list[tuple[str, Path]]:
    out, seen = [], set()
    for pair in items:
        try:
            item_id, path = pair
        except (TypeError, ValueError) as exc:
            raise UnitError(f"corpus items must be (id, audio_path) pairs, got {pair!r}") from exc
        item_id = str(item_id)
        if item_id in seen:
            raise UnitError(f"duplicate utterance id {item_id!r} in the corpus")
        seen.add(item_id)
        out.append((item_id, Path(path)))
    return out


def extract_corpus(
    items: Iterable[tuple[Any, str | Path]],
    extractor: UnitExtractor,
    cache_dir: str | Path,
    batch_size: int = 8,
    progress: bool = True,
    on_error: Literal["raise", "skip"] = "raise",
    report: dict[str, int] | None = None,
) -> dict[str, UnitSequence]:
    """Units of every `(id, audio_path)`, cached per utterance and resumable.

    Cached utterances are read, not recomputed; a corrupt cache file is recomputed with a
    :class:`UnitCacheWarning`. Audio that cannot be read, or that the speech model cannot take
    (shorter than its receptive field, NaN samples, ...), raises naming the utterance, or with
    `on_error="skip"` is left out of the result with a warning. Returns the units in item order. `report`, when
    given, is filled with how many utterances were read from the cache (`cached`), computed
    (`computed`, stale or corrupt cache entries included) and left out (`dropped`); the three
    add up to the number of items.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise UnitError(f"batch_size must be >= 1, got {batch_size}")
    if on_error not in ("raise", "skip"):
        raise UnitError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    pairs = _as_items(items)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    _check_cache_meta(cache, extractor.fingerprint())

    found: dict[str, UnitSequence] = {}
    todo: list[tuple[str, Path]] = []
    for item_id, path in pairs:
        seq = _read_cached(_cache_path(cache, item_id), item_id, Path(path),
                           extractor.kmeans.n_clusters)
        if seq is None:
            todo.append((item_id, path))
        else:
            found[item_id] = seq
    n_cached = len(found)
    # closed on an error too: its message starts a line of its own, not the bar's line
    with tqdm(total=len(pairs), initial=n_cached, unit="utt", desc="units",
              disable=not progress) as bar:
        for batch in _batches(todo, batch_size):
            ids, wavs = _load_items(batch, on_error)
            if wavs:
                where = dict(batch)
                for item_id, seq in _extract_batch(extractor, ids, wavs, on_error):
                    text = json.dumps({"id": item_id, "audio_sha256": _audio_digest(Path(where[item_id])),
                                       **seq.to_dict()}, separators=(",", ":"))
                    atomic_write_text(_cache_path(cache, item_id), text)
                    found[item_id] = seq
            bar.update(len(batch))
    if report is not None:
        report.update(cached=n_cached, computed=len(found) - n_cached,
                      dropped=len(pairs) - len(found))
    return {item_id: found[item_id] for item_id, _ in pairs if item_id in found}


def sample_features(
    items: Iterable[tuple[Any, str | Path]],
    features: FeatureExtractor,
    max_frames: int,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
) -> np.ndarray:
    """A random sample of frame features for k-means training: float32 [<= max_frames, D].

    Utterances are visited in a seeded random order until `max_frames` frames are in hand
    (so a big corpus is not read in full), then exactly `max_frames` are drawn from them.
    """
    if max_frames < 1:
        raise UnitError(f"max_frames must be >= 1, got {max_frames}")
    pairs = _as_items(items)
    order = np.random.default_rng(seed).permutation(len(pairs))
    from tqdm import tqdm

    chunks: list[np.ndarray] = []
    total = 0
    with tqdm(total=max_frames, unit="frame", desc="k-means sample", disable=not progress) as bar:
        for batch in _batches([pairs[i] for i in order], batch_size):
            _, wavs = _load_items(batch, "raise")
            for f in features(wavs):
                chunks.append(f)
                total += f.shape[0]
                bar.update(min(f.shape[0], max(0, max_frames - bar.n)))
            if total >= max_frames:
                break
    if not chunks or total == 0:
        raise UnitError("the corpus gave no feature frames to sample")
    frames = np.concatenate(chunks, axis=0)  # [N, D]
    if total > max_frames:
        pick = np.sort(np.random.default_rng(seed + 1).choice(total, size=max_frames, replace=False))
        frames = frames[pick]
    return frames.astype(np.float32, copy=False)


def train_kmeans_on_corpus(
    items: Iterable[tuple[Any, str | Path]],
    features: FeatureExtractor,
    n_clusters: int,
    max_frames: int = 100_000,
    seed: int = 0,
    batch_size: int = 8,
    out_path: str | Path | None = None,
    progress: bool = True,
) -> UnitKMeans:
    """Sample frames from the corpus, fit k-means on them and optionally save it to `out_path`."""
    frames = sample_features(items, features, max_frames, seed, batch_size, progress)  # [N, D]
    km = UnitKMeans.fit(frames, n_clusters=n_clusters, seed=seed, progress=progress)
    if out_path is not None:
        km.save(out_path)
    return km
