import json
import os
import re
import shutil

import pytest
import torch
from conftest import noise

from echox.errors import CheckpointError, UnitError
from echox.model.batch import collate_t2c
from echox.model.echox import EchoX
from echox.model.prompt import Turn


def _perturb(m):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _outputs(m):
    m.eval()
    b = m.collate([[Turn("user", audio=noise(0.9, 3), transcript="hi"), Turn("assistant", text="Hello there.")]])
    s2t = m.forward_s2t(b)
    units = [[1, 2, 3, 4]]
    echo = m.forward_echo(b, units)
    t2c = m.forward_t2c(collate_t2c([[5, 6, 7]], [[3, 2, 1]]))[1]
    return s2t.logits, s2t.speech.ctc_logits, echo.units.logits, t2c.logits


def test_save_load_gives_bit_identical_logits(make_model, tmp_path):
    m = make_model()
    _perturb(m)
    m.echo.load_state_dict({k: v + 0.01 for k, v in m.t2c.state_dict().items()})  # echo != t2c
    before = _outputs(m)
    old_umask = os.umask(0o022)  # (under 077 every file would be 0600, and the check below moot)
    try:
        folder = m.save_pretrained(tmp_path / "ckpt")
    finally:
        os.umask(old_umask)
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["checksums.json", "config.json", "model.safetensors", "tokenizer"]
    assert not list(tmp_path.glob(".ckpt*")), "temp folders must be gone"
    # every file as readable as the config beside it (safetensors alone writes its file 0600)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir() if p.is_file()}
    assert set(modes.values()) == {0o644}, modes
    m2 = EchoX.from_pretrained(folder)
    # in eval mode, as transformers' models come: it came in training mode, so the README's
    # library calls ran with dropout (LoRA, denoiser, echo decoder) and answered at random
    assert not any(x.training for x in m2.modules())
    after = _outputs(m2)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    # only trained parts are stored: no frozen Whisper or base-LLM weights
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any(k.startswith("encoder.") for k in keys)
    assert all("lora_" in k for k in keys if k.startswith("llm."))
    assert any(k.startswith("echo.") for k in keys) and any(k.startswith("denoiser.") for k in keys)


def test_overwrite_is_atomic_and_replaces(make_model, tmp_path):
    m = make_model()
    folder = m.save_pretrained(tmp_path / "ckpt")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    _perturb(m)
    m.save_pretrained(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # the second save replaced the first: the reloaded weights are the perturbed ones
    reloaded = EchoX.from_pretrained(folder).state_dict()
    changed = [k for k, v in m.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "the perturbation changed nothing"
    assert all(torch.equal(reloaded[k], m.state_dict()[k]) for k in changed)


def test_missing_and_corrupt_files_are_named(make_model, tmp_path):
    m = make_model()
    folder = m.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        EchoX.from_pretrained(tmp_path / "nope")

    w = folder / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])  # half-written
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        EchoX.from_pretrained(folder)
    w.write_bytes(data)

    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing: .*config\.json"):
        EchoX.from_pretrained(folder)


def test_a_tokenizer_missing_or_broken_outside_the_checksums(make_model, tmp_path):
    """checksums.json written by an older save (or edited) may not list the tokenizer files:
    a missing or unreadable tokenizer is still a CheckpointError naming its folder."""
    import json
    import shutil

    folder = make_model().save_pretrained(tmp_path / "ckpt")
    sums = folder / "checksums.json"
    kept = {k: v for k, v in json.loads(sums.read_text()).items() if not k.startswith("tokenizer")}
    sums.write_text(json.dumps(kept))
    EchoX.from_pretrained(folder)  # complete: loads
    good = folder / "tokenizer" / "tokenizer.json"
    text = good.read_text()
    good.write_text(text[: len(text) // 2])  # half-written
    with pytest.raises(CheckpointError, match=r"tokenizer: the checkpoint's tokenizer cannot be read"):
        EchoX.from_pretrained(folder)
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(CheckpointError, match=r"tokenizer: the checkpoint's tokenizer is missing"):
        EchoX.from_pretrained(folder)


def test_weights_that_do_not_fit_are_reported(make_model, tmp_path):
    m = make_model()
    folder = m.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["t2c"]["num_layers"] = 3
    (folder / "config.json").write_text(json.dumps(meta))
    sums = json.loads((folder / "checksums.json").read_text())
    import hashlib

    sums["config.json"] = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    (folder / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(CheckpointError, match="does not fit"):
        EchoX.from_pretrained(folder)


def _same_s2t_to_fp16(m, back):
    """The reloaded float16 copy gives the original's S2T logits to fp16 precision; the batch."""
    m.eval()
    back.eval()
    b = m.collate([[Turn("user", audio=noise(0.9, 3), transcript="hi"),
                    Turn("assistant", text="Hello there.")]])
    torch.testing.assert_close(back.forward_s2t(b).logits, m.forward_s2t(b).logits,
                               rtol=0.02, atol=0.02)
    return b


def test_slim_checkpoint_for_shipping(make_model, tmp_path):
    """omit the T2C and store float16: smaller, loads back in float32, same outputs to fp16."""
    from safetensors import safe_open

    m = make_model()
    _perturb(m)
    m.trained_stages = ["s2t", "t2c", "echo"]
    full = m.save_pretrained(tmp_path / "full")
    slim = m.save_pretrained(tmp_path / "slim", omit_parts=("t2c",), dtype=torch.float16)
    meta = json.loads((slim / "config.json").read_text())
    assert meta["omitted_parts"] == ["t2c"] and meta["weights_dtype"] == "float16"
    assert meta["trained_stages"] == ["s2t", "echo"]  # the T2C is gone, so is its stage
    with safe_open(str(slim / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert not any(k.startswith("t2c.") for k in keys)
        assert {f.get_tensor(k).dtype for k in keys} == {torch.float16}
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(slim) < 0.5 * size(full)
    back = EchoX.from_pretrained(slim)
    assert back.trained_stages == ["s2t", "echo"]
    assert all(p.dtype == torch.float32 for p in back.parameters())
    b = _same_s2t_to_fp16(m, back)
    torch.testing.assert_close(back.forward_echo(b, [[1, 2, 3, 4]]).units.logits,
                               m.forward_echo(b, [[1, 2, 3, 4]]).units.logits, rtol=0.02, atol=0.02)
    # its T2C holds initial weights: units from text were noise ([1827, 539, 539, ...])
    assert back.omitted_parts == ("t2c",) and m.units_from_text(["hi"])
    with pytest.raises(UnitError, match="saved without its T2C .* units_from_hidden"):
        back.units_from_text(["hi"])
    again = EchoX.from_pretrained(back.save_pretrained(tmp_path / "again"))  # it stays left out
    assert json.loads((tmp_path / "again" / "config.json").read_text())["omitted_parts"] == ["t2c"]
    with pytest.raises(UnitError, match="saved without its T2C"):
        again.units_from_text(["hi"])
    with pytest.raises(CheckpointError, match="trained with stage echo"):
        m.save_pretrained(tmp_path / "bad", omit_parts=("echo",))
    with pytest.raises(CheckpointError, match="trained with stage s2t"):
        m.save_pretrained(tmp_path / "bad", omit_parts=("adapter",))
    with pytest.raises(CheckpointError, match="can be left out"):
        m.save_pretrained(tmp_path / "bad", omit_parts=("encoder",))


def _export(make_model, tmp_path, capsys, stages: list[str], name: str):
    """A perturbed tiny-random model recorded as trained by `stages`, saved and exported with
    `echox train export`: (model, its folder, the export, the printed report, the weight-name
    prefixes in the export)."""
    from safetensors import safe_open

    from echox.cli import main

    m = make_model()
    _perturb(m)
    m.trained_stages = stages
    src = m.save_pretrained(tmp_path / stages[-1])
    out = tmp_path / name
    assert main(["train", "export", "--model", str(src), "--out", str(out)]) == 0
    rep = json.loads(capsys.readouterr().out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    return m, src, out, rep, prefixes


def test_export_keeps_only_trained_parts(make_model, tmp_path, capsys):
    """`echox train export` of a Stage I model: adapter + LoRA in float16, no T2C, echo
    decoder or denoiser; it loads back as a Stage I model with the same S2T outputs (to fp16),
    and is a valid `--init` for stage echo."""
    from echox.cli import main
    from echox.train.stages import prepare_model

    m, src, out, rep, prefixes = _export(make_model, tmp_path, capsys, ["s2t"], "warm")
    assert rep["omitted_parts"] == ["t2c", "echo", "denoiser"] and rep["dtype"] == "float16"
    assert prefixes & {"adapter", "llm"} == {"adapter", "llm"}
    assert not prefixes & {"t2c", "echo", "denoiser"}
    back = EchoX.from_pretrained(out)
    assert back.trained_stages == ["s2t"]
    _same_s2t_to_fp16(m, back)
    t2c = tmp_path / "t2c"
    m.trained_stages = ["t2c"]
    m.save_pretrained(t2c)
    echo = prepare_model("echo", init=out, t2c_from=t2c)  # the warm start feeds Stage III
    torch.testing.assert_close(echo.echo.state_dict(), m.t2c.state_dict())
    assert main(["train", "export", "--model", str(src), "--out", str(out)]) == 2  # exists
    assert "already exists" in capsys.readouterr().err


def test_export_of_a_stage_two_model_keeps_the_t2c_alone(make_model, tmp_path, capsys):
    """`echox train export` of a Stage II model: only the T2C (and the added token rows), in
    float16; the untrained adapter and LoRA are left out. It loads back with the same T2C (to
    fp16) and is a valid `--t2c-from` of stage echo."""
    from echox.train.stages import prepare_model

    m, src, out, rep, prefixes = _export(make_model, tmp_path, capsys, ["t2c"], "t2c-warm")
    assert rep["trained_stages"] == ["t2c"]
    assert sorted(rep["omitted_parts"]) == ["adapter", "denoiser", "echo", "llm"]
    assert prefixes == {"t2c", "_added_rows"}
    assert (out / "model.safetensors").stat().st_size < 0.6 * (src / "model.safetensors").stat().st_size
    back = EchoX.from_pretrained(out)
    assert back.trained_stages == ["t2c"]
    for (k, a), b in zip(m.t2c.state_dict().items(), back.t2c.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a.half().float(), msg=k)
    s2t = make_model(seed=1)
    s2t.trained_stages = ["s2t"]
    echo = prepare_model("echo", init=s2t.save_pretrained(tmp_path / "s2t"), t2c_from=out)
    torch.testing.assert_close(echo.echo.state_dict(), back.t2c.state_dict())


def test_export_drop_echo_gives_a_stage_one_model(make_model, tmp_path, capsys):
    """`--drop-echo` of a model trained by stages s2t and echo (a shipped bundle): the copy has
    the adapter and LoRA only, records stage s2t alone, and a new Stage III run from it starts
    its echo decoder again as a copy of the given T2C (not the old echo decoder)."""
    from echox.cli import main
    from echox.train.stages import prepare_model

    m = make_model()
    _perturb(m)
    m.trained_stages = ["s2t", "echo"]
    src = m.save_pretrained(tmp_path / "bundle", omit_parts=("t2c",))
    out = tmp_path / "s2t-only"
    assert main(["train", "export", "--model", str(src), "--drop-echo", "--out", str(out)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["trained_stages"] == ["s2t"]
    assert rep["omitted_parts"] == ["t2c", "echo", "denoiser"]
    back = EchoX.from_pretrained(out)
    assert back.trained_stages == ["s2t"]
    _same_s2t_to_fp16(m, back)
    t2c_model = make_model()
    with torch.no_grad():
        for p in t2c_model.t2c.parameters():
            p.add_(0.5)
    t2c_model.trained_stages = ["t2c"]
    t2c = t2c_model.save_pretrained(tmp_path / "t2c")
    echo = prepare_model("echo", init=out, t2c_from=t2c)
    torch.testing.assert_close(echo.echo.state_dict(), t2c_model.t2c.state_dict())
    kept = prepare_model("echo", init=src, t2c_from=t2c)  # without it the old echo decoder stays
    assert not torch.equal(next(iter(kept.echo.parameters())), next(iter(echo.echo.parameters())))


def test_added_token_rows_come_from_the_gathered_state(make_model, tmp_path):
    """Under FSDP the live weights are shards (FSDP1: a flat slice or empty; FSDP2: a DTensor
    whose indexing is a collective, a hang when only rank 0 saves): the rows of added tokens
    must come from the gathered `full_state`, like everything else in the checkpoint."""
    m = make_model()
    _perturb(m)
    full = {k: v.clone() for k, v in m.state_dict().items()}
    emb = m.llm.base.get_input_embeddings()
    ids = torch.tensor(m.llm.added_token_ids)
    key = next(k for k in full if k.startswith("llm.") and k.endswith("embed_tokens.weight"))
    for k in (key, key.replace("model.embed_tokens", "lm_head")):  # tied in tiny-random
        full[k][ids] += 1.0  # tell the gathered rows from the live ones
    with torch.no_grad():
        emb.weight.data = torch.empty(0)  # what a rank holding none of the embedding sees
    folder = m.save_pretrained(tmp_path / "ck", full_state=full)
    back = EchoX.from_pretrained(folder)
    torch.testing.assert_close(back.llm.base.get_input_embeddings().weight[ids], full[key][ids])


def _rewrite(folder, name, text):
    """Replace a checkpoint file and its checksum, as a hand edit that kept checksums would."""
    import hashlib

    (folder / name).write_text(text)
    sums = json.loads((folder / "checksums.json").read_text())
    sums[name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "checksums.json").write_text(json.dumps(sums))


@pytest.mark.parametrize(("text", "kind"), [("[]", r"a list: \[\]"), ("3", "a number: 3"),
                                            ('"echox"', 'a string: "echox"'), ("null", "null")])
def test_config_json_that_is_not_an_object(make_model, tmp_path, text, kind):
    folder = make_model().save_pretrained(tmp_path / "ckpt")
    _rewrite(folder, "config.json", text)
    where = re.escape(str(folder / "config.json"))
    with pytest.raises(CheckpointError, match=rf"^{where} is not an EchoX checkpoint config: "
                                              rf"expected a JSON object, got {kind}$"):
        EchoX.from_pretrained(folder)


def test_malformed_config_and_checksum_values(make_model, tmp_path):
    folder = make_model().save_pretrained(tmp_path / "ckpt")
    meta = json.loads((folder / "config.json").read_text())
    _rewrite(folder, "config.json", json.dumps({**meta, "config": [1, 2]}))
    with pytest.raises(CheckpointError, match=r'config\.json: "config" must be a JSON object, '
                                              r"got a list: \[1, 2\]"):
        EchoX.from_pretrained(folder)
    _rewrite(folder, "config.json", json.dumps({**meta, "format_version": "2"}))
    with pytest.raises(CheckpointError, match=r"config\.json: format_version must be an integer"):
        EchoX.from_pretrained(folder)
    (folder / "checksums.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"corrupt checkpoint file .*checksums\.json: "
                                              r"expected a JSON object"):
        EchoX.from_pretrained(folder)
    (folder / "checksums.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(CheckpointError, match=r"corrupt checkpoint file .*checksums\.json"):
        EchoX.from_pretrained(folder)
    (folder / "checksums.json").write_text("{}")  # would verify nothing
    with pytest.raises(CheckpointError, match=r"lists no checksum for config\.json, model\.safetensors"):
        EchoX.from_pretrained(folder)
    (folder / "checksums.json").write_text('{"config.json": 123}')  # "got an object" of one
    with pytest.raises(CheckpointError, match=r"the checksum of 'config\.json' is not a sha256 string \(a number: 123\)"):
        EchoX.from_pretrained(folder)
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    from echox.model.checkpoint import sha256_file

    sums = {n: sha256_file(folder / n) for n in ("config.json", "model.safetensors")}
    for name in ("../outside.txt", str(outside), "sub/../../outside.txt"):
        (folder / "checksums.json").write_text(json.dumps({**sums, name: sha256_file(outside)}))
        with pytest.raises(CheckpointError, match=re.escape(f"{name!r} is not a file inside")):
            EchoX.from_pretrained(folder)


def test_a_checkpoint_of_linked_files_loads(make_model, tmp_path):
    """A Hugging Face cache snapshot links each file into blobs/: such a checkpoint was called
    corrupt ("'model.safetensors' is not a file inside the checkpoint folder")."""
    folder = make_model().save_pretrained(tmp_path / "ckpt")
    snap = tmp_path / "snapshot"
    (tmp_path / "blobs").mkdir()
    snap.mkdir()
    for f in folder.rglob("*"):
        if f.is_file():
            blob = tmp_path / "blobs" / f.relative_to(folder).as_posix().replace("/", "__")
            blob.write_bytes(f.read_bytes())
            (snap / f.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            (snap / f.relative_to(folder)).symlink_to(blob)
    assert EchoX.from_pretrained(snap) is not None
    (tmp_path / "blobs" / "model.safetensors").write_bytes(b"0" * 10)  # a link's target changed
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        EchoX.from_pretrained(snap)


def test_save_never_deletes_what_is_not_a_checkpoint(make_model, tmp_path):
    """Saving replaces the whole folder: a file there, or a folder of other files, was deleted."""
    m = make_model()
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        m.save_pretrained(tmp_path / "notes.txt")
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("a,b")
    with pytest.raises(CheckpointError, match=r"holds other files \(data.csv\)"):
        m.save_pretrained(other)
    with pytest.raises(CheckpointError, match="cannot write the checkpoint"):
        m.save_pretrained(tmp_path / "notes.txt" / "ckpt")  # below a file
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert [p.name for p in other.iterdir()] == ["data.csv"]
    (tmp_path / "empty").mkdir()
    m.save_pretrained(tmp_path / "empty")  # an empty folder, or a checkpoint, is replaced
    m.save_pretrained(tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "notes.txt", "other"]
    m.save_pretrained(other, replace=True)  # asked for (`echox bundle --force`)
    assert not (other / "data.csv").exists() and (other / "config.json").is_file()


def test_save_refuses_bad_extra_files_and_dtypes(make_model, tmp_path):
    m = make_model()
    for name in ("../escape.txt", str(tmp_path / "abs.txt"), "a/b.txt", "config.json"):
        with pytest.raises(CheckpointError, match="plain file name"):
            m.save_pretrained(tmp_path / "ckpt", extra_files={name: "x"})
    with pytest.raises(CheckpointError, match="floating torch.dtype"):
        m.save_pretrained(tmp_path / "ckpt", dtype=torch.int8)  # weights would become garbage
    with pytest.raises(CheckpointError, match="unknown dtype 'half'"):
        m.save_pretrained(tmp_path / "ckpt", dtype="half")
    with pytest.raises(CheckpointError, match="tuple of part names"):
        m.save_pretrained(tmp_path / "ckpt", omit_parts="t2c")
    # a dict was pathlib's TypeError once the weights were written
    with pytest.raises(CheckpointError, match="extra file 'a.json': its content must be text"):
        m.save_pretrained(tmp_path / "ckpt", extra_files={"a.json": {"k": 1}})
    with pytest.raises(CheckpointError, match="extra_files must be a dict"):
        m.save_pretrained(tmp_path / "ckpt", extra_files=[("a.json", "x")])
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "afile").write_text("x")  # it said "checkpoint folder not found"
    with pytest.raises(CheckpointError, match="afile is a file, not a checkpoint folder"):
        EchoX.from_pretrained(tmp_path / "afile")


@pytest.mark.parametrize("bad", [None, 5, {"w": 1}, b"/tmp/x", ""])
def test_a_folder_that_is_not_a_path_is_a_checkpoint_error(bad, tmp_path):
    """from_pretrained(None) was a TypeError from pathlib; now the error names what was given."""
    from echox.infer.bundle import load_bundle
    from echox.model.echox import EchoX

    with pytest.raises(CheckpointError, match="must be a path"):
        EchoX.from_pretrained(bad)
    with pytest.raises(CheckpointError, match="must be a path"):
        load_bundle(bad)
    with pytest.raises(CheckpointError, match="unknown dtype 'half'; choose bf16, fp16 or fp32"):
        EchoX.from_pretrained(tmp_path, dtype="half")


def test_from_pretrained_checks_device_dtype_and_the_config_it_reads(make_model, tmp_path):
    """device "cuda" on a CPU build was an AssertionError, "foo" or 5 a RuntimeError, an int
    dtype transformers' ValueError; trained_stages null a TypeError ("echo" became 5 letters);
    an _added_rows.embed of another shape a RuntimeError, a missing one silently random rows."""
    import torch
    from safetensors.torch import load_file, save_file

    from echox.model.checkpoint import CHECKSUMS, CONFIG, WEIGHTS, sha256_file

    folder = make_model().save_pretrained(tmp_path / "ckpt")
    if not torch.cuda.is_available():
        with pytest.raises(CheckpointError, match="device cuda: this torch build or machine has no CUDA"):
            EchoX.from_pretrained(folder, device="cuda")
    with pytest.raises(CheckpointError, match="device 'foo'"):
        EchoX.from_pretrained(folder, device="foo")
    # mps without Apple's GPU was transformers' RuntimeError, meta one of load_state_dict
    if not torch.backends.mps.is_available():
        with pytest.raises(CheckpointError, match="device mps: this machine or torch build cannot use it"):
            EchoX.from_pretrained(folder, device="mps")
    with pytest.raises(CheckpointError, match="the meta device holds no weights"):
        EchoX.from_pretrained(folder, device="meta")
    # the names load_bundle takes (it was refused here: fp16 for load_bundle, float16 here)
    assert next(EchoX.from_pretrained(folder, dtype="fp16").llm.parameters()).dtype == torch.float16
    with pytest.raises(CheckpointError, match="dtype must be a floating torch.dtype"):
        EchoX.from_pretrained(folder, dtype=torch.int8)

    def rewrite(name, text=None, tensors=None):
        if tensors is not None:
            save_file(tensors, str(folder / name))
        else:
            (folder / name).write_text(text)
        sums = json.loads((folder / CHECKSUMS).read_text())
        sums[name] = sha256_file(folder / name)
        (folder / CHECKSUMS).write_text(json.dumps(sums))

    meta = json.loads((folder / CONFIG).read_text())
    for bad in (None, "echo", [1]):
        rewrite(CONFIG, json.dumps({**meta, "trained_stages": bad}))
        with pytest.raises(CheckpointError, match="trained_stages must be a list of stage names"):
            EchoX.from_pretrained(folder)
    rewrite(CONFIG, json.dumps(meta))
    sd = load_file(str(folder / WEIGHTS))
    rows = sd["_added_rows.embed"]
    rewrite(WEIGHTS, tensors={**sd, "_added_rows.embed": torch.zeros(rows.shape[0] + 1, rows.shape[1])})
    with pytest.raises(CheckpointError, match=r"_added_rows.embed is \[\d+, \d+\], the model's"):
        EchoX.from_pretrained(folder)
    rewrite(WEIGHTS, tensors={k: v for k, v in sd.items() if k != "_added_rows.embed"})
    with pytest.raises(CheckpointError, match="no _added_rows.embed"):
        EchoX.from_pretrained(folder)
    rewrite(WEIGHTS, tensors=sd)
    assert EchoX.from_pretrained(folder).trained_stages == meta.get("trained_stages", [])


def test_a_trigger_token_of_several_tokens_is_a_config_error(make_model):
    from echox.errors import ConfigError

    m = make_model()
    m.config.trigger.token = "no-such-token-xyz"
    with pytest.raises(ConfigError, match="trigger.token 'no-such-token-xyz' is \\d+ tokens"):
        m.trigger_row()


def test_save_pretrained_to_a_folder_that_is_not_a_path(make_model):
    with pytest.raises(CheckpointError, match="must be a path"):
        make_model().save_pretrained(None)


def test_option_folder_names_the_option_for_a_file_or_a_missing_folder(tmp_path):
    """`--init`, `--t2c-from` and `--resume` share this check (`echox train`)."""
    from echox.model.checkpoint import option_folder

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(CheckpointError, match=r"^--resume .*afile is a file, not a checkpoint folder$"):
        option_folder("--resume", afile)
    with pytest.raises(CheckpointError, match=r"^--init .*nothere: checkpoint folder not found$"):
        option_folder("--init", str(tmp_path / "nothere"))
    assert option_folder("--t2c-from", str(tmp_path)) == tmp_path


@pytest.mark.parametrize("text", ['{"a": ' + "7" * 5000 + "}", "[" * 100_000 + "]" * 100_000],
                         ids=["number-too-long", "too-deep"])
def test_checkpoint_json_too_long_or_too_deep_is_one_error(make_model, tmp_path, text):
    """Python refuses a 4300+-digit integer with a plain ValueError and deep nesting with a
    RecursionError; both were tracebacks from `from_pretrained` and from saving over it."""
    folder = make_model().save_pretrained(tmp_path / "ckpt")
    _rewrite(folder, "config.json", text)
    with pytest.raises(CheckpointError, match=r"corrupt checkpoint file .*config\.json"):
        EchoX.from_pretrained(folder)
    with pytest.raises(CheckpointError, match=r"holds other files"):
        make_model().save_pretrained(folder)  # no longer recognisably a checkpoint: kept
    assert (folder / "config.json").read_text() == text
    (folder / "checksums.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"corrupt checkpoint file .*checksums\.json"):
        EchoX.from_pretrained(folder)


def test_loading_a_model_draws_no_transformers_bar(make_model, tmp_path, capfd):
    """transformers 5 drew a "Loading weights" bar for every local load: hundreds of
    carriage-return lines in a training log. It is off while EchoX loads, and on again after."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    make_model().save_pretrained(tmp_path / "m")
    capfd.readouterr()
    hf_logging.enable_progress_bar()
    disable_progress_bars("huggingface_hub.http_get")  # a user's own setting of the hub's bars
    try:
        EchoX.from_pretrained(tmp_path / "m")
        err = capfd.readouterr().err
        assert "Loading weights" not in err
        assert hf_logging.is_progress_bar_enabled()  # as it was before the load
        assert are_progress_bars_disabled("huggingface_hub.http_get")  # left alone
    finally:
        enable_progress_bars()


def test_a_moved_base_llm_is_named_and_read_from_where_it_is_now(make_model, tmp_path, capsys):
    """A checkpoint names its frozen LLM by the folder it had. Once that folder moved, chat,
    eval, serve, demo and export could not load the model at all (a bare "model folder not
    found"); `base_models=` / `--base-llm` read it from its new place, and export writes it so."""
    from echox.cli import main
    from echox.hub import resolve
    from echox.infer.bundle import load_bundle

    llm_a, llm_b = tmp_path / "llm-a", tmp_path / "llm-b"
    shutil.copytree(resolve("builtin:tiny-random-llama"), llm_a)
    m = make_model([f"llm.name_or_path={llm_a}"])
    m.trained_stages = ["s2t"]
    ck = m.save_pretrained(tmp_path / "ck")
    want = m.llm.model.get_input_embeddings().weight.detach().clone()
    llm_a.rename(llm_b)
    with pytest.raises(CheckpointError, match=r"base LLM .*llm-a: folder not found \(moved\?\).*--base-llm"):
        EchoX.from_pretrained(ck)
    with pytest.raises(CheckpointError, match="base LLM /no/such: folder not found"):
        load_bundle(ck, base_models={"llm": "/no/such"})
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="base LLM .*file: a file, not a folder"):
        load_bundle(ck, base_models={"llm": str(tmp_path / "file")})
    back = load_bundle(ck, base_models={"llm": str(llm_b)}).model
    assert back.config.llm.name_or_path == str(llm_b)
    torch.testing.assert_close(back.llm.model.get_input_embeddings().weight, want)
    # the CLI: an empty flag is refused; export names the new place in its copy
    assert main(["train", "export", "--model", str(ck), "--out", str(tmp_path / "e0"),
                 "--base-llm", " "]) == 2
    assert "--base-llm: give a folder" in capsys.readouterr().err
    assert main(["train", "export", "--model", str(ck), "--out", str(tmp_path / "e0"),
                 "--base-llm", "~no-such-user-here/llm"]) == 2  # was a RuntimeError traceback
    assert "not a usable path" in capsys.readouterr().err
    assert main(["train", "export", "--model", str(ck), "--out", str(tmp_path / "e1"),
                 "--base-llm", str(llm_b)]) == 0
    assert EchoX.from_pretrained(tmp_path / "e1").config.llm.name_or_path == str(llm_b)
    from echox.cli import build_parser

    for cmd in (["chat"], ["demo"], ["eval", "--benchmark", "b.jsonl", "--out", "o"], ["serve"]):
        args = build_parser().parse_args([*cmd, "--base-llm", "x", "--base-encoder", "y"])
        assert (args.base_llm, args.base_encoder) == ("x", "y")


def test_a_folder_of_another_kind_or_in_a_files_place_is_named(make_model, tmp_path):
    """A vocoder folder given as the model said only "checkpoint file missing: checksums.json",
    and a config.json that is a folder was called missing."""
    from echox.audio import check_output_path
    from echox.errors import AudioError

    from echox.infer.bundle import shipped_bundle

    with pytest.raises(CheckpointError, match="missing: .*; it is a vocoder folder"):
        EchoX.from_pretrained(shipped_bundle() / "vocoder")
    folder = make_model().save_pretrained(tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is a folder, not the checkpoint's file"):
        EchoX.from_pretrained(folder)
    with pytest.raises(AudioError, match="is a folder, not an audio file path"):
        check_output_path(tmp_path)  # `-o answers/`: it said "unsupported suffix ''"
