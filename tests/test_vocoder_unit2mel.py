"""The unit -> mel model (`echox.vocoder.unit2mel`): alignment, forward, loss, checkpoints."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from echox.errors import (
    ConfigError,
    VocoderCheckpointError,
    VocoderConfigError,
    VocoderFileNotFoundError,
    VocoderInputError,
)
from echox.vocoder.hifigan import HiFiGANConfig, HiFiGANGenerator, MelSpec
from echox.vocoder.train import Unit2MelExample, collate_unit2mel, prepare_unit2mel_example
from echox.vocoder.unit2mel import (
    Unit2Mel,
    Unit2MelConfig,
    align_durations,
    grow_unit2mel,
    length_regulate,
    sinusoidal_positions,
    unit2mel_loss,
)

HOP = 16  # tiny HiFi-GAN: 22,050 Hz, hop 16


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are overhead-bound: on a busy 2-core box, 2 threads made a step 30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_generator(n_mels: int = 16, seed: int = 0) -> HiFiGANGenerator:
    spec = MelSpec(n_mels=n_mels, sampling_rate=22050, hop_length=HOP, n_fft=64, win_length=64)
    cfg = HiFiGANConfig(num_mels=n_mels, upsample_rates=(4, 4), upsample_kernel_sizes=(8, 8),
                        upsample_initial_channel=16, resblock_kernel_sizes=(3,),
                        resblock_dilation_sizes=((1, 2),), mel=spec)
    torch.manual_seed(seed)
    return HiFiGANGenerator(cfg).eval()


def tiny_model(seed: int = 0, **overrides) -> Unit2Mel:
    torch.manual_seed(seed)
    return Unit2Mel(Unit2MelConfig.tiny(hop_length=HOP, **overrides)).eval()


# ----------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("seed", range(5))
def test_align_durations_sums_exactly_and_is_proportional(seed: int) -> None:
    rng = np.random.default_rng(seed)
    runs = rng.integers(1, 6, size=rng.integers(1, 60)).tolist()
    mel_rate = 22050 / 256
    expected = sum(runs) * mel_rate / 50.0
    for n_mel in (math.floor(expected), math.ceil(expected) + 1):
        durs = align_durations(runs, n_mel, 50.0, mel_rate)
        assert len(durs) == len(runs) and sum(durs) == n_mel and min(durs) >= 0
        # cumulative rounding: every boundary is within one frame of the exact time
        exact = np.cumsum(runs) * n_mel / sum(runs)
        assert np.all(np.abs(np.cumsum(durs) - exact) <= 0.5 + 1e-9)


def test_align_durations_rejects_mismatched_audio() -> None:
    with pytest.raises(VocoderInputError, match="do not match"):
        align_durations([1500], 86, 50.0, 22050 / 256)  # a padded 30 s window vs 1 s of audio
    with pytest.raises(VocoderInputError, match=">= 1"):
        align_durations([2, 0], 5, 50.0, 86.0)
    with pytest.raises(VocoderInputError):
        align_durations([], 5, 50.0, 86.0)


def test_length_regulator_repeats_units_by_durations() -> None:
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)  # [B, T, D]
    d = torch.tensor([[2, 0, 1, 3], [1, 1, 0, 0]])
    y, mask = length_regulate(x, d)
    assert y.shape == (2, 6, 3) and mask.sum(1).tolist() == [6, 2]
    assert torch.equal(y[0], x[0, [0, 0, 2, 3, 3, 3]])
    assert torch.equal(y[1, :2], x[1, [0, 1]]) and torch.all(y[1, 2:] == 0)
    y, mask = length_regulate(x, d, max_frames=4)
    assert y.shape == (2, 4, 3)


# ----------------------------------------------------------------------------- model


def test_forward_shapes_masks_and_predicted_durations() -> None:
    m = tiny_model(postnet_layers=2)
    units = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, -1, -1]])
    mask = units >= 0
    d = torch.tensor([[1, 2, 3, 1, 1], [2, 2, 2, 9, 9]])
    out = m(units, mask, d)
    assert out.mel.shape == (2, 8, 16) and out.mel_before_postnet is not None
    assert out.mel_mask.sum(1).tolist() == [8, 6]  # pads' durations are ignored
    assert torch.all(out.mel[1, 6:] == 0) and torch.all(out.log_dur_pred[1, 3:] == 0)
    pred = m(units, mask)  # inference: predicted durations, >= 1 frame per real unit
    assert torch.all(pred.durations[mask] >= 1) and torch.all(pred.durations[~mask] == 0)
    assert pred.mel.shape[1] == int(pred.durations.sum(1).max())


def test_bad_inputs_raise_clear_errors() -> None:
    m = tiny_model()
    with pytest.raises(VocoderInputError, match="unit ids must be in"):
        m(torch.tensor([[1, 99]]))
    with pytest.raises(VocoderInputError, match="integer ids"):
        m(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(VocoderInputError, match="summing to 0"):
        m(torch.tensor([[1, 2]]), durations=torch.tensor([[0, 0]]))
    with pytest.raises(VocoderConfigError, match="divisible"):
        Unit2MelConfig.tiny(d_model=30, n_heads=4)


def _synthetic_pairs(cfg: Unit2MelConfig, n: int, seed: int = 0):
    """Mels that are a fixed pattern per unit: learnable from the units alone."""
    rng = np.random.default_rng(seed)
    table = rng.normal(-5.0, 2.0, size=(cfg.num_units, cfg.n_mels)).astype(np.float32)
    pairs = []
    for _ in range(n):
        units = rng.integers(0, cfg.num_units, size=rng.integers(6, 12))
        units = [int(u) for i, u in enumerate(units) if i == 0 or u != units[i - 1]]
        runs = rng.integers(1, 4, size=len(units)).tolist()
        n_mel = round(sum(runs) * cfg.frames_per_unit_frame)
        durs = align_durations(runs, n_mel, cfg.unit_rate, cfg.mel_rate)
        mel = np.repeat(table[units], durs, axis=0)  # [F, M]
        mel += rng.normal(0, 0.1, size=mel.shape).astype(np.float32)
        pairs.append((units, runs, mel.T.copy()))  # HiFi-GAN layout [M, F]
    return pairs


def test_loss_is_masked() -> None:
    m = tiny_model()
    batch = collate_unit2mel([prepare_unit2mel_example(u, r, a, m.config) for u, r, a in
                              _synthetic_pairs(Unit2MelConfig.tiny(hop_length=HOP), 2)])
    out = m(batch.units, batch.unit_mask, batch.durations)
    loss = unit2mel_loss(out, batch.mel, batch.mel_mask, batch.log_dur)
    garbage = batch.mel.clone()
    garbage[~batch.mel_mask] = 1e6  # padded frames must not count
    loss2 = unit2mel_loss(out, garbage, batch.mel_mask, batch.log_dur)
    assert torch.isfinite(loss.total) and torch.allclose(loss.total, loss2.total)


def test_crop_offsets_give_the_positions_of_the_full_utterance() -> None:
    pe = sinusoidal_positions(40, 16)
    shifted = sinusoidal_positions(10, 16, offset=torch.tensor([0, 25]))
    assert shifted.shape == (2, 10, 16)
    assert torch.allclose(shifted[0], pe[:10], atol=1e-5)
    assert torch.allclose(shifted[1], pe[25:35], atol=1e-5)
    # the model uses them: a crop's output depends on its offsets
    m = tiny_model().eval()
    units, durs = torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 2]])
    plain = m(units, durations=durs).mel
    assert torch.equal(plain, m(units, durations=durs, unit_offset=torch.tensor([0]),
                                frame_offset=torch.tensor([0])).mel)
    assert not torch.allclose(plain, m(units, durations=durs, unit_offset=torch.tensor([5]),
                                       frame_offset=torch.tensor([9])).mel)
    batch = collate_unit2mel([Unit2MelExample([1, 2], [2, 3], torch.zeros(5, 4), 7, 30),
                              Unit2MelExample([3], [4], torch.zeros(4, 4))])
    assert batch.unit_offset.tolist() == [7, 0] and batch.frame_offset.tolist() == [30, 0]


def test_infer_with_given_durations_matches_forward() -> None:
    model = tiny_model(3)
    units, durs = [1, 5, 7, 2], [3, 1, 4, 2]
    out = model.infer(units, durations=durs)
    assert out.durations[0].tolist() == durs and out.mel.shape[1] == sum(durs)
    with torch.no_grad():
        ref = model(torch.tensor([units]), durations=torch.tensor([durs]))
    torch.testing.assert_close(out.mel, ref.mel)


# ----------------------------------------------------------------------------- checkpoints


def test_config_json_roundtrip(tmp_path) -> None:
    cfg = Unit2MelConfig(num_units=1000, unit_rate=25.0, postnet_layers=3)
    cfg.save_json(tmp_path / "c.json")
    assert Unit2MelConfig.from_json(tmp_path / "c.json") == cfg
    assert cfg.frames_per_unit_frame == pytest.approx(22050 / 256 / 25.0)
    (tmp_path / "bad.json").write_text(json.dumps({"num_units": 5, "bogus": 1}))
    with pytest.raises(VocoderConfigError, match="bogus"):
        Unit2MelConfig.from_json(tmp_path / "bad.json")


def test_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(VocoderFileNotFoundError, match="folder not found"):
        Unit2Mel.from_pretrained(tmp_path / "nope")
    tiny_model().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(VocoderFileNotFoundError, match="model.safetensors"):
        Unit2Mel.from_pretrained(tmp_path / "m")
    tiny_model().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(VocoderCheckpointError, match="not valid JSON"):
        Unit2Mel.from_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match="holds other files"):  # not a unit->mel save now
        tiny_model().save_pretrained(tmp_path / "m")
    tiny_model().save_pretrained(tmp_path / "m2")
    meta = json.loads((tmp_path / "m2" / "config.json").read_text())
    meta["unit2mel"]["d_model"] = 64
    (tmp_path / "m2" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(VocoderCheckpointError, match="does not fit"):
        Unit2Mel.from_pretrained(tmp_path / "m2")
    tiny_model().save_pretrained(tmp_path / "m2")  # an earlier unit->mel save is replaced
    Unit2Mel.from_pretrained(tmp_path / "m2")


def test_grown_model_starts_with_the_same_mels_then_trains(tmp_path) -> None:
    model = tiny_model(4)
    grown = grow_unit2mel(model, extra_decoder_layers=2, postnet_layers=3)
    assert grown.config.decoder_layers == model.config.n_layers + 2
    assert len(grown.decoder) == len(model.decoder) + 2 and grown.postnet is not None
    assert len(grown.encoder) == len(model.encoder)
    units, durs = [1, 5, 7, 2, 9], [3, 1, 4, 2, 2]
    torch.testing.assert_close(grown.infer(units, durations=durs).mel,
                               model.infer(units, durations=durs).mel)
    torch.testing.assert_close(grown.infer(units).durations, model.infer(units).durations)
    # the new parts learn: one optimiser step moves the identity-started block and the postnet
    grown.train()
    opt = torch.optim.SGD(grown.parameters(), lr=0.1)
    out = grown(torch.tensor([units]), durations=torch.tensor([durs]))
    out.mel.pow(2).mean().backward()
    opt.step()
    assert grown.decoder[-1].conv2.weight.abs().sum() > 0
    assert grown.postnet.convs[-1].weight.abs().sum() > 0
    # the grown config round-trips and an ungrown one keeps n_dec_layers unset
    grown.save_pretrained(tmp_path / "g")
    again = Unit2Mel.from_pretrained(tmp_path / "g")
    assert again.config == grown.config and again.config.n_dec_layers == model.config.n_layers + 2
    assert grow_unit2mel(model, postnet_layers=2).config.n_dec_layers is None


def test_grow_rejects_bad_requests() -> None:
    model = tiny_model(5)
    with pytest.raises(VocoderConfigError, match="extra_decoder_layers"):
        grow_unit2mel(model, extra_decoder_layers=-1)
    with pytest.raises(VocoderConfigError, match="postnet_layers"):
        grow_unit2mel(model, postnet_layers=1)
    with pytest.raises(VocoderConfigError, match="already has"):
        grow_unit2mel(grow_unit2mel(model, postnet_layers=2), postnet_layers=2)
    with pytest.raises(VocoderConfigError, match="n_dec_layers"):
        Unit2MelConfig.tiny(n_dec_layers=-2)


def test_save_never_deletes_what_is_not_an_earlier_save(tmp_path) -> None:
    """A save replaces its folder whole: a file there, or a folder of other files, is refused
    (they were deleted); an empty folder or an earlier save is replaced."""
    from echox.errors import ConfigError

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        tiny_model().save_pretrained(tmp_path / "notes.txt")
    with pytest.raises(ConfigError, match=r"holds other files \(notes.txt\)"):
        tiny_model().save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    tiny_model(seed=1).save_pretrained(tmp_path / "empty")
    second = tiny_model(seed=2)
    second.save_pretrained(tmp_path / "empty")  # an earlier save: replaced
    reloaded = Unit2Mel.from_pretrained(tmp_path / "empty").state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in second.state_dict().items())
