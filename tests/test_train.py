"""Smoke tests of the one training loop for all stages (tiny random configs, CPU)."""

import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import noise

from echox.config import preset_config
from echox.model.echox import EchoX
from echox.model.prompt import Turn
from echox.train import stages
from echox.train.trainer import TrainConfig, Trainer

ANSWERS = ["Paris.", "Blue is a color.", "Four.", "The sun is a star.", "Yes.", "Tokyo is in Japan.",
           "Seven days.", "Water is wet."]


def dialogues(n=8):
    return [[Turn("user", audio=noise(0.8 + 0.1 * i, i), transcript=f"q{i}"),
             Turn("assistant", text=ANSWERS[i % len(ANSWERS)])] for i in range(n)]


def t2c_examples(n=8):
    g = torch.Generator().manual_seed(0)
    return [(ANSWERS[i % len(ANSWERS)], torch.randint(0, 50, (6 + i,), generator=g).tolist()) for i in range(n)]


def _cfg(tmp_path, stage, **kw):
    base = dict(stage=stage, output_dir=str(tmp_path / stage), max_steps=6, batch_size=2,
                save_every=2, keep_last=2, lr=3e-3, warmup_steps=1, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def _trained_state(model):
    from echox.model.checkpoint import trained_state

    return trained_state(model)


def _run(stage, tmp_path, model=None, resume=None, stop_at=None, **kw):
    model = model or stages.prepare_model(stage, preset_config("tiny-random"))
    cfg = _cfg(tmp_path, stage, **kw)
    if stage == "t2c":
        data, coll = stages.ListDataset(t2c_examples()), stages.t2c_collator(model)
    elif stage == "s2t":
        data, coll = stages.ListDataset(dialogues()), stages.s2t_collator(model)
    else:
        g = torch.Generator().manual_seed(1)
        ex = [stages.EchoExample(d, units=[torch.randint(0, 50, (5,), generator=g).tolist()]) for d in dialogues()]
        data, coll = stages.ListDataset(ex), stages.echo_collator(model)
    tr = Trainer(model, cfg, data, coll, eval_data=stages.ListDataset(list(data)[:2]) if stage == "s2t" else None)
    return model, tr.train(resume=resume, stop_at=stop_at)


def _echo_init(tmp_path):
    """A Stage-I checkpoint and a Stage-II checkpoint for echo training."""
    s2t_model, _ = _run("s2t", tmp_path / "pre", max_steps=1, save_every=0)
    t2c_model, _ = _run("t2c", tmp_path / "pre", max_steps=1, save_every=0)
    return tmp_path / "pre" / "s2t" / "model", tmp_path / "pre" / "t2c" / "model"


@pytest.mark.parametrize("stage", ["s2t", "t2c", "echo"])
def test_stage_runs_saves_and_keeps_last(stage, tmp_path):
    model = None
    if stage == "echo":
        s2t_dir, t2c_dir = _echo_init(tmp_path)
        model = stages.prepare_model("echo", init=s2t_dir, t2c_from=t2c_dir)
    model, res = _run(stage, tmp_path, model=model)
    out = tmp_path / stage
    assert res.step == 6
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-000004", "step-000006"]  # saved at 2, 4, 6; keeps the last 2
    for n in names:
        files = {p.name for p in (out / "checkpoints" / n).iterdir()}
        assert {"model.safetensors", "config.json", "checksums.json", "tokenizer",
                "trainer_state.pt", "rng_state_0.pt", "training_args.json"} <= files
    assert (out / "model" / "model.safetensors").is_file()
    assert not (out / "model" / "trainer_state.pt").exists()
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert any((out / "tb").iterdir())
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6]
    reloaded = EchoX.from_pretrained(out / "model")
    assert stage in reloaded.trained_stages
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    # written out, not read from stages.STAGE_PARTS (what the code under test uses)
    assert trainable == {"s2t": {"adapter", "llm"}, "t2c": {"t2c"},
                         "echo": {"adapter", "llm", "echo", "denoiser"}}[stage]


# with dropout (the tiny recipes' LoRA 0.05 and T2C 0.1), the resumed run draws the same masks:
# each new DataLoader iterator took a number from the global RNG, and a resumed run makes one
# mid-epoch that the uninterrupted run does not
@pytest.mark.parametrize("stage,dropout", [("s2t", []), ("echo", []), ("t2c", ["t2c.dropout=0.1"]),
                                           ("s2t", ["llm.lora.dropout=0.1"])])
def test_resume_matches_uninterrupted(stage, dropout, tmp_path):
    def fresh():
        if stage == "echo":
            return stages.prepare_model("echo", init=s2t_dir, t2c_from=t2c_dir)
        torch.manual_seed(0)
        return stages.prepare_model(stage, preset_config("tiny-random", dropout))

    s2t_dir = t2c_dir = None
    if stage == "echo":
        s2t_dir, t2c_dir = _echo_init(tmp_path)
    full, res_full = _run(stage, tmp_path / "a", model=fresh())
    part, res_part = _run(stage, tmp_path / "b", model=fresh(), stop_at=3, save_every=2)
    assert res_part.step == 3 and res_part.last_checkpoint[0] == 3  # the pause is saved
    shutil.rmtree(res_part.last_checkpoint[1])  # as if killed after step 3's log, before its save
    resumed, res = _run(stage, tmp_path / "b", model=fresh(), resume="latest")  # from step 2
    assert res.step == 6
    a, b = _trained_state(full), _trained_state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / stage / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / stage / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    # step 3, logged by the interrupted run after its step-2 checkpoint, is logged once: the
    # resumed run's row replaces it, so the curve is one run's
    steps_b = [json.loads(x)["step"] for x in (tmp_path / "b" / stage / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in x]
    assert steps_b == sorted(set(steps_b)) == list(range(1, 7))
    assert lb[:2] == pytest.approx(la[:2]) and lb[2:] == pytest.approx(la[2:], rel=1e-4)


def test_a_checkpoint_holds_its_rng_state_from_the_moment_it_appears(tmp_path, monkeypatch):
    """The RNG state was written after the checkpoint's atomic rename: a kill between them left
    a checkpoint without it, which resume took (with a warning) and lost the dropout stream."""
    import echox.train.trainer as trainer_mod

    seen = []
    real = trainer_mod.Trainer._save

    def spy(self, final=False):  # what a kill right after the rename would leave
        folder = self.out / "checkpoints" / f"step-{self.step:06d}"
        orig = torch.save

        def save_and_look(obj, path, *a, **kw):
            orig(obj, path, *a, **kw)
            if Path(path).name == "rng_state_0.pt" and folder.is_dir():
                seen.append("after rename")  # written into the folder once it is in place

        monkeypatch.setattr(torch, "save", save_and_look)
        try:
            return real(self, final)
        finally:
            monkeypatch.setattr(torch, "save", orig)

    monkeypatch.setattr(trainer_mod.Trainer, "_save", spy)
    _run("t2c", tmp_path, max_steps=2, save_every=1)
    assert not seen
    for ck in sorted((tmp_path / "t2c" / "checkpoints").glob("step-*")):
        assert (ck / "rng_state_0.pt").is_file()


def test_keep_best_keeps_the_lowest_eval_loss_model(tmp_path):
    from echox.model.echox import EchoX

    _, res = _run("s2t", tmp_path, eval_every=1, keep_best=True, lr=0.3)  # a rough ride
    out = tmp_path / "s2t"
    best = json.loads((out / "best" / "best.json").read_text())
    step, loss = min(res.eval_losses, key=lambda e: e[1])
    assert len(res.eval_losses) == 6 and best == {"step": step, "eval_loss": pytest.approx(loss)}
    assert EchoX.from_pretrained(out / "best") is not None
    # a resumed run knows the best so far: a worse eval does not overwrite it
    tr = Trainer(stages.prepare_model("s2t", preset_config("tiny-random")),
                 _cfg(tmp_path, "s2t", eval_every=1, keep_best=True), stages.ListDataset(dialogues()),
                 stages.s2t_collator(stages.prepare_model("s2t", preset_config("tiny-random"))))
    tr._resume("latest")
    assert tr.best == (step, pytest.approx(loss))
    tr._save_best(loss + 1.0)
    assert json.loads((out / "best" / "best.json").read_text())["step"] == step


def test_spelling_t2c_trains_and_echo_takes_its_config(tmp_path):
    """A T2C with a spelling encoder (t2c.spelling_dim) trains in Stage II, and Stage III on
    a Stage I model without one adopts the Stage II T2C config, spelling weights included."""
    spelled = stages.prepare_model("t2c", preset_config("tiny-random", ["t2c.spelling_dim=8"]))
    assert torch.count_nonzero(spelled.t2c.spelling.out.weight) == 0  # starts as the plain T2C
    _run("t2c", tmp_path, model=spelled, max_steps=2, save_every=0, lr=0.05)
    w = spelled.t2c.spelling.out.weight.detach().clone()
    assert torch.count_nonzero(w) > 0  # the spelling encoder learned
    _run("s2t", tmp_path, max_steps=1, save_every=0)
    m = stages.prepare_model("echo", init=tmp_path / "s2t" / "model", t2c_from=tmp_path / "t2c" / "model")
    assert m.config.t2c.spelling_dim == 8
    torch.testing.assert_close(m.t2c.spelling.out.weight, w)
    torch.testing.assert_close(m.echo.spelling.out.weight, w)  # the echo decoder is a copy
    ids = m.tokenizer("Brazil", add_special_tokens=False)["input_ids"]
    plain = m.llm.embed(torch.tensor(ids))
    assert not torch.allclose(m.text_condition([ids])[0], plain)  # the L_den target spells too
    # the Stage II config is adopted, but the unit decoding set beside --init stays
    m = stages.prepare_model("echo", init=tmp_path / "s2t" / "model", t2c_from=tmp_path / "t2c" / "model",
                             init_overrides=["t2c.beams=3"])
    assert m.config.t2c.spelling_dim == 8 and m.config.t2c.beams == 3 and m.echo.cfg.beams == 3


def test_spelling_tells_apart_tokens_of_different_text():
    from echox.model.unit_decoder import SpellingEncoder

    enc = SpellingEncoder(d_out=6, dim=4, max_chars=5)
    torch.nn.init.normal_(enc.out.weight)
    words = {0: "Brazil", 1: "Chile", 2: "", 3: "Brazilian"}  # 3: same first 5 bytes as 0
    enc.token_text = words.__getitem__
    out = enc(torch.tensor([0, 1, 2, 0, 3]))
    assert out.shape == (5, 6)
    torch.testing.assert_close(out[0], out[3])  # the same token, the same vector
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(out[2], enc.out.bias)  # no text: nothing pooled
    torch.testing.assert_close(out[4], out[0])  # only max_chars bytes are read


def test_echo_needs_previous_stages(tmp_path):
    with pytest.raises(stages.StageError, match="needs --init"):
        stages.prepare_model("echo", preset_config("tiny-random"))
    t2c_model, _ = _run("t2c", tmp_path, max_steps=1, save_every=0)
    with pytest.raises(stages.StageError, match="not trained with stage s2t"):
        stages.prepare_model("echo", init=tmp_path / "t2c" / "model")
    s2t_model, _ = _run("s2t", tmp_path, max_steps=1, save_every=0)
    with pytest.raises(stages.StageError, match="needs a trained T2C"):
        stages.prepare_model("echo", init=tmp_path / "s2t" / "model")
    with pytest.raises(stages.StageError, match="not trained with stage t2c"):
        stages.prepare_model("echo", init=tmp_path / "s2t" / "model", t2c_from=tmp_path / "s2t" / "model")
    m = stages.prepare_model("echo", init=tmp_path / "s2t" / "model", t2c_from=tmp_path / "t2c" / "model")
    assert torch.equal(m.echo.lm_head.weight, m.t2c.lm_head.weight)  # echo starts from the T2C


def test_offline_pseudo_labels_cached_and_cut(tmp_path, make_model):
    m = make_model(["trigger.min_len=2", "trigger.max_len=4", "trigger.threshold=-1.0",
                    "trigger.delay=1", "trigger.window=1", "t2c.max_positions=40"])
    m.eval()
    d = [[Turn("user", audio=noise(0.6, 1)), Turn("assistant", text="A longer answer here.")]]
    cache = tmp_path / "pl.jsonl"
    ex = stages.precompute_pseudo_labels(m, d, cache, cut=True)
    segs = ex[0].segments[0]
    assert len(segs) > 1 and segs[0][0] == 0 and all(a[1] == b[0] for a, b in zip(segs, segs[1:]))
    assert len(ex[0].units) == len(segs)
    again = stages.precompute_pseudo_labels(m, d, cache, cut=True)
    assert again[0].units == ex[0].units and len(cache.read_text().splitlines()) == 1
    batch = stages.echo_collator(m)(ex)
    out = m.forward_echo(batch)
    assert out.targets == ex[0].units
    # beam-searched labels are other labels: the same cache file does not hand back greedy ones
    m.config.t2c.beams = 3
    beamed = stages.precompute_pseudo_labels(m, d, cache, cut=True)
    assert len(cache.read_text().splitlines()) == 2
    texts = [m.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ["A longer answer here."]]
    assert len(beamed[0].units) == len(segs) and beamed[0].units[0] == m.pseudo_labels(
        [texts[0][segs[0][0]:segs[0][1]]])[0]
    # another T2C's labels are other labels too: the cache keys carry the T2C's weights
    m.config.t2c.beams = 1
    with torch.no_grad():
        next(m.t2c.parameters()).add_(0.5)
    retrained = stages.precompute_pseudo_labels(m, d, cache, cut=True)
    assert len(cache.read_text().splitlines()) == 3
    assert retrained[0].units[0] == m.pseudo_labels([texts[0][segs[0][0]:segs[0][1]]])[0]
    # and so do another Stage I model's (the cuts come from its states), when cutting
    with torch.no_grad():
        next(m.adapter.parameters()).add_(0.5)
    stages.precompute_pseudo_labels(m, d, cache, cut=True)
    assert len(cache.read_text().splitlines()) == 4
    stages.precompute_pseudo_labels(m, d, cache, cut=True)
    assert len(cache.read_text().splitlines()) == 4


def test_dialogue_key_reads_all_of_the_audio():
    """Two recordings with the same opening (a TTS voice's leading silence) and texts are two
    dialogues: their cached states and labels were shared when only the first 4 KB counted."""
    rs = np.random.RandomState(0)
    lead = np.zeros(1600, np.float32)
    a1 = np.concatenate([lead, rs.randn(16000).astype(np.float32) * 0.1])
    a2 = np.concatenate([lead, rs.randn(16000).astype(np.float32) * 0.1])

    def d(a):
        return [Turn("user", audio=a, transcript="the capital of france"), Turn("assistant", text="Paris.")]
    assert stages._dialogue_key(d(a1)) != stages._dialogue_key(d(a2))
    assert stages._dialogue_key(d(a1)) == stages._dialogue_key(d(a1.copy()))
    assert stages._dialogue_key(d(a1)) != stages._dialogue_key(d(a1[:-1]))


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    worker = Path(__file__).parent / "ddp_worker.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    # --multi_gpu picks the torchrun launcher; with no GPU the trainer runs gloo on CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(worker), str(tmp_path / "ddp.json")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r1 = subprocess.run([sys.executable, str(worker), str(tmp_path / "one.json")], env=env,
                        capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    ddp, one = json.loads((tmp_path / "ddp.json").read_text()), json.loads((tmp_path / "one.json").read_text())
    assert ddp["world"] == 2 and one["world"] == 1
    assert ddp["first_loss"] == pytest.approx(one["first_loss"], rel=1e-4)


@pytest.mark.slow
def test_fsdp_launch_on_cpu_is_refused_not_silently_ddp(tmp_path):
    """accelerate (1.15) shards only on GPUs: on CPU it runs an FSDP launch as plain DDP
    (MULTI_CPU), and torch's FSDP1 refuses CPU. The trainer says so rather than pretend. If
    this starts failing because accelerate runs FSDP on CPU, turn it into an FSDP-vs-1-process
    loss test like the DDP one above."""
    worker = Path(__file__).parent / "ddp_worker.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
           "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
           "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
           "--fsdp_sync_module_states", "false",  # true: accelerate itself raises without a GPU
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(worker), str(tmp_path / "fsdp.json")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and not (tmp_path / "fsdp.json").exists()
    assert "an FSDP launch config was given, but accelerate runs this job as MULTI_CPU" in r.stderr, \
        r.stderr[-3000:]


def test_length_grouped_batches_cover_each_epoch_and_cut_padding():
    from echox.train.trainer import ShardedBatches

    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(5, 200, (203,), generator=g).tolist()
    s = ShardedBatches(203, 4, 0, 1, seed=1, lengths=lengths, pool=8)
    plain = ShardedBatches(203, 4, 0, 1, seed=1)
    for epoch in range(2):
        b = s.epoch_batches(epoch)
        assert len(b) == s.batches_per_epoch == 50
        flat = [i for x in b for i in x]
        assert len(set(flat)) == 200  # each example at most once, a full epoch of batches
        assert b == s.epoch_batches(epoch)  # a pure function of (seed, epoch): resumable

        def padding(batches):
            return sum(len(x) * max(lengths[i] for i in x) - sum(lengths[i] for i in x) for x in batches)

        assert padding(b) < 0.25 * padding(plain.epoch_batches(epoch))
    assert s.epoch_batches(0) != s.epoch_batches(1)
    # the order of batches is shuffled, not longest-first across the epoch
    firsts = [max(lengths[i] for i in x) for x in s.epoch_batches(0)]
    assert firsts != sorted(firsts, reverse=True)
    # two processes take disjoint halves of each global batch
    r0 = list(ShardedBatches(203, 2, 0, 2, seed=1, lengths=lengths, pool=8))
    r1 = list(ShardedBatches(203, 2, 1, 2, seed=1, lengths=lengths, pool=8))
    assert [a + b for a, b in zip(r0, r1)] == s.epoch_batches(0)
    with pytest.raises(ValueError, match="lengths"):
        ShardedBatches(10, 2, 0, 1, 0, lengths=[1, 2])


@pytest.mark.parametrize("stage", ["s2t", "t2c"])
def test_bf16_training_runs(stage, tmp_path, monkeypatch):
    from echox.train import trainer

    # bf16 autocast itself, on any CPU (the tiny config is cheap even where bf16 is emulated)
    monkeypatch.setattr(trainer, "cpu_has_fast_bf16", lambda: True)
    _, res = _run(stage, tmp_path, precision="bf16", max_steps=3, save_every=0)
    assert res.step == 3 and torch.isfinite(torch.tensor(res.last_loss))


def test_bf16_falls_back_to_fp32_on_a_cpu_without_native_bf16(tmp_path, monkeypatch, caplog):
    from echox.train import trainer

    monkeypatch.setattr(trainer, "cpu_has_fast_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="echox.train.trainer"):
        assert trainer.effective_precision("bf16", cuda=False) == "fp32"
    assert "no native bfloat16" in caplog.text
    assert trainer.effective_precision("bf16", cuda=True) == "bf16"  # a GPU keeps it
    assert trainer.effective_precision("fp16", cuda=False) == "fp16"  # only bf16 is swapped
    assert trainer.effective_precision("fp32", cuda=False) == "fp32"
    monkeypatch.setattr(trainer, "cpu_has_fast_bf16", lambda: True)
    assert trainer.effective_precision("bf16", cuda=False) == "bf16"
    # the trainer runs what effective_precision says
    monkeypatch.setattr(trainer, "cpu_has_fast_bf16", lambda: False)
    model = stages.prepare_model("t2c", preset_config("tiny-random"))
    tr = Trainer(model, _cfg(tmp_path, "t2c", precision="bf16", max_steps=1, save_every=0),
                 stages.ListDataset(t2c_examples()), stages.t2c_collator(model))
    assert tr.precision == "fp32" and tr.acc.mixed_precision == "no"


def test_cpu_precision_probes(monkeypatch):
    from echox.model import precision

    cpuinfo = Path("/proc/cpuinfo")
    lines = re.findall(r"^flags\s*:(.*)$", cpuinfo.read_text(), re.M) if cpuinfo.is_file() else []
    if lines:  # x86 Linux: the probes agree with the flags the kernel lists
        flags = set(lines[0].split())
        assert precision.cpu_has_fast_bf16() == bool(flags & {"avx512_bf16", "amx_tile"})
        assert precision.cpu_has_fast_fp16() == ("amx_fp16" in flags)
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_fast_fp16", lambda: True)
    assert precision.slow_on_cpu(torch.bfloat16) and not precision.slow_on_cpu(torch.float16)
    assert not precision.slow_on_cpu(torch.float32) and not precision.slow_on_cpu(None)


def test_grouping_needs_sizable_items(tmp_path):
    from echox.errors import ConfigError

    with pytest.raises(ConfigError, match="no length"):  # ListDataset cannot size its items
        _run("s2t", tmp_path, group_by_length=True)


def test_dataset_lengths_for_grouping(tmp_path):
    from echox.data.manifest import DialogueMessage, DialogueRecord, TtsRecord  # noqa: I001 (import loop)
    from echox.data.datasets import S2TDataset, T2CDataset
    from echox.errors import ManifestError

    recs = [DialogueRecord([DialogueMessage("user", "q" * n, audio="a.wav"),
                            DialogueMessage("assistant", "a" * (2 * n))]) for n in (3, 10)]
    with pytest.raises(ManifestError, match="audio file not found"):  # checked when made
        S2TDataset(recs, tmp_path)
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    ds = S2TDataset(recs, tmp_path)
    assert [ds.length(i) for i in range(2)] == [9, 30]

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1] * len(text)}

    t = T2CDataset([TtsRecord("abc", units=[1, 2, 3, 4])], Tok())
    assert t.length(0) == 7


def test_train_config_checks_precision():
    from echox.errors import ConfigError

    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="bf32")
    # ranges that torch and numpy would refuse later with a traceback
    with pytest.raises(ConfigError, match="weight_decay"):
        TrainConfig(weight_decay=-5.0)
    with pytest.raises(ConfigError, match="seed"):
        TrainConfig(seed=-1)
    with pytest.raises(ConfigError, match="seed"):
        TrainConfig(seed=2**32)
    for norm in (float("nan"), -1.0, float("inf")):  # NaN turned gradient clipping off silently
        with pytest.raises(ConfigError, match="max_grad_norm"):
            TrainConfig(max_grad_norm=norm)
    assert TrainConfig(max_grad_norm=0.0).max_grad_norm == 0.0  # 0: no clipping


def test_guided_attention_t2c_trains_and_eval_loss_stays_ce(tmp_path):
    """t2c.align_weight > 0: the training loss adds the guided-attention cost (logged as
    `align`), gradients reach the decoder, eval losses stay plain CE, and decoding works."""
    from echox.model import losses

    m = stages.prepare_model("t2c", preset_config("tiny-random", ["t2c.align_weight=2.0"]))
    assert m.t2c.model.config._attn_implementation == "eager"
    batch = stages.t2c_collator(m)(t2c_examples(3))
    m.train()
    out = m(batch, "t2c")
    align = out.metrics["align"]
    assert 0.0 < align < 1.0
    torch.manual_seed(0)
    m.eval()  # dropout is 0 in tiny-random: the same logits, no align term
    ev = m(batch, "t2c")
    assert "align" not in ev.metrics
    _, uo = m.forward_t2c(batch)
    ce = float(losses.aligned_ce_loss(uo.logits, uo.labels).detach())
    assert float(ev.loss.detach()) == pytest.approx(ce, rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(ce + 2.0 * align, rel=1e-4)
    m.train()
    m.zero_grad()
    m(batch, "t2c").loss.backward()
    q = m.t2c.model.layers[0].self_attn.q_proj.weight.grad
    assert q is not None and float(q.abs().sum()) > 0
    units = m.units_from_text(["Paris."])  # decoding runs on the eager attention too
    assert isinstance(units[0], list)
    _run("t2c", tmp_path, model=m, max_steps=2, save_every=0)
    _run("s2t", tmp_path, max_steps=1, save_every=0)
    e = stages.prepare_model("echo", init=tmp_path / "s2t" / "model", t2c_from=tmp_path / "t2c" / "model")
    assert e.config.t2c.align_weight == 2.0  # Stage III adopts the Stage II T2C config
    assert e.echo.model.config._attn_implementation == "eager"


def test_init_overrides_reconfigure_the_adapter(tmp_path, make_model):
    from echox.errors import StageError

    m = make_model(["adapter.ctc_head=tied", "adapter.blank_head=true"])
    m.trained_stages = ["s2t"]
    with torch.no_grad():  # a "trained" adapter: weights that a fresh one would not have
        m.adapter.mm_projector1.weight.add_(0.5)
    folder = m.save_pretrained(tmp_path / "s2t")
    feats = torch.randn(1, 4, m.llm.hidden_size)
    before = m.adapter.ctc_head(feats)

    got = stages.prepare_model("s2t", init=folder,
                               init_overrides=["adapter.ctc_head=linear", "adapter.shrink=false"])
    a = got.adapter
    assert got.config.adapter.ctc_head == "linear" and not got.config.adapter.shrink and not a.shrink
    torch.testing.assert_close(a.mm_projector1.weight, m.adapter.mm_projector1.weight)
    # the new linear head starts as the tied head it replaces, and it trains
    torch.testing.assert_close(a.ctc_head(feats), before)
    assert a.audio_feature_head.weight.requires_grad and a.blank_head.weight.requires_grad
    assert got.trained_stages == ["s2t"]

    same = stages.prepare_model("s2t", init=folder, init_overrides=["adapter.lookback_keys=kept"])
    assert same.config.adapter.lookback_keys == "kept" and same.adapter.lookback_keys == "kept"
    torch.testing.assert_close(same.adapter.ctc_head(feats), before)
    kept = stages.prepare_model("s2t", init=folder, init_overrides=["llm.lora.r=4", "loss.s2t_weight=0"])
    assert kept.config.llm.lora.r == m.config.llm.lora.r  # ignored: LoRA weights fit one r
    assert kept.config.loss.s2t_weight == 0  # loss weights apply
    with pytest.raises(StageError, match="unknown key"):
        stages.prepare_model("s2t", init=folder, init_overrides=["adapter.nonsense=1"])
    with pytest.raises(StageError, match="unknown key"):  # a typo of t2c.beams was "ignored"
        stages.prepare_model("s2t", init=folder, init_overrides=["t2c.beam=4"])


def test_init_override_sets_the_lora_dropout(tmp_path, make_model):
    m = make_model()
    m.trained_stages = ["s2t"]
    folder = m.save_pretrained(tmp_path / "s2t")

    def drops(model):
        return [d for mod in model.llm.model.modules()
                if isinstance(getattr(mod, "lora_dropout", None), torch.nn.ModuleDict)
                for d in mod.lora_dropout.values()]

    on = stages.prepare_model("s2t", init=folder, init_overrides=["llm.lora.dropout=0.3"])
    assert on.config.llm.lora.dropout == 0.3 and drops(on)
    assert all(isinstance(d, torch.nn.Dropout) and d.p == 0.3 for d in drops(on))
    # the saved model records the new value; 0 puts peft's identity back (no masks drawn)
    again = stages.prepare_model("s2t", init=on.save_pretrained(tmp_path / "on"),
                                 init_overrides=["llm.lora.dropout=0"])
    assert again.config.llm.lora.dropout == 0.0
    assert all(isinstance(d, torch.nn.Identity) for d in drops(again))
    with pytest.raises(ValueError, match="LoRA dropout"):
        again.llm.set_lora_dropout(1.5)


def test_init_override_sets_the_unit_decoding(tmp_path, make_model):
    """`--set t2c.beams=N` with `--init`: the pseudo-labels' (and the saved model's) decoding;
    architecture settings of the T2C stay the checkpoint's."""
    m = make_model()
    m.trained_stages = ["s2t"]
    folder = m.save_pretrained(tmp_path / "s2t")
    got = stages.prepare_model("s2t", init=folder, init_overrides=[
        "t2c.beams=4", "t2c.length_penalty=0.5", "t2c.num_layers=5"])
    assert (got.config.t2c.beams, got.config.t2c.length_penalty) == (4, 0.5)
    assert got.echo.default_sampling(3).num_beams == 4
    assert got.config.t2c.num_layers == m.config.t2c.num_layers


def test_ctc_only_stage_i_never_runs_the_llm(make_model):
    m = make_model()
    batch = m.collate(dialogues(2))
    full = m.forward_s2t(batch)

    def no_llm(*a, **k):
        raise AssertionError("the LLM ran")

    m.llm.forward = no_llm
    out = m(batch, task="s2t", ctc_only=True)
    assert set(out.metrics) == {"ctc"}
    torch.testing.assert_close(out.loss, full.ctc)
    out.loss.backward()
    assert m.adapter.mm_projector1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in m.llm.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("head", ["tied", "linear"])
def test_restricted_ctc_vocabulary_is_the_full_head_on_its_columns(head, tmp_path, make_model):
    import torch.nn.functional as F

    m = make_model([f"adapter.ctc_head={head}", "adapter.blank_head=true"] if head == "tied"
                   else ["adapter.ctc_head=linear"])
    feats = torch.randn(2, 5, m.llm.hidden_size)
    full = m.adapter.ctc_head(feats)
    ids = [3, 7, 11, 20, 42]
    n = m.restrict_ctc(ids)
    a = m.adapter
    cols = sorted(set(ids) | {a.blank_id})
    assert n == len(cols) == a.ctc_vocab == m.config.adapter.ctc_vocab
    assert a.ctc_columns.tolist() == cols and a.ctc_columns[a.ctc_blank] == a.blank_id
    torch.testing.assert_close(a.ctc_head(feats), full[..., cols])  # the same logits, fewer columns
    assert a.ctc_token_ids(torch.tensor([0, a.ctc_blank])).tolist() == [3, a.blank_id]

    # targets map to columns; a token outside them is left out of its row
    tg = torch.tensor([[7, 99, 42], [11, -100, -100]])
    assert a.ctc_target_index(tg, -100).tolist() == [[cols.index(7), cols.index(42), -100],
                                                     [cols.index(11), -100, -100]]
    # the CTC loss is the softmax over the columns only
    batch = m.collate([[Turn("user", audio=noise(1.0, 1), transcript="q"), Turn("assistant", text="Yes.")]])
    batch.ctc_targets = torch.tensor([[7, 42, 7]])
    out = m.forward_s2t(batch)
    logp = out.speech.ctc_logits.float().log_softmax(-1).transpose(0, 1)
    want = F.ctc_loss(logp, torch.tensor([cols.index(7), cols.index(42), cols.index(7)]),
                      out.speech.frame_lengths, torch.tensor([3]), blank=a.ctc_blank, zero_infinity=True)
    assert out.speech.ctc_logits.shape[-1] == len(cols)
    torch.testing.assert_close(out.ctc, want)
    out.loss.backward()
    assert a.mm_projector1.weight.grad.abs().sum() > 0

    m.trained_stages = ["s2t"]
    back = EchoX.from_pretrained(m.save_pretrained(tmp_path / "m", dtype=torch.float16))
    assert back.adapter.ctc_columns.tolist() == cols and back.config.adapter.ctc_vocab == len(cols)
    torch.testing.assert_close(back.adapter.ctc_head(feats), a.ctc_head(feats), atol=2e-2, rtol=2e-2)


def test_restrict_ctc_checks_its_ids(make_model):
    m = make_model()
    with pytest.raises(ValueError, match="token ids must lie"):
        m.restrict_ctc([m.llm.vocab_size + 5])
    with pytest.raises(ValueError, match="ctc_vocab"):
        m.adapter.set_ctc_columns([1, 2])


def test_train_ctc_vocab_transcripts_sets_the_columns_once(tmp_path, make_model):
    from echox.data.datasets import ConcatDataset, S2TDataset
    from echox.data.manifest import read_jsonl
    from echox.train.run import restrict_ctc_to_transcripts

    import soundfile as sf

    sf.write(tmp_path / "a.wav", noise(0.5), 16000)
    lines = [{"id": f"d{i}", "conversations": [{"from": "user", "value": text, "audio": "a.wav"},
                                              {"from": "assistant", "value": "ok"}]}
             for i, text in enumerate(["the red fox", "a blue fox"])]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    recs = read_jsonl(tmp_path / "d.jsonl", "dialogue").records
    data = ConcatDataset([S2TDataset(recs[:1], tmp_path), S2TDataset(recs[1:], tmp_path)])
    assert data.transcripts() == ["the red fox", "a blue fox"]
    m = make_model()
    restrict_ctc_to_transcripts(m, data)
    want = {i for t in data.transcripts() for i in m.tokenizer(t, add_special_tokens=False)["input_ids"]}
    assert set(m.adapter.ctc_columns.tolist()) == want | {m.adapter.blank_id}
    before = m.adapter.ctc_columns.clone()
    restrict_ctc_to_transcripts(m, S2TDataset(recs[:1], tmp_path))  # already restricted: kept
    assert torch.equal(m.adapter.ctc_columns, before)


def test_extra_adapter_layers_start_as_the_identity_and_learn(tmp_path, make_model):
    """`adapter.extra_layers`: an adapter grown from a trained one computes what it did (zero
    residual branches), its new layers get gradients, and a checkpoint keeps them."""
    m = make_model(["adapter.lookback_dropout=0.0"]).eval()
    wave = [noise(1.0, 3)]
    with torch.no_grad():
        before = m.encode_speech(wave)
    changed = m.reconfigure_adapter(dataclasses.replace(m.config.adapter, extra_layers=2))
    assert changed["dropped"] == [] and all(k.startswith("extra_layers.") for k in changed["new"])
    assert len(m.adapter.extra_layers) == 2 and m.config.adapter.extra_layers == 2
    m.eval()
    with torch.no_grad():
        after = m.encode_speech(wave)
    torch.testing.assert_close(after.ctc_logits, before.ctc_logits)
    torch.testing.assert_close(after.embeds, before.embeds)

    m.train()
    batch = m.collate([[Turn("user", audio=wave[0], transcript="q"), Turn("assistant", text="Yes.")]])
    m.forward_s2t(batch).loss.backward()
    for layer in m.adapter.extra_layers:
        assert layer.linear2.weight.grad.abs().sum() > 0  # the zero branch is not stuck at zero

    m.trained_stages = ["s2t"]
    back = EchoX.from_pretrained(m.save_pretrained(tmp_path / "m"))
    assert back.config.adapter.extra_layers == 2
    torch.testing.assert_close(back.adapter.extra_layers[1].linear1.weight, m.adapter.extra_layers[1].linear1.weight)
    with pytest.raises(ValueError, match="extra_layers"):
        dataclasses.replace(m.config.adapter, extra_layers=-1).validate()


def test_frozen_s2t_echo_reads_cached_states(tmp_path, make_model, caplog):
    """`train.freeze_s2t`: the response states are computed once and cached; a step on them
    gives the echo and denoising losses of a step that runs the S2T model, without L_S2T."""
    m = make_model(["t2c.max_positions=64"]).eval()
    d = [[Turn("user", audio=noise(0.6, 1)), Turn("assistant", text="A longer answer here.")],
         [Turn("user", audio=noise(0.8, 2)), Turn("assistant", text="Short.")]]
    units = [[1, 2, 3], [4, 5, 6, 7]]
    cache = tmp_path / "states"
    states = stages.precompute_states(m, d, cache)
    files = sorted(cache.rglob("*.safetensors"))
    assert len(files) == 2 and [len(s) for s in states] == [1, 1]
    ex = [stages.EchoExample(t, units=[u], states=s) for t, u, s in zip(d, units, states)]
    batch = stages.echo_collator(m)(ex)
    cached = m.forward_echo(batch)
    batch.states = None
    full = m.forward_echo(batch)
    assert float(cached.s2t) == 0.0 and float(full.s2t.detach()) > 0
    torch.testing.assert_close(cached.echo, full.echo, atol=2e-3, rtol=2e-3)  # float16 states
    torch.testing.assert_close(cached.den, full.den, atol=2e-3, rtol=2e-3)

    # offline pseudo-labels from the cached states: the segments and units of an S2T forward
    cut = dict(cut=True, batch_size=2)
    pl = stages.precompute_pseudo_labels(m, d, tmp_path / "a.jsonl", **cut)
    pl_states = stages.precompute_pseudo_labels(m, d, tmp_path / "b.jsonl", states=states, **cut)
    assert [e.segments for e in pl_states] == [e.segments for e in pl]
    assert [e.units for e in pl_states] == [e.units for e in pl]

    # cached: read back, not recomputed; a corrupt file is recomputed with a warning
    files[0].write_bytes(b"not a safetensors file")
    with caplog.at_level("WARNING"):
        again = stages.precompute_states(m, d, cache)
    assert "unreadable cached states" in caplog.text
    for a, b in zip(again, states):
        torch.testing.assert_close(a[0], b[0])
    # another S2T model (changed adapter weights) never reads these states
    with torch.no_grad():
        m.adapter.mm_projector1.bias.add_(0.5)
    stages.precompute_states(m, d, cache)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2
    # states that do not fit the batch's responses are refused
    batch.states = [s[0][:-1] for s in states]
    with pytest.raises(ValueError, match="stale states cache"):
        m.forward_echo(batch)


def test_char_condition_reads_the_text_byte_by_byte(tmp_path):
    """`t2c.char_condition`: each token's condition is repeated once per byte of its text with
    that byte's embedding; the T2C trains on it, Stage III adopts it with the T2C, and the
    echo decoder reads Adapter(H) the same way."""
    from echox.model.unit_decoder import CharCondition

    cc = CharCondition(4, max_chars=3)
    cc.token_text = {0: "ab", 1: "", 2: "wxyz"}.__getitem__
    cond = torch.randn(3, 4)
    out = cc(cond, [0, 1, 2])
    assert out.shape == (2 + 1 + 3, 4)  # "ab", one row for no text, "wxy" (max_chars)
    torch.testing.assert_close(out[0] - out[1], cc.chars.weight[ord("a") + 1] - cc.chars.weight[ord("b") + 1]
                               + cc.pos.weight[0] - cc.pos.weight[1])
    torch.testing.assert_close(out[2], cond[1] + cc.chars.weight[0] + cc.pos.weight[0])
    with pytest.raises(ValueError, match="token ids"):
        cc(cond, [0, 1])

    m = stages.prepare_model("t2c", preset_config("tiny-random", ["t2c.char_condition=true"]))
    w0 = m.t2c.char_condition.chars.weight.detach().clone()
    _run("t2c", tmp_path, model=m, max_steps=2, save_every=0, lr=0.05)
    assert not torch.equal(m.t2c.char_condition.chars.weight, w0)  # the byte embeddings learn
    ids = m.tokenizer("Tokyo is big.", add_special_tokens=False)["input_ids"]
    cond = m.t2c.expand([torch.randn(len(ids), m.t2c.adapter.in_features)], [ids])
    rows, _ = m.t2c._rows(cond, [[1, 2, 3]])
    # Stage II leaves out pairs longer than max_positions by this count: a row per byte here
    assert rows[0].shape[0] == m.t2c.row_length(ids, 3) == 2 + len(b"Tokyo is big.") + 3
    labels = m.pseudo_labels([m.tokenizer("Tokyo", add_special_tokens=False)["input_ids"]])
    assert len(labels) == 1 and all(0 <= u < m.t2c.num_units for u in labels[0])
    _run("s2t", tmp_path, max_steps=1, save_every=0)
    e = stages.prepare_model("echo", init=tmp_path / "s2t" / "model", t2c_from=tmp_path / "t2c" / "model")
    assert e.config.t2c.char_condition
    torch.testing.assert_close(e.echo.char_condition.chars.weight, m.t2c.char_condition.chars.weight)
    batch = e.collate([[Turn("user", audio=noise(0.5, 4)), Turn("assistant", text="Tokyo is big.")]])
    out = e.forward_echo(batch, units=[[1, 2, 3]])
    out.loss.backward()
    assert e.echo.char_condition.chars.weight.grad.abs().sum() > 0


def test_shared_prompt_runs_once_with_the_same_loss_and_gradients(make_model):
    """A Stage I batch runs the tokens every row starts with once (their KV cache repeated for
    the rows): the loss, logits, hidden states and every gradient are those of one pass over
    the whole batch. A multi-turn row with text before its audio shares less."""
    m = make_model(["llm.lora.dropout=0.0"])
    batch = m.collate(dialogues(3) + [[Turn("user", text="Hi."), Turn("assistant", text="Hello."),
                                        Turn("user", audio=noise(0.7, 9), transcript="q"),
                                        Turn("assistant", text="Sure.")]])
    calls = []
    llm_forward = m.llm.forward
    m.llm.forward = lambda e, *a, **k: calls.append(tuple(e.shape[:2])) or llm_forward(e, *a, **k)
    split = m.forward_s2t(batch)
    assert len(calls) == 2 and calls[0][0] == 1 and calls[0][1] > 0  # the shared part: one row
    split.loss.backward()
    g_split = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    calls.clear()
    full = m.forward_s2t(batch, share_prompt=False)  # one pass over the whole batch
    assert len(calls) == 1
    full.loss.backward()
    g_full = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    torch.testing.assert_close(split.loss, full.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split.logits, full.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(split.hidden, full.hidden, rtol=1e-4, atol=1e-5)
    assert g_split.keys() == g_full.keys() and any("lora_" in n for n in g_full)
    for n in g_full:
        torch.testing.assert_close(g_split[n], g_full[n], rtol=1e-4, atol=1e-6, msg=n)


def test_llm_attention_setting_switches_the_kernel_not_the_loss(tmp_path):
    """train.llm_attention: eager trains with plain matmul attention: the same losses as the
    default kernel (up to float rounding), and a bad name is refused."""
    from echox.errors import ConfigError

    sdpa_model, sdpa = _run("s2t", tmp_path / "a", max_steps=3, save_every=0)
    eager_model, eager = _run("s2t", tmp_path / "b", max_steps=3, save_every=0, llm_attention="eager")
    assert eager_model.llm.base.config._attn_implementation == "eager"
    assert sdpa_model.llm.base.config._attn_implementation != "eager"
    assert eager.first_loss == pytest.approx(sdpa.first_loss, rel=1e-4)
    assert eager.last_loss == pytest.approx(sdpa.last_loss, rel=1e-3)
    with pytest.raises(ConfigError, match="llm_attention"):
        TrainConfig(llm_attention="flash")


def test_max_minutes_stops_the_run_and_saves_the_final_model(tmp_path):
    # a limit that is over after the first step: the run ends there, as if at max_steps
    model, res = _run("s2t", tmp_path, max_steps=50, save_every=2, max_minutes=1e-9)
    out = tmp_path / "s2t"
    assert res.step == 1
    assert EchoX.from_pretrained(out / "model").trained_stages == ["s2t"]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1]
    from echox.errors import ConfigError

    with pytest.raises(ConfigError, match="max_minutes"):
        _cfg(tmp_path, "s2t", max_minutes=-1)
    with pytest.raises(ConfigError, match="precompute_batch"):
        _cfg(tmp_path, "echo", precompute_batch=-1)


def test_cpu_steps_hand_freed_heap_back(tmp_path, monkeypatch):
    """On a CPU, each optimizer step ends with glibc's malloc_trim (a Stage III run whose heap
    fragmented grew to 16.7 GB and was killed); off glibc there is nothing to call."""
    import echox.train.trainer as trainer_mod

    calls = []
    monkeypatch.setattr(trainer_mod, "heap_trimmer", lambda: lambda pad: calls.append(pad) or 1)
    _, res = _run("t2c", tmp_path, max_steps=3, save_every=0)
    assert res.step == 3 and calls == [0, 0, 0]
    monkeypatch.undo()
    trim = trainer_mod.heap_trimmer()
    if platform.libc_ver()[0] == "glibc":
        assert trim is not None and trim(0) in (0, 1)


def test_resume_from_a_run_folder_takes_its_newest_checkpoint(tmp_path):
    """`--resume runs/x` (the run, not runs/x/checkpoints/step-N) said a config.json was missing."""
    from echox.errors import CheckpointError

    _run("t2c", tmp_path / "a", max_steps=4, save_every=2)
    _, res = _run("t2c", tmp_path / "b", max_steps=6, save_every=2, resume=str(tmp_path / "a" / "t2c"))
    assert res.step == 6
    rows = [json.loads(x) for x in (tmp_path / "b" / "t2c" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [5, 6]  # it went on from a's step 4
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        _run("t2c", tmp_path / "c", max_steps=6, resume=str(tmp_path / "empty"))


def test_a_nan_eval_loss_never_becomes_the_best(tmp_path):
    model = stages.prepare_model("t2c", preset_config("tiny-random"))
    tr = Trainer(model, _cfg(tmp_path, "t2c", keep_best=True, max_steps=1, save_every=0),
                 stages.ListDataset(t2c_examples()), stages.t2c_collator(model))
    tr.step = 1
    tr._save_best(float("nan"))
    assert tr.best is None and not (tmp_path / "t2c" / "best").exists()
    tr._save_best(2.5)
    tr.step = 2
    tr._save_best(float("nan"))
    assert tr.best == (1, 2.5)
    assert json.loads((tmp_path / "t2c" / "best" / "best.json").read_text())["step"] == 1


def test_stop_requests_wait_for_the_step_but_a_second_ctrl_c_does_not(tmp_path, capfd):
    model = stages.prepare_model("t2c", preset_config("tiny-random"))
    tr = Trainer(model, _cfg(tmp_path, "t2c"), stages.ListDataset(t2c_examples()), stages.t2c_collator(model))
    tr.request_stop(signal.SIGTERM)
    tr.request_stop(signal.SIGTERM)  # a process manager's repeat changes nothing
    # the stop is acknowledged at once, once (it used to print nothing until the step ended)
    assert [x for x in capfd.readouterr().err.splitlines() if x.startswith("echox")] == [
        "echox train: SIGTERM: stopping after the step in progress, with a checkpoint of it"]
    assert tr.stop_signal == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        tr.request_stop(signal.SIGINT)
    res = tr.train()
    ck = tmp_path / "t2c" / "checkpoints" / "step-000001"
    assert (res.step, res.stopped_by, res.last_checkpoint) == (1, signal.SIGTERM, (1, ck))
    assert (ck / "model.safetensors").is_file()  # the step it stopped after is kept
    assert not (tmp_path / "t2c" / "model").exists()



def test_a_stop_during_the_final_save_says_the_run_is_finishing(tmp_path, capfd):
    model = stages.prepare_model("t2c", preset_config("tiny-random"))
    tr = Trainer(model, _cfg(tmp_path, "t2c", max_steps=1, save_every=0),
                 stages.ListDataset(t2c_examples()), stages.t2c_collator(model))
    save = tr._save

    def save_with_a_signal(final: bool = False):
        if final:
            tr.request_stop(signal.SIGTERM)  # a job scheduler's stop while the model is saved
        return save(final)

    tr._save = save_with_a_signal
    res = tr.train()
    assert res.stopped_by == 0 and (tmp_path / "t2c" / "model" / "model.safetensors").is_file()
    # it used to promise a stop "after the step in progress" with a checkpoint, and then went on
    assert [x for x in capfd.readouterr().err.splitlines() if x.startswith("echox")] == [
        "echox train: SIGTERM: the last step is made: finishing the final save and eval"]

def _worker_ignores_sigterm(batch):
    return signal.getsignal(signal.SIGTERM) is signal.SIG_IGN and signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_dataloader_workers_leave_sigterm_and_ctrl_c_to_the_main_process(tmp_path):
    """A SIGTERM to the whole process group killed the DataLoader workers, and the run ended
    with "DataLoader worker ... is killed by signal" instead of stopping and saving; a Ctrl-C
    ran each worker's copy of the stop handler, which printed its line once per worker."""
    model = stages.prepare_model("t2c", preset_config("tiny-random"))
    tr = Trainer(model, _cfg(tmp_path, "t2c", num_workers=1), stages.ListDataset(t2c_examples()),
                 _worker_ignores_sigterm)
    assert all(tr.loader)
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN  # the main process keeps its own


def test_logged_lr_is_the_one_the_step_trained_with(tmp_path):
    """metrics.jsonl's lr was the next step's: step 1 of a 1-step warmup logged 3e-3 though it
    trained at lr 0 (no weight moved), and the last step logged 0."""
    torch.manual_seed(0)
    model = stages.prepare_model("t2c", preset_config("tiny-random"))
    before = {k: v.clone() for k, v in _trained_state(model).items()}
    cfg = _cfg(tmp_path, "t2c", max_steps=3, warmup_steps=2, save_every=0, schedule="constant")
    tr = Trainer(model, cfg, stages.ListDataset(t2c_examples()), stages.t2c_collator(model))
    tr.train(stop_at=1)
    rows = [json.loads(x) for x in (tmp_path / "t2c" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[0]["lr"] == 0.0
    after = _trained_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # lr 0: nothing moved


def test_a_resume_with_another_lr_records_the_lr_the_run_keeps(tmp_path):
    """After --resume with another lr (the checkpoint's lr is kept), training_args.json and the
    trainer state recorded the new lr, and the next plain resume warned of a change never made."""
    _run("t2c", tmp_path, max_steps=4, save_every=2, stop_at=2)
    _run("t2c", tmp_path, max_steps=4, save_every=2, resume="latest", lr=0.1)
    out = tmp_path / "t2c"
    for folder in (out / "checkpoints" / "step-000002", out / "model"):
        assert json.loads((folder / "training_args.json").read_text())["lr"] == pytest.approx(3e-3)


def test_a_roll_back_sets_the_later_saves_aside(tmp_path):
    """--resume from an older checkpoint of the same run folder left the later ones live: the
    next --resume went on from the abandoned step 6, keep_last deleted the new saves as older
    than them, and best/ stayed a model of the abandoned steps. They go aside (renamed, not
    deleted) at the resumed run's first save; a run stopped before it changes nothing."""
    kw = dict(max_steps=6, save_every=2, keep_last=5, eval_every=1, keep_best=True)
    _run("s2t", tmp_path, **kw)
    out = tmp_path / "s2t"
    best_json = out / "best" / "best.json"
    best_json.write_text(json.dumps({"step": 6, "eval_loss": 0.0}))  # unbeatable, of step 6
    model = stages.prepare_model("s2t", preset_config("tiny-random"))
    tr = Trainer(model, _cfg(tmp_path, "s2t", **kw, seed=7), stages.ListDataset(dialogues()),
                 stages.s2t_collator(model))
    tr._resume(out / "checkpoints" / "step-000002")  # resumed, nothing saved yet
    assert tr.best is None  # the abandoned best is no bar for the new evals
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == \
        ["step-000002", "step-000004", "step-000006"]
    assert (out / "metrics-abandoned-after-step-000002.jsonl").is_file()
    _, res = _run("s2t", tmp_path, **kw, resume=str(out / "checkpoints" / "step-000002"),
                  stop_at=3, seed=7)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["abandoned-step-000004", "abandoned-step-000006", "step-000002", "step-000003"]
    assert json.loads((out / "best-abandoned-step-000006" / "best.json").read_text())["step"] == 6
    assert json.loads(best_json.read_text())["step"] == 3  # the new line's
    _, res = _run("s2t", tmp_path, **kw, resume="latest", seed=7)
    assert res.step == 6
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    from echox.train.trainer import checkpoint_folders

    for n in (999_999, 1_000_000, 2):
        (tmp_path / "checkpoints" / f"step-{n:06d}").mkdir(parents=True)
    assert [p.name for p in checkpoint_folders(tmp_path)] == \
        ["step-000002", "step-999999", "step-1000000"]


def test_a_resume_on_another_number_of_processes_goes_on_by_examples(tmp_path, caplog):
    """The saved position counts global batches (batch_size x processes): a run saved by 2
    processes and resumed by 1 re-read half the epoch's examples, silently."""
    import logging

    from echox.model.checkpoint import sha256_file

    _run("t2c", tmp_path, max_steps=8, save_every=1, stop_at=1)
    ck = tmp_path / "t2c" / "checkpoints" / "step-000001"
    state = torch.load(ck / "trainer_state.pt", weights_only=False)
    assert state["index"] == 1 and state["num_processes"] == 1
    state["num_processes"] = 2  # as if 2 processes had made it: 1 batch of 2 x 2 examples
    torch.save(state, ck / "trainer_state.pt")
    sums = json.loads((ck / "checksums.json").read_text())
    if "trainer_state.pt" in sums:
        sums["trainer_state.pt"] = sha256_file(ck / "trainer_state.pt")
        (ck / "checksums.json").write_text(json.dumps(sums))
    model = stages.prepare_model("t2c", preset_config("tiny-random"))
    tr = Trainer(model, _cfg(tmp_path, "t2c", max_steps=8, save_every=1),
                 stages.ListDataset(t2c_examples()), stages.t2c_collator(model))
    with caplog.at_level(logging.WARNING):
        tr._resume(ck)
    assert tr.sampler.index == 2  # the 4 examples done are 2 batches of 2 here
    assert "global batch was 2 x 2 processes, this run's is 2 x 1" in caplog.text
    # 2 processes x batch 2 resumed as 1 x batch 4: the same global batch, nothing converted
    tr4 = Trainer(model, _cfg(tmp_path, "t2c", max_steps=8, save_every=1, batch_size=4),
                  stages.ListDataset(t2c_examples()), stages.t2c_collator(model))
    tr4._resume(ck)
    assert tr4.sampler.index == 1


def test_init_reads_the_base_models_from_where_the_user_says(tmp_path, make_model, monkeypatch):
    """A checkpoint records its frozen LLM and encoder by the path they had; once moved (or on
    a cluster with local copies of the hub ids) no stage could read it: --set
    model.llm.name_or_path was ignored beside --init, and a relative path was recorded as typed."""
    from echox.errors import EchoXError

    m = make_model()
    m.trained_stages = ["s2t"]
    folder = m.save_pretrained(tmp_path / "s2t")
    llm = m.config.llm.name_or_path
    with pytest.raises(EchoXError, match="/no/such/llm"):  # it is read from there now
        stages.prepare_model("s2t", init=folder, init_overrides=["llm.name_or_path=/no/such/llm"])
    moved = stages.prepare_model("s2t", init=folder, init_overrides=[f"llm.name_or_path={llm}"])
    assert moved.config.llm.name_or_path == llm
    # --t2c-from beside a relocated LLM: the T2C must name the LLM --init names
    s2t_dir, t2c_dir = _echo_init(tmp_path / "pair")
    ok = stages.prepare_model("echo", init=s2t_dir, t2c_from=t2c_dir,
                              init_overrides=[f"llm.name_or_path={llm}"])
    assert "t2c" in ok.trained_stages
    meta = json.loads((t2c_dir / "config.json").read_text())
    meta["config"]["llm"]["name_or_path"] = "another/llm"
    from echox.model.checkpoint import sha256_file

    (t2c_dir / "config.json").write_text(json.dumps(meta))
    sums = json.loads((t2c_dir / "checksums.json").read_text())
    sums["config.json"] = sha256_file(t2c_dir / "config.json")
    (t2c_dir / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(EchoXError, match="trained on LLM embeddings of another/llm"):
        stages.prepare_model("echo", init=s2t_dir, t2c_from=t2c_dir,
                             init_overrides=[f"llm.name_or_path={llm}"])
    (tmp_path / "models" / "llm").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert stages.local_or_hub("models/llm") == str(tmp_path / "models" / "llm")
    assert stages.local_or_hub("org/not-here") == "org/not-here"
