"""`WS /v1/stream` against an adversarial client: wrong types, refused uploads, cancels at odd
moments, long numbers, lone surrogates, handshakes racing for the last connection place.

Each test checks the answer the protocol (docs/api.md) promises and that the connection (or
the next one) still serves. The tiny random engine and the helpers come from test_serve.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import noise
from starlette.websockets import WebSocketDisconnect
from test_serve import (  # noqa: F401 - `engine` is a fixture
    EndlessEngine,
    client,
    engine,
    streamed_flac,
    turn_events,
    wait_until,
    wav,
)

from echox.infer.engine import Engine
from echox.serve.app import ServeConfig, create_app


def error(ws: Any, status: int, code: str, words: str = "") -> dict[str, Any]:
    ev = ws.receive_json()
    assert ev["type"] == "error" and (ev["status"], ev["code"]) == (status, code), ev
    assert words in ev["message"], ev
    return ev


def pong(ws: Any) -> None:
    """The next message is the answer to a ping: nothing else was sent before it."""
    ws.send_json({"type": "ping"})
    assert ws.receive_json() == {"type": "pong"}


def pong_after(ws: Any, expected: dict[str, Any]) -> None:
    """The next message is `expected`, then the answer to a ping (which keeps a server that
    sends nothing from hanging the test)."""
    ws.send_json({"type": "ping"})
    assert ws.receive_json() == expected
    assert ws.receive_json() == {"type": "pong"}


class SlowTidyEngine:
    """The real engine, but a turn's iterator takes 0.5 s to return after its final event
    (as the engine does while it stops its speech workers); `tidied` is set when it has."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.tidied = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def session(self, history: Any = None) -> Any:
        s = self._engine.session(history)
        respond = s.respond

        def slow(*args: Any, **kw: Any) -> Iterator[Any]:
            events = respond(*args, **kw)

            def tidy() -> Iterator[Any]:
                yield from events
                time.sleep(0.5)
                self.tidied.set()

            return tidy()

        s.respond = slow
        return s


def test_ws_cancel_is_always_answered(engine: Engine) -> None:
    """`cancel` is answered by `cancelled` also when no answer is under way (before any turn,
    twice, after the final event): a client waiting for the acknowledgement never hangs."""
    with client(engine) as c, c.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        ws.send_json({"type": "cancel"})
        pong_after(ws, {"type": "cancelled"})
        ws.send_json({"type": "text", "text": "hello"})
        assert turn_events(ws)[-1]["type"] == "final"
        for _ in range(2):
            ws.send_json({"type": "cancel"})
            pong_after(ws, {"type": "cancelled"})
        ws.send_json({"type": "text", "text": "still there?"})
        assert turn_events(ws)[-1]["turn"] == 2


def test_ws_cancel_after_the_final_event_lets_the_turn_tidy_up(engine: Engine) -> None:
    """A turn that has sent its final event is not "cancelled": the cancel waits until its
    thread has returned (its worker slot is not given back early)."""
    slow = SlowTidyEngine(engine)
    with client(slow) as c, c.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        ws.send_json({"type": "text", "text": "hello"})
        assert turn_events(ws)[-1]["type"] == "final"
        ws.send_json({"type": "cancel"})
        assert ws.receive_json() == {"type": "cancelled"}
        assert slow.tidied.is_set()
        h = c.get("/health").json()
        assert (h["running"], h["served"], h["stopped"]) == (0, 1, 0)


BAD_AUDIO_MESSAGES = [
    ({"format": "pcm_s16le", "sample_rate": "16000"}, "got '16000'"),
    ({"format": "pcm_s16le", "sample_rate": 16000.5}, "got 16000.5"),
    ({"format": "pcm_s16le", "sample_rate": -16000}, "got -16000"),
    ({"format": "pcm_s16le", "sample_rate": 10 ** 12}, "got 1000000000000"),
    ({"format": "pcm_f32le", "sample_rate": True}, "got True"),
    ({"format": "pcm_f32le", "sample_rate": [16000]}, "got a JSON list"),
    ({"format": "pcm_s16le"}, "got None"),
    ({"format": "mp3", "sample_rate": 16000}, "unknown audio format 'mp3'"),
    ({"format": {"pcm": 1}}, "unknown audio format a JSON dict"),
]


def test_ws_a_refused_audio_message_drops_its_frames(engine: Engine) -> None:
    """A refused `audio` message gets one error; the frames and `end` that follow it belong to
    the refused turn and are dropped (before, they were read as an audio file: a second,
    confusing bad_audio error for the same turn)."""
    pcm = (noise(0.5) * 30000).astype("<i2").tobytes()
    with client(engine) as c, c.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        for fields, words in BAD_AUDIO_MESSAGES:
            ws.send_json({"type": "audio", **fields, "history": [{"role": 5}]})
            error(ws, 400, "bad_request", words)
            ws.send_bytes(pcm[:4000])
            ws.send_bytes(pcm[4000:])
            ws.send_json({"type": "end"})
            pong(ws)
        # a valid audio message (extra fields ignored) still starts a turn; a whole-number
        # float rate is that number, and a null format is a file
        ws.send_json({"type": "audio", "format": "pcm_s16le", "sample_rate": 16000, "x": [1]})
        ws.send_bytes(pcm)
        ws.send_json({"type": "end"})
        assert turn_events(ws)[-1]["type"] == "final"
        ws.send_json({"type": "audio", "format": "pcm_s16le", "sample_rate": 16000.0})
        ws.send_bytes(pcm)
        ws.send_json({"type": "end"})
        assert turn_events(ws)[-1]["type"] == "final"
        ws.send_json({"type": "audio", "format": None})
        ws.send_bytes(wav(0.5))
        ws.send_json({"type": "end"})
        assert turn_events(ws)[-1]["type"] == "final"


def test_ws_a_typed_turn_ends_a_refused_upload(engine: Engine) -> None:
    """After a 413 on an upload the client abandons, a typed turn ends it: a file sent next
    (binary frames, no `audio` message) is answered, not silently dropped."""
    with client(engine, max_upload_bytes=20_000) as c, c.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        for _ in range(25):  # many small frames, over the limit together
            ws.send_bytes(b"\x00" * 1000)
        error(ws, 413, "too_large", "over the limit of 20000 bytes")
        ws.send_json({"type": "text", "text": "never mind"})
        assert turn_events(ws)[-1]["type"] == "final"
        ws.send_bytes(wav(0.5))
        ws.send_json({"type": "end"})
        ws.send_json({"type": "ping"})
        events = []
        while not events or events[-1]["type"] != "pong":  # the turn's first events, the pong
            msg = ws.receive()
            if msg.get("text") is not None:
                events.append(json.loads(msg["text"]))
        wait_until(lambda: c.get("/health").json()["served"] == 2, 30)  # before: dropped
        if "final" not in [e["type"] for e in events]:
            events += turn_events(ws)
        assert next(e for e in events if e["type"] == "final")["turn"] == 2


def test_ws_long_numbers_and_lone_surrogates_are_bad_input(engine: Engine) -> None:
    """JSON with a number of 4300+ digits (a ValueError in Python, not a JSONDecodeError) or
    text with a lone surrogate ("\\ud800": no tokenizer takes it) is the client's mistake: a
    400, not a dropped connection or a 500 "the model failed"."""
    with client(engine) as c:
        with c.websocket_connect("/v1/stream") as ws:
            ws.receive_json()
            ws.send_text('{"type": "audio", "format": "pcm_s16le", "sample_rate": '
                         + "1" * 5000 + "}")
            error(ws, 400, "bad_message", "not JSON")
            ws.send_text('{"type": "text", "text": "hi \\ud800 there"}')
            error(ws, 400, "bad_request", "lone surrogate")
            ws.send_bytes(wav(0.3))
            ws.send_text('{"type": "end", "text": "\\udfff"}')
            error(ws, 400, "bad_request", "lone surrogate")
            pong(ws)
            ws.send_json({"type": "text", "text": "fine"})
            assert turn_events(ws)[-1]["type"] == "final"
        long_number = b'{"text": "hi", "x": ' + b"1" * 5000 + b"}"
        cases = [
            c.post("/v1/chat", content=long_number, headers={"content-type": "application/json"}),
            c.post("/v1/chat", files={"audio": ("q.wav", wav(0.3), "audio/wav")},
                   data={"history": "[" + "1" * 5000 + "]"}),
            c.post("/v1/chat", content=b'{"text": "hi \\ud800"}',
                   headers={"content-type": "application/json"}),
            c.post("/v1/chat", content=json.dumps({"text": "hi", "history": [
                {"role": "user", "text": "\ud800"}, {"role": "assistant", "text": "ok"}]}),
                headers={"content-type": "application/json"}),
            c.post("/v1/chat", content=wav(0.3),
                   headers={"content-type": "audio/wav", "content-length": "9" * 5000}),
        ]
        for r, status in zip(cases, (400, 400, 400, 400, 413), strict=True):
            assert r.status_code == status, r.text
            assert len(r.text) < 400, r.text  # the 5000 digits are not echoed
        assert c.post("/v1/chat", json={"text": "fine"}).status_code == 200


def test_ws_errors_do_not_echo_huge_values(engine: Engine) -> None:
    """An error quotes what the client sent in a few characters, not its megabytes."""
    with client(engine) as c, c.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        ws.send_json({"type": "x" * 20_000})
        ev = error(ws, 400, "bad_message", "unknown message type 'xxx")
        assert len(ev["message"]) < 200
        ws.send_json({"type": "audio", "format": "y" * 20_000})
        assert len(error(ws, 400, "bad_request", "unknown audio format")["message"]) < 200
        ws.send_json({"type": "audio", "format": "pcm_s16le", "sample_rate": "9" * 20_000})
        assert len(error(ws, 400, "bad_request", "sample_rate")["message"]) < 200
        pong(ws)


def test_ws_a_text_message_past_its_limit_is_refused_unread(engine: Engine) -> None:
    """Megabytes of JSON in a text frame were parsed on the event loop: 15 MB held every
    other client for seconds. A message longer than a `text` at its limit can be is refused
    before it is parsed; one at the limit, escaped to 12 characters a character, is read."""
    with client(engine, max_text_chars=50) as c, c.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        ws.send_text(json.dumps({"type": "text", "x": [{}] * 1_000}))  # 5,000+ characters
        ev = error(ws, 413, "message_too_large", "1624 characters")
        ws.send_text(json.dumps({"type": "text", "text": "\U0001f600" * 50}))  # 12 a character
        assert turn_events(ws)[-1]["type"] == "final"
        pong(ws)
        assert "send audio as binary frames" in ev["message"]


WS_SCOPE = {"type": "websocket", "asgi": {"version": "3.0"}, "scheme": "ws",
            "http_version": "1.1", "path": "/v1/stream", "raw_path": b"/v1/stream",
            "query_string": b"", "root_path": "", "headers": [(b"host", b"testserver")],
            "client": ("127.0.0.1", 50000), "server": ("testserver", 80), "subprotocols": []}


def test_ws_handshakes_racing_for_the_last_place(engine: Engine) -> None:
    """Two handshakes at once with one place left: one conversation, one 503 (before, both
    were checked before either was counted, and both were let in)."""
    app = create_app(engine, ServeConfig(max_connections=1))
    scope = WS_SCOPE

    async def both() -> list[list[dict[str, Any]]]:
        inboxes = [asyncio.Queue(), asyncio.Queue()]
        sent: list[list[dict[str, Any]]] = [[], []]

        def conversation(i: int) -> Any:
            inboxes[i].put_nowait({"type": "websocket.connect"})

            async def send(msg: dict[str, Any]) -> None:
                if msg["type"] == "websocket.accept":
                    await asyncio.sleep(0.05)  # the handshake's answer is being written
                sent[i].append(msg)

            return app(dict(scope), inboxes[i].get, send)

        tasks = [asyncio.create_task(conversation(i)) for i in (0, 1)]
        for _ in range(200):
            if all(any("text" in m for m in s) for s in sent):
                break
            await asyncio.sleep(0.01)
        for q in inboxes:
            q.put_nowait({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return sent

    try:
        sent = asyncio.run(both())
    finally:
        app.state.echox.close()
    first = sorted(json.loads(next(m["text"] for m in s if "text" in m))["type"] for s in sent)
    assert first == ["error", "ready"], sent
    refused = next(s for s in sent if json.loads(s[1]["text"])["type"] == "error")
    assert json.loads(refused[1]["text"])["code"] == "too_many_connections"
    assert refused[-1] == {"type": "websocket.close", "code": 1013, "reason": ""}
    assert app.state.echox.connections == 0


def test_ws_next_connection_works_after_a_client_leaves_mid_answer(engine: Engine) -> None:
    """A client that closes while its answer streams frees its place and its worker: with one
    of each, the next connection is let in and answered."""
    with client(engine, max_connections=1, workers=1, queue_size=0) as c:
        for _ in range(3):
            with c.websocket_connect("/v1/stream") as ws:
                assert ws.receive_json()["type"] == "ready"
                ws.send_json({"type": "text", "text": "hello"})
                assert ws.receive_json()["type"] == "start"
        with c.websocket_connect("/v1/stream") as ws:
            assert ws.receive_json()["type"] == "ready"
            ws.send_json({"type": "text", "text": "hello"})
            assert turn_events(ws)[-1]["type"] == "final"
        h = c.get("/health").json()
        assert (h["connections"], h["running"], h["refused"]) == (0, 0, 0)


def test_ws_a_typed_turn_drops_audio_not_yet_ended(engine: Engine) -> None:
    """Frames sent before a `text` turn, without their `end`, are dropped when it starts (as
    a new `audio` message drops them): a later lone `end` has no audio to answer."""
    pcm = (noise(0.5) * 30000).astype("<i2").tobytes()
    with client(engine) as c, c.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        ws.send_json({"type": "audio", "format": "pcm_s16le", "sample_rate": 16000})
        ws.send_bytes(pcm)
        ws.send_json({"type": "text", "text": "something else"})
        assert turn_events(ws)[-1]["type"] == "final"
        ws.send_json({"type": "end"})
        error(ws, 400, "empty_turn")


def test_ws_an_end_with_a_refused_text_keeps_the_audio(engine: Engine) -> None:
    """An `end` whose text is refused used to drop the turn's audio with it: the client had to
    upload it again. Now the same audio is answered by the next `end`."""
    pcm = (noise(0.5) * 30000).astype("<i2").tobytes()
    with client(engine) as c, c.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        ws.send_json({"type": "audio", "format": "pcm_s16le", "sample_rate": 16000})
        ws.send_bytes(pcm)
        ws.send_json({"type": "end", "text": 5})
        error(ws, 400, "bad_request", "text must be a string")
        ws.send_json({"type": "end", "text": "x" * 2_001})
        error(ws, 413, "text_too_long")
        ws.send_json({"type": "end", "text": "x" * 100_000})  # refused before it is read
        error(ws, 413, "message_too_large")
        ws.send_json({"type": "end"})
        events = turn_events(ws)
        assert events[-1]["type"] == "final" and events[-1]["turn"] == 1
        wait_until(lambda: c.get("/health").json()["served"] == 1, 30)


def test_ws_a_client_that_stops_reading_frees_its_worker_at_the_turn_timeout(
        engine: Engine) -> None:
    """A client that stops reading mid-answer (its socket buffers full, the server's send
    waits) held its worker for ever, past the turn timeout: every other turn got 503 busy.
    Now a send is given up at the turn timeout: the worker is free, and another conversation
    is answered while the silent client is still connected."""
    app = create_app(engine, ServeConfig(workers=1, queue_size=0, turn_timeout=0.5))
    tried: list[str] = []  # the events sent to the silent client, which it never reads

    def conversation(text: str, reads: bool) -> tuple[asyncio.Task[None], list[dict[str, Any]],
                                                      asyncio.Queue[dict[str, Any]]]:
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        got: list[dict[str, Any]] = []

        async def send(msg: dict[str, Any]) -> None:
            if msg["type"] == "websocket.close":
                return
            if not msg.get("text"):  # the handshake's accept
                return
            ev = json.loads(msg["text"])
            if not reads and ev["type"] not in ("ready", "start"):
                tried.append(ev["type"])
                await asyncio.Event().wait()  # the client reads nothing more: never sent
            got.append(ev)

        inbox.put_nowait({"type": "websocket.connect"})
        inbox.put_nowait({"type": "websocket.receive",
                          "text": json.dumps({"type": "text", "text": text})})
        return asyncio.create_task(app(dict(WS_SCOPE), inbox.get, send)), got, inbox

    async def main() -> tuple[float, tuple[int, int, int], list[str]]:
        gate = app.state.echox.gate
        silent, got, inbox = conversation("hello", reads=False)
        t0 = time.monotonic()
        while not any(e.get("type") == "start" for e in got) and time.monotonic() - t0 < 30:
            await asyncio.sleep(0.01)
        t0 = time.monotonic()  # the turn runs; the client reads no more
        while gate.admitted and time.monotonic() - t0 < 10:
            await asyncio.sleep(0.02)
        freed_after = time.monotonic() - t0
        state = (gate.running, gate.admitted, gate.stopped)
        app.state.echox.cfg.turn_timeout = 60.0  # the next turn's answer is not timed: a busy CPU
        other, other_got, other_inbox = conversation("me next", reads=True)
        while (not any(e.get("type") in ("final", "error") for e in other_got)
               and time.monotonic() - t0 < 30):
            await asyncio.sleep(0.02)
        for q in (inbox, other_inbox):
            q.put_nowait({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(other, 10)
        # the silent conversation ends with its client: no send of its turn still waits on it
        await asyncio.wait_for(silent, 10)
        return freed_after, state, [e.get("type") for e in other_got]

    try:
        freed_after, state, other = asyncio.run(main())
    finally:
        app.state.echox.close()
    assert state == (0, 0, 1) and freed_after < 5, (state, freed_after)
    assert other[0] == "ready" and other[-1] == "final", other
    # one send was cut off, and nothing followed it (a 504 text frame where an audio header's
    # bytes were due would break the protocol, and it waited on the same client for ever)
    assert tried == ["text"], tried


class BrokenResetEngine:
    """The real engine, but a session's `reset` fails with an error the server does not
    expect (a stand-in for any bug met while handling a message)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def session(self, history: Any = None) -> Any:
        s = self._engine.session(history)

        def reset() -> None:
            raise KeyError("a bug")

        s.reset = reset
        return s


def test_ws_an_unexpected_error_answers_the_message_and_keeps_the_conversation(
        engine: Engine) -> None:
    """An error the server does not expect while it handles a message is a 500 `error`
    event (logged); it used to end the connection, and the conversation's history with it."""
    with client(BrokenResetEngine(engine)) as c, c.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        ws.send_json({"type": "text", "text": "hello"})
        first = turn_events(ws)[-1]
        ws.send_json({"type": "reset"})
        error(ws, 500, "internal", "KeyError")
        pong(ws)
        ws.send_json({"type": "text", "text": "hello"})
        second = turn_events(ws)[-1]
        assert (first["type"], second["type"], second["turn"]) == ("final", "final", 2)
        assert second["stats"]["prefix_tokens"] > first["stats"]["prefix_tokens"]  # history


def test_ws_audio_the_model_cannot_take_is_a_400_and_the_conversation_goes_on(
        engine: Engine) -> None:
    """A streamed FLAC (no length in its header) ended the connection (a ValueError from an
    allocation of 2^63 frames); samples of 1e30 were a 500 "the model failed" after the turn
    had started. Both are refused before the turn, and the conversation goes on."""
    with client(engine) as c, c.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        ws.send_json({"type": "text", "text": "hello"})
        assert turn_events(ws)[-1]["type"] == "final"
        ws.send_bytes(streamed_flac(0.5))
        ws.send_json({"type": "end"})
        error(ws, 400, "bad_audio", "the file does not give its length")
        ws.send_bytes(wav(0.5))
        ws.send_json({"type": "end"})
        assert turn_events(ws)[-1]["turn"] == 2
        ws.send_json({"type": "audio", "format": "pcm_f32le", "sample_rate": 16000})
        ws.send_bytes((noise(0.5) * np.float32(1e30)).astype("<f4").tobytes())
        ws.send_json({"type": "end"})
        error(ws, 400, "bad_audio", "far outside the [-1, 1]")
        ws.send_json({"type": "text", "text": "still there?"})
        assert turn_events(ws)[-1]["turn"] == 3


def test_ws_an_idle_conversation_is_closed_and_frees_its_place(engine: Engine) -> None:
    """Idle clients that answered pings held every conversation place for ever. A turn that
    runs longer than the idle time is not cut: only silence with no turn running counts."""
    with client(EndlessEngine(engine), idle_timeout=0.6, max_connections=1) as c:
        with c.websocket_connect("/v1/stream") as ws:
            assert ws.receive_json()["limits"]["idle_timeout"] == 0.6
            ws.send_json({"type": "text", "text": "talk for a while"})
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.5:  # a turn past the idle time goes on
                assert ws.receive_json()["type"] in ("start", "text")
            ws.send_json({"type": "cancel"})
            while ws.receive_json()["type"] != "cancelled":
                pass
            ev = ws.receive_json()  # then silence: closed
            assert (ev["type"], ev["status"], ev["code"]) == ("error", 408, "idle_timeout"), ev
            with pytest.raises(WebSocketDisconnect) as e:
                ws.receive_json()
            assert e.value.code == 1000
        with c.websocket_connect("/v1/stream") as ws:  # its place is free again
            assert ws.receive_json()["type"] == "ready"
