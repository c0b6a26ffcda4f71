"""Checkpoint shards read and written one tensor, and one block of bytes, at a time.

An 8B checkpoint is ~19 GB; converting it must not hold it in memory. safetensors files are
read from their JSON header (names, dtypes, shapes, byte ranges) and their tensors are copied
as raw bytes in fixed-size blocks, never as whole tensors. A `SafetensorsWriter` knows every
tensor of the file it writes up front (from the source headers), writes the header first and
then takes the tensors in any order. PyTorch `.bin` shards are opened with `mmap=True` (their
storages stay on disk until read); an old non-zip `.bin` is read whole, one shard at a time.

The safetensors layout (an 8-byte little-endian header length, a JSON header with `dtype`,
`shape` and `data_offsets` per tensor, then the data) follows the format's public spec.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from echox.errors import CheckpointError

BLOCK = 16 << 20  # bytes per read / write
MAX_HEADER = 100 << 20

ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                 "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
TORCH_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
                torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass
class TensorInfo:
    """Where one tensor of a shard lies; `start` < 0 for `.bin` shards (read through torch)."""

    name: str
    dtype: str  # safetensors' name: F32, BF16, ...
    shape: tuple[int, ...]
    file: Path
    start: int
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of a safetensors file, from its header only (no tensor data is read)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
        try:
            meta = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    out = {}
    spans: list[tuple[int, int, str]] = []
    for name, e in meta.items():
        if name == "__metadata__":
            continue
        try:
            dtype, dims, (a, b) = e["dtype"], e["shape"], e["data_offsets"]
            # whole numbers only: int() made a shape of 32.5 into 32
            if not isinstance(dims, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                     and v >= 0 for v in dims):
                raise TypeError("shape must be a list of whole numbers")
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (a, b)) or a < 0:
                raise TypeError("data_offsets must be integers")
            shape = tuple(dims)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: corrupt header entry for {name}") from err
        if dtype not in ELEMENT_BYTES:
            raise CheckpointError(f"{path}: {name} has dtype {dtype}, which EchoX cannot read")
        if b - a != math.prod(shape) * ELEMENT_BYTES[dtype] or 8 + n + b > size:
            raise CheckpointError(f"{path}: {name} lies outside the file or has the wrong size "
                                  f"(truncated download?)")
        out[name] = TensorInfo(name, dtype, shape, path, 8 + n + a, b - a)
        spans.append((a, b, name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:  # two tensors read the same bytes: both took them, exit 0
            raise CheckpointError(f"{path}: corrupt header: {first} and {second} share bytes")
    return out


class BinShards:
    """`.bin` shards through `torch.load`, one open at a time."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._state: dict[str, torch.Tensor] = {}

    def state(self, path: Path) -> dict[str, torch.Tensor]:
        if path != self._path:
            self._state = {}
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True)
                except Exception as e:  # noqa: BLE001
                    raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({e})") from e
            except Exception as e:  # noqa: BLE001 - unpickling errors of any kind
                raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({e})") from e
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise CheckpointError(f"{path}: not a flat state dict of tensors")
            self._path, self._state = path, state
        return self._state

    def infos(self, path: Path) -> dict[str, TensorInfo]:
        out = {}
        for name, t in self.state(path).items():
            if t.dtype not in TORCH_DTYPES:
                raise CheckpointError(f"{path}: {name} has dtype {t.dtype}, which EchoX cannot write")
            out[name] = TensorInfo(name, TORCH_DTYPES[t.dtype], tuple(t.shape), path, -1,
                                   t.numel() * t.element_size())
        return out


def iter_bytes(info: TensorInfo, bins: BinShards, block: int = BLOCK) -> Iterator[memoryview]:
    """The raw (little-endian) bytes of one tensor, `block` at a time."""
    if info.start >= 0:
        with open(info.file, "rb") as f:
            f.seek(info.start)
            left = info.nbytes
            while left:
                chunk = f.read(min(block, left))
                if not chunk:
                    raise CheckpointError(f"{info.file}: ends inside {info.name} (truncated?)")
                left -= len(chunk)
                yield memoryview(chunk)
        return
    t = bins.state(info.file)[info.name].contiguous().reshape(-1)
    raw = memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
    for i in range(0, len(raw), block):
        yield raw[i:i + block]


def same_bytes(a: TensorInfo, b: TensorInfo, bins: BinShards) -> bool:
    """Whether two tensors are bit-identical (dtype, shape and data), compared block by block."""
    if (a.dtype, a.shape) != (b.dtype, b.shape):
        return False
    buf = bytearray()
    it_b = iter_bytes(b, bins)
    for chunk in iter_bytes(a, bins):
        while len(buf) < len(chunk):
            nxt = next(it_b, None)
            if nxt is None:
                return False
            buf += nxt
        if bytes(buf[:len(chunk)]) != bytes(chunk):
            return False
        del buf[:len(chunk)]
    return not buf and next(it_b, None) is None


class SafetensorsWriter:
    """A safetensors file whose tensors are declared up front; data arrives in any order."""

    def __init__(self, path: Path, tensors: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        self._where: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, dtype, shape in tensors:
            nbytes = math.prod(shape) * ELEMENT_BYTES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._where[name] = (offset, nbytes)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._base = 8 + len(raw)
        self.path = path
        self.total = offset
        self._todo = set(self._where)
        self._f = open(path, "wb")
        self._f.write(len(raw).to_bytes(8, "little") + raw)
        self._f.truncate(self._base + offset)

    def write(self, name: str, chunks: Iterator[memoryview]) -> None:
        start, nbytes = self._where[name]
        self._f.seek(self._base + start)
        done = 0
        for c in chunks:
            self._f.write(c)
            done += len(c)
        if done != nbytes:
            raise CheckpointError(f"{self.path}: {name} got {done} bytes, expected {nbytes}")
        self._todo.discard(name)

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if self._todo:
            raise CheckpointError(f"{self.path}: tensors never written: {sorted(self._todo)[:5]}")
