"""HiFi-GAN on ONNX Runtime (`echox.vocoder.onnx`): export, int8 stages, vocoder folders that
name an ONNX spec."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from test_vocoder_unit2mel import HOP, _one_thread, tiny_generator, tiny_model  # noqa: F401 - autouse fixture
from test_vocoder_unit_mel import _local_model

from echox.errors import ConversionError, VocoderCheckpointError
from echox.vocoder.hifigan import hifigan_reach_frames
from echox.vocoder.io import (
    load_generator,
    load_hifigan,
    load_unit_mel_vocoder,
    load_vocoder,
    save_vocoder,
)
from echox.vocoder.onnx import (
    CALIBRATION_FILE,
    ONNX_GENERATOR,
    OnnxHiFiGAN,
    OnnxSpec,
    cached_onnx_generator,
    convert_generator_onnx,
    stage_nodes,
)
from echox.vocoder.unit2mel import Unit2Mel, Unit2MelConfig
from echox.vocoder.unit_mel import UnitMelVocoder


def _mels(n: int, n_mels: int = 16, frames: int = 40, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((n_mels, frames + 7 * i)) - 4.0).astype(np.float32) for i in range(n)]


def test_fp32_onnx_matches_torch_for_any_length(tmp_path) -> None:
    gen = tiny_generator()
    convert_generator_onnx(gen, tmp_path / "g")
    onnx_gen = load_generator(tmp_path / "g")  # the folder loader dispatches on generator.onnx
    assert isinstance(onnx_gen, OnnxHiFiGAN) and onnx_gen.config == gen.config
    for frames in (1, 9, 57):
        mel = torch.from_numpy(_mels(1, frames=frames)[0])[None]
        with torch.no_grad():
            ref = gen(mel)
        out = onnx_gen(mel)
        assert out.shape == ref.shape == (1, frames * gen.config.hop_length)
        np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=2e-5)
    meta = json.loads((tmp_path / "g" / "config.json").read_text())["echox"]
    assert meta["runtime"] == "onnxruntime" and meta["int8_stages"] == []


def test_int8_stage_quantizes_only_that_stage_and_stays_close(tmp_path) -> None:
    import onnx

    gen = tiny_generator()
    convert_generator_onnx(gen, tmp_path / "q", int8_stages=[1], calibration=_mels(4))
    graph = onnx.load(str(tmp_path / "q" / ONNX_GENERATOR)).graph
    quantized = {n.name for n in graph.node if n.op_type in ("QLinearConv", "ConvInteger")}
    float_convs = {n.name for n in graph.node if n.op_type in ("Conv", "ConvTranspose")}
    assert quantized, "stage 1 should hold int8 convolutions"
    assert all(n.startswith(("/ups.1/", "/resblocks.1/")) for n in quantized)
    assert any(n.startswith("/ups.0/") for n in float_convs)  # stage 0 stays float
    assert any(n.startswith("/conv_post") for n in float_convs)
    mel = torch.from_numpy(_mels(1, frames=50, seed=7)[0])[None]
    with torch.no_grad():
        ref = gen(mel).numpy()
    out = load_generator(tmp_path / "q")(mel).numpy()
    assert out.shape == ref.shape and not np.array_equal(out, ref)
    assert np.corrcoef(out[0], ref[0])[0, 1] > 0.95  # int8 noise, not a different signal


def test_bad_stage_and_missing_calibration_are_clear_errors(tmp_path) -> None:
    gen = tiny_generator()
    with pytest.raises(ConversionError, match="out of range"):
        convert_generator_onnx(gen, tmp_path / "q", int8_stages=[5], calibration=_mels(1))
    with pytest.raises(ConversionError, match="calibration"):
        convert_generator_onnx(gen, tmp_path / "q", int8_stages=[0])
    assert not (tmp_path / "q").exists()  # nothing half-written
    with pytest.raises(VocoderCheckpointError, match="calibration"):
        OnnxSpec(int8_stages=(1,))


def test_broken_onnx_folder_fails_at_load(tmp_path) -> None:
    convert_generator_onnx(tiny_generator(), tmp_path / "g")
    (tmp_path / "g" / ONNX_GENERATOR).write_bytes(b"not a graph")
    with pytest.raises(VocoderCheckpointError, match="cannot open ONNX"):
        load_generator(tmp_path / "g")
    os.remove(tmp_path / "g" / ONNX_GENERATOR)
    with pytest.raises(VocoderCheckpointError, match="lacks"):
        load_generator(tmp_path / "g")  # neither ONNX nor torch weights


def test_stage_nodes_lists_the_stage_convolutions(tmp_path) -> None:
    gen = tiny_generator()
    convert_generator_onnx(gen, tmp_path / "g")
    names = stage_nodes(tmp_path / "g" / ONNX_GENERATOR, gen.config, [0])
    # ups.0 + one resblock of two (conv1, conv2) pairs
    assert len(names) == 1 + 4 and names[0].startswith("/ups.0/")


def test_cache_converts_once(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ECHOX_CACHE", str(tmp_path / "cache"))
    gen, spec = tiny_generator(), OnnxSpec((0,), _mels(2))
    first = cached_onnx_generator(gen, spec)
    stamp = first.path.stat().st_mtime_ns
    again = cached_onnx_generator(gen, OnnxSpec((0,), _mels(2)))
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp
    other = cached_onnx_generator(tiny_generator(seed=5), spec)  # other weights, other entry
    assert other.path != first.path


def test_a_damaged_cache_copy_is_converted_again(tmp_path, monkeypatch, caplog) -> None:
    """A cut generator.onnx in the cache failed every later run ("cannot open ONNX generator",
    blaming the bundle's vocoder) until the user found and deleted the cache folder."""
    monkeypatch.setenv("ECHOX_CACHE", str(tmp_path / "cache"))
    gen, spec = tiny_generator(), OnnxSpec((0,), _mels(2))
    first = cached_onnx_generator(gen, spec)
    mel = torch.from_numpy(_mels(1)[0]).unsqueeze(0)
    want = first(mel)
    data = first.path.read_bytes()
    first.path.write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING", logger="echox"):
        again = cached_onnx_generator(gen, spec)
    assert "cannot be opened" in caplog.text and again.path == first.path
    assert again.path.stat().st_size == len(data)
    torch.testing.assert_close(again(mel), want)


def test_onnx_generator_in_a_vocoder_saves_as_local_folder(tmp_path) -> None:
    convert_generator_onnx(tiny_generator(), tmp_path / "g", int8_stages=[0], calibration=_mels(2))
    voc = UnitMelVocoder(tiny_model(), load_generator(tmp_path / "g"), output_sr=22050,
                         hifigan=str(tmp_path / "g"))
    units = [3, 1, 4, 1, 5, 9, 2, 6]
    audio = voc.synthesize(units)
    save_vocoder(voc, tmp_path / "v")
    assert (tmp_path / "v" / "hifigan" / ONNX_GENERATOR).is_file()
    back = load_unit_mel_vocoder(tmp_path / "v")
    assert isinstance(back.generator, OnnxHiFiGAN)
    np.testing.assert_allclose(back.synthesize(units), audio, atol=1e-6)


@pytest.mark.slow
def test_packaged_generator_with_onnx_spec_roundtrips(tmp_path, monkeypatch) -> None:
    """A folder naming the packaged `small` HiFi-GAN plus an int8 spec: calibration mels travel
    in the folder, the graph is built into the cache on load, and the audio follows torch's."""
    monkeypatch.setenv("ECHOX_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = Unit2Mel(Unit2MelConfig.tiny(n_mels=80)).eval()  # HiFi-GAN's mel contract
    units = [5, 9, 2, 7, 7, 1]
    calib = [model.infer(units).mel[0].T.numpy()]
    torch_voc = UnitMelVocoder(model, load_hifigan("small"), hifigan="small")
    onnx_voc = UnitMelVocoder(model, load_hifigan("small"), hifigan="small",
                              onnx=OnnxSpec((1, 2), calib))
    save_vocoder(onnx_voc, tmp_path / "v")
    meta = json.loads((tmp_path / "v" / "config.json").read_text())["vocoder"]
    assert meta["hifigan"] == "small" and meta["onnx"]["int8_stages"] == [1, 2]
    assert (tmp_path / "v" / CALIBRATION_FILE).is_file()
    back = load_unit_mel_vocoder(tmp_path / "v")
    assert isinstance(back.generator, OnnxHiFiGAN)
    assert list((tmp_path / "cache" / "hifigan-onnx").iterdir())
    ref, out = torch_voc.synthesize(units), back.synthesize(units)
    assert out.shape == ref.shape and np.corrcoef(out, ref)[0, 1] > 0.9
    save_vocoder(back, tmp_path / "v2")  # the spec survives a second save
    assert json.loads((tmp_path / "v2" / "config.json").read_text())["vocoder"]["onnx"] == meta["onnx"]
    (tmp_path / "v2" / CALIBRATION_FILE).unlink()
    with pytest.raises(VocoderCheckpointError, match="calibration"):
        load_unit_mel_vocoder(tmp_path / "v2")


def test_onnx_vocoder_cli(tmp_path, monkeypatch, capsys) -> None:
    """`echox vocoder onnx`: calibrates on the manifest's units and writes a loadable folder;
    input mistakes are clear errors."""
    from echox.cli import main

    monkeypatch.setenv("ECHOX_CACHE", str(tmp_path / "cache"))
    save_vocoder(UnitMelVocoder(tiny_model(), tiny_generator(), output_sr=22050, hifigan="mine"),
                 tmp_path / "v")
    lines = [json.dumps({"id": f"r{i}", "text": "hi", "units": [i, 3, 4, 5, i + 1]}) for i in range(6)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines + ["{broken"]) + "\n")
    code = main(["vocoder", "onnx", "--vocoder", str(tmp_path / "v"), "--out", str(tmp_path / "o"),
                 "--int8-stages", "1", "--calibrate", str(tmp_path / "m.jsonl"), "--n", "3"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "int8 stages [1], 3 calibration mels" in out.out
    back = load_unit_mel_vocoder(tmp_path / "o")
    assert isinstance(back.generator, OnnxHiFiGAN)
    assert back.synthesize([1, 2, 3]).dtype == np.float32
    for argv, msg in [(["--int8-stages", "1"], "needs --calibrate"),
                      (["--int8-stages", "x"], "comma-separated"),
                      (["--int8-stages", "7", "--calibrate", str(tmp_path / "m.jsonl")], "out of range"),
                      (["--vocoder", str(tmp_path / "o")], "already runs on ONNX"),
                      (["--out", str(tmp_path / "v")], "overlaps --vocoder"),  # it replaced its input
                      (["--out", str(tmp_path / "v" / "hifigan")], "overlaps --vocoder"),
                      (["--out", str(tmp_path / "m.jsonl" / "x")], "is a file"),
                      (["--n", "-1"], "--n")]:
        base = ["vocoder", "onnx", "--vocoder", str(tmp_path / "v"), "--out", str(tmp_path / "p")]
        if msg == "--n":
            with pytest.raises(SystemExit):
                main(base + argv)
            assert "--n" in capsys.readouterr().err
            continue
        code = main(base + argv + (["--calibrate", str(tmp_path / "m.jsonl")] if "ONNX" in msg else []))
        assert code == 2 and msg in capsys.readouterr().err
    assert (tmp_path / "v" / "hifigan" / "generator.safetensors").is_file()
    # a vocoder saved over a folder of another program's config.json (a whole bundle) is refused
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text('{"format": "echox"}')
    for force, msg in [([], "exists; pass --force"), (["--force"], "holds other files")]:
        code = main(["vocoder", "onnx", "--vocoder", str(tmp_path / "v"), "--out", str(tmp_path / "b"),
                     "--int8-stages", ""] + force)
        assert code == 2 and msg in capsys.readouterr().err
        assert (tmp_path / "b" / "config.json").read_text() == '{"format": "echox"}'
    # an existing vocoder is replaced only with --force (it was replaced unasked)
    made = (tmp_path / "o" / "config.json").read_bytes()
    again = ["vocoder", "onnx", "--vocoder", str(tmp_path / "v"), "--out", str(tmp_path / "o"),
             "--int8-stages", ""]
    assert main(again) == 2 and "pass --force" in capsys.readouterr().err
    assert (tmp_path / "o" / "config.json").read_bytes() == made
    assert main(again + ["--force"]) == 0
    assert "int8 stages [], 0 calibration mels" in capsys.readouterr().out
    assert isinstance(load_unit_mel_vocoder(tmp_path / "o").generator, OnnxHiFiGAN)


@pytest.mark.slow
def test_committed_k500_vocoder_is_v1_quality(tmp_path, monkeypatch) -> None:
    """The recipe's default vocoder (V1 with int8 stages 1 and 2, built into the cache on first
    load, ~1 min) renders what float32 V1 renders from the same mel, up to int8 noise."""
    from pathlib import Path

    monkeypatch.setenv("ECHOX_CACHE", str(tmp_path / "cache"))
    folder = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "vocoder-k500" / "vocoder"
    voc = load_vocoder(folder)
    assert isinstance(voc.generator, OnnxHiFiGAN) and voc.onnx.int8_stages == (1, 2)
    units = [458, 437, 185, 210, 257, 45, 263, 415, 222, 308, 417, 25, 115, 260, 382, 89, 172,
             479, 155, 70, 357, 139, 340, 176, 138, 454, 223, 122, 461, 153]  # gk-000's start
    mel = voc.unit2mel.infer(units).mel.transpose(1, 2)
    with torch.no_grad():
        ref = load_hifigan("universal")(mel)[0].numpy()
    out = voc.generator(mel)[0].numpy()
    assert out.shape == ref.shape and np.corrcoef(out, ref)[0, 1] > 0.95
    audio = voc.synthesize(units)
    assert voc.sample_rate == 16000 and audio.dtype == np.float32 and 0.02 < np.abs(audio).max() <= 1


def test_spec_meta_roundtrip_and_bad_calibration_files(tmp_path) -> None:
    from safetensors.torch import save_file

    spec = OnnxSpec((2, 1, 1), _mels(3))
    assert spec.int8_stages == (1, 2)
    spec.save_calibration(tmp_path)
    back = OnnxSpec.from_meta(spec.to_meta(), tmp_path)
    assert back.int8_stages == (1, 2) and back.digest() == spec.digest()  # float16 on disk
    assert [m.shape for m in back.calibration] == [m.shape for m in spec.calibration]
    save_file({"x": torch.zeros(2, 3)}, str(tmp_path / CALIBRATION_FILE))
    with pytest.raises(VocoderCheckpointError, match="mel.0"):
        OnnxSpec.from_meta(spec.to_meta(), tmp_path)
    (tmp_path / CALIBRATION_FILE).write_bytes(b"\x00" * 5)
    with pytest.raises(VocoderCheckpointError, match="cannot read"):
        OnnxSpec.from_meta(spec.to_meta(), tmp_path)
    with pytest.raises(VocoderCheckpointError, match="JSON object"):
        OnnxSpec.from_meta(["int8"], tmp_path)


def test_streaming_through_an_onnx_generator_equals_full_away_from_joins(tmp_path) -> None:
    convert_generator_onnx(tiny_generator(), tmp_path / "g")
    voc = UnitMelVocoder(_local_model(), load_generator(tmp_path / "g"), output_sr=22050,
                         context_units=1000)
    units = list(np.random.default_rng(0).integers(0, 20, 30))
    full = voc.synthesize(units)
    stream = np.concatenate(list(voc.synthesize_stream([units[:11], units[11:]], crossfade_ms=2.0)))
    assert len(stream) == len(full) == 30 * 3 * HOP
    reach = hifigan_reach_frames(voc.generator.config) * HOP
    far = np.ones(len(full), dtype=bool)
    far[11 * 3 * HOP - reach - 2 * 45 : 11 * 3 * HOP + 1] = False
    np.testing.assert_allclose(stream[far], full[far], atol=1e-5)


def test_bundle_hifigan_over_an_onnx_vocoder_keeps_onnx(tmp_path, monkeypatch, capsys) -> None:
    """`echox bundle --vocoder ONNX --hifigan G`: G runs on ONNX Runtime with the vocoder's
    stages, as the replaced HiFi-GAN did (the spec was dropped, the bundle fell back to torch)."""
    from echox.cli import main
    from echox.config import preset_config
    from echox.infer.bundle import load_bundle
    from echox.model.echox import EchoX
    from echox.vocoder.io import save_generator

    monkeypatch.setenv("ECHOX_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = EchoX.build(preset_config("tiny-random"))
    model.trained_stages = ["s2t", "t2c", "echo"]
    model.save_pretrained(tmp_path / "ckpt")
    first = tiny_generator()
    voc = UnitMelVocoder(tiny_model(num_units=50), cached_onnx_generator(first, OnnxSpec((), [])),
                         hifigan="first", onnx=OnnxSpec((), []))
    save_vocoder(voc, tmp_path / "voc")
    other = tiny_generator(seed=3)
    save_generator(other, tmp_path / "gen")
    code = main(["bundle", "--model", str(tmp_path / "ckpt"), "--vocoder", str(tmp_path / "voc"),
                 "--hifigan", str(tmp_path / "gen"), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "runs on ONNX Runtime" in err
    b = load_bundle(tmp_path / "b")
    assert isinstance(b.vocoder.generator, OnnxHiFiGAN)
    x = torch.randn(1, 16, 9)
    with torch.no_grad():  # the replacement generator's output, not the first one's
        out = torch.as_tensor(np.asarray(b.vocoder.generator(x)))
        torch.testing.assert_close(out, other(x), rtol=1e-3, atol=1e-3)
    # a local int8 HiFi-GAN keeps no calibration mels: the new one runs in torch, and says so
    save_vocoder(UnitMelVocoder(voc.unit2mel, cached_onnx_generator(first, OnnxSpec((1,), _mels(2))),
                                hifigan="first"), tmp_path / "voc8")
    with pytest.warns(UserWarning, match="runs in torch.*echox vocoder onnx"):
        code = main(["bundle", "--model", str(tmp_path / "ckpt"), "--vocoder", str(tmp_path / "voc8"),
                     "--hifigan", str(tmp_path / "gen"), "--out", str(tmp_path / "b8")])
    assert code == 0, capsys.readouterr().err
    assert not isinstance(load_bundle(tmp_path / "b8").vocoder.generator, OnnxHiFiGAN)
