"""Training of the vocoder parts (`echox.vocoder.train`): the shared schedule, unit->mel
training on synthetic pairs, crops, and `echox vocoder train`."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_vocoder_unit2mel import HOP, _one_thread, _synthetic_pairs, tiny_generator  # noqa: F401 - autouse fixture

from echox.errors import VocoderInputError
from echox.vocoder.io import load_unit_mel_vocoder
from echox.vocoder.train import (
    Unit2MelExample,
    crop_example,
    lr_at,
    prepare_unit2mel_example,
    train_unit2mel,
)
from echox.vocoder.unit2mel import Unit2Mel, Unit2MelConfig


def test_lr_schedule_warms_up_then_decays_to_its_floor() -> None:
    lrs = [lr_at(s, 100, 10, 1.0, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert lr_at(0, 10, 0, 2.0, 0.05) == pytest.approx(2.0)  # no warm-up


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


def test_prepare_example_from_waveform() -> None:
    cfg = Unit2MelConfig.tiny(n_mels=80)  # HiFi-GAN V1 mel: 22,050 Hz, hop 256
    wav = np.random.default_rng(0).normal(0, 0.1, 22050).astype(np.float32)  # 1 s
    ex = prepare_unit2mel_example([3, 4, 5], [20, 10, 20], wav, cfg)  # 50 unit frames = 1 s
    assert ex.mel.shape == (86, 80) and sum(ex.durations) == 86
    with pytest.raises(VocoderInputError, match="mel with 80 bins"):
        prepare_unit2mel_example([3], [50], np.zeros((7, 9)), cfg)


def test_train_writes_a_loadable_checkpoint(tmp_path) -> None:
    cfg = Unit2MelConfig.tiny(hop_length=HOP)
    res = train_unit2mel(_synthetic_pairs(cfg, 3), cfg, steps=4, batch_size=2,
                         out_dir=tmp_path / "ck", log_every=2, progress=False)
    assert res["steps"] == 4 and len(res["history"]) == 2 and res["out_dir"]
    assert (tmp_path / "ck" / "training_args.json").is_file()
    voc = load_unit_mel_vocoder(tmp_path / "ck", generator=tiny_generator())
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


def test_continued_training_reports_where_it_starts() -> None:
    cfg = Unit2MelConfig.tiny(hop_length=HOP)
    pairs = _synthetic_pairs(cfg, 6)
    first = train_unit2mel(pairs, cfg, steps=2, batch_size=2, progress=False, holdout=2)
    assert [e["step"] for e in first["evals"]] == [2]  # a fresh model has no step-0 row
    start = first["evals"][-1]["mel"]
    res = train_unit2mel(pairs, cfg, steps=2, batch_size=2, progress=False, holdout=2,
                         model=first["model"], eval_every=1)
    assert [e["step"] for e in res["evals"]] == [0, 1, 2]
    assert res["evals"][0]["mel"] == pytest.approx(start, rel=1e-5)
    assert res["evals"][1]["mel"] != pytest.approx(start, rel=1e-6)  # it trained


# ----------------------------------------------------------------------------- echox vocoder train


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
    """`echox vocoder train --init DIR --reinit-units`: new k-means ids, trained layers kept."""
    from echox.cli import main

    manifest, tiny = _cli_vocoder_data(tmp_path)
    assert main(["vocoder", "train", "--data", str(manifest), "--out", str(tmp_path / "a"),
                 "--max-steps", "2", "--batch-size", "2", *tiny]) == 0
    first = Unit2Mel.from_pretrained(tmp_path / "a" / "model")
    assert main(["vocoder", "train", "--init", str(tmp_path / "a" / "model"), "--reinit-units",
                 "--data", str(manifest), "--out", str(tmp_path / "b"), "--max-steps", "1",
                 "--batch-size", "2", "--lr", "1e-5", *tiny]) == 0
    second = Unit2Mel.from_pretrained(tmp_path / "b" / "model")
    assert second.config == first.config
    moved = (second.embed.weight - first.embed.weight).abs().mean()
    kept = (second.proj.weight - first.proj.weight).abs().max()
    assert moved > 0.1 and kept < 1e-3, (moved, kept)
    assert '"stage": "vocoder"' in capsys.readouterr().out
    # a k-means of another K: --set vocoder.num_units was ignored (the init's 20 kept), so a
    # manifest of units up to 29 was refused as out of range
    wider = tmp_path / "wider.jsonl"
    wider.write_text("".join(json.dumps({**json.loads(x), "units": [u + 10 for u in json.loads(x)["units"]]}) + "\n"
                             for x in manifest.read_text().splitlines()))
    grown = [a if a != "vocoder.num_units=20" else "vocoder.num_units=30" for a in tiny]
    assert main(["vocoder", "train", "--init", str(tmp_path / "a" / "model"), "--reinit-units",
                 "--data", str(wider), "--out", str(tmp_path / "c"), "--max-steps", "1",
                 "--batch-size", "2", *grown]) == 0
    third = Unit2Mel.from_pretrained(tmp_path / "c" / "model")
    assert third.config.num_units == 30 and third.embed.weight.shape[0] == 30
    assert (third.proj.weight - first.proj.weight).abs().max() < 0.1  # the layers above carried over


def test_train_vocoder_cli_grows_a_trained_model(tmp_path, capsys) -> None:
    from echox.cli import main

    manifest, tiny = _cli_vocoder_data(tmp_path)
    assert main(["vocoder", "train", "--data", str(manifest), "--out", str(tmp_path / "a"),
                 "--max-steps", "1", "--batch-size", "2", *tiny]) == 0
    assert main(["vocoder", "train", "--init", str(tmp_path / "a" / "model"), "--grow-decoder",
                 "1", "--add-postnet", "2", "--data", str(manifest), "--out", str(tmp_path / "b"),
                 "--max-steps", "1", "--batch-size", "2", *tiny]) == 0
    grown = Unit2Mel.from_pretrained(tmp_path / "b" / "model")
    assert len(grown.decoder) == 2 and grown.config.postnet_layers == 2
    capsys.readouterr()
    assert main(["vocoder", "train", "--grow-decoder", "1", "--data", str(manifest),
                 "--out", str(tmp_path / "c"), "--max-steps", "1", *tiny]) != 0
    assert "give --init" in capsys.readouterr().err and not (tmp_path / "c").exists()
    # --reinit-units alone was ignored: a fresh model trained, exit 0
    assert main(["vocoder", "train", "--reinit-units", "--data", str(manifest),
                 "--out", str(tmp_path / "c"), "--max-steps", "1", *tiny]) == 2
    assert "give --init" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_vocoder_train_bad_options_and_lines_are_one_line(tmp_path, capsys):
    """0 is a value, not "unset" (no silent 2,000 steps); bad steps, lr, batch or holdout are one
    line before any training; a malformed manifest line is skipped as the stages skip it."""
    from echox.cli import main

    manifest, tiny = _cli_vocoder_data(tmp_path)
    base = ["vocoder", "train", "--data", str(manifest), "--out", str(tmp_path / "a"), *tiny]
    for bad, says in ((["--max-steps", "0"], "--max-steps"), (["--lr", "-1"], "--lr"),
                      (["--batch-size", "-2"], "--batch-size"), (["--lr", "inf"], "--lr"),
                      (["--holdout", "-1", "--max-steps", "1"], "--holdout must be 0 to"),
                      (["--eval-every", "-5"], "--eval-every must be >= 0"),
                      (["--save-every", "-1"], "--save-every must be >= 0"),
                      (["--segment-frames", "0"], "--segment-frames must be >= 1")):  # a ValueError
        assert main([*base, *bad]) == 2, bad
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "a" / "model").exists()
    with manifest.open("a") as f:
        f.write("{bad\n")
    assert main([*base, "--max-steps", "1", "--batch-size", "2"]) == 0
    # the same command again threw that run's saves away (a killed run's progress with them)
    saved = (tmp_path / "a" / "unit2mel" / "model.safetensors").read_bytes()
    assert main([*base, "--max-steps", "1", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds an earlier run's Unit2Mel (steps done: 1)" in err and "--init" in err, err
    assert (tmp_path / "a" / "unit2mel" / "model.safetensors").read_bytes() == saved
    # also with another --init (the tiny pipeline passes the previous round's model)
    other = tmp_path / "other-u2m"
    shutil.copytree(tmp_path / "a" / "unit2mel", other)
    assert main([*base, "--max-steps", "1", "--batch-size", "2", "--init", str(other)]) == 2
    assert "holds an earlier run's Unit2Mel" in capsys.readouterr().err
    assert (tmp_path / "a" / "unit2mel" / "model.safetensors").read_bytes() == saved
    assert main([*base, "--max-steps", "1", "--batch-size", "2", "--init", str(tmp_path / "a" / "unit2mel")]) == 0
    # a save killed between its two renames leaves the run moved aside, unit2mel/ missing: a
    # run without --init trained from scratch (and a later cleanup could delete the progress)
    aside = tmp_path / "a" / ".unit2mel.old-999999"
    (tmp_path / "a" / "unit2mel").rename(aside)
    for extra in ([], ["--init", str(tmp_path / "a" / "unit2mel")]):
        assert main([*base, "--max-steps", "1", "--batch-size", "2", *extra]) == 2
        err = capsys.readouterr().err
        assert "its previous version is" in err and ".unit2mel.old-999999" in err, err
    assert (aside / "model.safetensors").read_bytes() != b"" and not (tmp_path / "a" / "unit2mel").exists()
    aside.rename(tmp_path / "a" / "unit2mel")
    (tmp_path / "afile").write_text("keep")
    assert main([*base[:4], "--out", str(tmp_path / "afile"), *tiny, "--max-steps", "1"]) == 2
    assert "is a file" in capsys.readouterr().err
    # an --out whose model/ is another program's save (an EchoX checkpoint) was replaced whole
    other = tmp_path / "run" / "model"
    other.mkdir(parents=True)
    (other / "config.json").write_text('{"format": "echox"}')
    assert main([*base[:4], "--out", str(tmp_path / "run"), *tiny, "--max-steps", "1"]) == 2
    assert "holds other files" in capsys.readouterr().err
    assert (other / "config.json").read_text() == '{"format": "echox"}'
    # counts that are not one run length per unit: one line naming the line (a TypeError)
    rows = [json.loads(x) for x in manifest.read_text().splitlines() if x.strip().startswith("{\"")]
    for counts in ([[5]] * 10, [5] * 9, [0] * 10, [5.5] * 10):
        bad = tmp_path / "bad.jsonl"
        bad.write_text("".join(json.dumps({**r, "counts": counts}) + "\n" for r in rows))
        assert main([*base[:2], "--data", str(bad), "--out", str(tmp_path / "c"), *tiny, "--max-steps", "1"]) == 2
        err = capsys.readouterr().err
        assert "bad.jsonl:1: 'counts' must be" in err and "Traceback" not in err, (counts, err)


def test_train_vocoder_init_keeps_the_hifigan_and_the_steps_on_record(tmp_path, capsys) -> None:
    """A vocoder of the small HiFi-GAN continued with --init was recorded as feeding
    "universal" (its unit2mel/ saves always were), and its training_args.json counted only the
    continued run's steps."""
    from echox.cli import main

    manifest, tiny = _cli_vocoder_data(tmp_path)
    assert main(["vocoder", "train", "--data", str(manifest), "--out", str(tmp_path / "a"),
                 "--max-steps", "2", "--batch-size", "2", *tiny, "--set", "train.hifigan=small"]) == 0
    for init in ("model", "unit2mel"):
        out = tmp_path / f"b-{init}"
        assert main(["vocoder", "train", "--init", str(tmp_path / "a" / init), "--data", str(manifest),
                     "--out", str(out), "--max-steps", "3", "--batch-size", "2", "--threads", "1"]) == 0
        for folder in ("model", "unit2mel"):
            meta = json.loads((out / folder / "config.json").read_text())["vocoder"]
            assert meta["hifigan"] == "small", (init, folder, meta)
        args = json.loads((out / "unit2mel" / "training_args.json").read_text())
        assert args["steps_done"] == 3
        if init == "unit2mel":  # a vocoder folder records no steps; a Unit2Mel save does
            assert args["init_steps_done"] == 2
    capsys.readouterr()
