"""Streaming inference: text token by token, speech in chunks within segments (the authors' trigger rule).

`Engine` holds what does not change between dialogues (the bundle, the trigger row, a
worker pool); a `Session` owns one dialogue. All streaming state is explicit and lives on the
session (`Session.history`, `Session.turn`): the KV cache (inside `TurnState.decode`), the
generated tokens and their hidden states, the `SegmentTrigger` and the segments cut so far.
The model modules keep no state between calls.

One turn (`Session.respond`):
1. the user turn (speech and/or text) joins the history; the whole prompt is embedded once;
2. the LLM decodes with a KV cache; after each token its hidden state h_t is scored against
   the LM-head row of the trigger token (cosine) and pushed to the trigger, which judges
   token c = t − delay, so segments close `delay` tokens late;
3. a closed segment's states H[start:end] go to a worker thread (`Engine.stream_segment`):
   denoiser → echo decoder, one token at a time → units (each unit-language token is split
   back on its own) → cut into chunks of `first_chunk_units`, then `chunk_units` → vocoder
   (`Vocoder.synthesize_stream`: each chunk rendered with left-context units, joins
   crossfaded). The vocoder dominates the cost, so rendering the first small chunk while the
   echo decoder goes on is what brings the first audio forward;
4. the worker puts each audio piece on the segment's queue as soon as it exists; the main
   thread delivers `AudioChunk`s in order (all of segment 0's parts before segment 1's),
   interleaved with the text without waiting, and waits for the rest at EOS;
5. without streaming, the same segments are voiced with the same chunks after the text is
   done, so both modes give the same audio. `chunk_units=0` renders each segment whole.

Stopping early (closing the `respond` iterator) cancels the queued segments and sets the
turn's stop event, which a running worker checks after every echo token and audio piece.

Threads: torch ops from worker threads while the main thread decodes are safe here (no grad,
no module state). Both share torch's intra-op pool, so on few cores they compete: with
`workers > 1` on a small CPU, `torch.set_num_threads(max(1, cores // 2))` can lower latency.
"""

from __future__ import annotations

import numbers
import queue
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from echox.audio import MIN_SPEECH_RATE, AudioWarning, audio_info, check_question_length, load_audio
from echox.config import MAX_AUDIO_SECONDS_CAP
from echox.errors import AudioError, ConfigError, EngineClosedError, PromptError
from echox.infer.bundle import Bundle
from echox.infer.events import (
    AudioChunk,
    EngineConfig,
    Event,
    Final,
    LatencyStats,
    Segment,
    SegmentSpeech,
    SpeechPiece,
    TextDelta,
)
from echox.model.encoder import check_speech_length
from echox.model.generation import (
    DecodeState,
    beam_decode,
    iter_decode,
    start_decode,
)
from echox.model.prompt import Turn, is_unicode
from echox.model.trigger import SegmentTrigger

__all__ = ["AudioChunk", "AudioInput", "Engine", "EngineConfig", "Event", "Final", "LatencyStats",
           "Segment", "SegmentSpeech", "Session", "SpeechPiece", "TextDelta", "TurnState",
           "load_question", "check_question"]

AudioInput = str | Path | bytes | bytearray | memoryview | np.ndarray | None


def check_max_audio_seconds(value: object) -> float:
    """A valid `--max-audio-seconds` / `max_audio_seconds` as float; ConfigError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0 < value < float("inf")):
        raise ConfigError(f"--max-audio-seconds must be a finite number of seconds > 0, got "
                          f"{value!r}")
    if value > MAX_AUDIO_SECONDS_CAP:
        raise ConfigError(f"--max-audio-seconds {value:g} is above {MAX_AUDIO_SECONDS_CAP:g} s: "
                          "the speech adapter attends over a whole question at once (its time "
                          "and memory grow with the square of the length); split longer audio")
    return float(value)


def check_question(audio: AudioInput, limit: float | None) -> None:
    """`load_question`'s checks alone, before a slow model load; a silent question is warned
    about once, when the turn loads it, not here too."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AudioWarning)
        load_question(audio, limit)


def _check_speech_rate(rate: object, name: str) -> None:
    if isinstance(rate, numbers.Integral) and not isinstance(rate, bool) and 0 < rate < MIN_SPEECH_RATE:
        raise AudioError(f"{name}: a sample rate of {rate} Hz is too low for speech (at least "
                         f"{MIN_SPEECH_RATE} Hz)")


def load_question(audio: AudioInput, limit: float | None, sr: int = 16000,
                  sample_rate: int | None = None) -> np.ndarray:
    """A spoken question as float32 mono at `sr`, checked: readable, complete, at least
    `MIN_QUESTION_SECONDS` long and at most `limit` seconds (None: no upper limit).

    The engine checks every user turn with it; `echox chat` and `echox demo` call it before
    the slow model load. A file longer than `limit` is refused from its header alone.
    """
    if isinstance(audio, np.ndarray):
        name = "question audio"
        _check_speech_rate(sample_rate if sample_rate is not None else sr, name)
        wav = load_audio(audio, sr, max_seconds=None,
                         orig_sr=sample_rate if sample_rate is not None else sr)
    elif isinstance(audio, (str, Path, bytes, bytearray, memoryview)):
        name = f"'{audio}': question audio" if isinstance(audio, (str, Path)) else "question audio"
        try:  # refuse a long file, or one of no speech's rate, from its header alone
            info = audio_info(audio)
        except AudioError:
            pass  # load_audio reports it
        else:
            _check_speech_rate(info.sample_rate, name)
            if limit is not None:
                check_speech_length(info.frames, limit, name, info.sample_rate)
        # a given rate must be the file's own (load_audio refuses one that disagrees)
        wav = load_audio(audio, sr, max_seconds=None, orig_sr=sample_rate)
    else:
        raise AudioError(f"unsupported audio input {type(audio).__name__}; "
                         "give a path, bytes or a numpy array")
    if limit is not None:
        check_speech_length(wav.size, limit, name)
    check_question_length(wav.size, sr, name)
    return wav


# ----------------------------------------------------------------------------- engine


class Engine:
    """The bundle plus a worker pool; makes `Session`s. Use as a context manager or `close()`."""

    def __init__(self, bundle: Bundle, cfg: EngineConfig | None = None,
                 max_audio_seconds: float | None = None) -> None:
        """`max_audio_seconds` (None = the model's `encoder.max_seconds`, 30 s by default) is
        the longest spoken question this engine accepts; the encoder takes a clip longer than
        its window as consecutive windows. It is the engine's own: other engines on the same
        bundle keep theirs, and the model's config is not changed."""
        if not isinstance(bundle, Bundle):  # an EchoX, a folder path: AttributeErrors later
            raise ConfigError(f"Engine needs a Bundle (echox.infer.bundle.load_bundle(folder)), "
                              f"got {type(bundle).__name__}")
        if cfg is not None and not isinstance(cfg, EngineConfig):
            raise ConfigError(f"Engine's cfg must be an EngineConfig or None, got {type(cfg).__name__}")
        self.bundle = bundle
        self.cfg = cfg or EngineConfig()
        self.model = bundle.model.eval()
        self.max_audio_seconds = (float(self.model.config.encoder.max_seconds)
                                  if max_audio_seconds is None
                                  else check_max_audio_seconds(max_audio_seconds))
        self.vocoder = bundle.vocoder
        limit = self.llm_positions
        if limit is not None and self.cfg.sampling.max_new_tokens >= limit:  # every turn would fail
            raise PromptError(f"max_new_tokens {self.cfg.sampling.max_new_tokens} is not below the "
                              f"LLM's {limit} positions: give a smaller --max-new-tokens")
        with torch.no_grad():
            self.trigger_row = self.model.trigger_row().detach().float()  # [D]
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()  # close() and a session making the pool
        self.closed = False

    @property
    def llm_positions(self) -> int | None:
        """The LLM's positions (prompt and answer together), where its config says."""
        return self.model.llm_positions

    def check_open(self) -> None:
        """Raise `EngineClosedError` once `close()` has been called."""
        if self.closed:
            raise EngineClosedError("this engine is closed; make a new Engine to answer more turns")

    @property
    def sample_rate(self) -> int:
        return self.vocoder.sample_rate if self.vocoder is not None else self.model.frontend.sample_rate

    @property
    def pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            self.check_open()  # a closed engine never starts a new pool that nobody shuts down
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.cfg.workers, thread_name_prefix="echox-speech")
            return self._pool

    def close(self) -> None:
        """Wait for the speech worker running now and cancel the queued ones; the engine and its
        sessions answer no more turns (`EngineClosedError`, also from a turn still being read
        when it next needs speech). Closing twice is harmless."""
        with self._pool_lock:
            self.closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def session(self, history: list[Turn] | None = None) -> Session:
        self.check_open()
        return Session(self, history)

    def trigger_score(self, hidden: torch.Tensor) -> float:
        """s_t = cos(h_t, W_lm[trigger token]) for one state [D]."""
        return float(F.cosine_similarity(hidden.float(), self.trigger_row, dim=0))

    def stream_segment(self, hidden: torch.Tensor, index: int = 0,
                       stop: threading.Event | None = None,
                       ids: list[int] | None = None) -> Iterator[SpeechPiece]:
        """States [n, D] of one segment -> audio pieces, made as the echo decoder goes.
        `ids`: the segment's text tokens (an echo decoder that reads by bytes needs them).

        Units are cut into chunks by the config's schedule and rendered by the vocoder's
        streaming API; a piece is yielded as soon as the vocoder returns it. The piece of the
        last chunk carries the crossfade tail too and has `last` set: every segment ends with
        exactly one `last` piece (empty audio when there are no units or no vocoder). When
        `stop` is set the pieces end early, without a `last` one. Worker-thread safe.
        """
        cfg = self.cfg
        sampling = cfg.unit_sampling
        if sampling is not None and sampling.seed is not None:  # same units whatever the order
            sampling = replace(sampling, seed=(sampling.seed + index) % 2**63)  # in range
        tokens: list[int] = []  # decoded since the last piece
        units: list[int] = []  # handed to the vocoder since the last piece
        ended = False  # the last chunk has been handed over: the rest is rendering only
        part = 0

        def stopped() -> bool:
            return stop is not None and stop.is_set()

        def chunks() -> Iterator[list[int]]:
            nonlocal ended
            buf: list[int] = []
            n_chunks = 0
            size = cfg.chunk_size(0)
            stream = self.bundle.unit_stream()  # the units of each token as soon as they are known
            for tok in self.model.iter_units_from_hidden(hidden, sampling, ids):
                if stopped():
                    return
                tokens.append(tok)
                buf += stream.push(tok)
                while size and len(buf) >= size:
                    chunk, buf = buf[:size], buf[size:]
                    units.extend(chunk)
                    yield chunk
                    n_chunks += 1
                    size = cfg.chunk_size(n_chunks)
            buf += stream.flush()
            ended = True
            units.extend(buf)
            yield buf  # may be empty: synthesize_stream skips it

        def piece(audio: np.ndarray, last: bool) -> SpeechPiece:
            nonlocal part
            out = SpeechPiece(part, audio, tokens[:], units[:], last)
            tokens.clear()
            units.clear()
            part += 1
            return out

        if stopped():
            return
        rest: list[np.ndarray] = []  # audio after the last chunk was handed over
        if self.vocoder is None:
            for _ in chunks():
                pass
        else:
            for audio in self.vocoder.synthesize_stream(chunks(), cfg.crossfade_ms,
                                                        cfg.context_units):
                if stopped():
                    return
                if ended:  # the last chunk's audio, then the crossfade tail: one last piece
                    rest.append(audio)
                else:
                    yield piece(audio, last=False)
        if not stopped():
            yield piece(np.concatenate(rest) if rest else np.zeros(0, dtype=np.float32), True)

    def synthesize_segment(self, hidden: torch.Tensor, index: int = 0,
                           ids: list[int] | None = None) -> SegmentSpeech:
        """States [n, D] of one segment -> echo tokens, units and audio, all at once."""
        pieces = list(self.stream_segment(hidden, index, ids=ids))
        return SegmentSpeech([t for p in pieces for t in p.tokens],
                             [u for p in pieces for u in p.units],
                             np.concatenate([p.audio for p in pieces]))


def text_delta(decode: Callable[..., str], tokens: list[int], start: int, done: int,
               final: bool) -> tuple[str, int] | None:
    """The text `tokens[done:]` add to an answer whose text up to `done` was given, and where
    the next window starts; None while the tail is an incomplete character (unless `final`).

    Only a window is decoded (`tokens[start:]` against `tokens[start:done]`): decoding the whole
    answer each token cost O(n²) (0.75 s for 2,000 tokens). Both decodes start at the same
    token, so a tokenizer that drops a first word's leading space (SentencePiece) drops it in
    both. The window moves on only past tokens that gave text: a window starting after skipped
    special tokens would lose the space before the next word."""
    before = decode(tokens[start:done], skip_special_tokens=True)
    text = decode(tokens[start:], skip_special_tokens=True)
    if not final and text.endswith("\ufffd"):
        return None
    piece = text[len(before):]  # a tokenizer that rewrites earlier text loses the edit
    return piece, (done if piece else start)


# ----------------------------------------------------------------------------- session


@dataclass
class TurnState:
    """Streaming state of the turn being generated (kept after it ends, for inspection)."""

    decode: DecodeState  # KV cache, masks and positions of the LLM
    prefix_len: int  # prompt positions before the first generated token
    trigger: SegmentTrigger
    tokens: list[int] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)  # [D] per token
    scores: list[float] = field(default_factory=list)
    segments: list[tuple[int, int]] = field(default_factory=list)  # cut and sent to speech
    text: str = ""  # text yielded so far
    text_tokens: int = 0  # tokens covered by the yielded text
    text_from: int = 0  # where the window `_text_delta` decodes starts (a whole character)


_DONE = object()  # a worker's last queue item: it returned, failed or was cancelled


@dataclass
class _Pending:
    """A segment handed to a worker: its pieces arrive on `pieces`, then `_DONE`."""

    index: int
    pieces: queue.SimpleQueue[SpeechPiece | object]
    future: Future[None]


def _voice(engine: Engine, hidden: torch.Tensor, index: int,
           out: queue.SimpleQueue[SpeechPiece | object], stop: threading.Event,
           ids: list[int] | None = None) -> None:
    """Worker: put the segment's pieces on `out` as they are made."""
    for piece in engine.stream_segment(hidden, index, stop, ids=ids):
        out.put(piece)


class Session:
    """One dialogue: its history and the current turn's streaming state."""

    def __init__(self, engine: Engine, history: list[Turn] | None = None) -> None:
        self.engine = engine
        self.history: list[Turn] = list(history or [])
        for i, t in enumerate(self.history):
            if not isinstance(t, Turn):
                raise PromptError(f"history[{i}] is a {type(t).__name__}, not a Turn "
                                  "(echox.model.prompt.Turn(role, text=..., audio=...))")
        self.turn: TurnState | None = None
        self._answering = False  # a respond() iterator is started and not yet finished or closed

    def _check_idle(self, what: str) -> None:
        if self._answering:
            raise PromptError(f"{what}: this session is still answering its last turn; read its "
                              "iterator to the end (or close() it) first")

    def reset(self) -> None:
        """Forget the dialogue."""
        self._check_idle("reset")
        self.history = []
        self.turn = None

    def user_turn(self, audio: AudioInput = None, text: str | None = None,
                  sample_rate: int | None = None) -> Turn:
        """Validate and load the user's input (speech as 16 kHz mono, at most the engine's
        `max_audio_seconds`: longer speech raises `AudioTooLongError`, one line that names
        `--max-audio-seconds`). A sample array is read at `sample_rate`, and taken as 16 kHz
        without it: give the rate of an array at any other (a 48 kHz array read as 16 kHz is
        slowed speech, answered as another question); a file gives its own."""
        model = self.engine.model
        if text is not None and not isinstance(text, str):
            raise PromptError(f"text must be a string, got {type(text).__name__}")
        if text is not None and not is_unicode(text):
            raise PromptError("the typed text is not valid UTF-8 (it holds bytes no character "
                              "is made of, or a lone surrogate such as \\ud800)")
        if audio is None and not (text and text.strip()):
            raise PromptError("a user turn needs speech (a wav path, bytes or samples) or text")
        wav = None
        if audio is not None:
            wav = load_question(audio, self.engine.max_audio_seconds,
                                model.frontend.sample_rate, sample_rate)
        return Turn("user", text=text if text and text.strip() else None, audio=wav)

    def respond(self, audio: AudioInput = None, text: str | None = None,
                sample_rate: int | None = None, speak: bool = True) -> Iterator[Event]:
        """Answer one user turn; yields TextDelta / Segment / AudioChunk events, then Final.
        `speak=False` answers in text only: no segment is voiced (no echo decoder, no
        vocoder), and Final's audio is empty.

        The input itself is checked here (errors raise at once); a prompt that, with
        `max_new_tokens`, is over the LLM's positions raises at the iterator's first `next()`,
        where the prompt is built from the history as it is then. The turn joins `history`
        when the iterator finishes; a second `respond` may be made before the first is read,
        and is refused only if read while the first is still answering.
        """
        t0 = time.perf_counter()
        self.engine.check_open()
        self._check_idle("respond")
        if not isinstance(speak, (bool, np.bool_)):  # `speak="no"` would speak
            raise PromptError(f"speak must be True or False, got {speak!r}")
        user = self.user_turn(audio, text, sample_rate)
        return self._stream(user, t0, bool(speak))

    # -- internals
    def _start(self, user: Turn) -> TurnState:
        model, cfg = self.engine.model, self.engine.cfg
        with torch.no_grad():
            batch = model.collate([self.history + [user]], add_generation_prompt=True)
            merged, _ = model.embed_inputs(batch, padding_side="left",
                                           max_seconds=self.engine.max_audio_seconds)  # [1, L, D]
        n = int(merged.inputs_embeds.shape[1])
        limit = self.engine.llm_positions  # the option alone is checked when the engine is made
        if limit is not None and n + cfg.sampling.max_new_tokens > limit:
            raise PromptError(f"the prompt is {n} positions and the answer may take "
                              f"{cfg.sampling.max_new_tokens} more, over the LLM's {limit}: "
                              f"lower max_new_tokens (--max-new-tokens) to at most {limit - n}"
                              if n < limit else
                              f"the prompt is {n} positions, {'over' if n > limit else 'all of'} "
                              f"the LLM's {limit}: shorten "
                              "the question" + (" or clear the history (reset; /reset in chat)"
                                                if self.history else ""))
        state = start_decode(merged.inputs_embeds, merged.attention_mask,
                             model.llm.stop_ids, cfg.sampling)
        return TurnState(state, int(merged.inputs_embeds.shape[1]),
                         SegmentTrigger(model.config.trigger))

    def _text_delta(self, final: bool) -> TextDelta | None:
        """New text since the last delta (`text_delta`); None while there is none yet."""
        turn = self.turn
        assert turn is not None
        if turn.text_tokens == len(turn.tokens):
            return None
        step = text_delta(self.engine.model.tokenizer.decode, turn.tokens, turn.text_from,
                          turn.text_tokens, final)
        if step is None:
            return None
        piece, turn.text_from = step
        ids = turn.tokens[turn.text_tokens:]
        turn.text += piece
        turn.text_tokens = len(turn.tokens)
        return TextDelta(piece, ids) if piece or ids else None

    def _submit(self, seg: tuple[int, int], pending: deque[_Pending],
                stop: threading.Event, ended: bool = False) -> Segment:
        turn = self.turn
        assert turn is not None
        index = len(turn.segments)
        turn.segments.append(seg)
        start, end = seg
        h = torch.stack(turn.hidden[start:end])  # [n, D]
        pieces: queue.SimpleQueue[SpeechPiece | object] = queue.SimpleQueue()
        try:
            future = self.engine.pool.submit(_voice, self.engine, h, index, pieces, stop,
                                             list(turn.tokens[start:end]))
        except RuntimeError as e:  # the pool was shut down between its lookup and the submit
            if self.engine.closed:
                raise EngineClosedError("the engine was closed during this turn") from e
            raise
        future.add_done_callback(lambda _: pieces.put(_DONE))  # also runs when cancelled
        pending.append(_Pending(index, pieces, future))
        return Segment(index, start, end, self._text_between(start, end, ended))

    def _text_between(self, start: int, end: int, ended: bool = False) -> str:
        """The text of the answer's tokens [start, end) in whole characters: the part of the
        text of tokens [:end] past that of [:start], each without a character left incomplete
        at its end (a trigger cut inside one split it into two U+FFFD halves). Segments joined
        are the answer's text."""
        tokens, decode = self.turn.tokens, self.engine.model.tokenizer.decode  # type: ignore[union-attr]

        def upto(k: int) -> str:  # the answer's end keeps what its bytes make
            text = decode(tokens[:k], skip_special_tokens=True) if k else ""
            return text if ended and k == len(tokens) else text.rstrip("\ufffd")

        before, through = upto(start), upto(end)
        if through.startswith(before):
            return through[len(before):]
        return decode(tokens[start:end], skip_special_tokens=True)  # a tokenizer that rewrites

    def _tokens(self) -> Iterator[tuple[int, torch.Tensor]]:
        """The answer's tokens, each with the hidden state [D] that produced it. Greedy or
        sampled tokens come one step at a time; with `num_beams > 1` all of them come once the
        search has ended (`beam_decode`), so text and speech start later."""
        model, cfg, turn = self.engine.model, self.engine.cfg, self.turn
        assert turn is not None
        if cfg.sampling.num_beams > 1:
            res = beam_decode(model._llm_step, model.llm.embed, turn.decode.embeds, turn.decode.mask,
                              model.llm.stop_ids, cfg.sampling, use_cache=cfg.use_cache,
                              suppress_ids=model.llm.added_token_ids)
            yield from zip(res.tokens[0], res.hidden[0])
            return
        for st in iter_decode(model._llm_step, model.llm.embed, turn.decode.embeds,
                              turn.decode.mask, model.llm.stop_ids, cfg.sampling,
                              use_cache=cfg.use_cache, suppress_ids=model.llm.added_token_ids,
                              state=turn.decode):
            if bool(st.emitted[0]):  # not the stop token
                yield int(st.ids[0]), st.hidden[0].clone()  # a copy: the prefix states can go

    def _stream(self, user: Turn, t0: float, speak: bool = True) -> Iterator[Event]:
        self.engine.check_open()  # closed after respond() made this iterator: no turn begins
        self._check_idle("respond")  # two iterators made before either started
        self._answering = True
        try:
            yield from self._answer(user, t0, speak)
        finally:
            self._answering = False

    def _answer(self, user: Turn, t0: float, speak: bool = True) -> Iterator[Event]:
        engine, cfg = self.engine, self.engine.cfg
        turn = self.turn = self._start(user)
        stats = LatencyStats(prefix_tokens=turn.prefix_len)
        pending: deque[_Pending] = deque()
        stop = threading.Event()  # set when the turn ends: workers of an abandoned turn quit
        chunks: list[np.ndarray] = []

        def ms() -> float:
            return (time.perf_counter() - t0) * 1000.0

        def deliver(block: bool) -> Iterator[AudioChunk]:
            """The pieces ready (or, with `block`, all), in segment then part order."""
            while pending:
                p = pending[0]
                try:
                    item = p.pieces.get(block=block)
                except queue.Empty:
                    return
                if item is _DONE:  # the worker ended before its last piece
                    if p.future.cancelled():  # close() cancelled it before it started
                        raise EngineClosedError("the engine was closed during this turn")
                    p.future.result()  # raises the worker's error
                    raise RuntimeError(f"the speech worker of segment {p.index} ended early")
                if item.last:
                    pending.popleft()
                chunks.append(item.audio)
                if item.audio.size and stats.first_audio_tokens is None:
                    stats.first_audio_tokens, stats.first_audio_ms = len(turn.tokens), ms()
                yield AudioChunk(p.index, item.audio, engine.sample_rate, item.units,
                                 item.part, item.last)

        def text_event(final: bool) -> Iterator[TextDelta]:
            delta = self._text_delta(final)
            if delta is not None:
                if stats.first_text_tokens is None:
                    stats.first_text_tokens, stats.first_text_ms = turn.text_tokens, ms()
                yield delta

        ended = False  # every token decoded: a segment's text may end the answer

        def close(seg: tuple[int, int] | None) -> Iterator[Event]:
            if seg is None or seg[1] <= seg[0] or not speak:
                return
            if stats.first_segment_tokens is None:
                stats.first_segment_tokens = len(turn.tokens)
            yield self._submit(seg, pending, stop, ended)

        try:
            for tok, h in self._tokens():
                turn.tokens.append(tok)
                turn.hidden.append(h)
                yield from text_event(final=False)
                turn.scores.append(engine.trigger_score(h))
                seg = turn.trigger.push(turn.scores[-1])
                if cfg.stream:
                    yield from close(seg)
                    yield from deliver(block=False)
            yield from text_event(final=True)
            ended = True
            last = turn.trigger.flush()
            if cfg.stream:
                yield from close(last)
            elif cfg.whole_response:
                yield from close((0, len(turn.tokens)))
            else:
                for seg in turn.trigger.cuts:
                    yield from close(seg)
            yield from deliver(block=True)
        finally:
            for p in pending:  # the caller stopped early: drop queued work ...
                p.future.cancel()
            stop.set()  # ... and end the running one (after the cancels: no new one starts)
            turn.decode.cache = None  # the KV cache belongs to this turn only: free it

        audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        stats.text_tokens = len(turn.tokens)
        stats.segments = len(turn.segments)
        stats.total_ms = ms()
        stats.audio_seconds = audio.size / engine.sample_rate
        stats.rtf = (stats.total_ms / 1000.0 / stats.audio_seconds) if audio.size else None
        text = engine.model.tokenizer.decode(turn.tokens, skip_special_tokens=True)
        self.history += [user, Turn("assistant", text=text)]
        yield Final(text, audio, engine.sample_rate, stats, list(turn.tokens),
                    list(turn.segments))
