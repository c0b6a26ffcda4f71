"""The unit->mel vocoder (`echox.vocoder.unit_mel`) and its folders: checks, lengths, streaming."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_vocoder_unit2mel import HOP, _one_thread, tiny_generator, tiny_model  # noqa: F401 - autouse fixture

from echox.errors import VocoderConfigError, VocoderFileNotFoundError, VocoderInputError
from echox.vocoder.hifigan import hifigan_reach_frames
from echox.vocoder.io import load_hifigan, load_unit_mel_vocoder, save_vocoder
from echox.vocoder.unit2mel import Unit2Mel, Unit2MelConfig
from echox.vocoder.unit_mel import UnitMelVocoder

# ----------------------------------------------------------------------------- checks and lengths


def test_vocoder_rejects_a_mismatched_hifigan_and_bad_units() -> None:
    with pytest.raises(VocoderConfigError, match="HiFi-GAN wants"):
        UnitMelVocoder(tiny_model(), tiny_generator(n_mels=8))
    voc = UnitMelVocoder(tiny_model(), tiny_generator())
    with pytest.raises(VocoderInputError, match="no valid unit ids"):
        voc.synthesize([])
    with pytest.warns(UserWarning, match="dropped 2 unit ids"):
        audio = voc.synthesize([1, 2, 500, -1])
    assert audio.size > 0
    for bad in ([1.5, 2.7], "12", [True, False]):  # were cast: units 1, 2 / 1, 2 / 1, 0
        with pytest.raises(VocoderInputError, match="integer ids"):
            voc.synthesize(bad)  # type: ignore[arg-type]


def test_synthesize_length_at_16k() -> None:
    voc = UnitMelVocoder(tiny_model(), tiny_generator(), output_sr=16000)
    units = [3, 1, 4, 1, 5, 9, 2, 6]
    frames = int(voc.unit2mel.infer(units).durations.sum())
    audio = voc.synthesize(units)
    assert voc.sample_rate == 16000 and audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == round(frames * HOP * 16000 / 22050)


# ----------------------------------------------------------------------------- streaming


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


def test_a_long_sequence_is_rendered_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past `max_units_at_once`, synthesize goes through the streaming path (memory grows with
    the square of the units in one pass): the same length and, away from joins, the same audio."""
    voc = UnitMelVocoder(_local_model(), tiny_generator(), output_sr=22050, context_units=1000)
    units = [int(u) for u in np.random.default_rng(2).integers(0, 20, 40)]
    full = voc.synthesize(units)
    calls: list[int] = []
    infer = voc.unit2mel.infer
    monkeypatch.setattr(voc.unit2mel, "infer", lambda ids: calls.append(len(ids)) or infer(ids))
    monkeypatch.setattr(voc, "max_units_at_once", 16)
    chunked = voc.synthesize(units)
    assert len(calls) == 3 and calls[0] == 16  # three passes: 16, then context + 16, context + 8
    assert chunked.dtype == np.float32 and len(chunked) == len(full) == 40 * 3 * HOP
    reach = hifigan_reach_frames(voc.generator.config) * HOP
    far = np.ones(len(full), dtype=bool)
    for j in (16 * 3 * HOP, 32 * 3 * HOP):
        far[j - reach - 2 * 221 : j + 1] = False  # HiFi-GAN's reach and the 10 ms crossfade
    np.testing.assert_allclose(chunked[far], full[far], atol=1e-5)


# ----------------------------------------------------------------------------- folders


def test_save_load_bit_identical(tmp_path) -> None:
    voc = UnitMelVocoder(tiny_model(postnet_layers=2), tiny_generator(), output_sr=16000,
                         context_units=5, hifigan="my-tiny")
    save_vocoder(voc, tmp_path / "v")
    # a generator that is not packaged travels with the folder, in the save_generator layout
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["config.json", "hifigan",
                                                                  "model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "v" / "hifigan").iterdir()) == [
        "config.json", "generator.safetensors"]
    back = load_unit_mel_vocoder(tmp_path / "v")
    a, b = voc.unit2mel.state_dict(), back.unit2mel.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    g1, g2 = voc.generator.state_dict(), back.generator.state_dict()
    assert g1.keys() == g2.keys() and all(torch.equal(g1[k], g2[k]) for k in g1)
    assert back.default_context_units == 5 and back.hifigan == "hifigan"
    units = [1, 5, 9, 2, 7, 3]
    assert np.array_equal(voc.synthesize(units), back.synthesize(units))
    # saved again from the loaded copy: still self-contained
    save_vocoder(back, tmp_path / "v2")
    assert (tmp_path / "v2" / "hifigan" / "generator.safetensors").is_file()
    # a packaged generator is stored by name only
    named = UnitMelVocoder(tiny_model(), tiny_generator(), hifigan="universal")
    save_vocoder(named, tmp_path / "n")
    assert not (tmp_path / "n" / "hifigan").exists()
    assert json.loads((tmp_path / "n" / "config.json").read_text())["vocoder"]["hifigan"] == "universal"


def _fresh(tmp_path):
    """A valid folder naming a HiFi-GAN file that does not exist."""
    save_vocoder(UnitMelVocoder(tiny_model(), tiny_generator(), hifigan="universal"), tmp_path / "v")
    meta = json.loads((tmp_path / "v" / "config.json").read_text())
    meta["vocoder"]["hifigan"] = str(tmp_path / "gone.pth")
    (tmp_path / "v" / "config.json").write_text(json.dumps(meta))
    return tmp_path / "v"


def test_a_missing_named_hifigan_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(VocoderFileNotFoundError, match="neither"):
        load_unit_mel_vocoder(_fresh(tmp_path))


# ----------------------------------------------------------------------------- real HiFi-GAN


@pytest.mark.slow
def test_real_hifigan_renders_16k_audio(tmp_path) -> None:
    torch.manual_seed(0)
    model = Unit2Mel(Unit2MelConfig.tiny(n_mels=80)).eval()  # HiFi-GAN V1 mel contract
    voc = UnitMelVocoder(model, load_hifigan("universal"), output_sr=16000)
    units = [5, 9, 2, 7]
    frames = int(model.infer(units).durations.sum())
    audio = voc.synthesize(units)
    assert audio.dtype == np.float32 and len(audio) == round(frames * 256 * 16000 / 22050)
    assert np.all(np.isfinite(audio)) and np.max(np.abs(audio)) <= 1.0
    pieces = list(voc.synthesize_stream([units[:2], units[2:]], crossfade_ms=10.0))
    assert all(p.dtype == np.float32 for p in pieces) and sum(map(len, pieces)) > 0
    save_vocoder(voc, tmp_path / "v")
    back = load_unit_mel_vocoder(tmp_path / "v")  # names "universal": reloads it
    assert np.array_equal(back.synthesize(units), audio)


def test_bundle_cli_slim_with_another_hifigan(tmp_path, capsys) -> None:
    """`echox bundle --slim --hifigan DIR`: float16, no T2C, the generator travels along."""
    from echox.cli import main
    from echox.config import preset_config
    from echox.infer.bundle import load_bundle
    from echox.model.echox import EchoX
    from echox.vocoder.io import save_generator

    torch.manual_seed(0)
    model = EchoX.build(preset_config("tiny-random"))
    model.trained_stages = ["s2t", "t2c", "echo"]
    model.save_pretrained(tmp_path / "ckpt")
    save_vocoder(UnitMelVocoder(tiny_model(num_units=50), tiny_generator(), hifigan="first"),
                 tmp_path / "voc")
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
