"""`echox train` end to end on manifests the test writes (tiny random model)."""

import json
import os
import signal

import numpy as np
import pytest
import torch
import soundfile as sf

from echox.cli import main
from echox.errors import CheckpointError
from echox.train.trainer import Trainer


def _write_corpus(root, n=6):
    (root / "audio").mkdir(parents=True)
    dl, tts = [], []
    rng = np.random.default_rng(0)
    for i in range(n):
        sf.write(root / "audio" / f"q{i}.wav", (0.1 * rng.standard_normal(12000 + 800 * i)).astype(np.float32), 16000)
        dl.append({"id": f"d{i}", "conversations": [
            {"from": "user", "value": f"question {i}", "audio": f"audio/q{i}.wav"},
            {"from": "assistant", "value": f"Answer number {i}.", "units": [int(x) for x in rng.integers(0, 50, 7)]}]})
        tts.append({"id": f"t{i}", "text": f"Answer number {i}.", "units": [int(x) for x in rng.integers(0, 50, 9)]})
    (root / "dialogues.jsonl").write_text("\n".join(json.dumps(d) for d in dl) + "\n{not json\n")
    (root / "tts.jsonl").write_text("\n".join(json.dumps(t) for t in tts) + "\n")


def _t2c_run(tmp_path, train):
    """A tiny corpus in tmp_path/c, a recipe with `train` settings, and the `echox train t2c`
    argv of a run into tmp_path/t2c."""
    _write_corpus(tmp_path / "c")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: tiny-random\ntrain: {{{train}}}\n")
    return tmp_path / "c", recipe, ["train", "t2c", "--recipe", str(recipe), "--data",
                                    str(tmp_path / "c" / "tts.jsonl"), "--out", str(tmp_path / "t2c")]


def _stages_one_and_two(tmp_path, train):
    """A tiny corpus in tmp_path/c, a recipe with `train` settings, and the s2t and t2c runs
    that Stage III starts from (tmp_path/s2t, tmp_path/t2c)."""
    _write_corpus(tmp_path / "c")
    c = tmp_path / "c"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: tiny-random\ntrain: {{{train}}}\n")
    assert main(["train", "s2t", "--recipe", str(recipe), "--data", str(c / "dialogues.jsonl"),
                 "--out", str(tmp_path / "s2t")]) == 0
    assert main(["train", "t2c", "--recipe", str(recipe), "--data", str(c / "tts.jsonl"),
                 "--out", str(tmp_path / "t2c")]) == 0
    return c, recipe


def test_three_stages_from_the_command_line(tmp_path, capsys):
    _write_corpus(tmp_path / "c")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-random\ntrain: {batch_size: 2, max_steps: 2, lr: 0.003}\n"
                      f"data: {{eval: {tmp_path / 'c' / 'dialogues.jsonl'}, eval_limit: 2}}\n")
    c = tmp_path / "c"
    assert main(["train", "s2t", "--recipe", str(recipe), "--data", str(c / "dialogues.jsonl"),
                 "--out", str(tmp_path / "s2t")]) == 0
    extra = c / "tts_extra.jsonl"  # a second TTS manifest (the recipe's extra sentences)
    extra.write_text((c / "tts.jsonl").read_text().replace('"id": "t', '"id": "x'))
    assert main(["train", "t2c", "--recipe", str(recipe), "--data", str(c / "tts.jsonl"), str(extra),
                 "--eval-data", str(c / "tts.jsonl"), "--out", str(tmp_path / "t2c"),
                 "--set", "train.keep_best=true"]) == 0
    assert (tmp_path / "t2c" / "best" / "best.json").is_file()
    for target, extra in (("pseudo", ["--pseudo-labels", "offline"]), ("gold-units", [])):
        out = tmp_path / f"echo-{target}"
        assert main(["train", "echo", "--recipe", str(recipe), "--data", str(c / "dialogues.jsonl"),
                     "--init", str(tmp_path / "s2t" / "model"), "--t2c-from", str(tmp_path / "t2c" / "model"),
                     "--target", target, "--out", str(out), "--set", "model.t2c.max_positions=64",
                     "--set", "train.cut_segments=false", *extra]) == 0
        assert (out / "model" / "model.safetensors").is_file()
    assert (tmp_path / "echo-pseudo" / "pseudo_labels.jsonl").is_file()
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    # on from an echo model that has its T2C: each such run (and resume) listed t2c once more
    again = tmp_path / "echo-again"
    assert main(["train", "echo", "--recipe", str(recipe), "--data", str(c / "dialogues.jsonl"),
                 "--init", str(tmp_path / "echo-pseudo" / "model"), "--t2c-from",
                 str(tmp_path / "t2c" / "model"), "--out", str(again), "--set", "model.t2c.max_positions=64",
                 "--set", "train.cut_segments=false", "--set", "train.max_steps=1"]) == 0
    capsys.readouterr()
    assert json.loads((again / "model" / "config.json").read_text())["trained_stages"] == ["s2t", "t2c", "echo"]
    # gold units missing from the eval dialogues: refused before any step (it failed at the
    # first evaluation, eval_every steps into the run, and named the wrong command)
    no_units = c / "no_units.jsonl"
    no_units.write_text("".join(json.dumps({**json.loads(x), "conversations": [
        {k: v for k, v in m.items() if k != "units"} for m in json.loads(x)["conversations"]]}) + "\n"
        for x in (c / "dialogues.jsonl").read_text().splitlines()[:3]))
    out = tmp_path / "echo-gold-eval"
    assert main(["train", "echo", "--recipe", str(recipe), "--data", str(c / "dialogues.jsonl"),
                 "--eval-data", str(no_units), "--init", str(tmp_path / "s2t" / "model"),
                 "--t2c-from", str(tmp_path / "t2c" / "model"), "--target", "gold-units",
                 "--out", str(out), "--set", "model.t2c.max_positions=64"]) == 2
    err = capsys.readouterr().err
    assert "--eval-data (data.eval): dialogue d0 (and 1 more)" in err and "echox units attach" in err, err  # eval_limit 2
    assert not (out / "checkpoints").exists()
    # gold units of another k-means: refused before any step, naming the dialogue
    far = c / "far_units.jsonl"
    rows = [json.loads(x) for x in (c / "dialogues.jsonl").read_text().splitlines()[:6]]
    rows[1]["conversations"][1]["units"] = [3, 4, 777]
    far.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["train", "echo", "--recipe", str(recipe), "--data", str(far),
                 "--init", str(tmp_path / "s2t" / "model"), "--t2c-from", str(tmp_path / "t2c" / "model"),
                 "--target", "gold-units", "--out", str(out), "--set", "model.t2c.max_positions=64"]) == 2
    err = capsys.readouterr().err
    assert "dialogue d1 has the unit 777, outside [0, 50) of the echo decoder" in err, err
    assert not (out / "checkpoints").exists()
    assert lines[1]["train_examples"] == 12  # both TTS manifests
    assert [r["stage"] for r in lines] == ["s2t", "t2c", "echo", "echo"]
    assert all(r["steps"] == 2 for r in lines)


def test_missing_stage_inputs_name_the_command_that_makes_them(tmp_path, capsys):
    """docs/training.md: a stage whose inputs are missing says what to run first (a missing
    manifest or unit language said only "not found")."""
    _write_corpus(tmp_path / "c")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-random\n")
    assert main(["train", "s2t", "--recipe", str(recipe), "--data", str(tmp_path / "no.jsonl"),
                 "--out", str(tmp_path / "s2t")]) == 2
    err = capsys.readouterr().err
    assert "--data " in err and "no such file" in err and "echox data build-tiny" in err, err
    assert main(["train", "t2c", "--recipe", str(recipe), "--data", str(tmp_path / "c" / "tts.jsonl"),
                 "--set", f"data.unit_language={tmp_path / 'lang'}", "--out", str(tmp_path / "t2c")]) == 2
    err = capsys.readouterr().err
    assert "data.unit_language" in err and "echox units train-language" in err, err
    assert main(["train", "t2c", "--recipe", str(recipe), "--data", str(tmp_path / "c" / "dialogues.jsonl"),
                 "--out", str(tmp_path / "t2c")]) == 2  # the wrong kind of manifest
    err = capsys.readouterr().err
    assert "a dialogues manifest; Stage II (t2c) trains on TTS manifests" in err, err


def test_train_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "echo", "--data", "x.jsonl", "--set", "model.seed=1"]) == 2
    assert "needs --init" in capsys.readouterr().err
    assert main(["train", "s2t", "--recipe", str(tmp_path / "missing.yaml")]) == 2
    assert "recipe not found" in capsys.readouterr().err
    assert main(["train", "s2t", "--set", "train.nonsense=1", "--data", "x"]) == 2
    assert "unknown key" in capsys.readouterr().err
    deep = tmp_path / "deep.yaml"  # a RecursionError of some 3,000 lines
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert main(["train", "s2t", "--recipe", str(deep)]) == 2
    assert "nested too deeply" in capsys.readouterr().err
    assert main(["train", "s2t", "--recipe", str(tmp_path / ("a" * 300 + ".yaml"))]) == 2  # ENAMETOOLONG
    err = capsys.readouterr().err
    assert "file name too long" in err and len(err.splitlines()) == 1, err
    import warnings  # the handler's local once replaced warnings.formatwarning with a string

    assert callable(warnings.formatwarning)
    with pytest.raises(SystemExit):  # 10**5 threads: a MemoryError
        main(["train", "s2t", "--threads", "100000"])
    assert "must be <= 1024" in capsys.readouterr().err
    assert main(["train", "s2t", "--set", "train.threads=100000", "--data", "x"]) == 2
    assert "train.threads: must be <= 1024" in capsys.readouterr().err
    _write_corpus(tmp_path / "c")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-random\ntrain: {batch_size: 2, max_steps: 1}\n")
    for bad, says in (("model.seed=99999999999999999999", "seed: must be in [0, 2**32)"),
                      ("model.adapter.num_heads=7", "does not divide the LLM width"),
                      ("model.encoder.window_seconds=1e9", "encoder positions")):  # ValueErrors
        assert main(["train", "s2t", "--recipe", str(recipe), "--set", bad, "--data",
                     str(tmp_path / "c" / "dialogues.jsonl"), "--out", str(tmp_path / "o")]) == 2, bad
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, (bad, err)


def test_t2c_with_char_condition_trains_from_the_command_line(tmp_path, capsys):
    """Stage II counts each pair's row before training (to leave out pairs longer than the
    T2C): with `t2c.char_condition` that reads token bytes, which must be set up by then."""
    c, recipe, argv = _t2c_run(tmp_path, "batch_size: 2, max_steps: 1")
    assert main(argv + ["--set", "model.t2c.char_condition=true"]) == 0, capsys.readouterr().err
    assert (tmp_path / "t2c" / "model" / "model.safetensors").is_file()


def test_echo_with_a_frozen_s2t_model_trains_only_the_speech_side(tmp_path, capsys):
    """`--set train.freeze_s2t=true`: the adapter and LoRA stay as Stage I left them, the
    response states are cached in the run folder, and the echo decoder learns."""
    from safetensors.torch import load_file

    c, recipe = _stages_one_and_two(tmp_path, "batch_size: 2, max_steps: 2, lr: 0.003")
    out = tmp_path / "echo"
    assert main(["train", "echo", "--recipe", str(recipe), "--data", str(c / "dialogues.jsonl"),
                 "--init", str(tmp_path / "s2t" / "model"), "--t2c-from", str(tmp_path / "t2c" / "model"),
                 "--target", "gold-units", "--out", str(out), "--set", "model.t2c.max_positions=64",
                 "--set", "train.freeze_s2t=true", "--set", "train.cut_segments=false"]) == 0
    before, after = load_file(str(tmp_path / "s2t" / "model" / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))
    s2t_keys = [k for k in before if k.startswith("adapter.") or "lora_" in k]
    echo_keys = [k for k in after if k.startswith("echo.")]
    assert s2t_keys and echo_keys
    assert all(torch.equal(before[k], after[k]) for k in s2t_keys)
    t2c = load_file(str(tmp_path / "t2c" / "model" / "model.safetensors"))
    assert any(not torch.equal(after[k], t2c[k.replace("echo.", "t2c.", 1)]) for k in echo_keys)
    assert len(list((out / "states").rglob("*.safetensors"))) == 6
    assert main(["train", "s2t", "--data", "x", "--set", "train.freeze_s2t=true"]) == 2
    assert "freeze_s2t" in capsys.readouterr().err


def test_a_run_folder_is_never_overwritten_and_bad_eval_data_keeps_the_model(tmp_path, capsys):
    """A second run into a folder with checkpoints needs --resume (else its steps would be
    replaced or mixed); bad eval data is refused before the first step; too little
    data and an --out that is a file are one line each."""
    c, recipe, run = _t2c_run(tmp_path, "batch_size: 2, max_steps: 2, lr: 0.003")
    assert main(run) == 0
    ckpts = sorted(p.name for p in (tmp_path / "t2c" / "checkpoints").iterdir())
    before = (tmp_path / "t2c" / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main([*run, "--set", "train.lr=0.0001"]) == 2
    err = capsys.readouterr().err
    assert "holds the checkpoints of an earlier run" in err and "--resume" in err
    assert sorted(p.name for p in (tmp_path / "t2c" / "checkpoints").iterdir()) == ckpts
    assert (tmp_path / "t2c" / "model" / "model.safetensors").read_bytes() == before
    assert main([*run, "--resume"]) == 0  # continuing it is fine
    for ck in (tmp_path / "t2c" / "checkpoints").iterdir():  # every checkpoint broken
        (ck / "checksums.json").unlink()
    capsys.readouterr()
    assert main([*run, "--resume"]) == 2
    assert "is complete" in capsys.readouterr().err
    bad_eval = c / "bad_eval.jsonl"  # units past the model's 50
    bad_eval.write_text(json.dumps({"id": "e", "text": "hi", "units": [1, 2, 999]}) + "\n")
    out = tmp_path / "t2c-eval"
    assert main(["train", "t2c", "--recipe", str(recipe), "--data", str(c / "tts.jsonl"),
                 "--eval-data", str(bad_eval), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("echox: error: ") and "TTS record e: unit 999 is outside" in err
    assert not (out / "checkpoints").exists()  # refused before the first step, not at the end
    assert main(["train", "t2c", "--recipe", str(recipe), "--data", str(c / "tts.jsonl"),
                 "--set", "train.batch_size=100", "--out", str(tmp_path / "big")]) == 2
    assert "fewer than one global batch" in capsys.readouterr().err
    (tmp_path / "afile").write_text("keep")
    assert main([*run[:-1], str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "afile").read_text() == "keep"


def _one_error_line(capsys):
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("echox: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_loss_that_is_not_finite_stops_the_run_and_saves_nothing(tmp_path, capsys):
    """A learning rate far too high makes the loss overflow after the first step: the run
    stops with one line before it saves anything, instead of writing a model of NaN weights
    and exiting 0. (Audio loud enough to do it, samples of 1e30, is now refused when read.)"""
    _write_corpus(tmp_path / "c")
    c = tmp_path / "c"
    sf.write(c / "audio" / "loud.wav", np.full(16000, 1e30, np.float32), 16000, subtype="FLOAT")
    recs = [json.loads(x) for x in (c / "dialogues.jsonl").read_text().splitlines()[:6]]
    (c / "six.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    recs[0]["conversations"][0]["audio"] = "audio/loud.wav"
    (c / "loud.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "s2t"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-random\ntrain: {batch_size: 6, max_steps: 3, lr: 0.003, save_every: 1}\n")
    assert main(["train", "s2t", "--recipe", str(recipe), "--data", str(c / "loud.jsonl"),
                 "--out", str(out)]) == 2
    assert "far outside the [-1, 1] of float audio" in _one_error_line(capsys)
    recipe.write_text("model: tiny-random\ntrain: {batch_size: 6, max_steps: 3, lr: 1.0e+30, "
                      "warmup_steps: 0, max_grad_norm: 0, save_every: 1}\n")
    assert main(["train", "s2t", "--recipe", str(recipe), "--data", str(c / "six.jsonl"),
                 "--out", str(out)]) == 2
    assert "the training loss is" in _one_error_line(capsys)
    # the finite first step was saved; nothing of the step whose loss overflowed
    assert not (out / "model").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]


def test_resume_survives_a_damaged_last_checkpoint_and_refuses_another_stage(tmp_path, capsys):
    """The last checkpoint's RNG file (written after its checksums) cut by a kill, or its
    config.json damaged: --resume goes on (from it, or from the one before, whose step folder
    is then written anew). A checkpoint of another stage is one line, not a traceback."""
    c, recipe, run = _t2c_run(tmp_path, "batch_size: 2, max_steps: 4, lr: 0.003, save_every: 1, "
                                        "keep_last: 3")
    ck = tmp_path / "t2c" / "checkpoints"
    assert main([*run, "--stop-at", "3"]) == 0
    (ck / "step-000003" / "rng_state_0.pt").write_bytes(b"garbage")
    assert main([*run, "--resume", "--stop-at", "3"]) == 0  # from step 3, without its RNG
    (ck / "step-000003" / "config.json").write_text("{garb")
    assert main([*run, "--resume"]) == 0  # from step 2; step 3 is written again
    from echox.model.checkpoint import verify_checkpoint

    verify_checkpoint(ck / "step-000003")
    steps = [json.loads(x)["step"] for x in (tmp_path / "t2c" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert main(["train", "s2t", "--recipe", str(recipe), "--data", str(c / "dialogues.jsonl"),
                 "--out", str(tmp_path / "s2t"), "--resume", str(ck / "step-000002")]) == 2
    assert "checkpoint of stage t2c" in _one_error_line(capsys)
    # a trainer state that its checksums vouch for but no run wrote: one line, not a
    # RuntimeError / AttributeError / OverflowError / IndexError traceback
    import shutil

    from echox.model.checkpoint import CHECKSUMS, sha256_file

    good = torch.load(ck / "step-000002" / "trainer_state.pt", weights_only=False)
    for i, bad in enumerate((b"garbage", {**good, "train_config": "t2c"}, {**good, "step": float("inf")},
                             {**good, "index": -3}, {**good, "epoch": 10**30}, [1, 2])):
        folder = tmp_path / f"bad{i}"
        shutil.copytree(ck / "step-000002", folder)
        state = folder / "trainer_state.pt"
        state.write_bytes(bad) if isinstance(bad, bytes) else torch.save(bad, state)
        sums = json.loads((folder / CHECKSUMS).read_text())
        sums["trainer_state.pt"] = sha256_file(state)
        (folder / CHECKSUMS).write_text(json.dumps(sums))
        assert main([*run[:-1], str(tmp_path / f"run{i}"), "--resume", str(folder)]) == 2, bad
        assert "cannot resume" in _one_error_line(capsys), bad


def test_the_unit_language_a_decoder_learned_is_recorded_and_checked(tmp_path, capsys):
    """Nothing recorded which unit language a T2C was trained on: a run that went on from it
    (Stage III's gold units, a Stage II continuation) without `data.unit_language`, or with
    another one, trained on raw unit ids or on another language's ids without a word, and a
    bundle could pair the decoder with any language."""
    from echox.infer.bundle import Bundle, check_bundle
    from echox.model.echox import EchoX
    from echox.units.language import UnitLanguage

    c, _, run = _t2c_run(tmp_path, "batch_size: 2, max_steps: 1, lr: 0.003")
    recipe = tmp_path / "r60.yaml"  # room for 10 merged tokens over the 50 units
    recipe.write_text("model: tiny-random\noverrides: [t2c.unit_vocab_size=60]\n"
                      "train: {batch_size: 2, max_steps: 1, lr: 0.003}\n")
    rng = np.random.default_rng(0)
    motifs = [rng.integers(0, 50, size=3).tolist() for _ in range(8)]
    seqs = [[u for j in rng.integers(0, 8, size=5) for u in motifs[j]] for _ in range(100)]
    lang, other = UnitLanguage.train(seqs, num_units=50, vocab_size=60), UnitLanguage.identity(50)
    lang.save(tmp_path / "lang")
    other.save(tmp_path / "other")
    assert lang.fingerprint == UnitLanguage.load(tmp_path / "lang").fingerprint != other.fingerprint
    i = run.index("--recipe") + 1
    first = [*run[:i], str(recipe), *run[i + 1:]]
    assert main([*first, "--set", f"data.unit_language={tmp_path / 'lang'}"]) == 0
    model = tmp_path / "t2c" / "model"
    assert json.loads((model / "config.json").read_text())["config"]["t2c"]["unit_language"] == lang.fingerprint
    on = [*run[:i], str(recipe), *run[i + 1:-1], str(tmp_path / "t2c-on"), "--init", str(model)]
    assert main(on) == 2
    assert "no data.unit_language is given" in _one_error_line(capsys)
    assert main([*on, "--set", f"data.unit_language={tmp_path / 'other'}"]) == 2
    assert "is not the unit language the model's T2C was trained on" in _one_error_line(capsys)
    assert main([*on, "--set", f"data.unit_language={tmp_path / 'lang'}"]) == 0
    # Stage III takes the language from the --t2c-from T2C (its --init S2T model has none)
    assert main(["train", "s2t", "--recipe", str(recipe), "--data", str(c / "dialogues.jsonl"),
                 "--out", str(tmp_path / "s2t")]) == 0
    echo = ["train", "echo", "--recipe", str(recipe), "--data", str(c / "dialogues.jsonl"),
            "--init", str(tmp_path / "s2t" / "model"), "--t2c-from", str(model),
            "--set", "train.cut_segments=false"]
    gold = [*echo, "--target", "gold-units", "--out", str(tmp_path / "gold")]
    assert main(gold) == 2
    assert "no data.unit_language is given" in _one_error_line(capsys)
    assert main([*gold, "--set", f"data.unit_language={tmp_path / 'other'}"]) == 2
    assert "is not the unit language" in _one_error_line(capsys)
    pseudo = [*echo, "--pseudo-labels", "offline", "--out", str(tmp_path / "echo"), "--max-steps", "2"]
    assert main([*pseudo, "--stop-at", "1"]) == 0  # its labels are the T2C's own tokens: no language needed
    assert main(["train", "echo", "--out", str(tmp_path / "echo"), "--resume"]) == 0  # as it was started
    echo_cfg = json.loads((tmp_path / "echo" / "model" / "config.json").read_text())["config"]
    assert echo_cfg["t2c"]["unit_language"] == lang.fingerprint
    trained = EchoX.from_pretrained(model)
    check_bundle(Bundle(trained, None, lang))
    for wrong in (None, other):
        with pytest.raises(CheckpointError, match="unit language"):
            check_bundle(Bundle(trained, None, wrong))


def test_stage_three_refuses_too_little_data_before_its_precompute(tmp_path, capsys):
    """Stage III computed every dialogue's states and pseudo-labels (20 minutes on the tiny
    corpus) and only then found the data smaller than one batch."""
    c, recipe = _stages_one_and_two(tmp_path, "batch_size: 2, max_steps: 1, lr: 0.003")
    capsys.readouterr()
    out = tmp_path / "echo"
    assert main(["train", "echo", "--recipe", str(recipe), "--data", str(c / "dialogues.jsonl"),
                 "--init", str(tmp_path / "s2t" / "model"), "--t2c-from", str(tmp_path / "t2c" / "model"),
                 "--pseudo-labels", "offline", "--batch-size", "16", "--out", str(out),
                 "--set", "train.freeze_s2t=true"]) == 2
    assert "6 examples are fewer than one global batch (16 x 1 processes)" in _one_error_line(capsys)
    assert not (out / "states").exists() and not (out / "pseudo_labels.jsonl").exists()


def test_a_refused_resume_leaves_the_run_record_as_it_was(tmp_path, capsys):
    """recipe.json was written before the checkpoint was read: a resume refused (another
    stage, a changed model) still recorded the refused settings as the run's."""
    c, recipe, run = _t2c_run(tmp_path, "batch_size: 2, max_steps: 3, lr: 0.003, save_every: 1")
    assert main([*run, "--stop-at", "2"]) == 0
    record = (tmp_path / "t2c" / "recipe.json").read_text()
    assert main(["train", "s2t", "--recipe", str(recipe), "--data", str(c / "dialogues.jsonl"),
                 "--out", str(tmp_path / "t2c"), "--resume"]) == 2
    assert "checkpoint of stage t2c" in _one_error_line(capsys)
    assert main([*run, "--resume", "--set", "model.t2c.intermediate_size=48", "--max-steps", "50"]) == 2
    _one_error_line(capsys)
    assert (tmp_path / "t2c" / "recipe.json").read_text() == record


def test_resume_without_a_recipe_goes_on_with_the_runs_own(tmp_path, capsys, monkeypatch):
    """--resume without --recipe built the default model (`tiny`), then failed on a checkpoint
    that "does not fit", and recorded `model: tiny` as the run's. A preset name stays a name
    where the run's folder holds a folder of that name (data/tiny beside the recipes)."""
    _, _, run = _t2c_run(tmp_path, "batch_size: 2, max_steps: 3, lr: 0.003, save_every: 1")
    (tmp_path / "tiny-random").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main([*run, "--stop-at", "2"]) == 0
    capsys.readouterr()
    i = run.index("--recipe")
    assert main([*run[:i], *run[i + 2:], "--resume"]) == 0
    assert "the run's own recipe" in capsys.readouterr().err
    recipe = json.loads((tmp_path / "t2c" / "recipe.json").read_text())
    assert recipe["model"] == "tiny-random" and recipe["train"]["max_steps"] == 3
    steps = [json.loads(x)["step"] for x in (tmp_path / "t2c" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    # a mistyped --out was told to "give training data"
    assert main(["train", "t2c", "--out", str(tmp_path / "t2x"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "t2x holds no run to resume (no recipe.json and no checkpoints" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "t2x").exists()


def test_resume_from_another_folder_reads_relative_paths_from_where_the_run_ran(
        tmp_path, monkeypatch, caplog):
    """A run started with relative paths and resumed from another folder (the same file,
    spelled from there) was said to go on "with other data"; resumed without --recipe, its
    recorded relative paths (data, the model YAML) were read from the new folder."""
    _write_corpus(tmp_path / "c")
    (tmp_path / "c" / "m.yaml").write_text("preset: tiny-random\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m.yaml\ntrain: {batch_size: 2, max_steps: 4, lr: 0.003, save_every: 1}\n")
    monkeypatch.chdir(tmp_path / "c")
    assert main(["train", "t2c", "--recipe", str(recipe), "--data", "tts.jsonl", "--out",
                 str(tmp_path / "t2c"), "--stop-at", "1"]) == 0
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING"):
        assert main(["train", "t2c", "--out", "t2c", "--resume", "--stop-at", "2"]) == 0  # its own recipe
    assert "other data" not in " ".join(r.getMessage() for r in caplog.records)
    record = tmp_path / "t2c" / "recipe.json"  # as a run of another version wrote it
    was = json.loads(record.read_text())
    record.write_text(json.dumps({**was, "train": {**was["train"], "gone_setting": 1}}))
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["train", "t2c", "--out", "t2c", "--resume", "--stop-at", "3"]) == 0
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "other data" not in msg and "settings this version does not have" in msg and "gone_setting" in msg
    monkeypatch.chdir(tmp_path / "c")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["train", "t2c", "--recipe", str(recipe), "--data", "./tts.jsonl", "--out", "../t2c",
                     "--resume"]) == 0
    assert "other data" not in " ".join(r.getMessage() for r in caplog.records)
    steps = [json.loads(x)["step"] for x in (tmp_path / "t2c" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]

def test_resume_names_settings_that_differ_from_the_checkpoint(tmp_path, caplog):
    """A resumed run given another lr keeps the checkpoint's (its optimizer holds it): said in
    a warning, with the other changed settings."""
    _, _, run = _t2c_run(tmp_path, "batch_size: 2, max_steps: 3, lr: 0.003, save_every: 1")
    assert main([*run, "--stop-at", "2"]) == 0
    with caplog.at_level("WARNING"):
        assert main([*run, "--resume", "--lr", "0.1", "--max-steps", "4"]) == 0
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "max_steps 3 -> 4" in msg and "lr 0.003 -> 0.1" in msg and "stay the checkpoint's" in msg
    recorded = json.loads((tmp_path / "t2c" / "recipe.json").read_text())["train"]
    assert recorded["lr"] == 0.003 and recorded["max_steps"] == 4  # what the run goes on with


def test_resume_on_other_data_is_said_and_the_old_data_stays_on_record(tmp_path, caplog):
    """--resume with another --data went on without a word, and recipe.json then named only
    the new manifest: what the first steps trained on was lost."""
    c, _, run = _t2c_run(tmp_path, "batch_size: 2, max_steps: 4, lr: 0.003, save_every: 1")
    assert main([*run, "--stop-at", "1"]) == 0
    i = run.index("--data") + 1
    with caplog.at_level("WARNING"):  # the same file, spelled otherwise: nothing to say
        assert main([*run[:i], f"{c}/./tts.jsonl", *run[i + 1:], "--resume", "--stop-at", "2"]) == 0
    assert "other data" not in " ".join(r.getMessage() for r in caplog.records)
    caplog.clear()
    more = c / "tts_more.jsonl"
    more.write_text((c / "tts.jsonl").read_text() * 2)
    with caplog.at_level("WARNING"):
        assert main([*run[:i], str(more), *run[i + 1:], "--resume"]) == 0
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "--resume with other data than this run's" in msg and "tts_more.jsonl" in msg, msg
    recipe = json.loads((tmp_path / "t2c" / "recipe.json").read_text())
    assert recipe["data"]["train"].endswith("tts_more.jsonl")
    assert recipe["data_before"][0]["train"].endswith("tts.jsonl")


def test_an_out_folder_taken_by_other_files_is_refused_before_training(tmp_path, capsys):
    """What a run writes in --out must not be taken by something else: refused up front with
    one line (not a traceback, or an error after training), and nothing there is touched. The
    metrics of an earlier run there that saved no checkpoint are not mixed into the new run's."""
    _write_corpus(tmp_path / "c")
    c = tmp_path / "c"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-random\ntrain: {batch_size: 2, max_steps: 2, lr: 0.003}\n")
    cases = {"metrics.jsonl/": "is a folder", "tb": "is a file", "checkpoints": "is a file",
             "model/mine.txt": "holds other files", "recipe.json": "not written by `echox train`",
             "loss_curve.png/": "is a folder", "states": "is a file", "pseudo_labels.jsonl/": "is a folder",
             "metrics.jsonl": "metrics.jsonl was not written by `echox train`",  # was emptied
             "loss_curve.png": "loss_curve.png was not written by `echox train`"}  # was replaced
    for i, (path, message) in enumerate(cases.items()):
        out = tmp_path / f"o{i}"
        p = out / path.rstrip("/")
        if path.endswith("/"):
            p.mkdir(parents=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("keep")
        assert main(["train", "t2c", "--recipe", str(recipe), "--data", str(c / "tts.jsonl"),
                     "--out", str(out)]) == 2, path
        assert message in _one_error_line(capsys), path
        assert set(out.rglob("*")) == {x for x in (p.parent, p) if x != out}, path
        assert p.is_dir() or p.read_text() == "keep"
    out = tmp_path / "killed"  # a run killed before its first checkpoint left these rows
    out.mkdir()
    (out / "recipe.json").write_text('{"train": {"max_steps": 2}}')  # written before training
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n{"step": 3, "lo')
    assert main(["train", "t2c", "--recipe", str(recipe), "--data", str(c / "tts.jsonl"),
                 "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] != 5.0
    # an --out whose model/ is the --init model: the run's save replaced the model it started from
    before = (out / "model" / "model.safetensors").read_bytes()
    assert main(["train", "t2c", "--recipe", str(recipe), "--data", str(c / "tts.jsonl"),
                 "--init", str(out / "model"), "--out", str(out), "--resume"]) == 2
    assert "is the --init model" in _one_error_line(capsys)
    assert (out / "model" / "model.safetensors").read_bytes() == before


@pytest.fixture
def sigterm_guard():
    """A SIGTERM that `echox train` leaves unhandled fails the test instead of killing pytest."""
    def unhandled(signum, frame):
        raise AssertionError("SIGTERM reached the test: echox train did not handle it")

    before = signal.signal(signal.SIGTERM, unhandled)
    yield
    signal.signal(signal.SIGTERM, before)


def _echox_lines(capsys):
    return [x for x in capsys.readouterr().err.splitlines() if x.startswith("echox")]


def test_sigterm_stops_between_steps_with_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch,
                                                                      sigterm_guard):
    """SIGTERM killed a run with exit status 143 and no word on where it stood."""
    _, _, run = _t2c_run(tmp_path, "batch_size: 2, max_steps: 5, lr: 0.003, save_every: 2")
    log = Trainer._log

    def kill_at_step_3(self, rec):
        log(self, rec)
        if rec["step"] == 3 and "loss" in rec:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "_log", kill_at_step_3)
    assert main(run) == 143
    assert _echox_lines(capsys) == ["echox train: stopped by SIGTERM at step 3; the last checkpoint "
                                    "is step 3: resume with --resume"]
    out = tmp_path / "t2c"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert not (out / "model").exists()
    monkeypatch.undo()
    assert main([*run, "--resume"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


@pytest.fixture
def sigint_default():
    """Ctrl-C as a terminal delivers it: a job started in the background (`cmd &`, as CI may
    be) inherits SIGINT ignored, and `echox train` rightly leaves an ignored signal alone."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_sigint_during_a_save_lets_it_finish(tmp_path, capsys, monkeypatch, sigint_default):
    """Ctrl-C while a checkpoint is written: the save completes (its RNG file too), the run
    stops there with one line and status 130, and that checkpoint is the one to resume."""
    from echox.model.checkpoint import verify_checkpoint
    from echox.model.echox import EchoX

    _, _, run = _t2c_run(tmp_path, "batch_size: 2, max_steps: 6, lr: 0.003, save_every: 2")
    save = EchoX.save_pretrained

    def interrupted_save(self, folder, *args, extra_writer=None, **kw):
        def writer(tmp):
            if folder.name == "step-000004":
                os.kill(os.getpid(), signal.SIGINT)
            extra_writer(tmp)
        return save(self, folder, *args, extra_writer=writer if extra_writer else None, **kw)

    monkeypatch.setattr(EchoX, "save_pretrained", interrupted_save)
    assert main(run) == 130
    assert _echox_lines(capsys) == ["echox train: stopped by SIGINT at step 4; the last checkpoint "
                                    "is step 4: resume with --resume"]
    ck = tmp_path / "t2c" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-000002", "step-000004"]
    verify_checkpoint(ck / "step-000004")
    assert (ck / "step-000004" / "rng_state_0.pt").is_file()


def test_sigterm_before_training_began_is_one_line(tmp_path, capsys, monkeypatch, sigterm_guard):
    from echox.train import run as run_mod

    _, _, run = _t2c_run(tmp_path, "batch_size: 2, max_steps: 2, lr: 0.003")
    build = run_mod.build_data

    def killed_while_reading(*args, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return build(*args, **kw)

    monkeypatch.setattr(run_mod, "build_data", killed_while_reading)
    assert main(run) == 143
    assert _echox_lines(capsys) == ["echox: stopped by SIGTERM"]


def test_a_save_cut_by_a_kill_is_cleared_by_the_next_run(tmp_path, capsys):
    """A kill midway through a save leaves its scratch folder (`atomic_dir`'s
    `.step-000003.tmp-<pid>`): the resumed run removes it, and what a save had moved aside."""
    _, _, run = _t2c_run(tmp_path, "batch_size: 2, max_steps: 3, lr: 0.003, save_every: 1")
    assert main([*run, "--stop-at", "2"]) == 0
    out = tmp_path / "t2c"
    for leftover in (out / "checkpoints" / ".step-000003.tmp-999999", out / ".model.tmp-999999",
                     out / "checkpoints" / ".step-000002.old-999999"):
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"half")
    assert main([*run, "--resume"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".lock"]  # the run lock's


def test_a_resume_given_another_init_keeps_the_runs_own_on_record(tmp_path, capsys, caplog):
    """--resume with another --init went on from the checkpoint (rightly) but recorded the new
    --init as where the run started, without a word."""
    import shutil

    _, _, run = _t2c_run(tmp_path, "batch_size: 2, max_steps: 2, lr: 0.003, save_every: 1")
    assert main([*run, "--set", "train.max_steps=1"]) == 0
    first = tmp_path / "t2c" / "model"
    other = shutil.copytree(first, tmp_path / "other")
    cont = [a if a != str(tmp_path / "t2c") else str(tmp_path / "cont") for a in run]
    assert main([*cont, "--init", str(first), "--stop-at", "1"]) == 0
    with caplog.at_level("WARNING"):
        assert main([*cont, "--init", str(other), "--resume"]) == 0
    assert "the run started from --init" in caplog.text and "is not used" in caplog.text
    assert json.loads((tmp_path / "cont" / "recipe.json").read_text())["init"] == str(first)


def test_a_run_started_from_a_slim_export_resumes(tmp_path, capsys):
    """A T2C run whose --init is a slim export (its config names the parts its weights leave
    out) saves checkpoints without them too; --resume read such a checkpoint as if it held
    every part and refused it: "does not fit the model of its config: missing adapter...".
    """
    _, _, run = _t2c_run(tmp_path, "batch_size: 2, max_steps: 2, lr: 0.003, save_every: 1")
    assert main([*run, "--set", "train.max_steps=1"]) == 0
    slim = tmp_path / "slim"
    assert main(["train", "export", "--model", str(tmp_path / "t2c" / "model"),
                 "--out", str(slim)]) == 0
    assert "adapter" in json.loads((slim / "config.json").read_text())["omitted_parts"]
    cont = [a if a != str(tmp_path / "t2c") else str(tmp_path / "cont") for a in run]
    assert main([*cont, "--init", str(slim), "--stop-at", "1"]) == 0
    capsys.readouterr()
    assert main([*cont, "--init", str(slim), "--resume"]) == 0, capsys.readouterr().err
    state = torch.load(tmp_path / "cont" / "checkpoints" / "step-000002" / "trainer_state.pt",
                       weights_only=False)
    assert state["step"] == 2


def test_a_stage_from_a_slim_export_that_left_out_its_parts_trains_and_keeps_them(tmp_path,
                                                                                 capsys):
    """A slim export leaves out the parts its stages never trained. A later stage that trains
    one of them kept it on the "left out" list: an echo run from a Stage I export failed at its
    first save ("cannot omit the echo decoder..."), after its steps; a T2C run from one
    exited 0 with no T2C in its model."""
    c, recipe = _stages_one_and_two(tmp_path, "batch_size: 2, max_steps: 2, lr: 0.003")
    slim = tmp_path / "s2t-slim"
    assert main(["train", "export", "--model", str(tmp_path / "s2t" / "model"),
                 "--out", str(slim)]) == 0
    assert {"t2c", "echo"} <= set(json.loads((slim / "config.json").read_text())["omitted_parts"])
    common = ["--recipe", str(recipe), "--set", "train.cut_segments=false"]
    assert main(["train", "echo", *common, "--data", str(c / "dialogues.jsonl"), "--init",
                 str(slim), "--t2c-from", str(tmp_path / "t2c" / "model"),
                 "--out", str(tmp_path / "echo")]) == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "echo" / "model" / "config.json").read_text())
    assert not {"echo", "denoiser"} & set(meta.get("omitted_parts") or [])
    assert main(["train", "t2c", "--recipe", str(recipe), "--data", str(c / "tts.jsonl"),
                 "--init", str(slim), "--out", str(tmp_path / "t2c2")]) == 0
    meta = json.loads((tmp_path / "t2c2" / "model" / "config.json").read_text())
    assert "t2c" in meta["trained_stages"] and "t2c" not in (meta.get("omitted_parts") or [])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "t2c2" / "model" / "model.safetensors"), "pt") as f:
        assert any(k.startswith("t2c.") for k in f.keys())


def test_echo_takes_a_t2c_of_another_unit_vocabulary_when_no_echo_was_trained(tmp_path, capsys):
    """A Stage I model of a unit-language recipe (2,000 tokens) and a T2C over the raw units
    (500): --t2c-from refused it ("differs in unit_vocab_size"), though the echo decoder that
    starts from the T2C had never been trained. A trained echo decoder must still fit."""
    c, recipe = _stages_one_and_two(tmp_path, "batch_size: 2, max_steps: 2, lr: 0.003")
    assert main(["train", "t2c", "--recipe", str(recipe), "--data", str(c / "tts.jsonl"),
                 "--set", "model.t2c.unit_vocab_size=60", "--out", str(tmp_path / "t2c60")]) == 0
    echo = ["train", "echo", "--recipe", str(recipe), "--data", str(c / "dialogues.jsonl"),
            "--set", "train.cut_segments=false", "--t2c-from", str(tmp_path / "t2c60" / "model")]
    assert main([*echo, "--init", str(tmp_path / "s2t" / "model"),
                 "--out", str(tmp_path / "echo60")]) == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "echo60" / "model" / "config.json").read_text())
    assert meta["config"]["t2c"]["unit_vocab_size"] == 60
    # an echo model (50 units) continued on the 60-unit T2C: refused
    assert main(["train", "echo", "--recipe", str(recipe), "--data", str(c / "dialogues.jsonl"),
                 "--set", "train.cut_segments=false", "--init", str(tmp_path / "s2t" / "model"),
                 "--t2c-from", str(tmp_path / "t2c" / "model"), "--out", str(tmp_path / "e50")]) == 0
    capsys.readouterr()
    assert main([*echo, "--init", str(tmp_path / "e50" / "model"), "--out", str(tmp_path / "x")]) == 2
    assert "differs from the model's in ['unit_vocab_size']" in _one_error_line(capsys)


def test_a_checkpoint_without_a_part_its_stage_trains_is_not_resumed(tmp_path, capsys,
                                                                       monkeypatch):
    """Checkpoints an older echox saved without the T2C of a T2C run (from a Stage I export)
    resumed with a T2C of random weights, without a word."""
    from echox.train import stages

    c, recipe = _stages_one_and_two(tmp_path, "batch_size: 2, max_steps: 2, lr: 0.003")
    slim = tmp_path / "s2t-slim"
    assert main(["train", "export", "--model", str(tmp_path / "s2t" / "model"),
                 "--out", str(slim)]) == 0
    run = ["train", "t2c", "--recipe", str(recipe), "--data", str(c / "tts.jsonl"), "--init",
           str(slim), "--out", str(tmp_path / "old"), "--set", "train.save_every=1"]
    apply = stages.apply_stage

    def as_before(model, stage, freeze_s2t=False):  # the omitted parts kept, as before the fix
        kept = model.omitted_parts
        apply(model, stage, freeze_s2t)
        model.omitted_parts = kept

    with monkeypatch.context() as m:
        m.setattr(stages, "apply_stage", as_before)
        assert main([*run, "--stop-at", "1"]) == 0
    capsys.readouterr()
    assert main([*run, "--resume"]) == 2
    assert "leaves out the t2c weights this stage trains" in _one_error_line(capsys)


def test_a_resume_with_its_recipe_keeps_the_runs_recorded_init(tmp_path, capsys, caplog):
    """--resume with --recipe but without repeating --init built the recipe's model, loaded the
    checkpoint into it where the shapes fit (adapter.shrink changed midway, without a word)
    and recorded the run as started from nothing."""
    _, recipe, run = _t2c_run(tmp_path, "batch_size: 2, max_steps: 2, lr: 0.003, save_every: 1")
    c = tmp_path / "c"
    assert main(["train", "s2t", "--recipe", str(recipe), "--data", str(c / "dialogues.jsonl"),
                 "--out", str(tmp_path / "s2t")]) == 0
    s2t = ["train", "s2t", "--recipe", str(recipe), "--data", str(c / "dialogues.jsonl"),
           "--set", "train.max_steps=3", "--out", str(tmp_path / "cont")]
    assert main([*s2t, "--init", str(tmp_path / "s2t" / "model"),
                 "--set", "model.adapter.shrink=false", "--stop-at", "1"]) == 0
    capsys.readouterr()
    assert main([*s2t, "--resume", "--stop-at", "2"]) == 0
    err = capsys.readouterr().err
    assert "the run's own starting points" in err and "model.adapter.shrink=false" in err
    with caplog.at_level("WARNING"):  # a --stop-at already passed trained nothing, silently
        assert main([*s2t, "--resume", "--stop-at", "1"]) == 0
    assert "--stop-at 1: the run is already at step 2; nothing is trained" in caplog.text
    step2 = tmp_path / "cont" / "checkpoints" / "step-000002" / "config.json"
    assert json.loads(step2.read_text())["config"]["adapter"]["shrink"] is False
    rec = json.loads((tmp_path / "cont" / "recipe.json").read_text())
    assert rec["init"] == str(tmp_path / "s2t" / "model")
    assert rec["init_sets"] == ["adapter.shrink=false"]
    # the run it started from deleted once used: the model comes from the run's checkpoint
    import shutil

    shutil.rmtree(tmp_path / "s2t")
    assert main([*s2t, "--resume"]) == 0, capsys.readouterr().err
    assert "which no longer exists; its model is built from the checkpoint" in capsys.readouterr().err
    final = json.loads((tmp_path / "cont" / "model" / "config.json").read_text())
    assert final["config"]["adapter"]["shrink"] is False
    assert json.loads((tmp_path / "cont" / "recipe.json").read_text())["init"] == rec["init"]


def test_a_model_folder_given_as_the_run_folder_is_refused(tmp_path, capsys):
    """`--out runs/x/model` (a model's own folder) put checkpoints/, metrics.jsonl and a model/
    inside it, beside its weights."""
    _, _, run = _t2c_run(tmp_path, "batch_size: 2, max_steps: 1, lr: 0.003")
    assert main(run) == 0
    model = tmp_path / "t2c" / "model"
    before = sorted(p.name for p in model.iterdir())
    i = run.index("--out")
    assert main([*run[:i], "--out", str(model), *run[i + 2:]]) == 2
    assert "is a model checkpoint folder, not a run folder" in _one_error_line(capsys)
    assert sorted(p.name for p in model.iterdir()) == before


def test_a_file_given_as_a_checkpoint_folder_is_one_line(tmp_path, capsys):
    """`--init afile` said "checkpoint folder not found"."""
    afile = tmp_path / "afile"
    afile.write_text("not a checkpoint")
    assert main(["train", "t2c", "--init", str(afile), "--data", str(tmp_path / "x.jsonl"),
                 "--out", str(tmp_path / "o")]) == 2
    assert _one_error_line(capsys) == f"echox: error: --init {afile} is a file, not a checkpoint folder"
    _, _, run = _t2c_run(tmp_path, "batch_size: 2, max_steps: 2, lr: 0.003")
    assert main([*run, "--resume", str(afile)]) == 2
    assert _one_error_line(capsys) == f"echox: error: --resume {afile} is a file, not a checkpoint folder"
    gone = tmp_path / "gone"
    assert main([*run, "--resume", str(gone)]) == 2
    assert _one_error_line(capsys) == f"echox: error: --resume {gone}: checkpoint folder not found"


def test_a_run_outside_the_main_thread_trains_without_the_stop_handler(tmp_path, capsys):
    """Python sets signal handlers only in the main thread: `echox train` called from another
    thread (a notebook's or a scheduler's worker) stopped with a ValueError before training."""
    import threading

    _, _, run = _t2c_run(tmp_path, "batch_size: 2, max_steps: 1, lr: 0.003")
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    got = []

    def in_a_thread():
        try:
            got.append(main(run))
        except BaseException as e:  # noqa: BLE001 - shown by the assertion below
            got.append(e)

    t = threading.Thread(target=in_a_thread)
    t.start()
    t.join()
    assert got == [0]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert (tmp_path / "t2c" / "model").is_dir()


def test_recipe_overrides_lora_targets_and_a_finished_run_resumed_elsewhere(tmp_path, capsys):
    """`overrides: 5` in a recipe was a TypeError; LoRA target modules that name no module of
    the LLM were peft's traceback; --resume from another run folder whose last checkpoint is
    its final step, into a new --out, ran no step and then failed plotting the metrics it had
    not written (FileNotFoundError)."""
    c, recipe, run = _t2c_run(tmp_path, "batch_size: 2, max_steps: 2, lr: 0.003, save_every: 1")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny-random\noverrides: 5\n")
    assert main([*run[:2], "--recipe", str(bad), *run[4:]]) == 2
    assert "overrides must be a list" in _one_error_line(capsys)
    assert main([*run, "--set", "model.llm.lora.target_modules=[nosuch]"]) == 2
    assert "llm.lora.target_modules: none of ['nosuch']" in _one_error_line(capsys)
    assert not (tmp_path / "t2c" / "checkpoints").exists()
    assert main(run) == 0
    out = tmp_path / "again"
    assert main([*run[:-1], str(out), "--resume", str(tmp_path / "t2c")]) == 0
    assert (out / "model" / "model.safetensors").is_file()


def test_a_dialogue_longer_than_the_llm_is_left_out(tmp_path, capsys, caplog):
    """A runaway line (an answer of thousands of words) trained past the LLM's 1,024 positions
    (tiny-random), or was killed for memory: it is left out with a warning."""
    import logging

    _write_corpus(tmp_path / "c")
    c = tmp_path / "c"
    lines = [x for x in (c / "dialogues.jsonl").read_text().splitlines() if x.startswith('{"id"')]
    long = json.loads(lines[0])
    long["id"], long["conversations"][1]["value"] = "runaway", "word " * 3000
    (c / "long.jsonl").write_text("\n".join([*lines, json.dumps(long)]) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-random\ntrain: {batch_size: 2, max_steps: 1, lr: 0.003}\n")
    with caplog.at_level(logging.WARNING, logger="echox.train.run"):
        assert main(["train", "s2t", "--recipe", str(recipe), "--data", str(c / "long.jsonl"),
                     "--out", str(tmp_path / "s2t")]) == 0
    assert "1 of 7 dialogues are longer than the LLM's positions" in caplog.text
    assert "runaway" in caplog.text
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert out[-1]["train_examples"] == 6


def test_bad_training_data_is_refused_before_the_first_step(tmp_path, capsys):
    """A missing audio file or a unit outside the T2C's vocabulary stopped the run when its
    batch came (after steps and checkpoints; never with fewer steps), naming neither record nor
    file; --out "" trained into the working folder; an --out that cannot be made was a traceback."""
    c, recipe, args = _t2c_run(tmp_path, "batch_size: 2, max_steps: 2, save_every: 1")
    lines = (c / "tts.jsonl").read_text().splitlines()
    bad = json.loads(lines[4])
    bad["units"] = [3, 999999]
    (c / "tts_bad.jsonl").write_text("\n".join(lines[:4] + [json.dumps(bad)]) + "\n")
    argv = [a if not a.endswith("tts.jsonl") else str(c / "tts_bad.jsonl") for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "TTS record t4: unit 999999 is outside the T2C's [0, 50)" in err, err
    assert not (tmp_path / "t2c" / "checkpoints").exists()
    dl = [json.loads(x) for x in (c / "dialogues.jsonl").read_text().splitlines()[:6]]
    dl[5]["conversations"][0]["audio"] = "audio/gone.wav"
    (c / "dl_bad.jsonl").write_text("".join(json.dumps(d) + "\n" for d in dl))
    assert main(["train", "s2t", "--recipe", str(recipe), "--data", str(c / "dl_bad.jsonl"),
                 "--out", str(tmp_path / "s2t")]) == 2
    err = capsys.readouterr().err
    assert "dialogue d5: audio file not found" in err and "gone.wav" in err, err
    assert not (tmp_path / "s2t" / "checkpoints").exists()
    for out, says in (("", "--out is empty"), (" ", "--out is empty")):
        assert main(args[:-1] + [out]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "model").exists() and not os.path.exists("metrics.jsonl")
    if os.path.isdir("/proc/self"):  # a folder that cannot be made (not a permission matter)
        assert main(args[:-1] + ["/proc/self/echox-run"]) == 2
        err = capsys.readouterr().err
        assert "cannot create the run folder" in err and err.count("\n") == 1, err


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_runs(tmp_path, capsys):
    """Two runs on one --out at once (started together, or a --resume while the first still
    ran) both exited 0: the later one's model/ and best/ won, and metrics.jsonl held every step
    twice, unsorted. The run holds <out>/.lock (a flock, gone with its process however it
    ends); a second run is one line."""
    import fcntl

    c, recipe, run = _t2c_run(tmp_path, "batch_size: 2, max_steps: 2, lr: 0.003, save_every: 1")
    out = tmp_path / "t2c"
    out.mkdir()
    with open(out / ".lock", "a+") as held:  # another process's run, as far as the lock goes
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere")
        held.flush()
        assert main(run) == 2
        assert "is in use by another run (pid 4242 on elsewhere)" in _one_error_line(capsys)
        assert not (out / "checkpoints").exists()
    assert main([*run, "--stop-at", "1"]) == 0  # released: the run goes, and lets go at its end
    assert main([*run, "--resume"]) == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
