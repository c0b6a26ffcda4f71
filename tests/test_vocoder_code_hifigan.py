"""fairseq's unit HiFi-GAN (`echox.vocoder.code_hifigan`): fairseq-layout loading, lengths,
bad input and streaming."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_vocoder_hifigan import load_reference_hifigan

from echox.errors import (
    VocoderCheckpointError,
    VocoderConfigError,
    VocoderFileNotFoundError,
    VocoderInputError,
)
from echox.vocoder.base import Vocoder
from echox.vocoder.code_hifigan import CodeHiFiGAN, CodeHiFiGANConfig

NOT_WEIGHT_NORMED = ("dict.", "dur_predictor.", "spkr.")


def tiny_model(seed: int = 0) -> CodeHiFiGAN:
    torch.manual_seed(seed)
    return CodeHiFiGAN(CodeHiFiGANConfig.tiny()).eval()


def to_fairseq_layout(model: CodeHiFiGAN, seed: int = 1) -> dict[str, torch.Tensor]:
    """The model's weights as fairseq saves them: weight-norm convs as weight_g / weight_v.

    v is the weight times a random positive scale per output row, so that loading must
    really compute g * v / ||v|| (dim 0, torch's weight_norm default) to get the weight back.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.endswith(".weight") and not key.startswith(NOT_WEIGHT_NORMED):
            base = key[: -len(".weight")]
            scale = torch.rand((value.shape[0],) + (1,) * (value.dim() - 1), generator=gen) + 0.5
            v = value * scale
            out[base + ".weight_g"] = value.reshape(value.shape[0], -1).norm(dim=1).reshape(scale.shape)
            out[base + ".weight_v"] = v
        else:
            out[key] = value.clone()
    return out


def write_fairseq_files(tmp_path: Path, model: CodeHiFiGAN) -> tuple[Path, Path]:
    ckpt = tmp_path / "g_00000001"
    torch.save({"generator": to_fairseq_layout(model)}, ckpt)
    cfg = tmp_path / "vocoder_config.json"
    raw = model.config.to_dict()
    raw.update({"segment_size": 8960, "num_mels": 80, "dur_prediction_weight": 1.0, "fmax_for_loss": None})
    cfg.write_text(json.dumps(raw))
    return ckpt, cfg


def units(n: int, seed: int = 0, high: int = 50) -> list[int]:
    return torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ----------------------------------------------------------------------------- config


def test_config_defaults_are_the_released_vocoder() -> None:
    cfg = CodeHiFiGANConfig()
    assert cfg.hop_size == 320 and cfg.sampling_rate == 16000 and cfg.num_embeddings == 1000
    assert cfg.dur_predictor_params is not None and cfg.dur_predictor_params.var_pred_kernel_size == 3


def test_config_from_real_flat_json(tmp_path: Path) -> None:
    raw = {  # the layout of the authors' vocoder_config.json, training keys included
        "resblock": "1", "num_gpus": 1, "batch_size": 16, "learning_rate": 0.0002,
        "upsample_rates": [5, 4, 4, 2, 2], "upsample_kernel_sizes": [11, 8, 8, 4, 4],
        "upsample_initial_channel": 512, "resblock_kernel_sizes": [3, 7, 11],
        "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        "num_embeddings": 1000, "embedding_dim": 128, "model_in_dim": 128,
        "segment_size": 8960, "code_hop_size": 320, "f0": False, "num_mels": 80,
        "dur_prediction_weight": 1.0,
        "dur_predictor_params": {"encoder_embed_dim": 128, "var_pred_hidden_dim": 128,
                                 "var_pred_kernel_size": 3, "var_pred_dropout": 0.5},
        "sampling_rate": 16000, "fmin": 0, "fmax": 8000, "fmax_for_loss": None,
        "dist_config": {"dist_backend": "nccl", "dist_url": "env://"},
    }
    path = tmp_path / "vocoder_config.json"
    path.write_text(json.dumps(raw))
    assert CodeHiFiGANConfig.from_json(path) == CodeHiFiGANConfig()
    path.write_text(json.dumps({"generator": raw}))  # one level of nesting is accepted too
    assert CodeHiFiGANConfig.from_json(path) == CodeHiFiGANConfig()


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"f0": True}, "f0"),
        ({"code_hop_size": 256}, "code_hop_size"),
        ({"resblock": "2"}, "resblock"),
        ({"model_in_dim": 80}, "model_in_dim"),
        ({"upsample_kernel_sizes": [5, 5]}, "k-u even"),
    ],
)
def test_config_rejects_unsupported(tmp_path: Path, patch: dict, message: str) -> None:
    raw = CodeHiFiGANConfig.tiny().to_dict() | patch
    path = tmp_path / "vocoder_config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(VocoderConfigError, match=message) as info:
        CodeHiFiGANConfig.from_json(path)
    assert str(path) in str(info.value)


def test_config_missing_and_broken_file(tmp_path: Path) -> None:
    with pytest.raises(VocoderFileNotFoundError, match="nope.json"):
        CodeHiFiGANConfig.from_json(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(VocoderConfigError, match="bad.json"):
        CodeHiFiGANConfig.from_json(bad)


# ----------------------------------------------------------------------------- loading


def test_fairseq_checkpoint_round_trip(tmp_path: Path) -> None:
    ref = tiny_model()
    ckpt, cfg = write_fairseq_files(tmp_path, ref)
    loaded = CodeHiFiGAN.from_fairseq(ckpt, cfg)
    assert not loaded.training
    u = torch.tensor(units(20))
    for dur in (True, False):
        torch.testing.assert_close(loaded(u, dur_prediction=dur), ref(u, dur_prediction=dur), atol=1e-5, rtol=1e-4)
    # plain strict load_state_dict of the fairseq layout works too (weight norm folded by a hook)
    fresh = CodeHiFiGAN(CodeHiFiGANConfig.tiny()).eval()
    fresh.load_state_dict(torch.load(ckpt, weights_only=True)["generator"], strict=True)
    torch.testing.assert_close(fresh(u), ref(u), atol=1e-5, rtol=1e-4)


def test_checkpoint_errors(tmp_path: Path) -> None:
    ref = tiny_model()
    ckpt, cfg = write_fairseq_files(tmp_path, ref)
    with pytest.raises(VocoderFileNotFoundError, match="g_missing"):
        CodeHiFiGAN.from_fairseq(tmp_path / "g_missing", cfg)
    with pytest.raises(VocoderFileNotFoundError, match="missing_config.json"):
        CodeHiFiGAN.from_fairseq(ckpt, tmp_path / "missing_config.json")

    no_gen = tmp_path / "g_nogen"
    torch.save({"discriminator": {}}, no_gen)
    with pytest.raises(VocoderCheckpointError, match="'generator'"):
        CodeHiFiGAN.from_fairseq(no_gen, cfg)

    sd = to_fairseq_layout(ref)
    sd["dict.weight"] = torch.zeros(60, 16)
    wrong = tmp_path / "g_wrong"
    torch.save({"generator": sd}, wrong)
    with pytest.raises(VocoderCheckpointError, match=r"dict\.weight.*\(60, 16\)"):
        CodeHiFiGAN.from_fairseq(wrong, cfg)

    del sd["conv_post.bias"]
    torch.save({"generator": sd}, wrong)
    with pytest.raises(VocoderCheckpointError, match=r"conv_post\.bias"):
        CodeHiFiGAN.from_fairseq(wrong, cfg)

    garbage = tmp_path / "g_garbage"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(VocoderCheckpointError, match="g_garbage"):
        CodeHiFiGAN.from_fairseq(garbage, cfg)


def test_released_config_layout_and_hop() -> None:
    """The SPEC's real config on random weights: fairseq key names/shapes and 320 samples/unit."""
    torch.manual_seed(0)
    model = CodeHiFiGAN(CodeHiFiGANConfig()).eval()
    sd = to_fairseq_layout(model)
    assert sd["dict.weight"].shape == (1000, 128)
    assert sd["conv_pre.weight_v"].shape == (512, 128, 7)
    assert sd["ups.0.weight_v"].shape == (512, 256, 11) and sd["ups.0.weight_g"].shape == (512, 1, 1)
    assert sd["ups.4.weight_v"].shape == (32, 16, 4)
    assert sd["resblocks.14.convs2.2.weight_v"].shape == (16, 16, 11)
    assert sd["conv_post.weight_v"].shape == (1, 16, 7)
    assert {k for k in sd if k.startswith("dur_predictor.")} == {
        f"dur_predictor.{m}.{p}" for m in ("conv1.0", "ln1", "conv2.0", "ln2", "proj") for p in ("weight", "bias")
    }
    assert not any(k.startswith("resblocks.15.") for k in sd)
    model.load_state_dict(sd, strict=True)
    with torch.inference_mode():
        assert model(torch.tensor([5, 17, 999, 3]), dur_prediction=False).shape == (1, 4 * 320)
        out = model.generate([5, 17, 999, 3], dur_prediction=True)
    assert out.audio.shape[-1] == int(out.durations.sum()) * 320


def test_generator_parity_with_reference_hifigan() -> None:
    """Our generator equals the original HiFi-GAN code (weight-normed, as trained) when loaded
    from its weight_g/weight_v state dict; fairseq's CodeGenerator is that generator + units."""
    ref_mod = load_reference_hifigan()
    cfg = CodeHiFiGANConfig(
        upsample_rates=[5, 2], upsample_kernel_sizes=[11, 4], upsample_initial_channel=32,
        resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
        num_embeddings=20, embedding_dim=80, model_in_dim=80, dur_predictor_params=None,
    )
    h = SimpleNamespace(**{k: getattr(cfg, k) for k in (
        "resblock", "upsample_rates", "upsample_kernel_sizes", "upsample_initial_channel",
        "resblock_kernel_sizes", "resblock_dilation_sizes")})
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's deprecated weight_norm
        ref = ref_mod.Generator(h).eval()
    ours = CodeHiFiGAN(cfg).eval()
    sd = dict(ref.state_dict())
    assert any(k.endswith(".weight_g") for k in sd)
    sd["dict.weight"] = torch.randn(20, 80)
    ours.load_state_dict(sd, strict=True)
    codes = torch.tensor([units(9, high=20)])
    with torch.no_grad():
        expect = ref(ours.dict(codes).transpose(1, 2))  # [1, 1, S]
        torch.testing.assert_close(ours(codes, dur_prediction=False), expect[:, 0], atol=1e-5, rtol=1e-4)


def test_fold_matches_torch_parametrized_weight_norm() -> None:
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.ConvTranspose1d(16, 8, 4, 2, padding=1))
    with torch.no_grad():
        conv.parametrizations.weight.original0.mul_(torch.rand_like(conv.parametrizations.weight.original0))
    model = tiny_model()
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("ups.1.")}
    for name, value in conv.state_dict().items():
        sd[f"ups.1.{name}"] = value
    model.load_state_dict(sd, strict=True)
    torch.testing.assert_close(model.ups[1].weight, conv.weight.detach())


# ----------------------------------------------------------------------------- forward


def test_output_lengths() -> None:
    model = tiny_model()
    hop = model.hop_size
    assert hop == 4
    u = units(13)
    assert model(torch.tensor(u), dur_prediction=False).shape == (1, 13 * hop)
    with torch.no_grad():
        model.dur_predictor.proj.bias.fill_(float(np.log(3 + 1)))  # log(count+1) -> 3 frames each
        model.dur_predictor.proj.weight.zero_()
    with torch.no_grad():
        out = model.generate(u, dur_prediction=True)
    assert out.durations.tolist() == [[3] * 13]
    assert out.audio.shape == (1, 13 * 3 * hop)
    assert float(out.audio.abs().max()) <= 1.0


def test_durations_follow_prediction_and_clamp() -> None:
    model = tiny_model()
    x = model.dict(torch.tensor([units(9)]))
    log_d = model.dur_predictor(x)
    expect = torch.clamp(torch.round(torch.exp(log_d) - 1).long(), min=1)
    out = model.generate(units(9))
    assert torch.equal(out.durations, expect) and int(out.durations.min()) >= 1
    assert out.audio.shape[-1] == int(expect.sum()) * model.hop_size
    # durations expand the embedding exactly like repeat_interleave before the generator
    feats = torch.repeat_interleave(x[0], expect[0], dim=0).T[None]
    torch.testing.assert_close(out.audio, model.decode(feats))


def test_batch_without_durations() -> None:
    model = tiny_model()
    batch = torch.tensor([units(10, 1), units(10, 2)])
    out = model(batch, dur_prediction=False)
    assert out.shape == (2, 40)
    torch.testing.assert_close(out[1], model(batch[1], dur_prediction=False)[0], atol=1e-6, rtol=1e-5)


def test_multispeaker_embedding() -> None:
    cfg = CodeHiFiGANConfig.tiny()
    cfg = CodeHiFiGANConfig(**{**cfg.__dict__, "multispkr": True, "num_speakers": 4, "model_in_dim": 32})
    torch.manual_seed(0)
    model = CodeHiFiGAN(cfg).eval()
    assert model.state_dict()["spkr.weight"].shape == (4, 16)
    u = units(6)
    a, b = model(u, dur_prediction=False, speaker=1), model(u, dur_prediction=False, speaker=2)
    assert a.shape == (1, 24) and not torch.allclose(a, b)
    with pytest.raises(VocoderInputError, match="speaker"):
        model(u)


def test_invalid_ids_dropped() -> None:
    model = tiny_model()
    clean = [3, 7, 9, 11]
    with pytest.warns(UserWarning, match=r"dropped 2 unit ids >= num_embeddings \(50\)"):
        out = model([3, -1, 7, 50, 9, 1234, 11, -5], dur_prediction=False)
    torch.testing.assert_close(out, model(clean, dur_prediction=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # negative ids (padding) are dropped silently
        model([3, -1, 7], dur_prediction=False)


def test_bad_input() -> None:
    model = tiny_model()
    with pytest.raises(VocoderInputError, match="no valid unit ids"):
        model.synthesize([])
    with pytest.raises(VocoderInputError, match="no valid unit ids"):
        model(torch.tensor([-1, -1]))
    with pytest.raises(VocoderInputError, match="integer ids"):
        model(torch.rand(5))
    with pytest.raises(VocoderInputError, match="integer ids"):
        model(torch.zeros(1, 2, 3, dtype=torch.long))


@pytest.mark.parametrize("units", [[[1, 2], [3, 4]], "123", None, [1.5, 2.5]])
def test_synthesize_takes_one_sequence_of_integer_ids(units: object) -> None:
    """A batch [B, T] used to come back as row 0's audio alone (the rest dropped silently)."""
    with pytest.raises(VocoderInputError, match=r"units must be integer ids \[T\]"):
        tiny_model().synthesize(units, dur_prediction=False)  # type: ignore[arg-type]


def test_receptive_field_bound_holds() -> None:
    """Changing one unit changes audio only within `receptive_field_frames` units of it."""
    model = tiny_model()
    rf, hop = model.receptive_field_frames(), model.hop_size
    base = units(60)
    changed = list(base)
    p = 30
    changed[p] = (changed[p] + 1) % 50
    a = model.synthesize(base, dur_prediction=False)
    b = model.synthesize(changed, dur_prediction=False)
    diff = np.abs(a - b) > 1e-6
    lo, hi = (p - rf) * hop, (p + 1 + rf) * hop
    assert diff[lo:hi].any()
    assert not diff[:lo].any() and not diff[hi:].any()


# ----------------------------------------------------------------------------- interface / streaming


def test_codehifigan_is_a_vocoder() -> None:
    model = tiny_model()
    assert isinstance(model, Vocoder) and model.sample_rate == 16000
    audio = model.synthesize(units(8))
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert model.training is False


def test_synthesize_keeps_train_mode() -> None:
    model = tiny_model().train()
    a = model.synthesize(units(12))  # eval inside: dropout off, deterministic
    assert model.training
    np.testing.assert_array_equal(a, model.synthesize(units(12)))


@pytest.mark.parametrize("chunk_sizes", [[30, 40, 30], [5, 30, 3, 22]])
def test_stream_equals_full_away_from_joins(chunk_sizes: list[int]) -> None:
    """Without duration prediction, chunked synthesis with left context equals the full
    synthesis except in the last receptive field before each join (no right context there)."""
    model = tiny_model()
    rf, hop = model.receptive_field_frames(), model.hop_size
    all_units = units(sum(chunk_sizes), seed=3)
    chunks = np.split(np.array(all_units), np.cumsum(chunk_sizes)[:-1])
    full = model.synthesize(all_units, dur_prediction=False)
    pieces = list(model.synthesize_stream([c.tolist() for c in chunks], crossfade_ms=0.5, dur_prediction=False))
    stream = np.concatenate(pieces)
    assert stream.dtype == np.float32 and stream.shape == full.shape
    ok = np.ones(len(full), dtype=bool)
    for join in np.cumsum(chunk_sizes)[:-1]:
        ok[max(0, (join - rf - 1) * hop) : join * hop] = False
    assert ok.mean() > 0.3
    np.testing.assert_allclose(stream[ok], full[ok], atol=1e-5)
    assert np.abs(stream - full).max() < 1.0  # sanity


def test_stream_with_durations_and_no_context() -> None:
    model = tiny_model()
    chunks = [units(10, 1), [], units(7, 2), [60, 70], units(9, 3)]
    fade = int(round(0.5 * model.sample_rate / 1000))
    with pytest.warns(UserWarning):  # the chunk of out-of-range ids is skipped, not fatal
        with_ctx = np.concatenate(list(model.synthesize_stream(chunks, crossfade_ms=0.5)))
    lengths = [len(model.synthesize(c)) for c in chunks if c and max(c) < 50]
    with pytest.warns(UserWarning):
        no_ctx = np.concatenate(list(model.synthesize_stream(chunks, crossfade_ms=0.5, context_units=0)))
    assert len(no_ctx) == sum(lengths) - 2 * fade  # 2 overlapping joins
    assert len(with_ctx) > 0 and np.all(np.isfinite(with_ctx)) and np.abs(with_ctx).max() <= 1.0
    assert len(with_ctx) % model.hop_size == 0  # length preserved: whole frames only
