"""A disk cache of frozen speech-encoder outputs, one file per clip.

The Whisper encoder is frozen in every training stage, so its output for a clip never
changes; computing it once and reading it back afterwards removes most of a step's encoder
work. An entry is keyed by

- the audio content (the float32 waveform at 16 kHz, hashed in full),
- the encoder's identity (a hash of its weights and its window length), and
- whether padding frames are kept (the adapter's `mask_padding`),

so another encoder, another window or another masking never reads a stale entry.

Each entry is a safetensors file holding the encoder frames that the adapter reads (the valid
frames, rounded up to a whole pair; or the whole window when padding is not masked) plus the
number of valid frames. Its metadata records the key and a SHA-256 of the tensor bytes.
Entries are written atomically (temp file + rename). A truncated, corrupt or mismatched entry
is reported with a warning, deleted and recomputed: it never stops a run and is never used.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from echox.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT = "echox-encoder-cache-v1"


def encoder_fingerprint(encoder: nn.Module, window_frames: int, keep_padding: bool) -> str:
    """A hash of the encoder's weights (names, shapes, dtypes, values) and of how it is used."""
    h = hashlib.sha256(f"{FORMAT}|window={window_frames}|pad={int(keep_padding)}".encode())
    for name, t in sorted(encoder.state_dict().items()):
        h.update(f"|{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


class EncoderCache:
    """Encoder frames per clip under `root/<encoder fingerprint>/<ab>/<key>.safetensors`."""

    def __init__(self, root: str | os.PathLike, fingerprint: str) -> None:
        self.root = Path(root) / fingerprint
        self.fingerprint = fingerprint
        self.hits = self.misses = self.repaired = 0

    def key(self, wave: np.ndarray) -> str:
        w = np.ascontiguousarray(wave, dtype=np.float32)
        h = hashlib.sha256(self.fingerprint.encode())
        h.update(str(w.shape).encode())
        h.update(w.tobytes())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> tuple[torch.Tensor, int] | None:
        """(frames [T, d], valid frames) or None when absent or unusable (then deleted)."""
        from safetensors import safe_open

        p = self.path(key)
        if not p.is_file():
            self.misses += 1
            return None
        try:
            with safe_open(str(p), framework="pt") as fh:
                meta = fh.metadata() or {}
                frames = fh.get_tensor("frames")
            if meta.get("format") != FORMAT or meta.get("key") != key:
                raise ValueError("it belongs to another key or format")
            if meta.get("sha256") != _sha(frames):
                raise ValueError("its checksum does not match its frames")
            valid = int(meta["valid"])
            if frames.ndim != 2 or not 0 < valid <= frames.shape[0]:
                raise ValueError(f"bad shape {tuple(frames.shape)} for {valid} valid frames")
        except Exception as e:  # noqa: BLE001 - any unreadable entry is recomputed
            log.warning("encoder cache: %s is unusable (%s); recomputing it", p, e)
            p.unlink(missing_ok=True)
            self.repaired += 1
            self.misses += 1
            return None
        self.hits += 1
        return frames, valid

    def put(self, key: str, frames: torch.Tensor, valid: int) -> None:
        from safetensors.torch import save


        frames = frames.detach().cpu().contiguous()
        meta = {"format": FORMAT, "key": key, "valid": str(int(valid)), "sha256": _sha(frames)}
        try:
            atomic_write_bytes(self.path(key), save({"frames": frames}, metadata=meta))
        except OSError as e:  # a full disk costs speed, not the run
            log.warning("encoder cache: cannot write %s (%s)", self.path(key), e)
