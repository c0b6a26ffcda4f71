"""The 3B / 8B GPU recipes, dry-run on CPU: the very same recipe files and launch commands, with
one override file that swaps in `tiny-random` sizes and small local data in the same schemas.

Each stage runs a few steps, stops, saves, and resumes. The slow test does the same through
2 processes with the launch script itself (DDP over gloo on CPU: FSDP and DeepSpeed need GPUs,
docs/training.md). The GPU recipe and the tested one differ only in the override.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from conftest import load_script

from echox.cli import main

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("3b", "8b")
STAGES = ("s2t", "t2c", "echo", "echo_gold")
ANSWERS = ["Paris is the capital.", "Blue is a colour.", "Four legs.", "The sun is a star.",
           "Yes, it is.", "Tokyo is in Japan."]


# ---- small local data in the schemas the GPU recipes read ------------------------------------
def _wav(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32)


def _shard(folder: Path, first: int, n: int) -> None:
    """An extracted EchoX-Dialogues tar shard: data.json and the wavs it names (SPEC.md)."""
    (folder / "wav").mkdir(parents=True)
    items = []
    for i in range(first, first + n):
        sf.write(folder / "wav" / f"q{i}.wav", _wav(0.6 + 0.1 * (i % 4), i), 16000)
        sf.write(folder / "wav" / f"a{i}.wav", _wav(0.8, 100 + i), 16000)
        items.append({"conversations": [
            {"from": "user", "value": f"question number {i}", "audio": f"wav/q{i}.wav", "wer": 0.0},
            {"from": "assistant", "value": ANSWERS[i % len(ANSWERS)], "audio": f"wav/a{i}.wav"}]})
    (folder / "data.json").write_text(json.dumps(items))


def _asr_parquet(folder: Path, n: int) -> None:
    """A LibriSpeech / MLS-like dataset: parquet with an `audio` {bytes, path} column + text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    blobs = []
    for i in range(n):
        buf = io.BytesIO()
        sf.write(buf, _wav(0.7, 200 + i), 16000, format="FLAC")
        blobs.append({"bytes": buf.getvalue(), "path": f"utt{i}.flac"})
    pq.write_table(pa.table({"audio": blobs, "text": [f"spoken words {i}" for i in range(n)],
                             "id": [f"utt{i}" for i in range(n)]}), folder / "train-00000-of-00001.parquet")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The GPU recipes' data/full, in small: made by the same tools as recipes/3b/prepare_data.sh
    (dialogues_tts.py, `echox units attach`, `echox units train-language`); only the units
    are random instead of mHuBERT's (no HuBERT installs here)."""
    from echox.data.manifest import read_jsonl, write_jsonl

    d = tmp_path_factory.mktemp("data_full")
    _shard(d / "EchoX-Dialogues" / "shard-000", 0, 4)
    _shard(d / "EchoX-Dialogues" / "shard-001", 4, 4)
    _shard(d / "EchoX-Dialogues-heldout" / "shard-002", 8, 2)
    _asr_parquet(d / "asr", 4)
    tts_script = load_script("recipes/3b/dialogues_tts.py")
    for src, out in (("EchoX-Dialogues", "tts"), ("EchoX-Dialogues-heldout", "tts/heldout")):
        assert tts_script.main([str(d / src), "--out", str(d / out)]) == 0
    rng = np.random.default_rng(0)
    (d / "units").mkdir()
    for src, out in (("tts/tts.jsonl", "tts_units.jsonl"), ("tts/heldout/tts.jsonl", "tts_units_heldout.jsonl")):
        recs = read_jsonl(d / src, "tts").records
        for r in recs:  # stands in for `echox units extract` (mHuBERT layer 11 + km1000)
            r.units = [int(x) for x in rng.integers(0, 40, 12)]
        write_jsonl(d / "units" / out, recs)
    assert main(["units", "train-language", "--manifest", str(d / "units/tts_units.jsonl"),
                 "--num-units", "40", "--vocab-size", "48", "--out", str(d / "units/language")]) == 0
    for dl, tu, out in (("tts/dialogues.jsonl", "tts_units.jsonl", "dialogues_units.jsonl"),
                        ("tts/heldout/dialogues.jsonl", "tts_units_heldout.jsonl",
                         "dialogues_units_heldout.jsonl")):
        assert main(["units", "attach", "--dialogues", str(d / dl), "--tts-units", str(d / "units" / tu),
                     "--out", str(d / "units" / out)]) == 0
    return {"root": d}


def override(stage: str, d: Path, out: Path) -> Path:
    """THE override: tiny-random sizes, a few steps, the small data in the recipes' schemas
    (every data source kind of the GPU recipe, local). Nothing else of the recipe changes."""
    data = {
        "s2t": {"train": [{"hf": str(d / "asr"), "schema": "asr", "audio_dir": str(d / "hf-audio")},
                          str(d / "EchoX-Dialogues")],
                "eval": str(d / "EchoX-Dialogues-heldout"), "eval_limit": 2},
        "t2c": {"train": str(d / "units/tts_units.jsonl"), "eval": str(d / "units/tts_units_heldout.jsonl"),
                "eval_limit": 2, "unit_language": str(d / "units/language")},
        "echo": {"train": str(d / "EchoX-Dialogues"), "eval": str(d / "EchoX-Dialogues-heldout"),
                 "eval_limit": 2, "unit_language": str(d / "units/language")},
        "echo_gold": {"train": str(d / "units/dialogues_units.jsonl"),
                      "eval": str(d / "units/dialogues_units_heldout.jsonl"), "eval_limit": 2,
                      "unit_language": str(d / "units/language")},
    }[stage]
    ov = {"model": "tiny-random", "overrides": [],
          "train": {"max_steps": 4, "batch_size": 2, "warmup_steps": 1, "save_every": 2,
                    "eval_every": 2, "eval_batches": 1, "log_every": 1, "threads": 1},
          "data": data}
    path = out / f"override-{stage}.yaml"
    path.write_text(yaml.safe_dump(ov))
    return path


def launch_args(size: str, stage: str, runs: Path) -> list[str]:
    """What recipes/<size>/<stage>.sh hands to `echox` after `accelerate launch ... -m echox.cli`."""
    text = (ROOT / "recipes" / size / f"{stage}.sh").read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if x.startswith("exec accelerate launch"))
    tail = line.split("-m echox.cli", 1)[1].replace('"$@"', "").replace("$RUNS", str(runs))
    return shlex.split(tail)


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


# ---- the recipe files ---------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
def test_recipes_are_complete_and_consistent(size):
    from accelerate.commands.config.config_args import load_config_from_file

    from echox.config import load_config
    from echox.train.run import load_stage_recipe, train_config

    model = load_config(str(ROOT / "recipes" / size / "model.yaml"))
    assert model.llm.name_or_path.startswith("meta-llama/Llama-3.")
    assert model.encoder.name_or_path == "openai/whisper-large-v3"
    assert model.t2c.unit_vocab_size == 4000 and model.llm.lora.r == 64
    global_batch = {}
    for stage in STAGES:
        cmd = "echo" if stage.startswith("echo") else stage
        r = load_stage_recipe(str(ROOT / "recipes" / size / f"{stage}.yaml"), [], stage=cmd)
        assert r["model"] == f"recipes/{size}/model.yaml"  # one model file for every stage
        cfg = train_config(cmd, r, type("A", (), {})())
        assert cfg.precision == "bf16" and cfg.max_steps > 1000 and cfg.save_every > 0
        global_batch[stage] = cfg.batch_size * cfg.grad_accum * 8
        args = launch_args(size, stage, Path("RUNS"))
        assert args[:2] == ["train", cmd] and args[args.index("--recipe") + 1] == f"recipes/{size}/{stage}.yaml"
        assert r["data"].train
    assert global_batch == {"s2t": 64, "t2c": 256, "echo": 64, "echo_gold": 64}
    assert load_stage_recipe(str(ROOT / f"recipes/{size}/echo.yaml"), [], stage="echo")["train"].pseudo_labels == "online"
    for cfg_file in sorted((ROOT / "recipes" / "accelerate").glob("*.yaml")):
        load_config_from_file(str(cfg_file))  # accelerate reads every launch config
    for z in ("zero2", "zero3"):
        ds = json.loads((ROOT / f"recipes/accelerate/{z}.json").read_text())
        assert isinstance(ds["train_micro_batch_size_per_gpu"], int)


def test_the_3b_and_8b_recipes_differ_only_in_size():
    for stage in STAGES:
        a = yaml.safe_load((ROOT / f"recipes/3b/{stage}.yaml").read_text())
        b = yaml.safe_load((ROOT / f"recipes/8b/{stage}.yaml").read_text())
        assert a["data"] == b["data"]
        for k in set(a["train"]) | set(b["train"]):
            if k not in ("output_dir", "batch_size", "grad_accum"):
                assert a["train"].get(k) == b["train"].get(k), (stage, k)


# ---- the dry run ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
def test_dry_run_of_every_stage_saves_and_resumes(size, data, tmp_path):
    """s2t, t2c, then echo and the gold baseline from their outputs, each: 2 steps, stop, resume
    to step 4; the 8B recipes accumulate gradients over 2 micro-batches as on the GPUs."""
    runs = tmp_path / "runs"
    outs = {"s2t": "s2t", "t2c": "t2c", "echo": "echo", "echo_gold": "echo-gold"}
    for stage in STAGES:
        ov = override(stage, data["root"], tmp_path)
        args = launch_args(size, stage, runs) + ["--override", str(ov)]
        assert main(args + ["--stop-at", "2"]) == 0, stage
        run = runs / outs[stage]
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]
        assert not (run / "model").exists()
        assert main(args + ["--resume"]) == 0, stage
        assert _steps(run) == [1, 2, 3, 4]
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
        state = torch.load(run / "checkpoints/step-000002/trainer_state.pt", weights_only=False)
        recipe = yaml.safe_load((ROOT / f"recipes/{size}/{stage}.yaml").read_text())["train"]
        assert state["train_config"]["grad_accum"] == recipe["grad_accum"]
        assert state["train_config"]["lr"] == recipe["lr"]  # the recipe's, not the override's
        saved = json.loads((run / "recipe.json").read_text())
        assert saved["model"] == "tiny-random" and saved["train"]["precision"] == "bf16"
        cfg = json.loads((run / "model" / "config.json").read_text())
        assert (cmd := "echo" if stage.startswith("echo") else stage) in cfg["trained_stages"], cmd
    assert (runs / "echo" / "model" / "model.safetensors").is_file()


def test_hub_dataset_sources_become_local_manifests_once(data, tmp_path, capsys, monkeypatch):
    """An `{hf: ...}` source (LibriSpeech's schema here) is read once into audio files and a
    manifest; the next run reads the manifest, even with the dataset gone. `--prepare-data`
    does that for a whole recipe and stops."""
    import shutil

    from echox.errors import ConfigError
    from echox.train.run import _dialogue_source

    src_dir = tmp_path / "asr"
    shutil.copytree(data["root"] / "asr", src_dir)
    src = {"hf": str(src_dir), "schema": "asr", "audio_dir": str(tmp_path / "audio"), "limit": 3}
    recs, base = _dialogue_source(src)
    assert len(recs) == 3 and base is None
    user, asst = recs[0].conversations
    assert user.prompt == "Transcribe this audio." and asst.value == user.value == "spoken words 0"
    assert Path(user.audio).is_file() and Path(user.audio).parent == tmp_path / "audio"
    shutil.rmtree(src_dir)
    again, _ = _dialogue_source(src)
    assert [r.to_json() for r in again] == [r.to_json() for r in recs]
    shards, _ = _dialogue_source({"path": str(data["root"] / "EchoX-Dialogues"), "limit": 5})
    assert len(shards) == 5 and all(Path(r.conversations[0].audio).is_absolute() for r in shards)
    with pytest.raises(Exception, match="exactly one of hf or path"):
        _dialogue_source({"hf": "x", "path": "y"})
    shards_dir = str(data["root"] / "EchoX-Dialogues")
    for bad, says in (({"path": shards_dir, "limit": "x"}, "limit must be a whole number"),  # TypeError
                      ({"path": shards_dir, "limit": 1.5}, "limit must be a whole number"),
                      ({"path": shards_dir, "limit": -1}, "limit must be a whole number"),  # dropped one
                      ({"hf": 5}, "hf must be a non-empty string"), ({"path": ""}, "path must be"),
                      (["a.jsonl"], "expected a path or a mapping")):  # its repr became a path
        with pytest.raises(ConfigError, match=says):
            _dialogue_source(bad)
    (tmp_path / "afile").write_text("keep")  # an audio_dir that is a file was a FileExistsError
    with pytest.raises(ConfigError, match=r"audio_dir .*afile is a file; give a folder"):
        _dialogue_source({**src, "audio_dir": str(tmp_path / "afile")})
    assert (tmp_path / "afile").read_text() == "keep"
    import errno

    import echox.data.hf as hf

    def full(path, data):  # a full disk while a clip is written was a traceback
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(hf, "atomic_write_bytes", full)
    shutil.copytree(data["root"] / "asr", src_dir)
    with pytest.raises(ConfigError, match=r"reading it into .*audio2 failed \(No space left on device\)"):
        _dialogue_source({**src, "audio_dir": str(tmp_path / "audio2")})
    assert not list((tmp_path / "audio2").iterdir())  # no manifest of a partial read
    monkeypatch.undo()
    # every row skipped (a text column that is no text): an empty manifest was cached, and read
    # again, still empty, once the data was mended
    empty = {**src, "audio_dir": str(tmp_path / "audio3"), "text_column": "audio"}
    with pytest.raises(ConfigError, match=r"no usable row .*nothing is cached"):
        _dialogue_source(empty)
    assert not list((tmp_path / "audio3").glob("*.jsonl"))
    # a source that cannot be read left the empty audio_dir it had made
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError):
        _dialogue_source({**src, "hf": str(tmp_path / "no-such-dataset"), "audio_dir": str(tmp_path / "audio4")})
    assert not (tmp_path / "audio4").exists()
    ov = override("s2t", data["root"], tmp_path)
    capsys.readouterr()
    assert main(["train", "s2t", "--recipe", str(ROOT / "recipes/3b/s2t.yaml"), "--override", str(ov),
                 "--out", str(tmp_path / "run"), "--prepare-data"]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts == {"stage": "s2t", "train_examples": 4 + 8, "eval_examples": 2}
    assert not (tmp_path / "run").exists() and list((data["root"] / "hf-audio").glob("*.jsonl"))


# ---- 2 processes: the launch script itself ---------------------------------------------------------
@pytest.mark.slow
def test_dry_run_through_the_launch_script_on_two_processes(data, tmp_path):
    """recipes/3b/s2t.sh with ACCELERATE_CONFIG=recipes/accelerate/ddp.yaml and 2 processes:
    DDP over gloo on CPU (FSDP and DeepSpeed do not run on CPU). Stop at step 2, then resume."""
    runs = tmp_path / "runs"
    ov = override("s2t", data["root"], tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RUNS": str(runs), "NUM_PROCESSES": "2",
           "ACCELERATE_CONFIG": "recipes/accelerate/ddp.yaml",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    script = str(ROOT / "recipes" / "3b" / "s2t.sh")
    for extra in (["--stop-at", "2"], ["--resume"]):
        r = subprocess.run(["bash", script, "--override", str(ov), *extra], env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    run = runs / "s2t"
    state = torch.load(run / "checkpoints/step-000002/trainer_state.pt", weights_only=False)
    assert state["num_processes"] == 2
    assert {p.name for p in (run / "checkpoints/step-000002").glob("rng_state_*.pt")} == {
        "rng_state_0.pt", "rng_state_1.pt"}
    assert _steps(run) == [1, 2, 3, 4]
    assert re.search(r'"steps": 4', r.stdout) and (run / "model" / "model.safetensors").is_file()


def test_memory_plan_builds_the_published_sizes_that_docs_quote():
    """bench/memory_plan.py on the meta device: the published parameter counts, and the
    trainable / frozen sizes docs/scale.md quotes for the 3B S2T stage (its first table)."""
    from echox.config import load_config

    mp = load_script("bench/memory_plan.py")

    parts = mp.build_parts(load_config(str(ROOT / "recipes/3b/model.yaml")))
    assert all(p.is_meta for m in parts.values() for p in m.parameters())
    llm = sum(p.numel() for n, p in parts["llm"].named_parameters() if "lora_" not in n)
    assert round(llm / 1e9, 2) == 3.21 and round(sum(p.numel() for p in parts["encoder"].parameters()) / 1e6) == 637
    st = mp.state_bytes(parts, "s2t")
    row = f"| s2t | {st['trainable'] / 1e6:,.0f}M | {st['frozen'] / 1e6:,.0f}M | 8 x 1 | " \
          f"{sum(st['memory']['DDP'].values()) / 1e9:.1f}"
    doc = (ROOT / "docs" / "scale.md").read_text()
    assert row.rsplit(" | ", 1)[0] in doc
    ddp_static = sum(st["memory"]["DDP"].values())
    assert 18e9 < ddp_static < 22e9  # weights + grads + AdamW + buckets, before activations


def test_tiny_pipeline_refuses_an_unknown_step(tmp_path: Path) -> None:
    """A misspelt STEP (`s2tt`) ran nothing and exited 0; now it names the steps, exit 2."""
    root = Path(__file__).resolve().parents[1]
    for step in ("s2tt", "units,eval2"):
        r = subprocess.run(["bash", str(root / "recipes" / "tiny" / "pipeline.sh")],
                           capture_output=True, text=True, timeout=60, cwd=root,
                           env={**os.environ, "STEP": step, "RUNS": str(tmp_path / "runs"),
                                "DATA": str(tmp_path / "data")})
        assert r.returncode == 2, r.stderr
        bad = step.split(",")[-1]
        assert f"unknown STEP '{bad}'" in r.stderr and " s2t " in r.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_tiny_pipeline_checks_its_settings_before_any_step(tmp_path: Path) -> None:
    """A STEP list with spaces (or empty) ran nothing and exited 0; CTC_STEPS=abc skipped the
    CTC pre-training with a shell warning; T2C_STEPS=abc or T2C_INIT=/nope failed only when
    their step came, after hours of the earlier ones; STEP=bundle with nothing trained and
    STEP=ttsx without BIGBENCH exited 0."""
    root = Path(__file__).resolve().parents[1]
    ran = tmp_path / "ran"  # a stand-in echox that records every call
    fake = tmp_path / "echox"
    fake.write_text(f"#!/bin/sh\necho \"$*\" >> {ran}\n")
    fake.chmod(0o755)
    for env, says in (({"STEP": "units t2c"}, "separated by commas"),
                      ({"STEP": ","}, "separated by commas"),
                      ({"STEP": "all", "CTC_STEPS": "abc"}, "CTC_STEPS must be a whole number"),
                      ({"STEP": "all", "T2C_STEPS": "1e3"}, "T2C_STEPS must be a whole number"),
                      ({"STEP": "all", "T2C_STEPS": "0"}, "T2C_STEPS must be a whole number >= 1"),
                      ({"STEP": "all", "VOCAB": "100"}, "VOCAB must be at least the 500 units"),
                      ({"STEP": "units,ttsx,t2c", "BIGBENCH": ""}, "ttsx: set BIGBENCH"),
                      ({"STEP": "all", "THREADS": "0"}, "THREADS must be a whole number >= 1"),
                      ({"STEP": "all", "ECHO_ACCUM": "0"}, "ECHO_ACCUM must be a whole number >= 1"),
                      ({"STEP": "all", "T2C_LR": "fast"}, "T2C_LR must be a number"),
                      ({"STEP": "all", "T2C_INIT": "/nope"}, "T2C_INIT=/nope: no such folder"),
                      ({"STEP": "ttsx", "BIGBENCH": ""}, "ttsx: set BIGBENCH"),
                      ({"STEP": "bundle"}, "no trained Stage III model"),
                      ({"STEP": "vocoder"}, "run STEP=units first")):
        r = subprocess.run(["bash", str(root / "recipes" / "tiny" / "pipeline.sh")],
                           capture_output=True, text=True, timeout=60, cwd=root,
                           env={**os.environ, "RUNS": str(tmp_path / "runs"), "ECHOX": str(fake),
                                "DATA": str(tmp_path / "data"), **env})
        assert r.returncode == 2 and says in r.stderr, (env, r.stderr)
        assert not ran.exists(), (env, ran.read_text())  # refused before any step ran
    r = subprocess.run(["bash", str(root / "recipes" / "tiny" / "pipeline.sh")], capture_output=True,
                       text=True, timeout=60, cwd=root,
                       env={**os.environ, "STEP": "units", "T2C_LR": "1e+3", "ECHO_LR": "3E-4",
                            "UNITS_WINDOW": "10", "CTC_STEPS": "0",
                            "ECHOX": str(fake), "DATA": str(tmp_path / "data"),
                            "RUNS": str(tmp_path / "runs")})
    assert r.returncode == 0 and "units extract" in ran.read_text(), r.stderr  # good values pass


def test_tiny_pipeline_raw_units_train_and_bundle_without_a_unit_language(tmp_path: Path) -> None:
    """UNIT_LANG=none: no unit language is trained, the stages read the raw units
    (data.unit_language=null), and the bundles name none."""
    root = Path(__file__).resolve().parents[1]
    ran = tmp_path / "ran"
    fake = tmp_path / "echox"
    fake.write_text(f"#!/bin/sh\necho \"$*\" >> {ran}\n")
    fake.chmod(0o755)
    (tmp_path / "runs" / "echo" / "model").mkdir(parents=True)
    r = subprocess.run(["bash", str(root / "recipes" / "tiny" / "pipeline.sh")], capture_output=True,
                       text=True, timeout=60, cwd=root,
                       env={**os.environ, "STEP": "units,t2c,bundle", "UNIT_LANG": "none",
                            "ECHOX": str(fake), "DATA": str(tmp_path / "data"),
                            "RUNS": str(tmp_path / "runs")})
    calls = ran.read_text().splitlines()
    assert r.returncode == 0, r.stderr
    assert not [c for c in calls if c.startswith("units train-language")]
    t2c = [c for c in calls if c.startswith("train t2c")]
    assert len(t2c) == 1 and "data.unit_language=null" in t2c[0].split(), calls
    bundle = [c for c in calls if c.startswith("bundle")]
    assert len(bundle) == 1 and "--unit-language" not in bundle[0], calls


def test_tiny_pipeline_echo_batch_and_accumulation_reach_both_stage3_runs(tmp_path: Path) -> None:
    """ECHO_BATCH=8 ECHO_ACCUM=2: Echo and the gold-unit baseline train steps of 16 examples in
    half the memory (raw-unit targets of batch 16 peaked at 20 GB)."""
    root = Path(__file__).resolve().parents[1]
    ran = tmp_path / "ran"
    fake = tmp_path / "echox"
    fake.write_text(f"#!/bin/sh\necho \"$*\" >> {ran}\n")
    fake.chmod(0o755)
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "dialogues_extra_units.jsonl").write_text("")
    r = subprocess.run(["bash", str(root / "recipes" / "tiny" / "pipeline.sh")], capture_output=True,
                       text=True, timeout=60, cwd=root,
                       env={**os.environ, "STEP": "echo,gold", "ECHO_BATCH": "8", "ECHO_ACCUM": "2",
                            "ECHO_EXTRA": "1", "S2T_MODEL": str(tmp_path), "T2C_MODEL": str(tmp_path),
                            "ECHOX": str(fake), "DATA": str(data), "RUNS": str(tmp_path / "runs")})
    assert r.returncode == 0, r.stderr
    runs = [c.split() for c in ran.read_text().splitlines() if c.startswith("train echo")]
    assert len(runs) == 2, ran.read_text()
    for args in runs:
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        assert "train.batch_size=8" in sets and "train.grad_accum=2" in sets, args


def test_prepare_data_checks_its_models_before_any_download(tmp_path):
    """MHUBERT / KM1000 that do not exist were found at step 5, after the TB-scale downloads."""
    script = ROOT / "recipes" / "3b" / "prepare_data.sh"
    env = {**os.environ, "ECHOX": "false", "PYTHON": "false", "PATH": os.environ.get("PATH", "")}
    for mhubert, km, says in (("/no/mhubert", str(script), "MHUBERT=/no/mhubert is not a folder"),
                              ("org/mhubert", str(tmp_path / "km.bin"), "is not a file")):
        r = subprocess.run(["bash", str(script)], env={**env, "MHUBERT": mhubert, "KM1000": km},
                           capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert r.returncode == 2 and says in r.stderr, r.stderr
    step3 = next(x for x in script.read_text().splitlines() if x.startswith("$ECHOX train s2t"))
    assert step3.endswith("--prepare-data ${ECHOX_TRAIN_ARGS:-}"), step3


def test_device_pack_refuses_parts_too_small_for_the_wheels_and_a_foreign_out(tmp_path: Path) -> None:
    """--part-mb below the wheels' size cut the payload at a negative offset: parts that failed
    their checksum only on the GPU machine. An --out holding other things lost its bin*/."""
    root = Path(__file__).resolve().parents[1]
    wheel = tmp_path / "x.whl"
    wheel.write_bytes(b"w" * 2_000_000)

    def pack(out: Path, part_mb: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(root / "recipes/tiny/device/pack.py"), "pack",
                               "--out", str(out), "--data", str(tmp_path), "--s2t", str(tmp_path),
                               "--whisper", str(tmp_path), "--wheels", str(wheel), "--part-mb", part_mb],
                              capture_output=True, text=True, timeout=60)

    r = pack(tmp_path / "out", "1")
    assert r.returncode == 2 and "leaves no room beside the wheels" in r.stderr, r.stderr
    home = tmp_path / "home"
    (home / "bin").mkdir(parents=True)  # a user's scripts: not one of the packer's bin1, bin2
    r = pack(home, "60")
    assert r.returncode == 2 and "holds other things (bin)" in r.stderr, r.stderr
    assert (home / "bin").is_dir()
    r = pack(tmp_path / "out", "nan")
    assert r.returncode == 2 and "--part-mb must be a finite number" in r.stderr, r.stderr


def test_t2c_to_raw_units_keeps_the_unit_rows_and_forgets_the_language(tmp_path: Path, make_model) -> None:
    """recipes/tiny/t2c_to_raw_units.py: the single-unit and special rows and the body carry
    over; the converted T2C records no unit language (it kept the old fingerprint, and
    `echox train t2c --init ... --set data.unit_language=null` refused it), and its unit budget
    grows by the language's units per token where it counts text tokens."""
    from conftest import load_script

    from echox.model.echox import EchoX
    from echox.units.language import UnitLanguage

    rng = np.random.default_rng(0)
    k, v = 20, 50  # tiny-random's T2C speaks 50 tokens: a language of 50 over 20 units
    lang = UnitLanguage.train([rng.integers(0, k, 40) for _ in range(200)], num_units=k, vocab_size=v)
    m = make_model([f"t2c.unit_language={lang.fingerprint}"])
    assert m.config.t2c.unit_vocab_size == v
    m.trained_stages = ["t2c"]
    src = m.save_pretrained(tmp_path / "t2c")
    lang.save(src / "unit_language")
    (src / "unit_language" / "train_stats.json").write_text(json.dumps({"heldout": {"units_per_token": 2.0}}))
    conv = load_script("recipes/tiny/t2c_to_raw_units.py")
    conv.convert(src, tmp_path / "raw")
    raw = EchoX.from_pretrained(tmp_path / "raw")
    assert raw.config.t2c.unit_language is None and raw.config.t2c.unit_vocab_size == k
    assert raw.config.t2c.max_units_per_token == 2 * m.config.t2c.max_units_per_token
    old, new = m.t2c.state_dict(), raw.t2c.state_dict()
    for name, t in old.items():
        if new[name].shape == t.shape:
            torch.testing.assert_close(new[name], t)
        else:
            torch.testing.assert_close(new[name], torch.cat([t[:k], t[v:]]))
    with pytest.raises(Exception, match="exists"):
        conv.convert(src, tmp_path / "raw")
    # a character condition counts characters: 8 units per character is ample for raw units,
    # and the budget stays (it was scaled as if it counted text tokens)
    mc = make_model([f"t2c.unit_language={lang.fingerprint}", "t2c.char_condition=true"])
    mc.trained_stages = ["t2c"]
    src = mc.save_pretrained(tmp_path / "t2c-chars")
    lang.save(src / "unit_language")
    (src / "unit_language" / "train_stats.json").write_text(json.dumps({"heldout": {"units_per_token": 2.0}}))
    conv.convert(src, tmp_path / "raw-chars")
    raw = EchoX.from_pretrained(tmp_path / "raw-chars")
    assert raw.config.t2c.max_units_per_token == mc.config.t2c.max_units_per_token
