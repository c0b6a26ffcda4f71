"""HiFi-GAN generator on ONNX Runtime, optionally with int8 convolutions in chosen stages.

`export_onnx` writes a generator as an fp32 ONNX graph; `convert_generator_onnx` makes an ONNX
generator folder from it, statically quantizing the convolutions of the upsampling stages
named in `int8_stages` (per-channel int8 weights, uint8 activations calibrated on real input
mels). Quantizing every stage costs quality: the last stage writes the waveform itself, and
its int8 noise fills the silences; V1's middle stages carry most of the compute and quantize
almost losslessly (measurements: docs/results.md). Only Conv/ConvTranspose nodes are
quantized; the residual sums and activations stay in float.

A converted generator is a folder: `config.json` (the original HiFi-GAN schema, plus an
"echox" entry naming the runtime and stages) and `generator.onnx`; `OnnxHiFiGAN` runs it and
`echox.vocoder.io.load_generator` opens such folders too. `OnnxSpec` is how a unit->mel
vocoder folder asks for its packaged HiFi-GAN on ONNX Runtime; `cached_onnx_generator` builds
that graph once into the EchoX cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from echox.errors import ConversionError, VocoderCheckpointError, VocoderInputError
from echox.fileio import atomic_dir, check_replaceable, folder_config, save_tensors
from echox.hub import cache_dir
from echox.vocoder.hifigan import GENERATOR_CONFIG, HiFiGANConfig, HiFiGANGenerator

__all__ = ["ONNX_GENERATOR", "OnnxHiFiGAN", "OnnxSpec", "cached_onnx_generator",
           "convert_generator_onnx", "export_onnx", "load_onnx_generator", "stage_nodes"]

log = logging.getLogger(__name__)

RUNTIME = "onnxruntime"
ONNX_GENERATOR = "generator.onnx"  # the graph in an ONNX generator folder


def holds_generator(folder: Path) -> bool:
    """Whether `folder` holds a HiFi-GAN generator saved before, PyTorch or ONNX: its
    config.json is of the HiFi-GAN schema (not, say, an EchoX model's or a unit->mel's)."""
    config = folder_config(folder)
    return config is not None and "upsample_rates" in config and "hop_size" in config


def export_onnx(generator: HiFiGANGenerator, path: Path | str, opset: int = 17) -> Path:
    """Write `generator` as an fp32 ONNX graph with a dynamic frame axis: mel [B, M, T] -> wav
    [B, T * hop]. Needs the `onnx` package (torch's exporter writes through it)."""
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise ConversionError("exporting to ONNX needs the `onnx` package: pip install onnx") from exc
    path = Path(path)
    mel = torch.zeros(1, generator.config.num_mels, 32)
    gen = generator.eval()
    # The TorchScript exporter (dynamo=False) needs no extra package beyond `onnx`; torch
    # marks it deprecated, and the shape check in forward() is a constant in the trace.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(gen, (mel,), str(path), input_names=["mel"], output_names=["wav"],
                          dynamic_axes={"mel": {0: "B", 2: "T"}, "wav": {0: "B", 1: "S"}},
                          opset_version=opset, dynamo=False)
    return path


def _conv_names(model_path: Path | str) -> list[str]:
    """Names of all Conv/ConvTranspose nodes of an ONNX graph, in graph order."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type in ("Conv", "ConvTranspose")]


def _stage_prefixes(config: HiFiGANConfig, stages: Sequence[int]) -> tuple[str, ...]:
    """Node-name prefixes of upsampling `stages` (the transposed conv and its resblocks), as
    `export_onnx` names them after the torch modules."""
    n_stages, k = len(config.upsample_rates), len(config.resblock_kernel_sizes)
    bad = [s for s in stages if not 0 <= int(s) < n_stages]
    if bad:
        raise ConversionError(f"int8 stages {bad} out of range: this generator has {n_stages}")
    return tuple(p for s in stages for p in
                 [f"/ups.{s}/"] + [f"/resblocks.{s * k + j}/" for j in range(k)])


def stage_nodes(model_path: Path | str, config: HiFiGANConfig, stages: Sequence[int]) -> list[str]:
    """Names of the Conv/ConvTranspose nodes of upsampling `stages` (the stage's transposed
    conv and its resblocks) in a graph written by `export_onnx`."""
    prefixes = _stage_prefixes(config, stages)
    return [n for n in _conv_names(model_path) if n.startswith(prefixes)]


def _quantize(fp32: Path, out: Path, config: HiFiGANConfig, stages: Sequence[int],
              calibration: Sequence[np.ndarray]) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    prefixes = _stage_prefixes(config, stages)
    mels = [np.ascontiguousarray(np.asarray(m, dtype=np.float32).reshape(1, config.num_mels, -1))
            for m in calibration]
    if not mels:
        raise ConversionError("int8 quantization needs calibration mels")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(mels)

        def get_next(self) -> dict | None:
            m = next(self.it, None)
            return None if m is None else {"mel": m}

    pre = fp32.with_name("pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    convs = _conv_names(pre)
    if not any(n.startswith(prefixes) for n in convs):
        raise ConversionError(f"found no convolutions of stages {list(stages)} in the graph")
    others = [n for n in convs if not n.startswith(prefixes)]  # conv_pre, conv_post, fp32 stages
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True, op_types_to_quantize=["Conv", "ConvTranspose"],
                    nodes_to_exclude=others)


def convert_generator_onnx(
    generator: HiFiGANGenerator,
    folder: Path | str,
    int8_stages: Sequence[int] = (),
    calibration: Sequence[np.ndarray] = (),
    extra: dict | None = None,
) -> Path:
    """Write `generator` as an ONNX generator folder (atomically). With `int8_stages`, the
    convolutions of those upsampling stages are statically quantized, their activation
    ranges calibrated on `calibration` (log-mels [M, T] or [1, M, T], what the generator
    will see: ideally the unit->mel model's own output)."""
    stages = sorted({int(s) for s in int8_stages})
    meta = {"runtime": RUNTIME, "int8_stages": stages, "calibration_mels": len(calibration)}
    meta.update(extra or {})
    config = generator.config.to_dict() | {"echox": meta}
    check_replaceable(folder, "saving the ONNX generator", is_earlier_save=holds_generator)
    with atomic_dir(Path(folder)) as tmp, tempfile.TemporaryDirectory() as work:
        fp32 = export_onnx(generator, Path(work) / "fp32.onnx")
        if stages:
            _quantize(fp32, tmp / ONNX_GENERATOR, generator.config, stages, calibration)
        else:
            os.replace(fp32, tmp / ONNX_GENERATOR)
        (tmp / GENERATOR_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return Path(folder)


class OnnxHiFiGAN(nn.Module):
    """A HiFi-GAN generator run by ONNX Runtime: log-mel [B, M, T] -> waveform [B, T * hop].

    A drop-in for `HiFiGANGenerator` at inference (same `.config`, same call); it has no
    torch parameters and ignores `.to()`. ORT's intra-op threads follow `threads`, or
    torch's thread count when the session is made (0)."""

    def __init__(self, path: Path | str, config: HiFiGANConfig, threads: int = 0,
                 meta: dict | None = None) -> None:
        super().__init__()
        self.config = config
        self.path = Path(path)
        self.meta = dict(meta or {})
        self.threads = int(threads)
        self._session = None
        self._session_threads = None

    def _get_session(self):
        import onnxruntime as ort

        threads = self.threads or torch.get_num_threads()
        if self._session is None or self._session_threads != threads:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            try:
                self._session = ort.InferenceSession(str(self.path), opts,
                                                     providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
                raise VocoderCheckpointError(f"cannot open ONNX generator {self.path}: {exc}") from exc
            self._session_threads = threads
        return self._session

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.dim() != 3 or mel.shape[1] != self.config.num_mels:
            raise VocoderInputError(
                f"expected log-mel [B, {self.config.num_mels}, T], got {tuple(mel.shape)}")
        x = mel.detach().to("cpu", torch.float32).contiguous().numpy()
        (wav,) = self._get_session().run(["wav"], {"mel": x})
        return torch.from_numpy(wav).to(mel.device)

    def __getstate__(self) -> dict:  # sessions do not pickle; reopen after a copy
        state = self.__dict__.copy()
        state["_session"], state["_session_threads"] = None, None
        return state


def load_onnx_generator(folder: Path | str, threads: int = 0) -> OnnxHiFiGAN:
    """Open an ONNX generator folder written by `convert_generator_onnx`."""
    folder = Path(folder)
    for name in (GENERATOR_CONFIG, ONNX_GENERATOR):
        if not (folder / name).is_file():
            raise VocoderCheckpointError(f"ONNX HiFi-GAN folder {folder} lacks {name}")
    config = HiFiGANConfig.from_json(folder / GENERATOR_CONFIG)  # clear errors for bad JSON
    meta = json.loads((folder / GENERATOR_CONFIG).read_text(encoding="utf-8")).get("echox")
    model = OnnxHiFiGAN(folder / ONNX_GENERATOR, config, threads=threads,
                        meta=meta if isinstance(meta, dict) else {})
    model._get_session()  # fail here, not at the first chunk
    return model


# ----------------------------------------------------------------------------- vocoder folders

CALIBRATION_FILE = "calibration.safetensors"
CACHE_FORMAT = 1  # bump when the conversion changes, so that old cache entries are not reused


@dataclass
class OnnxSpec:
    """How a unit->mel vocoder folder wants its (packaged) HiFi-GAN run: on ONNX Runtime, with
    int8 convolutions in `int8_stages`, calibrated on `calibration` (log-mels [M, T]).

    Stored in the folder's config.json under vocoder.onnx, the mels beside it in
    `calibration.safetensors`; the converted graph itself is built once into the EchoX cache
    (`cached_onnx_generator`) rather than shipped, as V1 in ONNX is ~50 MB."""

    int8_stages: tuple[int, ...] = ()
    calibration: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        try:
            self.int8_stages = tuple(sorted({int(s) for s in self.int8_stages}))
        except (TypeError, ValueError) as exc:
            raise VocoderCheckpointError(f"int8_stages must be ints, got {self.int8_stages!r}") from exc
        if self.int8_stages and not self.calibration:
            raise VocoderCheckpointError("int8 stages need calibration mels")

    def to_meta(self) -> dict:
        return {"int8_stages": list(self.int8_stages),
                "calibration": CALIBRATION_FILE if self.calibration else None}

    def save_calibration(self, folder: Path) -> None:
        if self.calibration:
            save_tensors({f"mel.{i}": torch.from_numpy(np.asarray(m, np.float32)).half().contiguous()
                          for i, m in enumerate(self.calibration)}, folder / CALIBRATION_FILE)

    @classmethod
    def from_meta(cls, meta: dict, folder: Path) -> OnnxSpec:
        if not isinstance(meta, dict):
            raise VocoderCheckpointError(f"{folder}: vocoder.onnx must be a JSON object")
        mels: list[np.ndarray] = []
        if meta.get("calibration"):
            path = folder / str(meta["calibration"])
            if not path.is_file():
                raise VocoderCheckpointError(f"{folder}: calibration mels {path.name} are missing")
            try:
                state = load_file(str(path))
            except Exception as exc:
                raise VocoderCheckpointError(f"cannot read {path}: {exc}") from exc
            try:
                order = sorted(state, key=lambda k: int(k.removeprefix("mel.")))
            except ValueError as exc:
                raise VocoderCheckpointError(f"{path}: expected tensors mel.0, mel.1, ...") from exc
            mels = [state[k].float().numpy() for k in order]
        return cls(tuple(meta.get("int8_stages") or ()), mels)

    def digest(self) -> str:
        h = hashlib.sha256(json.dumps([CACHE_FORMAT, list(self.int8_stages)]).encode())
        for m in self.calibration:
            h.update(np.asarray(m, np.float16).tobytes())
        return h.hexdigest()


def cached_onnx_generator(generator: HiFiGANGenerator, spec: OnnxSpec,
                          threads: int = 0) -> OnnxHiFiGAN:
    """`generator` converted by `spec`, from the EchoX cache (`$ECHOX_CACHE/hifigan-onnx/`);
    converted there the first time (about a minute for V1 with int8 stages)."""
    import onnxruntime

    h = hashlib.sha256(spec.digest().encode() + onnxruntime.__version__.encode())
    h.update(json.dumps(generator.config.to_dict(), sort_keys=True).encode())
    for k, v in sorted(generator.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().float().numpy().tobytes())
    folder = cache_dir() / "hifigan-onnx" / h.hexdigest()[:20]
    if (folder / ONNX_GENERATOR).is_file() and (folder / GENERATOR_CONFIG).is_file():
        try:
            return load_onnx_generator(folder, threads=threads)
        except (VocoderCheckpointError, ValueError, OSError) as exc:
            # a cache copy damaged since (a cut disk, a stray edit) failed every later run
            # (the conversion's atomic write replaces the folder)
            log.warning("the cached ONNX HiFi-GAN in %s cannot be opened (%s): converting it "
                        "again", folder, str(exc).splitlines()[0][:120])
    log.warning("converting the HiFi-GAN to ONNX (int8 stages %s) into %s (once)",
                list(spec.int8_stages), folder)
    try:
        convert_generator_onnx(generator, folder, spec.int8_stages, spec.calibration)
    except ConversionError as exc:  # a vocoder folder that cannot be served: a checkpoint error
        raise VocoderCheckpointError(f"cannot convert the HiFi-GAN for ONNX Runtime: {exc}") from exc
    return load_onnx_generator(folder, threads=threads)
