import pytest
import torch
from conftest import noise

from echox.errors import CheckpointError
from echox.hub import resolve
from echox.model.encoder import LogMelFrontEnd, WhisperSpeechEncoder


def test_window_truncation_and_frontend():
    folder = resolve("builtin:tiny-random-whisper")  # native window: 3 s
    full = WhisperSpeechEncoder.from_folder(folder)
    short = WhisperSpeechEncoder.from_folder(folder, window_seconds=1.5)
    assert full.window_frames == 300 and short.window_frames == 150
    assert full.native_window and not short.native_window
    assert WhisperSpeechEncoder.from_folder(folder, window_seconds=3.0).native_window
    fe = LogMelFrontEnd(folder, short.num_mel_bins, short.window_frames)
    feats = fe([noise(0.5), noise(1.2, 1)])
    assert feats.features.shape == (2, 80, 150)
    assert feats.lengths.tolist() == [50, 120]
    out = short(feats.features)
    assert out.shape == (2, 75, short.d_model)
    assert short.output_lengths(feats.lengths).tolist() == [25, 60]
    assert not any(p.requires_grad for p in short.parameters())
    with pytest.raises(ValueError, match="longer than the encoder window"):
        fe([noise(2.0)])
    with pytest.raises(ValueError, match="window_seconds"):
        WhisperSpeechEncoder.from_folder(folder, window_seconds=10.0)


def test_missing_whisper_files(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        WhisperSpeechEncoder.from_folder(tmp_path)


def test_a_damaged_weight_index_is_one_error_naming_it(tmp_path):
    """A Whisper folder with a sharded-weights index that is cut short or holds no weight_map
    (it was a json.JSONDecodeError or a KeyError traceback)."""
    import shutil

    shutil.copy(resolve("builtin:tiny-random-whisper") / "config.json", tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    for text, why in (('{"weight_map": {"model.encoder.', "malformed JSON"),
                      ("[]", "expected a JSON object, got list"),
                      ('{"metadata": {}}', 'expected a "weight_map" object')):
        index.write_text(text)
        with pytest.raises(CheckpointError, match=f"Whisper weight index {index}: {why}"):
            WhisperSpeechEncoder.from_folder(tmp_path)


def test_tied_ctc_head_has_no_own_parameters(make_model, tmp_path):
    from echox.model.echox import EchoX
    from echox.model.prompt import Turn

    linear, tied = make_model(), make_model(["adapter.ctc_head=tied"])
    n = lambda m: sum(p.numel() for p in m.adapter.parameters())  # noqa: E731
    assert n(linear) - n(tied) == linear.llm.vocab_size * linear.llm.hidden_size
    tied.eval()
    b = tied.collate([[Turn("user", audio=noise(1.0), transcript="hi"), Turn("assistant", text="Yo.")]])
    out = tied.forward_s2t(b)
    head = tied.llm.base.get_output_embeddings().weight
    assert out.speech.ctc_logits.shape[-1] == head.shape[0]
    tied.save_pretrained(tmp_path / "c")
    again = EchoX.from_pretrained(tmp_path / "c")
    again.eval()
    assert torch.equal(again.forward_s2t(b).logits, out.logits)


def test_frontend_batched_on_a_device_matches_clip_by_clip():
    """The GPU path (one batched STFT, `device=`) gives the per-clip CPU features; run here on
    the CPU, the same code as on a GPU."""
    folder = resolve("builtin:tiny-random-whisper")
    fe = LogMelFrontEnd(folder, 80, 300)
    waves = [noise(0.5), noise(2.9, 1), noise(1.7, 2) * 0.01]
    one = fe(waves)
    batched = fe(waves, device="cpu")
    assert batched.features.shape == one.features.shape == (3, 80, 300)
    assert batched.lengths.tolist() == one.lengths.tolist() == [50, 290, 170]
    assert torch.allclose(batched.features, one.features, atol=1e-4)
    assert not torch.equal(batched.features[0], batched.features[2])  # each clip its own max
    with pytest.raises(ValueError, match="longer than the encoder window"):
        fe([noise(3.5)], device="cpu")


def test_damaged_base_model_folders_are_one_error_naming_them(tmp_path):
    """A cut or lost LLM weights file, or a malformed config.json of the LLM or of Whisper, in
    a base-model folder (e.g. a cached conversion) was a library traceback."""
    import shutil

    from echox.config import LLMConfig
    from echox.model.llm import LLM

    llm = tmp_path / "llm"
    shutil.copytree(resolve("builtin:tiny-random-llama"), llm)
    weights = (llm / "model.safetensors").read_bytes()
    cfg = LLMConfig(name_or_path=str(llm), use_lora=False)
    (llm / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match=rf"{llm}: cannot load the LLM \(Safetensor"):
        LLM.from_folder(llm, cfg)
    (llm / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=rf"{llm}: cannot load the LLM \(OSError"):
        LLM.from_folder(llm, cfg)
    (llm / "model.safetensors").write_bytes(weights)
    (llm / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(CheckpointError, match=rf"{llm}: cannot load the (LLM|tokenizer) \("):
        LLM.from_folder(llm, cfg)

    whisper = tmp_path / "whisper"
    shutil.copytree(resolve("builtin:tiny-random-whisper"), whisper)
    (whisper / "config.json").write_text('{"d_model": ')
    with pytest.raises(CheckpointError, match=rf"{whisper}: cannot load the Whisper config"):
        WhisperSpeechEncoder.from_folder(whisper)
    (whisper / "preprocessor_config.json").write_text("{")
    with pytest.raises(CheckpointError, match=rf"{whisper}: cannot load the Whisper feature"):
        LogMelFrontEnd(whisper, 80, 300)
