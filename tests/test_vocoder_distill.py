"""Distilling a HiFi-GAN into a smaller one (`echox.vocoder.distill`), and the generator folder
format (`echox.vocoder.io`)."""

from __future__ import annotations

import json

import pytest
import torch

from echox.errors import (
    CheckpointError,
    PackagedModelMissingError,
    VocoderCheckpointError,
    VocoderConfigError,
    VocoderInputError,
)
from echox.vocoder import io as vocoder_io
from echox.vocoder.distill import (
    DistillConfig,
    TeacherPool,
    _losses,
    build_gta_pool,
    build_pool,
    distill,
    evaluate,
    prune_generator,
    stft_losses,
)
from echox.vocoder.hifigan import HiFiGANConfig, HiFiGANGenerator, MelSpec
from echox.vocoder.io import load_generator, save_generator

HOP = 16
SPEC = MelSpec(n_mels=16, sampling_rate=22050, hop_length=HOP, n_fft=64, win_length=64)
RES = ((64, 16, 64), (128, 32, 128))


def generator(channels: int, seed: int) -> HiFiGANGenerator:
    cfg = HiFiGANConfig(num_mels=16, upsample_rates=(4, 4), upsample_kernel_sizes=(8, 8),
                        upsample_initial_channel=channels, resblock_kernel_sizes=(3,),
                        resblock_dilation_sizes=((1, 2),), mel=SPEC)
    torch.manual_seed(seed)
    return HiFiGANGenerator(cfg).eval()


def mels(n: int = 4, frames: int = 60) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, frames + 7 * i, generator=g) * 0.5 - 4.0 for i in range(n)]


def test_generator_folder_round_trip(tmp_path) -> None:
    g = generator(16, 0)
    save_generator(g, tmp_path / "g", extra={"note": "test"})
    raw = json.loads((tmp_path / "g" / "config.json").read_text())
    assert raw["upsample_initial_channel"] == 16 and raw["hop_size"] == HOP
    assert raw["echox"] == {"note": "test"}
    back = load_generator(tmp_path / "g")
    assert back.config == g.config and not back.training
    x = torch.randn(1, 16, 12)
    torch.testing.assert_close(back(x), g(x), rtol=0, atol=0)
    (tmp_path / "g" / "generator.safetensors").write_bytes(b"half-written")
    with pytest.raises(VocoderCheckpointError, match="cannot read"):
        load_generator(tmp_path / "g")
    with pytest.raises(VocoderCheckpointError, match="lacks"):
        load_generator(tmp_path / "nothing")


def test_v2_sizes() -> None:
    v1, v2 = HiFiGANConfig(), HiFiGANConfig.v2()
    assert v2.upsample_initial_channel == 128 and v2.mel == v1.mel
    assert HiFiGANConfig.from_dict(v2.to_dict()) == v2
    n2 = sum(p.numel() for p in HiFiGANGenerator(v2).parameters())
    assert 0.8e6 < n2 < 1.0e6  # V2 has ~0.9M parameters (V1: 13.9M)


def test_small_hifigan_missing_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(vocoder_io, "small_hifigan_dir", lambda: tmp_path / "absent")
    with pytest.raises(PackagedModelMissingError, match="echox vocoder distill"):
        vocoder_io.load_hifigan("small")


def test_stft_losses_zero_on_identity() -> None:
    x = torch.randn(2, 512)
    assert float(stft_losses(x, x, RES)) < 1e-3
    assert float(stft_losses(x, torch.randn(2, 512), RES)) > 0.5


def test_pool_and_distill_lower_the_loss(tmp_path) -> None:
    teacher = generator(32, 1)
    pool = build_pool(teacher, mels(), n_windows=24, window_frames=40, progress=False)
    assert pool.mels.shape == (24, 16, 40) and pool.audio.shape == (24, 40 * HOP)
    with torch.no_grad():  # the stored audio is the teacher's own output
        torch.testing.assert_close(pool.audio[:2], teacher(pool.mels[:2]))
    pool.save(tmp_path / "pool.safetensors")
    back = TeacherPool.load(tmp_path / "pool.safetensors")
    assert back.valid == pool.valid and torch.equal(back.audio, pool.audio)
    train, held = pool.split(4)
    assert train.mels.shape[0] == 20 and held.mels.shape[0] == 4
    cfg = DistillConfig(steps=40, batch_size=4, segment_frames=8, margin_frames=4, lr=3e-3,
                        warmup=5, log_every=10, eval_every=40, stft_resolutions=RES)
    student = generator(8, 2)
    before = evaluate(student, held, cfg)
    res = distill(train, cfg, student=student, eval_pool=held, out_dir=tmp_path / "s",
                  progress=False)
    after = res["eval"][-1]
    assert after["loss"] < 0.8 * before["loss"], (before, after)
    assert res["history"][-1]["loss"] < res["history"][0]["loss"]
    saved = json.loads((tmp_path / "s" / "config.json").read_text())
    assert saved["echox"]["final_eval"]["step"] == 40
    loaded = load_generator(tmp_path / "s")
    x = pool.mels[:1]
    torch.testing.assert_close(loaded(x), res["model"](x))


def test_gta_pool_pairs_windows_and_skips_the_wave_loss(tmp_path) -> None:
    teacher = generator(32, 1)
    ms = mels()
    audio = [torch.arange(m.shape[-1] * HOP, dtype=torch.float32) + 1000 * i for i, m in enumerate(ms)]
    gta = build_gta_pool(ms, audio, n_windows=6, window_frames=30, valid=5, hop=HOP, seed=3)
    assert gta.mels.shape == (6, 16, 30) and gta.audio.shape == (6, 30 * HOP)
    assert not gta.locked.any()
    for w, a in zip(gta.mels, gta.audio):  # the audio sits under the same frames as the mel
        clip, first = int(a[0]) // 1000, int(a[0]) % 1000
        assert first % HOP == 0
        torch.testing.assert_close(w, ms[clip][:, first // HOP : first // HOP + 30])
    real = build_pool(teacher, ms, n_windows=4, window_frames=30, progress=False)
    both = TeacherPool.cat([real, build_gta_pool(ms, audio, 3, 30, real.valid, HOP)])
    assert both.locked.tolist() == [True] * 4 + [False] * 3
    both.save(tmp_path / "p.safetensors")
    back = TeacherPool.load(tmp_path / "p.safetensors")
    assert torch.equal(back.locked, both.locked)
    train, held = back.split(2)
    assert train.locked.sum() + held.locked.sum() == 4
    # the waveform L1 counts only the locked rows; mel and STFT losses count all
    cfg = DistillConfig(steps=1, batch_size=2, segment_frames=8, margin_frames=4, stft_resolutions=RES)
    student = generator(8, 2)
    x, y = both.mels[[0, 4], :, :16], both.audio[[0, 4], 4 * HOP : 12 * HOP]
    locked = torch.tensor([True, False])
    one = _losses(student, x, y, cfg, locked)["wave"]
    first = _losses(student, x[:1], y[:1], cfg)["wave"]
    torch.testing.assert_close(one, first)
    with pytest.raises(VocoderInputError, match="samples <"):
        build_gta_pool(ms, [a[:100] for a in audio], 2, 30, 5, HOP)
    with pytest.raises(VocoderInputError, match="differ"):
        TeacherPool.cat([real, build_gta_pool(ms, audio, 2, 40, real.valid, HOP)])


def test_distill_input_errors() -> None:
    teacher = generator(16, 0)
    with pytest.raises(VocoderInputError, match="no mel has"):
        build_pool(teacher, mels(frames=5), n_windows=2, window_frames=30, progress=False)
    with pytest.raises(VocoderConfigError, match="twice the teacher's reach"):
        build_pool(teacher, mels(), n_windows=2, window_frames=2, progress=False)
    pool = build_pool(teacher, mels(), n_windows=4, window_frames=30, progress=False)
    with pytest.raises(VocoderConfigError, match="too short"):
        distill(pool, DistillConfig(steps=1, segment_frames=40), student=generator(8, 0),
                progress=False)
    with pytest.raises(VocoderConfigError, match="must be > 0"):
        DistillConfig(steps=0)


def test_prune_keeps_the_teachers_weights_on_the_kept_channels() -> None:
    teacher = generator(32, 3)
    full = prune_generator(teacher, 32)  # every channel kept: the teacher itself
    x = mels(1)[0].unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(full(x), teacher(x))
        # with all channels kept, the least-squares gains are 1
        same = prune_generator(teacher, 32, calibration_mel=x)
        torch.testing.assert_close(same(x), teacher(x), rtol=1e-4, atol=1e-5)
    half = prune_generator(teacher, 16)
    assert half.config.upsample_initial_channel == 16
    assert half.config.resblock_kernel_sizes == teacher.config.resblock_kernel_sizes
    t, s = teacher.state_dict(), half.state_dict()
    for name, w in s.items():  # each student tensor is a sub-block of the teacher's
        assert w.numel() <= t[name].numel()
    # the kept rows of conv_pre are teacher rows, in order
    rows = [i for i in range(32) if any(torch.equal(t["conv_pre.weight"][i], r)
                                        for r in s["conv_pre.weight"])]
    assert len(rows) == 16
    with torch.no_grad():
        assert half(x).shape == teacher(x).shape
        calibrated = prune_generator(teacher, 16, calibration_mel=x)
        err_plain = (half(x) - teacher(x)).abs().mean()
        err_cal = (calibrated(x) - teacher(x)).abs().mean()
    assert torch.isfinite(calibrated(x)).all() and err_cal < err_plain
    with pytest.raises(VocoderConfigError, match="divisible"):
        prune_generator(teacher, 18)
    with pytest.raises(VocoderConfigError, match="must be in"):
        prune_generator(teacher, 64)


def test_hifigan_checkpoint_errors_are_vocoder_checkpoint_errors(tmp_path) -> None:
    """One `except` covers the HiFi-GAN loaders and the unit vocoders' loaders."""
    (tmp_path / "g").mkdir()
    with pytest.raises(VocoderCheckpointError, match="lacks"):
        load_generator(tmp_path / "g")
    assert issubclass(VocoderCheckpointError, CheckpointError)
    from echox.vocoder.hifigan import HiFiGANConfig

    raw = json.loads(json.dumps(HiFiGANConfig().to_dict()))
    raw["num_mels"] = float("inf")  # JSON's Infinity: an OverflowError traceback
    (tmp_path / "g" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(VocoderCheckpointError, match="bad HiFi-GAN config"):
        HiFiGANConfig.from_json(tmp_path / "g" / "config.json")


def test_train_hifigan_cli_gta_pool(tmp_path, capsys) -> None:
    """`echox vocoder distill --unit2mel DIR --gta`: teacher windows from the real mels plus
    ground-truth-aligned unit->mel windows whose target is the real audio."""
    import numpy as np
    import soundfile as sf

    from echox.cli import main
    from echox.vocoder.unit2mel import Unit2Mel, Unit2MelConfig

    torch.manual_seed(0)
    Unit2Mel(Unit2MelConfig.tiny(n_mels=80)).save_pretrained(tmp_path / "u2m")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):  # 1.5 s each: 75 units at 50 Hz
        sf.write(tmp_path / f"{i}.wav", (0.1 * rng.standard_normal(33075)).astype(np.float32), 22050)
        rows.append({"text": "hi", "audio": f"{i}.wav", "units": rng.integers(0, 20, 25).tolist(),
                     "counts": [3] * 25})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["vocoder", "distill", "--data", str(tmp_path / "m.jsonl"), "--teacher", "small",
            "--unit2mel", str(tmp_path / "u2m"), "--gta", "--windows", "16", "--unit2mel-share", "0.25",
            "--max-steps", "2", "--batch-size", "2", "--student-channels", "32", "--threads", "1",
            "--out", str(tmp_path / "s")]
    assert main(args) == 0
    pool = TeacherPool.load(tmp_path / "s" / "teacher_pool.safetensors")
    assert pool.locked.tolist() == [True] * 12 + [False] * 4
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["steps"] == 2 and load_generator(tmp_path / "s" / "model").config.upsample_initial_channel == 32
    assert pool.settings["teacher"] == "small" and pool.settings["windows"] == 16
    # the same command again reuses the pool; other settings were silently trained on the old
    # pool (and recorded as if it were theirs): now refused, naming what differs
    capsys.readouterr()
    # ... but not over the first run's student (a new random one replaced it): --init goes on
    assert main(args) == 2 and "holds an earlier run's student" in capsys.readouterr().err
    args = [*args, "--init", str(tmp_path / "s" / "model")]
    assert main(args) == 0 and "[distill] reusing 16 teacher windows" in capsys.readouterr().err
    other = list(args)
    other[other.index("--teacher") + 1] = "universal"
    other[other.index("--windows") + 1] = "64"
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "made with other settings" in err and "teacher 'small' -> 'universal'" in err and "windows 16 -> 64" in err, err
    # options left out are the pool's own: --pool alone reuses it, and the summary names its teacher
    pool_file = str(tmp_path / "s" / "teacher_pool.safetensors")
    assert main(["vocoder", "distill", "--pool", pool_file, "--max-steps", "1", "--batch-size", "2",
                 "--student-channels", "32", "--threads", "1", "--out", str(tmp_path / "alone")]) == 0
    assert json.loads((tmp_path / "alone" / "summary.json").read_text())["teacher"] == "small"
    # a retrained unit->mel: new aligned windows, the old teacher windows taken over unchanged
    torch.manual_seed(1)
    Unit2Mel(Unit2MelConfig.tiny(n_mels=80)).save_pretrained(tmp_path / "u2m2")
    again = [a if a != str(tmp_path / "u2m") else str(tmp_path / "u2m2") for a in args]
    again = again[:again.index("--init")]  # a new --out, a new student
    again = again[:-1] + [str(tmp_path / "s2")]
    assert main([*again, "--teacher-from", str(tmp_path / "s" / "teacher_pool.safetensors"),
                 "--unit2mel-share", "0.5"]) == 0
    pool2 = TeacherPool.load(tmp_path / "s2" / "teacher_pool.safetensors")
    assert pool2.locked.tolist() == [True] * 8 + [False] * 8
    assert torch.equal(pool2.mels[:8], pool.mels[:8]) and torch.equal(pool2.audio[:8], pool.audio[:8])
    assert not torch.equal(pool2.mels[8:12], pool.mels[12:16])
    # more teacher windows than the old pool holds: a clear error, nothing trained
    again = again[:-1] + [str(tmp_path / "s3")]
    assert main([*again, "--teacher-from", str(tmp_path / "s" / "teacher_pool.safetensors"),
                 "--unit2mel-share", "0.0"]) != 0
    assert not (tmp_path / "s3" / "model").exists()
    # a pool too small to hold out windows is refused before the teacher renders it (it was
    # rendered, then refused), and nothing is kept for a rerun with more windows to reuse
    fresh = args[:args.index("--init")]  # a new --out, a new student
    small = [*fresh[:-1], str(tmp_path / "s4")]
    small[small.index("--windows") + 1] = "8"
    capsys.readouterr()
    assert main(small) == 2
    err = capsys.readouterr().err
    assert "--windows must be > 8, got 8" in err and "[distill] teacher" not in err, err
    assert not (tmp_path / "s4" / "teacher_pool.safetensors").exists()


def test_evaluate_averages_the_wave_loss_over_locked_windows_only() -> None:
    cfg = DistillConfig(steps=1, batch_size=3, segment_frames=8, margin_frames=4, stft_resolutions=RES)
    frames = 16  # 2 x margin + segment: every window is evaluated on the same fixed segment
    torch.manual_seed(0)
    pool = TeacherPool(torch.randn(4, 16, frames), 0.1 * torch.randn(4, frames * HOP), valid=2,
                       hop=HOP, locked=torch.tensor([True, False, False, True]))
    student = generator(8, 3)
    seg = slice(cfg.margin_frames * HOP, (cfg.margin_frames + cfg.segment_frames) * HOP)
    with torch.no_grad():
        rows = [_losses(student.eval(), pool.mels[i : i + 1], pool.audio[i : i + 1, seg], cfg)
                for i in range(4)]
    got = evaluate(student, pool, cfg)
    torch.testing.assert_close(got["wave"], float(rows[0]["wave"] + rows[3]["wave"]) / 2)
    torch.testing.assert_close(got["mel"], sum(float(r["mel"]) for r in rows) / 4)
    assert evaluate(student, TeacherPool(pool.mels, pool.audio, 2, HOP, torch.zeros(4, dtype=torch.bool)),
                    cfg)["wave"] == 0.0


def test_save_generator_refuses_a_folder_of_other_files(tmp_path):
    from echox.errors import ConfigError

    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds other files"):
        save_generator(generator(8, 0), tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_distill_data_with_a_torn_line_skips_it(tmp_path) -> None:
    """A manifest line cut short by a killed writer (or not UTF-8) is left out with the stages'
    warning: it used to stop `echox vocoder distill` with a JSONDecodeError traceback."""
    import numpy as np
    import soundfile as sf

    from echox.train.vocoder_cmd import _mels_from_manifest

    sf.write(tmp_path / "a.wav", (0.1 * np.random.default_rng(0).standard_normal(22050)).astype(np.float32), 22050)
    (tmp_path / "m.jsonl").write_bytes(b'{"text": "hi", "audio": "a.wav"}\n{"text": "cut\n\xff\xfe\n')
    real, predicted, _ = _mels_from_manifest(str(tmp_path / "m.jsonl"), MelSpec(), None, None)
    assert len(real) == 1 and real[0].shape[0] == MelSpec().n_mels and predicted == []


def test_distill_cli_numbers_out_and_pool_files_are_checked_first(tmp_path, capsys) -> None:
    """`echox vocoder distill`: --max-steps 0 (or --batch-size / --lr 0) silently meant the
    defaults (3000 steps); --lr nan, --windows 0 and --student-channels -3 were tracebacks, as
    were an --out that is a file and a --pool / --teacher-from that is not a pool file."""
    from echox.cli import main

    (tmp_path / "afile").write_text("keep")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    (tmp_path / "ev").mkdir()  # an eval run's folder: its summary.json was overwritten
    (tmp_path / "ev" / "summary.json").write_text('{"mode": "s2t"}')
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"text": "hi", "audio": "nope.wav"}) + "\n")
    base = ["vocoder", "distill", "--teacher", "small", "--data", str(m), "--threads", "1"]
    out = ["--out", str(tmp_path / "s")]
    for bad, says in ((["--max-steps", "0"], "steps must be > 0"),
                      (["--batch-size", "0"], "batch_size must be > 0"),
                      (["--lr", "nan"], "--lr must be a finite number"),
                      (["--windows", "0"], "--windows must be >= 1"),
                      (["--student-channels", "-3"], "--student-channels must be >= 1"),
                      (["--limit", "-1"], "--limit must be >= 1"),
                      (["--out", str(tmp_path / "afile")], "is a file"),
                      ([*out, "--pool", str(tmp_path / "bad.safetensors")], "not a readable teacher pool"),
                      ([*out, "--pool", str(m)], "not a readable teacher pool"),
                      ([*out, "--pool", str(tmp_path)], "is a folder"),  # after the teacher ran
                      # found once the pool was built (and then the pool blocked the folder)
                      ([*out, "--window-frames", "32"], "--window-frames 32 is too short"),
                      # found once the student was trained, and the student thrown away
                      ([*out, "--pool", str(tmp_path / "s" / "model" / "p.safetensors")],
                       "lies inside"),
                      (["--out", str(tmp_path / "ev")], "summary.json of something else")):
        assert main([*base, *(out if "--out" not in bad else []), *bad]) == 2, bad
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.startswith("echox: error: ")]
        assert len(lines) == 1 and says in lines[0] and "Traceback" not in err, (bad, err)
    assert (tmp_path / "afile").read_text() == "keep" and not (tmp_path / "s").exists()
    assert (tmp_path / "ev" / "summary.json").read_text() == '{"mode": "s2t"}'
    with pytest.raises(VocoderCheckpointError, match="not a readable teacher pool"):
        TeacherPool.load(tmp_path / "bad.safetensors")


def test_distill_eval_every_zero_evaluates_only_at_the_end(tmp_path) -> None:
    """`--eval-every 0` ("only at the end", as for `vocoder train`) evaluated at every step
    (a `max(1, 0)`), and the CLI turned it into the default 500; negative is refused."""
    pool = build_pool(generator(32, 1), mels(), n_windows=12, window_frames=40, progress=False)
    train, held = pool.split(4)
    cfg = DistillConfig(steps=3, batch_size=2, segment_frames=8, margin_frames=4, lr=1e-3,
                        warmup=1, log_every=1, eval_every=0, stft_resolutions=RES)
    res = distill(train, cfg, student=generator(8, 2), eval_pool=held, out_dir=tmp_path / "s",
                  progress=False)
    assert [e["step"] for e in res["eval"]] == [3]
    with pytest.raises(VocoderConfigError, match="eval_every must be >= 0"):
        DistillConfig(eval_every=-1)
