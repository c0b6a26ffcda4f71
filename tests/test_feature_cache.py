"""The encoder-output cache: same losses with and without it, safe against bad entries."""

import json
import logging

import pytest
import torch
from conftest import noise
from test_train import _echo_init, _run, dialogues

from echox.config import preset_config
from echox.model.feature_cache import EncoderCache, encoder_fingerprint
from echox.train import stages


def _losses(out_dir):
    recs = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


@pytest.mark.parametrize("stage", ["s2t", "echo"])
def test_losses_equal_with_and_without_cache(stage, tmp_path):
    def fresh():
        if stage == "echo":
            return stages.prepare_model("echo", init=s2t_dir, t2c_from=t2c_dir)
        return stages.prepare_model(stage, preset_config("tiny-random"))

    s2t_dir = t2c_dir = None
    if stage == "echo":
        s2t_dir, t2c_dir = _echo_init(tmp_path)
    cache = tmp_path / "cache"
    kw = dict(max_steps=5, save_every=0)
    _run(stage, tmp_path / "plain", model=fresh(), **kw)
    m1, _ = _run(stage, tmp_path / "fill", model=fresh(), cache_encoder=True,
                 encoder_cache_dir=str(cache), **kw)
    assert m1.feature_cache.misses > 0  # the first run fills the cache
    m2, _ = _run(stage, tmp_path / "read", model=fresh(), cache_encoder=True,
                 encoder_cache_dir=str(cache), **kw)
    assert m2.feature_cache.misses == 0 and m2.feature_cache.hits > 0
    plain = _losses(tmp_path / "plain" / stage)
    assert len(plain) == 5
    for run in ("fill", "read"):
        assert _losses(tmp_path / run / stage) == pytest.approx(plain, rel=1e-5, abs=1e-6)


def test_encode_speech_equal_and_only_valid_frames_stored(make_model, tmp_path):
    m = make_model()
    m.eval()
    audio = [noise(0.5, 1), noise(1.7, 2), noise(1.1, 3)]
    ref = m.encode_speech(audio)
    m.enable_feature_cache(tmp_path)
    for _ in range(2):  # a miss, then a hit
        got = m.encode_speech(audio)
        torch.testing.assert_close(got.embeds, ref.embeds, rtol=1e-5, atol=1e-6)
        assert torch.equal(got.lengths, ref.lengths)
        assert torch.equal(got.frame_lengths, ref.frame_lengths)
        for i, n in enumerate(ref.frame_lengths.tolist()):  # frames past the speech differ
            torch.testing.assert_close(got.ctc_logits[i, :n], ref.ctc_logits[i, :n],
                                       rtol=1e-5, atol=1e-5)
    assert m.feature_cache.hits == 3 and m.feature_cache.misses == 3
    frames, valid = m.feature_cache.get(m.feature_cache.key(audio[0]))
    assert frames.shape[0] == 2 * ((valid + 1) // 2) < m.encoder.window_frames // 2


def test_bad_entries_are_recomputed_with_a_warning(make_model, tmp_path, caplog):
    m = make_model()
    m.eval()
    audio = [noise(0.9, 4)]
    ref = m.encode_speech(audio).embeds
    m.enable_feature_cache(tmp_path)
    m.encode_speech(audio)
    path = m.feature_cache.path(m.feature_cache.key(audio[0]))
    data = path.read_bytes()
    damaged = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "garbage": b"\x00" * 64,
        "flipped": data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:],  # a changed frame value
    }
    for name, bad in damaged.items():
        path.write_bytes(bad)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="echox.model.feature_cache"):
            got = m.encode_speech(audio).embeds
        assert "unusable" in caplog.text, name
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=name)
        assert m.feature_cache.get(m.feature_cache.key(audio[0])) is not None, name  # rewritten
    assert m.feature_cache.repaired == len(damaged)
    assert m.feature_cache.hits == len(damaged)


def test_keys_depend_on_content_encoder_and_window(make_model, tmp_path):
    m = make_model()
    fp = encoder_fingerprint(m.encoder, m.encoder.window_frames, keep_padding=False)
    assert fp == encoder_fingerprint(m.encoder, m.encoder.window_frames, keep_padding=False)
    assert fp != encoder_fingerprint(m.encoder, m.encoder.window_frames // 2, keep_padding=False)
    assert fp != encoder_fingerprint(m.encoder, m.encoder.window_frames, keep_padding=True)
    other = make_model(["seed=7"])
    with torch.no_grad():
        other.encoder.whisper.layers[0].fc1.weight.add_(1e-3)
    assert fp != encoder_fingerprint(other.encoder, other.encoder.window_frames, keep_padding=False)
    c = EncoderCache(tmp_path, fp)
    a, b = noise(0.5, 1), noise(0.5, 2)
    assert c.key(a) == c.key(a.copy()) and c.key(a) != c.key(b)
    b2 = a.copy()
    b2[-1] += 1e-4  # a change at the very end of the clip
    assert c.key(b2) != c.key(a)


def test_too_long_audio_fails_the_same_with_cache(make_model, tmp_path):
    m = make_model(["encoder.max_seconds=4"])  # over one 3 s window is fine; over 4 s is not
    long = noise(4.5, 1)
    with pytest.raises(ValueError, match="the limit is 4 s"):
        m.encode_speech([long])
    m.enable_feature_cache(tmp_path)
    with pytest.raises(ValueError, match="the limit is 4 s"):
        m.encode_speech([long])


def test_trainable_encoder_is_never_cached(make_model, tmp_path):
    m = make_model(["encoder.trainable=true"])
    with pytest.raises(ValueError, match="cannot be cached"):
        m.enable_feature_cache(tmp_path)


def test_dialogue_batches_via_cache_match(make_model, tmp_path):
    m = make_model()
    m.eval()
    batch = m.collate(dialogues(3))
    ref = m.forward_s2t(batch).loss
    m.enable_feature_cache(tmp_path)
    for _ in range(2):
        assert m.forward_s2t(m.collate(dialogues(3))).loss.item() == pytest.approx(ref.item(), rel=1e-6)
