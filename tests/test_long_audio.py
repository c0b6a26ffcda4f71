"""Questions longer than the encoder window (tiny-random: 3 s) are encoded window by window,
up to `encoder.max_seconds`; longer ones are refused with one line naming the option."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import noise

from echox.errors import AudioTooLongError
from echox.model.prompt import Turn

WIN = 3.0  # tiny-random Whisper window, seconds


def direct(m, waves):  # the one-window computation, straight from the parts
    feats = m.frontend(waves)
    enc = m.encoder(feats.features)
    return enc, m.encoder.output_lengths(feats.lengths)


def same_speech(a, b, exact: bool = False) -> None:
    """Two AdapterOutputs agree on each row's valid (shrunk) frames."""
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.frame_lengths, b.frame_lengths)
    for i, n in enumerate(a.lengths.tolist()):
        x, y = a.embeds[i, :n], b.embeds[i, :n]
        assert torch.equal(x, y) if exact else torch.allclose(x, y, atol=1e-5), i


@pytest.fixture(scope="module")
def models():
    from echox.config import preset_config
    from echox.model.echox import EchoX

    torch.manual_seed(0)
    masked = EchoX.build(preset_config("tiny-random")).eval()
    torch.manual_seed(0)
    unmasked = EchoX.build(preset_config("tiny-random", ["adapter.mask_padding=false"])).eval()
    assert masked.frontend.max_seconds == WIN
    return {True: masked, False: unmasked}


@pytest.mark.parametrize("mask", [True, False])
def test_one_window_clips_are_unchanged(models, mask):
    m = models[mask]
    waves = [noise(1.3, 1), noise(WIN, 2)]  # a short clip and one of exactly one window
    enc, lengths = m.encode_frames(waves)
    ref_enc, ref_len = direct(m, waves)
    assert enc.shape == ref_enc.shape == (2, 150, m.encoder.d_model)
    assert torch.equal(enc, ref_enc) and torch.equal(lengths, ref_len)
    with torch.no_grad():
        out = m.encode_speech(waves)
        ref = m.adapter(ref_enc, ref_len if mask else None)
    assert torch.equal(out.embeds, ref.embeds) and torch.equal(out.lengths, ref.lengths)
    assert torch.equal(out.ctc_logits, ref.ctc_logits)


def test_long_clip_is_its_windows_one_after_the_other(models):
    m = models[True]
    w = noise(2.5 * WIN, 3)
    win = m.frontend.max_samples
    pieces = [w[:win], w[win: 2 * win], w[2 * win:]]
    enc, lengths = m.encode_frames([w])
    parts = [m.encode_frames([p]) for p in pieces]  # each fits one window
    want = torch.cat([e[0] for e, _ in parts])  # [3 * 150, d]
    valid = sum(int(n[0]) for _, n in parts)
    assert valid == math.ceil(w.size / 320) == 375  # the frame counts add up
    assert lengths.tolist() == [valid]
    assert enc.shape == (1, 450, m.encoder.d_model)
    assert torch.allclose(enc[0], want, atol=1e-5)
    # its valid frames are not the first window's, repeated or cut
    assert not torch.allclose(enc[0, 150:300], enc[0, :150], atol=1e-3)


@pytest.mark.parametrize("mask", [True, False])
def test_mixed_batch_rows_equal_their_single_rows(models, mask):
    m = models[mask]
    waves = [noise(1.0, 4), noise(2.5 * WIN, 5), noise(4.0, 6)]
    enc, lengths = m.encode_frames(waves)
    assert enc.shape[1] == 450 and lengths.tolist() == [50, 375, 200]
    with torch.no_grad():
        batch = m.encode_speech(waves)
    for i, w in enumerate(waves):
        e1, n1 = m.encode_frames([w])
        n = int(n1[0])
        assert int(lengths[i]) == n
        assert torch.allclose(enc[i, :n], e1[0, :n], atol=1e-5)
        assert torch.count_nonzero(enc[i, e1.shape[1]:]) == 0  # zero rows past its windows
        with torch.no_grad():
            one = m.encode_speech([w])
        k = int(one.lengths[0])
        assert int(batch.lengths[i]) == k and int(batch.frame_lengths[i]) == int(one.frame_lengths[0])
        assert torch.allclose(batch.embeds[i, :k], one.embeds[0], atol=1e-5)
    # a long clip gives more speech embeddings to the LLM than its first window alone
    with torch.no_grad():
        first = m.encode_speech([waves[1][: m.frontend.max_samples]])
    assert int(batch.frame_lengths[1]) > int(first.frame_lengths[0])


def test_shrink_keeps_the_kept_frames_of_long_speech():
    from echox.model.speech_adapter import gather_kept

    keep = torch.zeros(2, 400, dtype=torch.bool)  # 400 frame pairs: 16 s of speech
    keep[0, ::7] = True
    keep[1, 300:] = True
    sh = gather_kept(keep)
    assert sh.index[0, : int(sh.lengths[0])].tolist() == list(range(0, 400, 7))
    assert sh.index[1, : int(sh.lengths[1])].tolist() == list(range(300, 400))


def test_generate_text_on_a_long_question(models):
    from echox.model.generation import SamplingConfig

    m = models[True]
    g = m.generate_text([[Turn("user", audio=noise(2.5 * WIN, 7))]], SamplingConfig(max_new_tokens=4))
    assert len(g.token_ids) == 1 and 1 <= len(g.token_ids[0]) <= 4
    assert g.hidden[0].shape[0] == len(g.token_ids[0])


def test_over_the_limit_is_one_line_naming_the_option(make_model):
    m = make_model(["encoder.max_seconds=4.5"]).eval()
    with torch.no_grad():
        assert m.encode_speech([noise(4.5, 1)]).lengths.shape == (1,)  # exactly at the limit
        with pytest.raises(AudioTooLongError) as e:
            m.encode_speech([noise(5.0, 1)])
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in msg
    assert msg == ("question audio is 5.0 s; the limit is 4.5 s (to accept longer speech, "
                   "pass --max-audio-seconds N; max_audio_seconds=N in the Python API, "
                   "encoder.max_seconds in a model config)")
    with pytest.raises(AudioTooLongError, match="utterance 1's audio is 5.0 s"):
        m.generate_text([[Turn("user", audio=noise(1.0))], [Turn("user", audio=noise(5.0))]])
    from echox.config import preset_config
    from echox.errors import ConfigError

    with pytest.raises(ConfigError, match="encoder.max_seconds"):
        preset_config("tiny-random", ["encoder.max_seconds=0"]).validate()


@pytest.mark.parametrize("mask", [True, False])
def test_cache_gives_the_uncached_result_for_long_clips(models, mask, tmp_path):
    m = models[mask]
    waves = [noise(2.5 * WIN, 8), noise(1.1, 9)]
    try:
        with torch.no_grad():
            ref = m.encode_speech(waves)
            m.enable_feature_cache(tmp_path)
            miss = m.encode_speech(waves)
            hit = m.encode_speech(waves)
            alone = m.encode_speech(waves[:1])  # a hit in another batch
        cache = m.feature_cache
        assert cache.misses == 2 and cache.hits == 3
        stored = cache.get(cache.key(waves[0]))
        assert stored is not None and stored[1] == 375
        assert stored[0].shape[0] == (376 if mask else 450)
    finally:
        m.enable_feature_cache(None)
    for out in (miss, hit):
        same_speech(out, ref, exact=True)
    with torch.no_grad():
        one = m.encode_speech(waves[:1])
    same_speech(alone, one)
    with pytest.raises(ValueError, match="expected a non-empty mono"):
        m.encode_speech([np.zeros((2, 100), dtype=np.float32)])


# ----------------------------------------------------------------------------- engine and CLI


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_engine import make_bundle_parts

    from echox.infer.bundle import save_bundle

    model, voc = make_bundle_parts()
    return save_bundle(tmp_path_factory.mktemp("long") / "bundle", model, voc)


def test_engine_limit(bundle_dir: Path, tmp_path: Path) -> None:
    from echox.errors import ConfigError
    from echox.infer.bundle import load_bundle
    from echox.infer.engine import Engine, EngineConfig
    from echox.infer.events import Final
    from echox.model.generation import SamplingConfig

    bundle = load_bundle(bundle_dir)
    with Engine(bundle) as eng:
        assert eng.model.config.encoder.max_seconds == 30.0
        turn = eng.session().user_turn(audio=noise(2.5 * WIN))  # longer than the window: fine
        assert turn.audio is not None and turn.audio.size == int(2.5 * WIN * 16000)
        with pytest.raises(AudioTooLongError, match=r"^question audio is 31.0 s; the limit is 30 s"):
            eng.session().user_turn(audio=noise(31.0))
    with Engine(bundle, max_audio_seconds=5) as eng, Engine(bundle) as other:
        assert eng.max_audio_seconds == 5.0
        # the limit is the engine's own: the shared model config and another engine keep 30 s
        assert eng.model.config.encoder.max_seconds == 30.0 and other.max_audio_seconds == 30.0
        f = tmp_path / "six.wav"
        sf.write(f, noise(6.0), 16000)
        with pytest.raises(AudioTooLongError, match=r"six.wav': question audio is 6.0 s.*limit is 5 s "
                           r"\(to accept longer speech, pass --max-audio-seconds N;"):
            eng.session().respond(audio=f)
        assert other.session().user_turn(audio=f).audio is not None
    # a limit over the model config's is honoured through the encoder too (not refused there)
    with Engine(bundle, max_audio_seconds=40, cfg=EngineConfig(sampling=SamplingConfig(
            temperature=0.0, max_new_tokens=2))) as eng:
        events = list(eng.session().respond(audio=noise(32.0)))
        assert isinstance(events[-1], Final)
        assert eng.model.config.encoder.max_seconds == 30.0
        with pytest.raises(AudioTooLongError, match="limit is 40 s"):
            eng.session().user_turn(audio=noise(41.0))
    with pytest.raises(ConfigError, match="--max-audio-seconds"):
        Engine(bundle, max_audio_seconds=0)


def test_chat_cli_long_questions(bundle_dir: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from echox.cli import main

    fast = ["--model", str(bundle_dir), "--temperature", "0", "--max-new-tokens", "4",
            "--no-stream", "--chunk-units", "0"]
    q = tmp_path / "long.wav"
    sf.write(q, noise(2.5 * WIN), 16000)
    code = main(["chat", str(q), "-o", str(tmp_path / "a.wav"), *fast])
    assert code == 0, capsys.readouterr().err  # 7.5 s: over the 3 s window, under 30 s
    capsys.readouterr()

    def one_line(argv: list[str], *words: str) -> None:
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and "Traceback" not in "\n".join(err)
        assert err[-1].startswith("echox: error: ")
        for w in words:
            assert w in err[-1], err[-1]

    one_line(["chat", str(q), "--max-audio-seconds", "5", *fast],
             "long.wav", "question audio is 7.5 s", "the limit is 5 s", "--max-audio-seconds")
    huge = tmp_path / "huge.wav"
    sf.write(huge, np.zeros(16000 * 31, dtype=np.float32), 16000)
    one_line(["chat", str(huge), *fast], "huge.wav", "31.0 s", "limit is 30 s",
             "--max-audio-seconds")
    one_line(["chat", str(q), "--max-audio-seconds", "0", *fast], "--max-audio-seconds", "> 0")
    one_line(["demo", "--model", str(bundle_dir), "--question", str(q), "--max-audio-seconds",
              "5", "--no-asr", "-o", str(tmp_path / "d.wav")], "long.wav", "--max-audio-seconds")
