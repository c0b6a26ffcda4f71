"""Unit -> mel model, its training loop, and the UnitMelVocoder (units -> mel -> HiFi-GAN)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from echox.convert.hifigan import HiFiGANConfig, HiFiGANGenerator, MelSpec
from echox.model.unit2mel import (
    DurationAlignmentError,
    Unit2Mel,
    Unit2MelConfig,
    UnitMelVocoder,
    align_durations,
    hifigan_reach_frames,
    length_regulate,
    sinusoidal_positions,
    unit2mel_loss,
)
from echox.model.vocoder import (
    VocoderCheckpointError,
    VocoderConfigError,
    VocoderFileNotFoundError,
    VocoderInputError,
)
from echox.train.vocoder import (
    Unit2MelExample,
    collate_unit2mel,
    crop_example,
    prepare_unit2mel_example,
    train_unit2mel,
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
    with pytest.raises(DurationAlignmentError, match="do not match"):
        align_durations([1500], 86, 50.0, 22050 / 256)  # a padded 30 s window vs 1 s of audio
    with pytest.raises(DurationAlignmentError, match=">= 1"):
        align_durations([2, 0], 5, 50.0, 86.0)
    with pytest.raises(DurationAlignmentError):
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


def test_overfits_a_tiny_batch() -> None:
    cfg = Unit2MelConfig.tiny(hop_length=256)
    pairs = _synthetic_pairs(cfg, 4)
    mels = np.concatenate([p[2].T for p in pairs])
    const_l1 = float(np.abs(mels - mels.mean(0)).mean())  # best constant predictor (~median)
    res = train_unit2mel(pairs, cfg, steps=60, lr=3e-3, batch_size=4, log_every=10,
                         progress=False, warmup=5)
    first, last = res["history"][0], res["history"][-1]
    assert last["loss"] <= 0.5 * first["loss"]
    assert last["mel"] <= 0.5 * const_l1
    # the duration predictor learns too
    assert last["duration"] < first["duration"]


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


def test_prepare_example_from_waveform() -> None:
    cfg = Unit2MelConfig.tiny(n_mels=80)  # HiFi-GAN V1 mel: 22,050 Hz, hop 256
    wav = np.random.default_rng(0).normal(0, 0.1, 22050).astype(np.float32)  # 1 s
    ex = prepare_unit2mel_example([3, 4, 5], [20, 10, 20], wav, cfg)  # 50 unit frames = 1 s
    assert ex.mel.shape == (86, 80) and sum(ex.durations) == 86
    with pytest.raises(VocoderInputError, match="mel with 80 bins"):
        prepare_unit2mel_example([3], [50], np.zeros((7, 9)), cfg)


# ----------------------------------------------------------------------------- checkpoints


def test_config_json_roundtrip(tmp_path) -> None:
    cfg = Unit2MelConfig(num_units=1000, unit_rate=25.0, postnet_layers=3)
    cfg.save_json(tmp_path / "c.json")
    assert Unit2MelConfig.from_json(tmp_path / "c.json") == cfg
    assert cfg.frames_per_unit_frame == pytest.approx(22050 / 256 / 25.0)
    (tmp_path / "bad.json").write_text(json.dumps({"num_units": 5, "bogus": 1}))
    with pytest.raises(VocoderConfigError, match="bogus"):
        Unit2MelConfig.from_json(tmp_path / "bad.json")


def test_save_load_bit_identical(tmp_path) -> None:
    voc = UnitMelVocoder(tiny_model(postnet_layers=2), tiny_generator(), output_sr=16000,
                         context_units=5, hifigan="my-tiny")
    voc.save_pretrained(tmp_path / "v")
    # a generator that is not packaged travels with the folder, in the save_generator layout
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["config.json", "hifigan",
                                                                  "model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "v" / "hifigan").iterdir()) == [
        "config.json", "generator.safetensors"]
    back = UnitMelVocoder.from_pretrained(tmp_path / "v")
    a, b = voc.unit2mel.state_dict(), back.unit2mel.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    g1, g2 = voc.generator.state_dict(), back.generator.state_dict()
    assert g1.keys() == g2.keys() and all(torch.equal(g1[k], g2[k]) for k in g1)
    assert back.default_context_units == 5 and back.hifigan == "hifigan"
    units = [1, 5, 9, 2, 7, 3]
    assert np.array_equal(voc.synthesize(units), back.synthesize(units))
    # saved again from the loaded copy: still self-contained
    back.save_pretrained(tmp_path / "v2")
    assert (tmp_path / "v2" / "hifigan" / "generator.safetensors").is_file()
    # a packaged generator is stored by name only
    named = UnitMelVocoder(tiny_model(), tiny_generator(), hifigan="universal")
    named.save_pretrained(tmp_path / "n")
    assert not (tmp_path / "n" / "hifigan").exists()
    assert json.loads((tmp_path / "n" / "config.json").read_text())["vocoder"]["hifigan"] == "universal"


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
    tiny_model().save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    meta["unit2mel"]["d_model"] = 64
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(VocoderCheckpointError, match="does not fit"):
        Unit2Mel.from_pretrained(tmp_path / "m")
    with pytest.raises(VocoderFileNotFoundError, match="neither"):
        UnitMelVocoder.from_pretrained(_fresh(tmp_path))


def _fresh(tmp_path):
    """A valid folder naming a HiFi-GAN file that does not exist."""
    UnitMelVocoder(tiny_model(), tiny_generator(), hifigan="universal").save_pretrained(tmp_path / "v")
    meta = json.loads((tmp_path / "v" / "config.json").read_text())
    meta["vocoder"]["hifigan"] = str(tmp_path / "gone.pth")
    (tmp_path / "v" / "config.json").write_text(json.dumps(meta))
    return tmp_path / "v"


def test_train_writes_a_loadable_checkpoint(tmp_path) -> None:
    cfg = Unit2MelConfig.tiny(hop_length=HOP)
    res = train_unit2mel(_synthetic_pairs(cfg, 3), cfg, steps=4, batch_size=2,
                         out_dir=tmp_path / "ck", log_every=2, progress=False)
    assert res["steps"] == 4 and len(res["history"]) == 2 and res["out_dir"]
    assert (tmp_path / "ck" / "training_args.json").is_file()
    voc = UnitMelVocoder.from_pretrained(tmp_path / "ck", generator=tiny_generator())
    assert voc.synthesize([1, 2, 3]).dtype == np.float32


def test_crop_keeps_whole_units_and_their_mel_frames() -> None:
    rng = np.random.default_rng(0)
    durs = [3, 1, 4, 1, 5, 9, 2, 6]
    mel = torch.arange(sum(durs), dtype=torch.float32)[:, None].repeat(1, 4)  # frame index
    ex = Unit2MelExample(list(range(10, 18)), durs, mel)
    starts = np.cumsum([0] + durs[:-1])
    for _ in range(50):
        c = crop_example(ex, 10, rng)
        assert 1 <= len(c.units) and sum(c.durations) == c.mel.shape[0] <= 10
        i = c.units[0] - 10  # a contiguous run of the original units ...
        assert c.units == list(range(10 + i, 10 + i + len(c.units)))
        assert c.durations == durs[i:i + len(c.units)]
        assert float(c.mel[0, 0]) == starts[i]  # ... with exactly their frames
        assert (c.unit_start, c.frame_start) == (i, starts[i])  # and where they start
    assert crop_example(ex, 100, rng) is ex  # short enough: untouched
    one = crop_example(Unit2MelExample([7], [30], torch.zeros(30, 4)), 8, rng)
    assert one.units == [7] and one.durations == [8] and one.mel.shape[0] == 8
    with pytest.raises(ValueError):
        crop_example(ex, 0, rng)


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


def test_train_on_crops_with_holdout_and_periodic_saves(tmp_path) -> None:
    cfg = Unit2MelConfig.tiny(hop_length=HOP)
    pairs = _synthetic_pairs(cfg, 6)
    res = train_unit2mel(pairs, cfg, steps=6, batch_size=2, out_dir=tmp_path / "ck",
                         log_every=2, progress=False, segment_frames=8, holdout=2,
                         eval_every=3, save_every=4)
    assert res["examples"] == 4
    assert [e["step"] for e in res["evals"]] == [3, 6]
    assert all(math.isfinite(e["mel"]) and e["mel"] > 0 for e in res["evals"])
    args = json.loads((tmp_path / "ck" / "training_args.json").read_text())
    assert args["steps_done"] == 6 and args["segment_frames"] == 8 and args["held_out"]["step"] == 6
    with pytest.raises(ValueError, match="holdout"):
        train_unit2mel(pairs, cfg, steps=1, holdout=6, progress=False)


# ----------------------------------------------------------------------------- vocoder


def test_vocoder_rejects_a_mismatched_hifigan_and_bad_units() -> None:
    with pytest.raises(VocoderConfigError, match="HiFi-GAN wants"):
        UnitMelVocoder(tiny_model(), tiny_generator(n_mels=8))
    voc = UnitMelVocoder(tiny_model(), tiny_generator())
    with pytest.raises(VocoderInputError, match="no valid unit ids"):
        voc.synthesize([])
    with pytest.warns(UserWarning, match="dropped 2 unit ids"):
        audio = voc.synthesize([1, 2, 500, -1])
    assert audio.size > 0


def test_synthesize_length_at_16k() -> None:
    voc = UnitMelVocoder(tiny_model(), tiny_generator(), output_sr=16000)
    units = [3, 1, 4, 1, 5, 9, 2, 6]
    frames = int(voc.unit2mel.infer(units).durations.sum())
    audio = voc.synthesize(units)
    assert voc.sample_rate == 16000 and audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == round(frames * HOP * 16000 / 22050)


def _local_model() -> Unit2Mel:
    """No attention and constant durations: a unit's mel depends only on itself and its
    position, so a chunk rendered with all history as context must equal the full render."""
    m = tiny_model(n_layers=0)
    with torch.no_grad():
        m.dur_predictor.proj.weight.zero_()
        m.dur_predictor.proj.bias.fill_(math.log(3 + 1))  # 3 frames per unit
    return m


def test_stream_equals_full_render_away_from_joins() -> None:
    voc = UnitMelVocoder(_local_model(), tiny_generator(), output_sr=22050, context_units=1000)
    units = list(np.random.default_rng(0).integers(0, 20, 40))
    chunks = [units[:13], [], units[13:25], units[25:]]
    full = voc.synthesize(units)
    stream = np.concatenate(list(voc.synthesize_stream(chunks, crossfade_ms=2.0)))
    assert len(stream) == len(full) == 40 * 3 * HOP
    # the end of a chunk lacks right context: HiFi-GAN's reach before each join may differ
    reach = hifigan_reach_frames(voc.generator.config) * HOP
    far = np.ones(len(full), dtype=bool)
    for j in (13 * 3 * HOP, 25 * 3 * HOP):
        far[j - reach - 2 * 45 : j + 1] = False
    np.testing.assert_allclose(stream[far], full[far], atol=1e-5)
    assert np.max(np.abs(stream - full)) < 0.5 * np.max(np.abs(full)) + 1e-6


def test_stream_at_16k_keeps_length_and_continuity() -> None:
    voc = UnitMelVocoder(_local_model(), tiny_generator(), output_sr=16000, context_units=8)
    units = list(np.random.default_rng(1).integers(0, 20, 30))
    chunks = [units[:10], units[10:20], units[20:]]
    pieces = list(voc.synthesize_stream(chunks, crossfade_ms=5.0))
    stream = np.concatenate(pieces)
    full = voc.synthesize(units)
    assert stream.dtype == np.float32 and abs(len(stream) - len(full)) <= len(chunks)
    # joins: no step larger than the largest step of the unchunked render
    steps = np.abs(np.diff(stream))
    assert steps.max() <= 1.5 * np.abs(np.diff(full)).max()


# ----------------------------------------------------------------------------- real HiFi-GAN


@pytest.mark.slow
def test_real_hifigan_renders_16k_audio(tmp_path) -> None:
    torch.manual_seed(0)
    model = Unit2Mel(Unit2MelConfig.tiny(n_mels=80)).eval()  # HiFi-GAN V1 mel contract
    voc = UnitMelVocoder(model, output_sr=16000)  # loads the packaged `universal` generator
    units = [5, 9, 2, 7]
    frames = int(model.infer(units).durations.sum())
    audio = voc.synthesize(units)
    assert audio.dtype == np.float32 and len(audio) == round(frames * 256 * 16000 / 22050)
    assert np.all(np.isfinite(audio)) and np.max(np.abs(audio)) <= 1.0
    pieces = list(voc.synthesize_stream([units[:2], units[2:]], crossfade_ms=10.0))
    assert all(p.dtype == np.float32 for p in pieces) and sum(map(len, pieces)) > 0
    voc.save_pretrained(tmp_path / "v")
    back = UnitMelVocoder.from_pretrained(tmp_path / "v")  # names "universal": reloads it
    assert np.array_equal(back.synthesize(units), audio)


def test_bundle_cli_slim_with_another_hifigan(tmp_path, capsys) -> None:
    """`echox bundle --slim --hifigan DIR`: float16, no T2C, the generator travels along."""
    from echox.cli import main
    from echox.config import preset_config
    from echox.convert.hifigan import save_generator
    from echox.infer.bundle import load_bundle
    from echox.model.echox import EchoX

    torch.manual_seed(0)
    model = EchoX.build(preset_config("tiny-random"))
    model.trained_stages = ["s2t", "t2c", "echo"]
    model.save_pretrained(tmp_path / "ckpt")
    UnitMelVocoder(tiny_model(num_units=50), tiny_generator(), hifigan="first"
                   ).save_pretrained(tmp_path / "voc")
    other = tiny_generator(seed=3)
    save_generator(other, tmp_path / "gen")
    code = main(["bundle", "--model", str(tmp_path / "ckpt"), "--vocoder", str(tmp_path / "voc"),
                 "--hifigan", str(tmp_path / "gen"), "--slim", "--out", str(tmp_path / "b")])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "b" / "config.json").read_text())
    assert meta["omitted_parts"] == ["t2c"] and meta["weights_dtype"] == "float16"
    assert (tmp_path / "b" / "vocoder" / "hifigan" / "generator.safetensors").is_file()
    b = load_bundle(tmp_path / "b")
    x = torch.randn(1, 16, 9)
    with torch.no_grad():  # the replacement generator, up to float16 rounding
        torch.testing.assert_close(b.vocoder.generator(x), other(x), rtol=0.02, atol=0.02)
    assert b.vocoder.synthesize([1, 2, 3]).size > 0
    # a CodeHiFiGAN-free check: a bad generator path is one clear line
    code = main(["bundle", "--model", str(tmp_path / "ckpt"), "--vocoder", str(tmp_path / "voc"),
                 "--hifigan", str(tmp_path / "nope"), "--out", str(tmp_path / "b2")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot load the HiFi-GAN" in err and "Traceback" not in err


def _cli_vocoder_data(tmp_path) -> tuple[Path, list[str]]:
    """A 3-pair units manifest and the --set flags of a tiny unit->mel for `echox train`."""
    import soundfile as sf

    rows = []
    rng = np.random.default_rng(0)
    for i in range(3):
        wav = (0.1 * np.sin(np.arange(16000) * 0.05 * (i + 1))).astype(np.float32)
        sf.write(tmp_path / f"a{i}.wav", wav, 16000)
        units = rng.integers(0, 20, size=10).tolist()
        rows.append({"audio": f"a{i}.wav", "text": "hello there", "units": units,
                     "counts": [5] * 10})
    manifest = tmp_path / "tts_units.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny = ["--set", "vocoder.num_units=20", "--set", "vocoder.d_model=32",
            "--set", "vocoder.n_heads=2", "--set", "vocoder.n_layers=1",
            "--set", "vocoder.ffn_dim=64", "--set", "vocoder.dur_hidden=32",
            "--set", "train.log_every=1", "--threads", "1"]
    return manifest, tiny


def test_train_vocoder_cli_continues_with_a_fresh_unit_embedding(tmp_path, capsys) -> None:
    """`echox train vocoder --init DIR --reinit-units`: new k-means ids, trained layers kept."""
    from echox.cli import main
    from echox.model.unit2mel import Unit2Mel

    manifest, tiny = _cli_vocoder_data(tmp_path)
    assert main(["train", "vocoder", "--data", str(manifest), "--out", str(tmp_path / "a"),
                 "--max-steps", "2", "--batch-size", "2", *tiny]) == 0
    first = Unit2Mel.from_pretrained(tmp_path / "a" / "model")
    assert main(["train", "vocoder", "--init", str(tmp_path / "a" / "model"), "--reinit-units",
                 "--data", str(manifest), "--out", str(tmp_path / "b"), "--max-steps", "1",
                 "--batch-size", "2", "--lr", "1e-5", *tiny]) == 0
    second = Unit2Mel.from_pretrained(tmp_path / "b" / "model")
    assert second.config == first.config
    moved = (second.embed.weight - first.embed.weight).abs().mean()
    kept = (second.proj.weight - first.proj.weight).abs().max()
    assert moved > 0.1 and kept < 1e-3, (moved, kept)
    assert '"stage": "vocoder"' in capsys.readouterr().out


def test_infer_with_given_durations_matches_forward() -> None:
    model = tiny_model(3)
    units, durs = [1, 5, 7, 2], [3, 1, 4, 2]
    out = model.infer(units, durations=durs)
    assert out.durations[0].tolist() == durs and out.mel.shape[1] == sum(durs)
    with torch.no_grad():
        ref = model(torch.tensor([units]), durations=torch.tensor([durs]))
    torch.testing.assert_close(out.mel, ref.mel)


def test_grown_model_starts_with_the_same_mels_then_trains(tmp_path) -> None:
    from echox.model.unit2mel import grow_unit2mel

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
    from echox.model.unit2mel import grow_unit2mel

    model = tiny_model(5)
    with pytest.raises(VocoderConfigError, match="extra_decoder_layers"):
        grow_unit2mel(model, extra_decoder_layers=-1)
    with pytest.raises(VocoderConfigError, match="postnet_layers"):
        grow_unit2mel(model, postnet_layers=1)
    with pytest.raises(VocoderConfigError, match="already has"):
        grow_unit2mel(grow_unit2mel(model, postnet_layers=2), postnet_layers=2)
    with pytest.raises(VocoderConfigError, match="n_dec_layers"):
        Unit2MelConfig.tiny(n_dec_layers=-2)


def test_train_vocoder_cli_grows_a_trained_model(tmp_path, capsys) -> None:
    from echox.cli import main

    manifest, tiny = _cli_vocoder_data(tmp_path)
    assert main(["train", "vocoder", "--data", str(manifest), "--out", str(tmp_path / "a"),
                 "--max-steps", "1", "--batch-size", "2", *tiny]) == 0
    assert main(["train", "vocoder", "--init", str(tmp_path / "a" / "model"), "--grow-decoder",
                 "1", "--add-postnet", "2", "--data", str(manifest), "--out", str(tmp_path / "b"),
                 "--max-steps", "1", "--batch-size", "2", *tiny]) == 0
    grown = Unit2Mel.from_pretrained(tmp_path / "b" / "model")
    assert len(grown.decoder) == 2 and grown.config.postnet_layers == 2
    capsys.readouterr()
    assert main(["train", "vocoder", "--grow-decoder", "1", "--data", str(manifest),
                 "--out", str(tmp_path / "c"), "--max-steps", "1", *tiny]) != 0
    assert "give --init" in capsys.readouterr().err and not (tmp_path / "c").exists()
