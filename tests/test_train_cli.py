"""`echox train` end to end on manifests the test writes (tiny random model)."""

import json

import numpy as np
import torch
import soundfile as sf

from echox.cli import main


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
    assert lines[1]["train_examples"] == 12  # both TTS manifests
    assert [r["stage"] for r in lines] == ["s2t", "t2c", "echo", "echo"]
    assert all(r["steps"] == 2 for r in lines)


def test_train_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "echo", "--data", "x.jsonl", "--set", "model.seed=1"]) == 2
    assert "needs --init" in capsys.readouterr().err
    assert main(["train", "s2t", "--recipe", str(tmp_path / "missing.yaml")]) == 2
    assert "recipe not found" in capsys.readouterr().err
    assert main(["train", "s2t", "--set", "train.nonsense=1", "--data", "x"]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_echo_with_a_frozen_s2t_model_trains_only_the_speech_side(tmp_path, capsys):
    """`--set train.freeze_s2t=true`: the adapter and LoRA stay as Stage I left them, the
    response states are cached in the run folder, and the echo decoder learns."""
    from safetensors.torch import load_file

    _write_corpus(tmp_path / "c")
    c = tmp_path / "c"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-random\ntrain: {batch_size: 2, max_steps: 2, lr: 0.003}\n")
    assert main(["train", "s2t", "--recipe", str(recipe), "--data", str(c / "dialogues.jsonl"),
                 "--out", str(tmp_path / "s2t")]) == 0
    assert main(["train", "t2c", "--recipe", str(recipe), "--data", str(c / "tts.jsonl"),
                 "--out", str(tmp_path / "t2c")]) == 0
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
    replaced or mixed); bad eval data, found at the end, costs no trained step; too little
    data and an --out that is a file are one line each."""
    _write_corpus(tmp_path / "c")
    c = tmp_path / "c"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-random\ntrain: {batch_size: 2, max_steps: 2, lr: 0.003}\n")
    run = ["train", "t2c", "--recipe", str(recipe), "--data", str(c / "tts.jsonl"),
           "--out", str(tmp_path / "t2c")]
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
    assert err.startswith("echox: error: ") and "fall outside [0, 50)" in err
    assert (out / "model" / "model.safetensors").is_file()  # the 2 steps were kept
    assert main(["train", "t2c", "--recipe", str(recipe), "--data", str(c / "tts.jsonl"),
                 "--set", "train.batch_size=100", "--out", str(tmp_path / "big")]) == 2
    assert "fewer than one global batch" in capsys.readouterr().err
    (tmp_path / "afile").write_text("keep")
    assert main([*run[:-1], str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "afile").read_text() == "keep"
