"""`echox convert official`: a tiny checkpoint in the released EchoX layout (built by
`official_fixture`), converted and run; the authors' computation checked by hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from official_fixture import (  # noqa: E402
    AUDIO,
    BOS,
    CHAIN,
    CHAIN_UNITS,
    EH,
    EOT,
    SH,
    UNIT_TEXTS,
    VOCAB,
    build_authors_folder,
    build_tokenizer,
    tok_id,
)

from echox.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):
    from echox.convert.official import convert_official

    root = tmp_path_factory.mktemp("official")
    fx = build_authors_folder(root)
    report = convert_official(fx.src, root / "bundle")
    return fx, root / "bundle", report


@pytest.fixture(scope="module")
def bundle(converted):
    from echox.infer.bundle import load_bundle

    return load_bundle(converted[1])


# ---- conversion: every tensor accounted for --------------------------------------------------


def test_every_tensor_accounted_for(converted, bundle) -> None:
    fx, out, report = converted
    rows = {r["key"]: r for r in report["tensors"]}
    assert set(rows) == set(fx.state)  # each SRC key is listed once
    assert report["counts"] == {"model": 50, "llm": 21, "dropped": 1}
    assert rows["unit_translator.model.embed_tokens.weight"]["to"] == "dropped"  # = the LLM's table
    assert "identical" in rows["unit_translator.model.embed_tokens.weight"]["why"]
    assert report["files_not_used"] == ["trainer_state.json"]
    # loading checked the names both ways (no missing, no unused key); the values went where
    # the report says
    sd = bundle.model.state_dict()
    for key, row in rows.items():
        if row["to"] == "dropped":
            continue
        where, name = row["to"].split(":")
        ours = sd[name if where == "model.safetensors" else f"llm.model.{name}"]
        assert torch.equal(ours, fx.state[key]), key
    assert rows["model.asr_transformer_encoder.layers.0.self_attn.in_proj_weight"]["to"] == \
        "model.safetensors:adapter.asr_transformer_encoder.self_attn.in_proj_weight"
    assert rows["unit_translator.aligner_MLP.3.bias"]["to"] == "model.safetensors:denoiser.net.3.bias"
    assert bundle.model.echo is bundle.model.t2c  # one T2C, as released
    assert bundle.model.echo.text_table() is bundle.model.llm.base.get_input_embeddings().weight


def test_config_sets_the_authors_computation(bundle) -> None:
    c = bundle.model.config
    assert c.encoder.window_seconds is None and c.adapter.mask_padding is False
    assert c.adapter.encoder_attention == "self" and c.adapter.drop_blank is False
    assert c.adapter.lookback_keys == "kept" and c.adapter.ctc_head == "linear"
    assert c.adapter.num_heads == 4  # the LLM's heads
    assert Path(c.llm.name_or_path) == (bundle.path / "llm").resolve()  # "llm" in config.json
    assert json.loads((bundle.path / "config.json").read_text())["config"]["llm"]["name_or_path"] == "llm"
    assert c.llm.resize_embeddings is False
    assert c.t2c.layout == "authors" and c.t2c.shared_embedding is True
    assert (c.t2c.num_layers, c.t2c.hidden_size, c.t2c.intermediate_size) == (2, 32, 64)  # "large"
    assert c.t2c.rope_theta == 500000.0 and c.t2c.rope_scaling["rope_type"] == "llama3"
    assert c.t2c.max_positions == 2048 and c.denoiser.ff_size == 64
    assert bundle.model.llm.vocab_size == VOCAB  # unit tokens did not grow the LLM
    assert type(bundle.unit_language).__name__ == "UnitTokens"
    with torch.no_grad():  # 0.1 s of speech: all 75 frames of the 3 s window reach the CTC head
        speech = bundle.model.encode_speech([np.zeros(1600, np.float32)])
    assert speech.ctc_logits.shape[1] == bundle.model.encoder.window_frames // 4 == 75


def test_t2c_sizes_follow_unit_model() -> None:
    from echox.model.unit_decoder_authors import authors_t2c_sizes

    llm = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 14336}
    pick = lambda s: (s["num_layers"], s["hidden_size"], s["num_heads"], s["num_kv_heads"],  # noqa: E731
                      s["intermediate_size"])
    assert pick(authors_t2c_sizes({**llm, "unit_model": "large"})) == (2, 4096, 32, 8, 14336)
    assert pick(authors_t2c_sizes({**llm, "unit_model": "small"})) == (4, 512, 8, 8, 2048)
    assert pick(authors_t2c_sizes({**llm, "unit_model": "default"})) == (8, 768, 12, 12, 2048)
    assert pick(authors_t2c_sizes(llm)) == (6, 512, 8, 8, 2048)


# ---- the authors' computation, by hand -------------------------------------------------------


def test_prompt_is_the_authors_layout(bundle) -> None:
    """Their ids: [B SH] T("system") [EH] T("\\n") T(system) [EOT], [SH] T("user") [EH]
    T("\\n<audio_patch>") T("") [EOT], [SH] T("assistant") [EH] T("\\n"), where T(x) is
    tokenizer(x).input_ids (which starts with <|begin_of_text|>)."""
    from echox.model.prompt import Turn

    tok = bundle.model.tokenizer
    T = lambda x: tok(x)["input_ids"]  # noqa: E731
    b, sh, eh, eot = (tok_id(t) for t in (BOS, SH, EH, EOT))
    system = bundle.model.config.llm.system_prompt
    want = ([b, sh] + T("system") + [eh] + T("\n") + T(system) + [eot]
            + [sh] + T("user") + [eh] + T("\n" + AUDIO) + T("") + [eot]
            + [sh] + T("assistant") + [eh] + T("\n"))
    enc = bundle.model.prompt.encode([Turn("user", audio=np.zeros(1600, np.float32))], True)
    assert enc.input_ids == want
    typed = bundle.model.prompt.encode([Turn("user", text="hi"), Turn("assistant", text="ok")])
    head = [b, sh] + T("system") + [eh] + T("\n") + T(system) + [eot]
    assert typed.input_ids == head + [sh] + T("user") + [eh] + T("hi") + [eot] \
        + [sh] + T("assistant") + [eh] + T("\n") + T("ok") + [eot]  # a typed turn has no "\n"
    start, end = typed.response_spans[0]
    assert typed.input_ids[start:end] == T("ok")[1:]
    both = bundle.model.prompt.encode([Turn("user", audio=np.zeros(1600, np.float32), text="hi")])
    assert both.input_ids == head + [sh] + T("user") + [eh] + T("\n" + AUDIO) + T("hi") + [eot]


def _self_attention_layer_by_hand(layer: nn.TransformerEncoderLayer, x: torch.Tensor) -> torch.Tensor:
    """Pre-norm layer whose attention has one key per query (the frame itself)."""
    d = x.shape[-1]
    w, bias = layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias
    v = F.layer_norm(x, (d,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps) @ w[2 * d:].T + bias[2 * d:]
    x = x + layer.self_attn.out_proj(v)
    h = F.layer_norm(x, (d,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
    return x + layer.linear2(F.relu(layer.linear1(h)))


def test_speech_adapter_by_hand() -> None:
    """encoder_attention=self, shrink keeping blank runs, look-back over the kept frames, no
    padding mask: each step written out with explicit matrices."""
    from echox.model.speech_adapter import SpeechAdapter, shrink_mask

    torch.manual_seed(3)
    d, heads, blank, t = 16, 2, 0, 9
    ad = SpeechAdapter(8, d, 12, blank_id=blank, num_heads=heads, lookback_dropout=0.1,
                       encoder_attention="self").eval()
    argmax = torch.tensor([[5, 5, 0, 0, 7, 7, 7, 0, 5]])  # 0 = blank
    assert shrink_mask(argmax, torch.ones_like(argmax, dtype=torch.bool), blank)[0].nonzero().flatten().tolist() \
        == [0, 2, 4, 7, 8]  # one frame per run; the blank runs keep theirs
    ad.ctc_head = lambda feats: F.one_hot(argmax, 12).float() * 5.0  # a known CTC argmax
    enc = torch.randn(1, 2 * t, 8)
    out = ad(enc, None)

    x = ad.mm_projector1(enc.reshape(1, t, 16))
    f = ad.out_norm(_self_attention_layer_by_hand(ad.asr_transformer_encoder, x))[0]  # [T, D]
    kept = [0, 2, 4, 7, 8]
    q = f[kept]
    w, bias = ad.lbm.in_proj_weight, ad.lbm.in_proj_bias
    qq, kk, vv = q @ w[:d].T + bias[:d], f @ w[d:2 * d].T + bias[d:2 * d], f @ w[2 * d:].T + bias[2 * d:]
    dh = d // heads
    outs = []
    for hd in range(heads):
        sl = slice(hd * dh, (hd + 1) * dh)
        score = qq[:, sl] @ kk[:, sl].T / math.sqrt(dh)
        score[:, [i for i in range(t) if i not in kept]] = float("-inf")  # key mask = not kept
        outs.append(torch.softmax(score, -1) @ vv[:, sl])
    att = ad.lbm.out_proj(torch.cat(outs, -1))
    want = ad.atten_layer_norm(q + att)
    assert out.lengths.tolist() == [5]
    torch.testing.assert_close(out.embeds[0], want, atol=1e-5, rtol=1e-5)


def test_self_attention_is_the_authors_module_call() -> None:
    """The authors' layer is built sequence-first and called on [turns, frames, D], and their
    inference code gives it one turn at a time: exactly encoder_attention=self (and not what
    'frames' computes)."""
    from echox.model.speech_adapter import SpeechAdapter

    torch.manual_seed(4)
    ad = SpeechAdapter(8, 16, 12, blank_id=0, num_heads=2, encoder_attention="self").eval()
    theirs = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, norm_first=True),
                                   num_layers=1, enable_nested_tensor=False).eval()
    theirs.layers[0].load_state_dict(ad.asr_transformer_encoder.state_dict())
    x = torch.randn(1, 10, 16)  # one turn: [turns, frames, D] read as [seq=1, batch=10, D]
    eye = ~torch.eye(10, dtype=torch.bool)
    with torch.no_grad():
        ours = ad.asr_transformer_encoder(x, src_mask=eye)
        frames = ad.asr_transformer_encoder(x)
        torch.testing.assert_close(ours, theirs(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours, _self_attention_layer_by_hand(ad.asr_transformer_encoder, x))
    assert not torch.allclose(ours, frames, atol=1e-3)


def test_t2c_prefix_and_first_step_by_hand(bundle) -> None:
    """Text prefix = [SH] T("speaker") [EH] T("\\n") + token 12800; unit prefix = [EOT] [SH]
    T("speaker") [EH] T("\\n"); the decoder input is adapter(cat(E[text prefix],
    aligner(H), E[unit prefix])) in the LLM's embedding space."""
    m = bundle.model
    t2c = m.echo
    tok = m.tokenizer
    T = lambda x: tok(x)["input_ids"]  # noqa: E731
    want_text = [tok_id(SH)] + T("speaker") + [tok_id(EH)] + T("\n") + [12800]
    want_unit = [tok_id(EOT), tok_id(SH)] + T("speaker") + [tok_id(EH)] + T("\n")
    assert t2c.text_prefix_ids == want_text and t2c.unit_prefix_ids == want_unit
    assert T("speaker")[0] == tok_id(BOS) and t2c.eos_id == tok_id(EOT)

    torch.manual_seed(0)
    h = torch.randn(4, 32)
    emb = m.llm.base.get_input_embeddings().weight  # the shared table
    with torch.no_grad():
        cond = m.denoiser.eval()(h)
        x = torch.cat([emb[want_text], cond, emb[want_unit]])
        x = t2c.adapter(x)[None]
        logits = t2c.lm_head(t2c.model(inputs_embeds=x).last_hidden_state)[0, -1]
        by_hand = int(logits.argmax())
        tokens = m.units_from_hidden([h])[0]
    assert tokens[0] == by_hand == tok_id(CHAIN[0])
    with torch.no_grad():  # LLM tokens read the LLM's table, unit tokens `unit_embedding`
        got = t2c.embed_ids(torch.tensor([tok_id(EOT), VOCAB + 3]))
    assert torch.equal(got[0], emb[tok_id(EOT)]) and torch.equal(got[1], t2c.unit_embedding.weight[3])
    assert tokens == [tok_id(t) for t in CHAIN]  # and the end token stops it


def test_unit_tokens_decode_drops_ids_over_1000() -> None:
    from echox.units.unit_tokens import UnitTokens

    vocab = UnitTokens.from_tokenizer(build_tokenizer(), VOCAB, len(UNIT_TEXTS))
    ids = [VOCAB + UNIT_TEXTS.index(t) for t in
           ["▁999", "▁1000", "7_", "▁1203_4", "_1500", "▁17_3", "0", "▁5"]]
    text = "▁999▁10007_▁1203_4_1500▁17_30▁5"  # joined inner texts, a number across two tokens
    assert vocab.text(ids + [5, tok_id(EOT)]) == text  # LLM tokens are skipped
    # the integers 999 10007 1203 4 1500 17 30 5; 10007, 1203 and 1500 are >= 1000
    want = [999, 4, 17, 30, 5]
    assert vocab.decode(ids) == want
    stream = vocab.stream()  # token by token, the same units; a number waits for its end
    got = [stream.push(i) for i in ids]
    assert got[0] == [] and got[1] == [999] and got[2] == []  # "1000" + "7_" is one number
    assert [u for g in got for u in g] + stream.flush() == want


# ---- running it ------------------------------------------------------------------------------


def test_forward_touches_every_tensor(bundle) -> None:
    """S2T (speech adapter + LLM, CE + CTC) and echo (denoiser + T2C) forwards: every tensor of
    the converted parts gets a gradient. Only the query/key rows of the adapter layer's
    attention get zero: with one key per query they do not change the output (as released)."""
    from echox.model.prompt import Turn

    m = bundle.model
    m.train()
    params = dict(m.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    m.encoder.requires_grad_(False)  # the Whisper audio tower is not part of the checkpoint
    rng = np.random.default_rng(0)
    batch = m.collate([[Turn("user", audio=(0.1 * rng.standard_normal(16000)).astype(np.float32),
                             transcript="hello there"), Turn("assistant", text="a b c d")]])
    s2t = m.forward_s2t(batch)
    h, x = m.response_states(s2t, batch)[0]
    units = m.echo([m.denoiser(h)], [[tok_id(t) for t in CHAIN[:4]]])
    echo = F.cross_entropy(units.logits[0], units.labels[0], ignore_index=-100)
    (s2t.loss + echo).backward()
    try:
        for name, p in params.items():
            if name.startswith(("encoder.", "t2c.")):
                continue
            assert p.grad is not None, name
            if name.startswith("adapter.asr_transformer_encoder.self_attn.in_proj"):
                d = p.shape[0] // 3
                assert p.grad[:2 * d].abs().max() == 0 and p.grad[2 * d:].abs().max() > 0, name
            else:
                assert p.grad.abs().max() > 0, name
    finally:
        m.zero_grad(set_to_none=True)
        m.eval()
        for p in params.values():
            p.requires_grad_(False)


def test_beam_search_runs_on_the_authors_decoder(bundle) -> None:
    """Beam search (`num_beams` > 1) through the authors' layout finds the fixture's chain
    too, with and without the KV cache."""
    from dataclasses import replace

    m = bundle.model
    h = torch.randn(4, 32)
    s = replace(m.echo.default_sampling(4), num_beams=3)
    with torch.no_grad():
        cond = m.denoiser.eval()(h)
        uncached = m.echo.generate([cond], s, use_cache=False)[0]
    assert m.units_from_hidden([h], s)[0] == uncached == [tok_id(t) for t in CHAIN]


def test_row_length_counts_the_authors_prompt(bundle) -> None:
    """Stage II leaves out pairs longer than max_positions by `row_length`: the prompt's
    prefix and suffix tokens, the condition and the units, as the teacher-forced row has."""
    echo = bundle.model.echo
    rows, _ = echo._rows([torch.randn(5, echo.adapter.in_features)], [[1, 2, 3]])
    assert rows[0].shape[0] == echo.row_length([7] * 5, 3) > 5 + 3


def test_segment_units_stream_through_the_engine(bundle) -> None:
    from echox.infer.engine import Engine, EngineConfig

    with Engine(bundle, EngineConfig(chunk_units=2, first_chunk_units=1)) as engine:
        seg = engine.synthesize_segment(torch.randn(5, 32))
    assert seg.tokens == [tok_id(t) for t in CHAIN] and seg.units == CHAIN_UNITS
    assert seg.audio.size > 0


def test_chat_speaks_from_the_converted_bundle(converted, tmp_path: Path, capsys) -> None:
    import soundfile as sf

    from echox.audio import save_audio

    q = tmp_path / "q.wav"
    save_audio(q, (0.1 * np.random.default_rng(1).standard_normal(16000)).astype(np.float32), 16000)
    out = tmp_path / "a.wav"
    rc = main(["chat", str(q), "--model", str(converted[1]), "-o", str(out), "--max-new-tokens", "5",
               "--temperature", "0", "--threads", "1", "--device", "cpu", "--dtype", "fp32"])
    assert rc == 0, capsys.readouterr().err
    audio, sr = sf.read(out)
    assert sr == 16000 and audio.size > 0 and np.abs(audio).max() > 0


def test_saved_again_and_reloaded(bundle, tmp_path: Path, capsys, monkeypatch) -> None:
    """A converted model saved as a plain checkpoint stores its one T2C once (under echo.)
    and carries the converted folder's own LLM along (hard links; its weights outside the
    checksums): a copy named the original's llm/ by path, so deleting the original, or a
    `bundle --force` back over it, left both without their LLM."""
    from echox.model.echox import EchoX

    bundle.model.save_pretrained(tmp_path / "again")
    meta = json.loads((tmp_path / "again" / "config.json").read_text())
    assert meta["config"]["llm"]["name_or_path"] == "llm"
    assert (tmp_path / "again" / "llm" / "config.json").is_file()
    sums = json.loads((tmp_path / "again" / "checksums.json").read_text())
    assert "llm/config.json" in sums and not any(k.endswith(".safetensors") and k.startswith("llm/")
                                                 for k in sums)
    again = EchoX.from_pretrained(tmp_path / "again")
    for k, v in bundle.model.echo.state_dict().items():
        assert torch.equal(again.echo.state_dict()[k], v), k
    assert again.trained_stages == ["s2t", "t2c", "echo"]
    # a bundle of the copy, then one back over the copy: each keeps an LLM of its own
    b2 = tmp_path / "b2"
    assert main(["bundle", "--model", str(tmp_path / "again"), "--out", str(b2)]) == 0
    assert main(["bundle", "--model", str(b2), "--out", str(tmp_path / "again"), "--force"]) == 0
    capsys.readouterr()
    for folder in (tmp_path / "again", b2):
        m = EchoX.from_pretrained(folder)
        assert Path(m.config.llm.name_or_path) == (folder / "llm").resolve()
    # no hard links (another file system): named by path, not copied at every save
    import echox.model.checkpoint as ckpt

    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(ckpt.os, "link", no_link)
    m.save_pretrained(tmp_path / "apart")
    meta = json.loads((tmp_path / "apart" / "config.json").read_text())
    assert meta["config"]["llm"]["name_or_path"] == str((b2 / "llm").resolve())
    assert not (tmp_path / "apart" / "llm").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a CPU-only torch")
def test_cuda_without_a_gpu_is_one_line(converted, capsys) -> None:
    rc = main(["chat", "--text", "hi", "--model", str(converted[1]), "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("echox: error: --device cuda: ") and err.count("\n") == 1, err


def test_dtype_loads_the_whole_model_in_it(converted) -> None:
    from echox.infer.bundle import load_bundle

    b = load_bundle(converted[1], dtype="bf16")
    assert {p.dtype for p in b.model.parameters()} == {torch.bfloat16}
    assert b.model.units_from_hidden([torch.randn(3, 32)])[0]  # runs in bf16


# ---- other layouts and damaged folders -------------------------------------------------------


def test_bin_shards_own_table_tied_head(tmp_path: Path) -> None:
    from echox.convert.official import convert_official
    from echox.model.echox import EchoX

    fx = build_authors_folder(tmp_path, fmt="bin", shards=3, shared_table=False, tie=True)
    report = convert_official(fx.src, tmp_path / "b")
    rows = {r["key"]: r for r in report["tensors"]}
    assert rows["unit_translator.model.embed_tokens.weight"]["to"] == \
        "model.safetensors:echo.model.embed_tokens.weight"
    assert "lm_head.weight" not in rows and report["t2c_shared_embedding"] is False
    m = EchoX.from_pretrained(tmp_path / "b")
    assert torch.equal(m.echo.model.embed_tokens.weight, fx.state["unit_translator.model.embed_tokens.weight"])
    assert m.llm.base.lm_head.weight.data_ptr() == m.llm.base.get_input_embeddings().weight.data_ptr()


# config.json values that converted into a bundle that could not answer (NaN rope_theta, -1
# positions), was killed for memory (a unit vocabulary of 2**31 - 1) or a traceback
CONFIG_EDITS: dict[str, dict[str, Any]] = {
    "rope theta nan": {"rope_theta": float("nan")},
    "rope theta negative": {"rope_theta": -5.0},
    "positions negative": {"max_position_embeddings": -1},
    "kv heads zero": {"num_key_value_heads": 0},
    "hidden act unknown": {"hidden_act": "nope"},
    "unit vocabulary huge": {"unit_vocab_size": 2**31 - 1},
    "kv heads not dividing": {"num_key_value_heads": 3},
}


def _damage(src: Path, how: str) -> None:
    if how == "missing shard":
        (src / "model-00002-of-00002.safetensors").unlink()
    elif how == "no tokenizer":
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (src / f).unlink()
    elif how == "int weights":  # converted, and the T2C never stopped (102 s of audio)
        from safetensors.torch import load_file, save_file

        index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
        key = "model.mm_projector1.weight"
        sd = load_file(str(src / index[key]))
        sd[key] = sd[key].to(torch.int32)
        save_file(sd, str(src / index[key]))
    elif how == "shard outside":  # read from another folder, and converted
        index = json.loads((src / "model.safetensors.index.json").read_text())
        index["weight_map"] = {k: f"../{v}" for k, v in index["weight_map"].items()}
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
    elif how in ("wrong shape", "unknown tensor", "missing tensor"):
        from safetensors.torch import load_file, save_file

        index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
        key = "unit_translator.aligner_MLP.3.bias" if how == "missing tensor" else "model.mm_projector1.weight"
        f = src / index[key]
        sd = load_file(str(f))
        if how == "wrong shape":
            sd[key] = torch.zeros(32, 63)
        elif how == "missing tensor":
            del sd[key]
        else:
            sd["model.asr_transformer_encoder.layers.1.norm1.weight"] = torch.zeros(32)
        save_file(sd, str(f))
    elif how == "no vocoder":
        (src / "g_00500000").unlink()
    elif how == "config not an object":
        (src / "config.json").write_text("5")
    elif how == "config not utf-8":
        (src / "config.json").write_bytes(b"\xff\xfe{")
    elif how == "wrong config types":
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, "adapter_size": "x", "audio_tower": 5}))
    elif how == "bad weight map":
        (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": 5}}))
    elif how == "tower config cut short":  # was a json.JSONDecodeError traceback
        (src.parent / "whisper-tiny-test" / "config.json").write_text('{"d_model": 3')
    elif how == "config a folder":  # was an IsADirectoryError traceback
        (src / "config.json").unlink()
        (src / "config.json").mkdir()
    elif how == "tower d_model text":  # was a ValueError traceback
        (src.parent / "whisper-tiny-test" / "config.json").write_text('{"d_model": "abc"}')
    elif how in CONFIG_EDITS:
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, **CONFIG_EDITS[how]}))
    elif how in ("huge size", "rope theta text", "rms eps text", "shard name too long"):
        cfg = json.loads((src / "config.json").read_text())
        if how == "shard name too long":  # was an OSError traceback
            (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "a" * 5000}}))
            return
        key, value = {"huge size": ("hidden_size", 10**30), "rope theta text": ("rope_theta", "x"),
                      "rms eps text": ("rms_norm_eps", "x")}[how]
        (src / "config.json").write_text(json.dumps({**cfg, key: value}))


@pytest.mark.parametrize("how, message", [
    ("missing shard", "shard model-00002-of-00002.safetensors named in model.safetensors.index.json is missing"),
    ("no tokenizer", "no tokenizer"),
    ("wrong shape", "wrong shape: model.mm_projector1.weight is [32, 63]"),
    ("unknown tensor", "does not have, e.g. model.asr_transformer_encoder.layers.1.norm1.weight"),
    ("no vocoder", "no vocoder"),
    ("missing tensor", "1 tensor(s) missing, e.g. unit_translator.aligner_MLP.3.bias"),
    ("config not an object", "not an EchoX config (a JSON object), got int"),
    ("config not utf-8", "config.json: not JSON"),
    ("wrong config types", "wrong type of audio_tower (5: expected a string), adapter_size ('x': expected a whole number)"),
    ("bad weight map", "not a weight index (its weight_map values must be file names)"),
    ("tower config cut short", "whisper-tiny-test/config.json: malformed JSON"),
    ("config a folder", "config.json: cannot read it (Is a directory)"),
    ("huge size", "out of range: hidden_size (1000000000000000000000000000000: expected 1 to 2147483647)"),
    ("rope theta text", "rope_theta is not a number"),
    ("rms eps text", "config.json: not a valid LLM config"),  # pydantic-style, several lines
    ("tower d_model text", "d_model is 'abc', not a whole number"),
    ("rope theta nan", "rope_theta must be a finite number > 0, got nan"),
    ("rope theta negative", "rope_theta must be a finite number > 0, got -5.0"),
    ("positions negative", "not a size: max_position_embeddings (-1: expected a whole number"),
    ("kv heads zero", "not a size: num_key_value_heads (0"),
    ("hidden act unknown", "the model it describes cannot be built (KeyError"),
    ("unit vocabulary huge", "tokens from id"),
    ("shard name too long", "named in model.safetensors.index.json is missing"),
    ("kv heads not dividing", "config.json: its sizes make no valid model (num_attention_heads, "
                              "num_key_value_heads"),
    ("int weights", "weights must be floating point (BF16, F16, F32, F64): model.mm_projector1.weight is I32"),
    ("shard outside", "its weight_map names '../model-00001-of-00002.safetensors', not a file beside it"),
])
def test_damaged_folder_one_line_exit_2(tmp_path: Path, capsys, how: str, message: str) -> None:
    fx = build_authors_folder(tmp_path, shards=2)
    _damage(fx.src, how)
    capsys.readouterr()  # the fixture's own output
    rc = main(["convert", "official", str(fx.src), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("echox: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_out_inside_the_source_and_a_tower_that_is_no_whisper_are_refused(tmp_path: Path, capsys) -> None:
    """OUT inside SRC wrote a bundle into the authors' folder (exit 0); --audio-tower naming a
    missing folder, or a folder of another model (no d_model), converted and failed at chat."""
    fx = build_authors_folder(tmp_path, shards=2)
    before = sorted(p.name for p in fx.src.iterdir())
    capsys.readouterr()
    cases = [([str(fx.src / "sub")], "lies inside SRC"),
             ([str(tmp_path / "o1"), "--audio-tower", str(tmp_path / "nope" / "whisper")], "no such folder"),
             ([str(tmp_path / "o2"), "--audio-tower", str(fx.src)], "its config.json has no d_model")]
    for argv, says in cases:
        assert main(["convert", "official", str(fx.src), *argv]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
    assert sorted(p.name for p in fx.src.iterdir()) == before
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_header_of_shared_bytes_or_a_fractional_shape_is_corrupt(tmp_path: Path) -> None:
    """Two tensors over the same bytes both took them; a shape of 32.5 became 32."""
    import struct

    from echox.convert.tensor_files import read_safetensors_header
    from echox.errors import CheckpointError

    def write(header: dict[str, Any], data: bytes) -> Path:
        raw = json.dumps(header).encode()
        path = tmp_path / f"t{len(list(tmp_path.iterdir()))}.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        return path

    ok = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    assert set(read_safetensors_header(write(ok, bytes(16)))) == {"a", "b"}
    shared = {**ok, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    with pytest.raises(CheckpointError, match="a and b share bytes"):
        read_safetensors_header(write(shared, bytes(16)))
    half = {"a": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}
    with pytest.raises(CheckpointError, match="corrupt header entry for a"):
        read_safetensors_header(write(half, bytes(8)))


def test_force_never_replaces_the_source(tmp_path: Path, capsys) -> None:
    fx = build_authors_folder(tmp_path, shards=2)
    before = sorted(p.name for p in fx.src.iterdir())
    capsys.readouterr()
    for out in (fx.src, fx.src.parent):
        rc = main(["convert", "official", str(fx.src), str(out), "--force"])
        err = capsys.readouterr().err
        assert rc == 2 and "would delete the checkpoint being converted" in err, err
    assert sorted(p.name for p in fx.src.iterdir()) == before
    # the audio tower the bundle will read was replaced by the bundle (pointing at itself)
    tower = fx.src.parent / "whisper-tiny-test"
    tower_files = sorted(p.name for p in tower.iterdir())
    rc = main(["convert", "official", str(fx.src), str(tower), "--force"])
    err = capsys.readouterr().err
    assert rc == 2 and "holds the audio tower" in err, err
    assert sorted(p.name for p in tower.iterdir()) == tower_files


def test_copy_memory_does_not_grow_with_the_tensor(tmp_path: Path) -> None:
    """A 128 MB tensor is copied with the streaming writer in a fresh process: its peak RSS
    grows by about two blocks, not by the tensor."""
    from echox.convert.tensor_files import BLOCK, SafetensorsWriter

    n = 32 << 20  # float32 values: 128 MB
    w = SafetensorsWriter(tmp_path / "big.safetensors", [("x", "F32", (n,))])
    w.write("x", iter([memoryview(bytes(BLOCK))] * (4 * n // BLOCK)))
    w.close()
    code = f"""
import resource
from pathlib import Path
from typing import Any
from echox.convert.tensor_files import BinShards, SafetensorsWriter, iter_bytes, read_safetensors_header
src = Path({str(tmp_path / 'big.safetensors')!r})
info = read_safetensors_header(src)["x"]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
w = SafetensorsWriter(src.with_name("copy.safetensors"), [("x", info.dtype, info.shape)])
w.write("x", iter_bytes(info, BinShards()))
w.close()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    grew = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout)
    assert grew < 48, f"peak RSS grew by {grew:.0f} MB copying 128 MB"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "copy.safetensors"), "pt") as f:
        assert f.get_slice("x").get_shape() == [n]


def test_stage_iii_on_the_released_layout_labels_offline_from_the_untrained_decoder(
        converted, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The released layout's T2C is its echo decoder, one module that Stage III trains: online
    pseudo-labels would come from the decoder being trained (not a frozen T2C), so they are
    refused; offline ones, train and eval alike, are decoded before the first step."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    (tmp_path / "audio").mkdir()
    lines = []
    for i in range(3):
        sf.write(tmp_path / "audio" / f"q{i}.wav", (0.1 * rng.standard_normal(12000)).astype(np.float32), 16000)
        lines.append(json.dumps({"id": f"d{i}", "conversations": [
            {"from": "user", "value": f"question {i}", "audio": str(tmp_path / "audio" / f"q{i}.wav")},
            {"from": "assistant", "value": f"a b c {i}"}]}))
    data = tmp_path / "dialogues.jsonl"
    data.write_text("\n".join(lines) + "\n")
    evd = tmp_path / "eval.jsonl"
    evd.write_text(lines[0].replace('"d0"', '"e0"').replace("a b c 0", "c b a") + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {batch_size: 2, max_steps: 1, lr: 0.001, eval_every: 1, eval_batches: 1,"
                      " save_every: 0, cut_segments: false}\n")
    base = ["train", "echo", "--recipe", str(recipe), "--init", str(converted[1]), "--data", str(data),
            "--eval-data", str(evd)]
    assert main([*base, "--pseudo-labels", "online", "--out", str(tmp_path / "online")]) == 2
    err = capsys.readouterr().err
    assert "one module (the released layout)" in err and "--pseudo-labels offline" in err, err
    out = tmp_path / "offline"
    assert main([*base, "--pseudo-labels", "offline", "--out", str(out)]) == 0, capsys.readouterr().err
    labels = [json.loads(x) for x in (out / "pseudo_labels.jsonl").read_text().splitlines()]
    assert len(labels) == 4  # the 3 training dialogues and the eval one
