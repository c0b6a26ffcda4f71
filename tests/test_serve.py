"""`echox serve`: every endpoint, each bad input, limits, access and the bounded worker.

The API runs on a tiny random bundle (fast); the bounded-worker tests swap the engine's answer
for an endless one, so that a turn is still running when the test acts on it. The last tests run
uvicorn itself on loopback (a real socket: a client that goes away) and `bench/load.py`.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from conftest import noise
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from test_engine import UNITS, make_bundle_parts

from echox.cli import build_parser, main
from echox.infer.bundle import Bundle, save_bundle
from echox.infer.engine import Engine, EngineConfig, TextDelta
from echox.serve.app import STATIC, ServeConfig, create_app

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    model, voc = make_bundle_parts()
    with Engine(Bundle(model, voc, None),
                EngineConfig.greedy(max_new_tokens=12, unit_sampling=UNITS)) as eng:
        yield eng


class EndlessEngine:
    """The real engine, but every answer is endless text (one piece per 20 ms) until it is
    closed; `closed` is set when the server closes a turn's iterator."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.closed = threading.Event()
        self.started = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def session(self, history: Any = None) -> Any:
        s = self._engine.session(history)

        def respond(audio: Any = None, text: Any = None, sample_rate: Any = None) -> Iterator[Any]:
            s.user_turn(audio, text, sample_rate)  # the real input checks

            def events() -> Iterator[Any]:
                self.started.set()
                try:
                    while True:
                        time.sleep(0.02)
                        yield TextDelta("x", [1])
                finally:
                    self.closed.set()

            return events()

        s.respond = respond
        return s


@contextmanager
def client(engine: Any, **cfg: Any) -> Iterator[TestClient]:
    with TestClient(create_app(engine, ServeConfig(**cfg))) as c:
        yield c


def wav(seconds: float = 0.5, sr: int = 16000, subtype: str = "PCM_16",
        data: np.ndarray | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, noise(seconds) if data is None else data, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def nan_wav() -> bytes:
    x = noise(0.3)
    x[100:110] = np.nan
    return wav(data=x, subtype="FLOAT")


def streamed_flac(seconds: float) -> bytes:
    """A FLAC file as an encoder writing to a pipe leaves it: STREAMINFO's total samples is 0
    (unknown), and libsndfile reports 2^63 - 1 frames."""
    buf = io.BytesIO()
    sf.write(buf, noise(seconds), 16000, format="FLAC", subtype="PCM_16")
    data = bytearray(buf.getvalue())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO comes first
    fields = int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)  # rate, channels, bits; total
    data[18:26] = fields.to_bytes(8, "big")
    return bytes(data)


def many_channel_flac(seconds: float, channels: int = 8, sr: int = 192000) -> bytes:
    """Silence in many channels at a high rate: a few KB that decode to megabytes."""
    buf = io.BytesIO()
    sf.write(buf, np.zeros((int(sr * seconds), channels), np.int16), sr, format="FLAC")
    return buf.getvalue()


def turn_events(ws: Any) -> list[dict[str, Any]]:
    """Messages of one turn up to its final (or error) event; audio headers get their bytes."""
    out: list[dict[str, Any]] = []
    while True:
        msg = ws.receive()
        if msg.get("bytes") is not None:
            assert out and out[-1]["type"] == "audio" and "pcm" not in out[-1]
            out[-1]["pcm"] = msg["bytes"]
            continue
        ev = json.loads(msg["text"])
        out.append(ev)
        if ev["type"] in ("final", "error"):
            return out


def wait_until(cond: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


# ----------------------------------------------------------------------------- HTTP


def test_health_models_and_the_page(engine: Engine) -> None:
    with client(engine, model_id="tiny-test") as c:
        h = c.get("/health").json()
        assert h["status"] == "ok" and h["model"] == "tiny-test"
        assert h["running"] == 0 and h["peak_rss_mb"] > 0
        assert h["peak_rss_mb"] >= h["rss_mb"]  # getrusage's peak read 1490.6 beside 1490.8
        m = c.get("/v1/models").json()["data"][0]
        assert m["id"] == "tiny-test" and m["sample_rate"] == 16000 and m["audio_output"]
        assert m["limits"]["max_audio_seconds"] > 0
        page = c.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "default-src 'self'" in page.headers["content-security-policy"]
        refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert refs and all(r.startswith("/static/") or r.startswith("data:") for r in refs)
        for r in refs:
            if r.startswith("/static/"):
                assert c.get(r).status_code == 200, r
        assert c.get("/static/recorder.js").status_code == 200
        assert c.get("/nope").json()["error"]["status"] == 404
    for f in STATIC.iterdir():  # no CDN: nothing on the page comes from another host
        assert "://" not in f.read_text(), f"{f.name} refers to another host"


def test_chat_json_multipart_and_raw_audio(engine: Engine) -> None:
    with client(engine) as c:
        r = c.post("/v1/chat", json={"text": "What is the capital of Japan?"})
        assert r.status_code == 200, r.text
        out = r.json()
        assert isinstance(out["text"], str) and out["stats"]["text_tokens"] > 0
        assert out["stats"]["first_audio_ms"] is not None and "queue_ms" in out["stats"]
        a, sr = sf.read(io.BytesIO(base64.b64decode(out["audio"]["base64"])))
        assert sr == 16000 and a.size > 0 and out["audio"]["format"] == "wav"

        r = c.post("/v1/chat", files={"audio": ("q.wav", wav(0.6, 44100), "audio/wav")},
                   data={"text": "and this?", "history": json.dumps(
                       [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "hello"}])})
        assert r.status_code == 200, r.text
        with_history = r.json()["stats"]["prefix_tokens"]
        r = c.post("/v1/chat", files={"audio": ("q.wav", wav(0.6, 44100), "audio/wav")},
                   data={"text": "and this?"})
        assert with_history > r.json()["stats"]["prefix_tokens"]  # the history was in the prompt

        # return_audio=false: not voiced at all (it was voiced, then dropped)
        r = c.post("/v1/chat?return_audio=false", content=wav(0.4),
                   headers={"content-type": "audio/wav"})
        assert r.status_code == 200 and r.json()["audio"] is None
        st = r.json()["stats"]
        assert st["text_tokens"] > 0 and st["segments"] == 0 and st["audio_seconds"] == 0
        assert st["first_audio_ms"] is None

        b64 = base64.b64encode(wav(0.4, 8000)).decode()
        r = c.post("/v1/chat", json={"audio_base64": b64, "return_audio": False})
        assert r.status_code == 200 and r.json()["audio"] is None
        assert r.json()["stats"]["segments"] == 0


BAD_UPLOADS = {
    "not audio": (b"\x00\x01 definitely not audio" * 20, 400, "bad_audio", "not a readable"),
    "truncated header": (wav()[:30], 400, "bad_audio", "not a readable"),
    "truncated, header only": (wav()[:44], 400, "bad_audio",
                               "truncated WAV file: the header says 8000 samples"),
    "truncated": (wav()[:44 + 8000], 400, "bad_audio",
                  "truncated WAV file: the header says 8000 samples (16000 bytes of audio), "
                  "the file holds 4000"),
    "one sample": (wav(data=np.full(1, 0.5, np.float32)), 400, "audio_too_short",
                   "audio is 0.00 s long; a question needs at least 0.1 s of audio"),
    "too short": (wav(0.05), 400, "audio_too_short", "0.05 s long"),
    "NaN": (nan_wav(), 400, "bad_audio", "non-finite"),
    "too long": (wav(2.0), 413, "audio_too_long",
                 "over the limit of 1.5 s (this server's limits.max_audio_seconds in GET "
                 "/v1/models; its operator sets it with echox serve --max-audio-seconds)"),
    "empty": (b"", 400, "empty_audio", "empty"),
    # finite samples far beyond full scale: the features overflowed into NaN, a 500 "the
    # model failed" with a traceback in the log
    "huge samples": (wav(data=noise(0.3) * 1e30, subtype="FLOAT"), 400, "bad_audio",
                     "far outside the [-1, 1] of float audio"),
    # a rate whose resampling filter has 20 million taps: 10 s and 1 GB for a 0.6 MB upload
    "odd rate": (wav(data=np.tile(noise(1.0), 19)[:300_000], sr=999_983), 400, "bad_audio",
                 "a sample rate of 999983 Hz is not read"),
    # 45 KB of FLAC that decode to 46 MB (and a 58 KB Ogg of 64 channels to 1.7 GB, 12 s)
    "many channels": (many_channel_flac(1.0), 413, "too_large",
                      "1.5 s of stereo at 192000 Hz"),
    # no length in the header: libsndfile's 2^63 - 1 frames were allocated, a 500
    "no length": (streamed_flac(0.5), 400, "bad_audio", "the file does not give its length"),
}


@pytest.mark.parametrize("name", list(BAD_UPLOADS))
def test_chat_refuses_bad_audio_and_keeps_serving(engine: Engine, name: str) -> None:
    data, status, code, words = BAD_UPLOADS[name]
    with client(engine, max_audio_seconds=1.5) as c:
        for send in ({"files": {"audio": ("q.wav", data, "audio/wav")}},
                     {"content": data, "headers": {"content-type": "audio/wav"}},
                     {"json": {"audio_base64": base64.b64encode(data).decode()}}):
            r = c.post("/v1/chat", **send)
            err = r.json()["error"]
            if name == "empty" and "files" not in send:  # an empty body is no audio at all
                assert r.status_code == 400 and err["code"] in ("empty_audio", "empty_turn")
                continue
            assert (r.status_code, err["code"]) == (status, code), (send.keys(), r.text)
            assert err["status"] == status and words in err["message"], err
        assert c.get("/health").json()["status"] == "ok"
        assert c.post("/v1/chat", json={"text": "still there?"}).status_code == 200


def test_chat_reads_a_high_rate_that_resamples_cheaply(engine: Engine) -> None:
    """Rates are refused by the cost of their resampling, not by size: 352.8 kHz (441/20 of
    16 kHz) is read, and so are the rates up to 192 kHz, as before."""
    with client(engine) as c:
        r = c.post("/v1/chat", content=wav(data=np.tile(noise(1.0), 7)[:105_840], sr=352_800),
                   headers={"content-type": "audio/wav"})
        assert r.status_code == 200, r.text


def test_chat_reads_a_history_at_its_limits_in_every_encoding(engine: Engine) -> None:
    """A request within the documented limits (2 x history_turns items of max_text_chars) fits
    its body in JSON and in multipart: it used to be refused as "bad multipart body: Part
    exceeded maximum size of 23KB" (and over a JSON body's limit with a small upload limit).
    Here it reaches the model, whose 1024 positions (the tiny LLM) it is over."""
    history = [{"role": r, "text": "\u00e9" * 2000}
               for _ in range(8) for r in ("user", "assistant")]
    with client(engine, max_upload_bytes=20_000) as c:
        for r in (c.post("/v1/chat", json={"text": "and now?", "history": history}),
                  c.post("/v1/chat", data={"text": "and now?", "history": json.dumps(history)},
                         files={"audio": ("q.wav", wav(0.3), "audio/wav")})):
            err = r.json()["error"]
            assert (r.status_code, err["code"]) == (400, "bad_request"), r.text
            assert "the prompt is" in err["message"] and "over the LLM's 1024" in err["message"]


def test_chat_refuses_bad_requests(engine: Engine) -> None:
    with client(engine, max_text_chars=50, max_upload_bytes=20_000) as c:
        cases = [
            (c.post("/v1/chat", json={}), 400, "empty_turn"),
            (c.post("/v1/chat", json={"text": "   "}), 400, "empty_turn"),
            (c.post("/v1/chat", json={"text": "x" * 51}), 413, "text_too_long"),
            (c.post("/v1/chat", json={"text": 5}), 400, "bad_request"),
            (c.post("/v1/chat", json=["text"]), 400, "bad_request"),
            (c.post("/v1/chat", content=b"{not json", headers={"content-type": "application/json"}),
             400, "bad_request"),
            (c.post("/v1/chat", json={"audio_base64": "***"}), 400, "bad_request"),
            (c.post("/v1/chat", json={"text": "hi", "history": [{"role": "x"}]}), 400,
             "bad_request"),
            (c.post("/v1/chat", json={"text": "hi", "return_audio": "maybe"}), 400, "bad_request"),
            (c.post("/v1/chat", content=b"hi", headers={"content-type": "text/plain"}), 415,
             "unsupported_media_type"),
            (c.post("/v1/chat", content=wav(1.0), headers={"content-type": "audio/wav"}), 413,
             "too_large"),
            (c.post("/v1/chat", files={"audio": ("q.wav", wav(1.0), "audio/wav")}), 413,
             "too_large"),
            (c.get("/v1/chat"), 405, "method_not_allowed"),
            (c.post("/v1/chat", content=b"[" * 20_000 + b"]" * 20_000,  # nested too deeply
                    headers={"content-type": "application/json"}), 400, "bad_request"),
            (c.post("/v1/chat", files={"audio": ("q.wav", wav(0.2), "audio/wav")},
                    data={"history": "[" * 20_000 + "]" * 20_000}), 400, "bad_request"),
            # the audio under another name: it was dropped, and the text answered alone
            (c.post("/v1/chat", files={"file": ("q.wav", wav(0.3), "audio/wav")},
                    data={"text": "what did I say?"}), 400, "bad_request"),
        ]
        for r, status, code in cases:
            assert r.status_code == status and r.json()["error"]["code"] == code, r.text
        # a multipart body cut short (no closing boundary) or without a boundary parameter
        whole = (b"--XyZ\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nhello\r\n"
                 b"--XyZ\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"q.wav\""
                 b"\r\nContent-Type: audio/wav\r\n\r\n" + wav(0.3) + b"\r\n--XyZ--\r\n")
        ok = c.post("/v1/chat", content=whole,
                    headers={"content-type": "multipart/form-data; boundary=XyZ"})
        assert ok.status_code == 200, ok.text
        for body, ctype, words in (
                (whole[: len(whole) // 2], "multipart/form-data; boundary=XyZ", "cut short"),
                (whole[:40], "multipart/form-data; boundary=\"XyZ\"", "cut short"),
                (whole, "multipart/form-data", "no boundary")):
            r = c.post("/v1/chat", content=body, headers={"content-type": ctype})
            err = r.json()["error"]
            assert (r.status_code, err["code"]) == (400, "bad_request") and words in err["message"]
        assert c.post("/v1/chat", json={"text": "fine"}).status_code == 200


def test_chat_refuses_text_that_is_not_utf8_and_odd_requests(engine: Engine) -> None:
    """Bytes that are not UTF-8 in a multipart field or the query string reached the model
    as latin-1 or U+FFFD text (answered, 200); a latin-1 JSON body was "not valid JSON"; a 1 Hz
    file became seconds of question; GET on the WebSocket endpoint was a 404."""
    with client(engine) as c:
        for raw in (b"\xff\xfe", b"\xed\xa0\x80"):  # latin-1, a UTF-8-encoded lone surrogate
            body = (b"--abc\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\n" + raw +
                    b"\r\n--abc--\r\n")
            r = c.post("/v1/chat", content=body,
                       headers={"content-type": "multipart/form-data; boundary=abc"})
            err = r.json()["error"]
            assert (r.status_code, err["code"]) == (400, "bad_request"), r.text
            assert "'text' is not valid utf-8 text" in err["message"], err
        r = c.post("/v1/chat?text=%ff%fe&return_audio=false", content=wav(0.3),
                   headers={"content-type": "audio/wav"})
        assert r.status_code == 400 and "query string is not valid UTF-8" in r.json()["error"]["message"]
        r = c.post("/v1/chat", content='{"text": "caf\u00e9"}'.encode("latin-1"),
                   headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not UTF-8" in r.json()["error"]["message"], r.text
        buf = io.BytesIO()
        sf.write(buf, np.zeros(10, np.float32), 1, format="WAV")
        r = c.post("/v1/chat", content=buf.getvalue(), headers={"content-type": "audio/wav"})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "bad_audio"), r.text
        assert "sample rate of 1 Hz" in r.json()["error"]["message"]
        for method in (c.get, c.post):
            r = method("/v1/stream")
            assert r.status_code == 426 and r.json()["error"]["code"] == "upgrade_required", r.text
            assert r.headers["upgrade"] == "websocket"
        # a UTF-8 query and a non-ASCII multipart field are read as before
        r = c.post("/v1/chat?text=caf%C3%A9&return_audio=false", content=wav(0.3),
                   headers={"content-type": "audio/wav"})
        assert r.status_code == 200, r.text
        assert c.post("/v1/chat", data={"text": "caf\u00e9?"}, files={"audio": ("q.wav", wav(0.3), "audio/wav")}
                      ).status_code == 200
        assert c.get("/health").json()["status"] == "ok"


# ----------------------------------------------------------------------------- WebSocket


def test_ws_streams_a_multi_turn_conversation(engine: Engine) -> None:
    with client(engine) as c, c.websocket_connect("/v1/stream") as ws:
        ready = ws.receive_json()
        assert ready["type"] == "ready" and ready["output_format"] == "pcm_s16le"

        ws.send_bytes(wav(0.5))  # a whole file, no "audio" message: format "file"
        ws.send_json({"type": "end"})
        t1 = turn_events(ws)
        kinds = [e["type"] for e in t1]
        assert kinds[0] == "start" and kinds[-1] == "final" and "text" in kinds
        audio = [e for e in t1 if e["type"] == "audio"]
        assert audio and all(len(e["pcm"]) == 2 * e["samples"] for e in audio)
        assert len(audio) > 1 and kinds.count("segment") > 1  # piece by piece, not one blob
        final = t1[-1]
        assert final["turn"] == 1 and final["text"] == "".join(e["text"] for e in t1
                                                               if e["type"] == "text")
        assert abs(final["audio_seconds"] - sum(e["samples"] for e in audio) / 16000) < 1e-3
        assert final["stats"]["first_audio_ms"] is not None

        pcm = (noise(0.6) * 32767).astype("<i2").tobytes()  # PCM chunks at 8 kHz, then end
        ws.send_json({"type": "audio", "format": "pcm_s16le", "sample_rate": 8000})
        for i in range(0, len(pcm), 1600):
            ws.send_bytes(pcm[i:i + 1600])
        ws.send_json({"type": "end", "text": "and that?"})
        t2 = turn_events(ws)
        assert t2[-1]["type"] == "final" and t2[-1]["turn"] == 2

        ws.send_json({"type": "text", "text": "hello"})
        t3 = turn_events(ws)[-1]
        ws.send_json({"type": "reset"})
        assert ws.receive_json() == {"type": "reset"}
        ws.send_json({"type": "text", "text": "hello"})
        t4 = turn_events(ws)[-1]
        assert t3["stats"]["prefix_tokens"] > t4["stats"]["prefix_tokens"]  # history, then none
        ws.send_json({"type": "ping"})
        assert ws.receive_json() == {"type": "pong"}


def test_ws_refuses_bad_messages_and_keeps_serving(engine: Engine) -> None:
    def error(ws: Any, status: int, code: str, words: str = "") -> None:
        ev = ws.receive_json()
        assert ev["type"] == "error" and (ev["status"], ev["code"]) == (status, code), ev
        assert words in ev["message"], ev

    with client(engine, max_audio_seconds=1.0) as c, c.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        ws.send_text("not json")
        error(ws, 400, "bad_message", "not JSON")
        ws.send_text("[1, 2]")
        error(ws, 400, "bad_message", "type")
        ws.send_text("[" * 12_000 + "]" * 12_000)
        error(ws, 400, "bad_message", "not JSON")
        ws.send_json({"type": "dance"})
        error(ws, 400, "bad_message", "unknown message type 'dance'")
        ws.send_json({"type": "audio", "format": "mp9"})
        error(ws, 400, "bad_request", "unknown audio format")
        ws.send_json({"type": "audio", "format": "pcm_s16le"})
        error(ws, 400, "bad_request", "sample_rate")
        ws.send_json({"type": "end"})  # the end of the refused turn: no second error
        ws.send_json({"type": "end"})
        error(ws, 400, "empty_turn")
        ws.send_json({"type": "text", "text": " "})
        error(ws, 400, "empty_text")
        ws.send_json({"type": "text", "text": ["a"]})
        error(ws, 400, "bad_request")
        # audio that is not audio, truncated, NaN, too long, empty
        ws.send_bytes(b"RIFF nonsense" * 10)
        ws.send_json({"type": "end"})
        error(ws, 400, "bad_audio", "not a readable audio file")
        ws.send_bytes(wav()[:30])
        ws.send_json({"type": "end"})
        error(ws, 400, "bad_audio")
        ws.send_json({"type": "audio", "format": "pcm_s16le", "sample_rate": 16000})
        ws.send_bytes(b"\x01\x02\x03")
        ws.send_json({"type": "end"})
        error(ws, 400, "bad_audio", "truncated pcm_s16le stream")
        nan = noise(0.2)
        nan[5] = np.nan
        ws.send_json({"type": "audio", "format": "pcm_f32le", "sample_rate": 16000})
        ws.send_bytes(nan.astype("<f4").tobytes())
        ws.send_json({"type": "end"})
        error(ws, 400, "bad_audio", "non-finite")
        ws.send_bytes(nan_wav())
        ws.send_json({"type": "end"})
        error(ws, 400, "bad_audio", "non-finite")
        ws.send_bytes(wav(0.5)[:2000])  # a file cut short
        ws.send_json({"type": "end"})
        error(ws, 400, "bad_audio", "truncated WAV file")
        ws.send_json({"type": "audio", "format": "pcm_s16le", "sample_rate": 16000})
        ws.send_bytes(b"\x00\x10" * 10)  # 10 samples: no question
        ws.send_json({"type": "end"})
        error(ws, 400, "audio_too_short", "pcm_s16le stream is 0.00 s long; a question needs")
        ws.send_json({"type": "audio", "format": "pcm_s16le", "sample_rate": 16000})
        ws.send_bytes(b"\x00\x00" * 20000)  # 1.25 s: refused as it arrives ...
        error(ws, 413, "audio_too_long")
        ws.send_bytes(b"\x00\x00" * 100)  # ... the rest of that turn is dropped
        ws.send_json({"type": "end"})
        ws.send_bytes(wav(1.5))
        ws.send_json({"type": "end"})
        error(ws, 413, "audio_too_long")
        ws.send_json({"type": "audio", "format": "file"})
        ws.send_bytes(b"")
        ws.send_json({"type": "end"})
        error(ws, 400, "empty_audio")
        ws.send_json({"type": "text", "text": "still serving?"})
        assert turn_events(ws)[-1]["type"] == "final"


def test_ws_token_origin_and_connection_limit(engine: Engine) -> None:
    with client(engine, token="s3cret", max_connections=1) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models").headers["www-authenticate"].startswith("Bearer")
        assert c.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        r = c.post("/v1/chat", json={"text": "hi"})
        assert r.status_code == 401 and "bearer token" in r.json()["error"]["message"]
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200  # liveness needs no token
        assert c.get("/").status_code == 200  # the page asks for the token itself
        with c.websocket_connect("/v1/stream") as ws:
            assert ws.receive_json()["status"] == 401
            with pytest.raises(WebSocketDisconnect) as e:
                ws.receive_json()
            assert e.value.code == 1008
        evil = {"Authorization": "Bearer s3cret", "Origin": "http://evil.example"}
        r = c.get("/v1/models", headers=evil)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin"
        with c.websocket_connect("/v1/stream?token=s3cret", headers={"Origin": "http://evil.example"}) as ws:
            assert ws.receive_json()["code"] == "forbidden_origin"
        with c.websocket_connect("/v1/stream", subprotocols=["echox", "bearer.s3cret"]) as ws:
            assert ws.accepted_subprotocol == "echox"  # how the page sends its token
            assert ws.receive_json()["type"] == "ready"
        with c.websocket_connect("/v1/stream", subprotocols=["echox", "bearer.nope"]) as ws:
            assert ws.receive_json()["status"] == 401
        own = {"Authorization": "Bearer s3cret", "Origin": "http://testserver"}
        assert c.get("/v1/models", headers=own).status_code == 200
        with c.websocket_connect("/v1/stream?token=s3cret") as ws:
            assert ws.receive_json()["type"] == "ready"
            with c.websocket_connect("/v1/stream", headers={"Authorization": "Bearer s3cret"}) as w2:
                ev = w2.receive_json()
                assert (ev["status"], ev["code"]) == (503, "too_many_connections")
                with pytest.raises(WebSocketDisconnect) as e:
                    w2.receive_json()
                assert e.value.code == 1013
            assert c.get("/health").json()["refused"] == 1  # every 503 is counted
    with client(engine, allow_origins=("http://evil.example",)) as c:
        assert c.get("/v1/models", headers={"Origin": "http://evil.example"}).status_code == 200


def test_an_origin_that_is_no_url_is_refused_not_a_500(engine: Engine) -> None:
    """An Origin urlsplit cannot parse ("http://[::1") was a 500 "the model failed" over HTTP
    and an exception in the WebSocket handshake (no answer at all): now a 403 like any other."""
    with client(engine) as c:
        for origin in ("http://[::1", "http://["):
            r = c.post("/v1/chat", json={"text": "hi"}, headers={"Origin": origin})
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin"
            with c.websocket_connect("/v1/stream", headers={"Origin": origin}) as ws:
                assert ws.receive_json()["code"] == "forbidden_origin"
                with pytest.raises(WebSocketDisconnect) as e:
                    ws.receive_json()
                assert e.value.code == 1008
        own = {"Host": "127.0.0.1:8000", "Origin": "http://127.0.0.1:8000"}
        assert c.post("/v1/chat", json={"text": "hi"}, headers=own).status_code == 200
        for host in ("localhost:8000", "[::1]:8000", "10.1.2.3"):
            assert c.get("/v1/models", headers={"Host": host, "Origin": f"http://{host}"}).status_code == 200


def test_dns_rebinding_is_refused_without_a_token(engine: Engine) -> None:
    """A site whose name resolves to this machine is same-origin with itself: Host and Origin
    agree. An open server took it for its own page (both /v1/chat and /v1/models answered)."""
    evil = {"Host": "evil.example:8000", "Origin": "http://evil.example:8000"}
    with client(engine) as c:
        r = c.post("/v1/chat", json={"text": "hi"}, headers=evil)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin"
        with c.websocket_connect("/v1/stream", headers=evil) as ws:
            assert ws.receive_json()["code"] == "forbidden_origin"
    with client(engine, allow_origins=("http://evil.example:8000",)) as c:  # named: allowed
        assert c.get("/v1/models", headers=evil).status_code == 200
    with client(engine, token="s3cret") as c:  # a token keeps the page's own name usable
        assert c.get("/v1/models", headers={**evil, "Authorization": "Bearer s3cret"}).status_code == 200


def test_allowed_origins_get_cors_headers_and_preflight_answers(engine: Engine) -> None:
    """--allow-origin named the WebSocket only: a page there could not read /v1/chat (no
    Access-Control-Allow-Origin header, and its preflight OPTIONS got 405)."""
    page = "https://app.example"
    with client(engine, allow_origins=(page,)) as c:
        r = c.options("/v1/chat", headers={"Origin": page, "Access-Control-Request-Method": "POST",
                                           "Access-Control-Request-Headers": "content-type"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
        r = c.post("/v1/chat", json={"text": "hi"}, headers={"Origin": page})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
        r = c.get("/v1/models", headers={"Origin": "https://other.example"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
        # a preflight to a path the API does not have: its 404, no CORS grant (it was a 200)
        r = c.options("/nope", headers={"Origin": page, "Access-Control-Request-Method": "GET"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
        assert "access-control-allow-origin" not in r.headers
    with client(engine) as c:  # no --allow-origin: no CORS headers at all
        r = c.get("/v1/models", headers={"Host": "127.0.0.1:8000", "Origin": "http://127.0.0.1:8000"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    # every HTTP route of the API may be preflighted: the CORS layer's list follows the routes
    # (a route added without it would have had its preflights refused with a 404)
    from starlette.routing import Route

    from echox.serve.app import _JsonCORS

    app = create_app(engine, ServeConfig())
    api = {r.path for r in app.routes if isinstance(r, Route) and r.include_in_schema}
    assert api - {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"} == set(_JsonCORS.API_PATHS)


def test_allowed_origins_are_checked_and_written_as_browsers_send_them(engine: Engine) -> None:
    """`--allow-origin https://app.example/` (pasted from the address bar) or `app.example`
    matched no browser's Origin: the page was refused and the server said nothing."""
    from echox.errors import ConfigError

    cfg = ServeConfig(allow_origins=("HTTPS://App.Example:443", "http://localhost:3000",
                                     "http://[::1]:8000", "*", "null"))
    assert cfg.allow_origins == ("https://app.example", "http://localhost:3000",
                                 "http://[::1]:8000", "*", "null")
    for bad in ("https://app.example/", "app.example", "https://app.example/page",
                "ftp://app.example", "https://", "https://u:p@app.example", "http://x:99999", 7):
        with pytest.raises(ConfigError, match="is not an origin; give the origin as a browser "
                                              "sends it"):
            ServeConfig(allow_origins=(bad,))
    with client(engine, allow_origins=("https://App.Example:443",)) as c:
        r = c.get("/v1/models", headers={"Origin": "https://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"


def test_refused_preflights_get_the_api_error_body(engine: Engine) -> None:
    """Starlette answered a refused preflight with a plain-text 400 ("Disallowed CORS
    origin"); every other refusal is the API's JSON error body."""
    page = "https://app.example"
    with client(engine, allow_origins=(page,)) as c:
        r = c.options("/v1/chat", headers={"Origin": "https://evil.example",
                                           "Access-Control-Request-Method": "POST"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin", r.text
        r = c.options("/v1/chat", headers={"Origin": page, "Access-Control-Request-Method": "DELETE"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", r.text
        assert "method" in r.json()["error"]["message"]
        assert r.headers["access-control-allow-origin"] == page  # the page can read why


def test_busy_queue_cancel_and_disconnect_free_the_worker(engine: Engine) -> None:
    slow = EndlessEngine(engine)
    with client(slow, workers=1, queue_size=1) as c:
        with c.websocket_connect("/v1/stream") as w1, c.websocket_connect("/v1/stream") as w2:
            w1.receive_json(), w2.receive_json()
            w1.send_json({"type": "text", "text": "talk forever"})
            assert w1.receive_json()["type"] == "start"
            assert w1.receive_json()["type"] == "text"
            w2.send_json({"type": "text", "text": "me next"})
            assert w2.receive_json() == {"type": "queued", "turn": 1, "position": 1}
            # full: one running, one waiting -> 503 with Retry-After, for HTTP and WebSocket
            r = c.post("/v1/chat", json={"text": "and me"})
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "busy"
            with c.websocket_connect("/v1/stream") as w3:
                w3.receive_json()
                w3.send_json({"type": "text", "text": "and me"})
                ev = w3.receive_json()
                assert (ev["type"], ev["status"], ev["code"]) == ("error", 503, "busy")
                assert ev["retry_after"] >= 1
            w1.send_json({"type": "text", "text": "again"})  # one turn at a time per connection
            while (ev := w1.receive_json())["type"] == "text":
                pass
            assert ev["status"] == 409 and ev["code"] == "turn_in_progress"
            w1.send_json({"type": "cancel"})  # stop: the queued turn starts
            while (ev := w1.receive_json())["type"] == "text":
                pass
            assert ev == {"type": "cancelled", "turn": 1}
            assert slow.closed.wait(10)
            assert w2.receive_json()["type"] == "start"
            slow.closed.clear()
        # w2 left mid-answer: its turn is stopped and its slot is free at once
        assert slow.closed.wait(10)
        wait_until(lambda: c.get("/health").json()["running"] == 0, 10)
        h = c.get("/health").json()
        assert h["stopped"] == 2 and h["refused"] == 2 and h["connections"] == 0


def test_turn_timeout_stops_the_answer(engine: Engine) -> None:
    slow = EndlessEngine(engine)
    with client(slow, turn_timeout=0.3) as c, c.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        ws.send_json({"type": "text", "text": "talk forever"})
        while (ev := ws.receive_json())["type"] in ("start", "text"):
            pass
        assert (ev["type"], ev["status"], ev["code"]) == ("error", 504, "timeout")
        assert slow.closed.wait(2)
        ws.send_json({"type": "ping"})
        assert ws.receive_json() == {"type": "pong"}
        r = c.post("/v1/chat", json={"text": "forever too"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


# ----------------------------------------------------------------------------- CLI


def test_serve_cli_defaults_help_and_option_errors(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.token, args.workers) == ("127.0.0.1", 8000, None, 1)
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for words in ("--host", "--token", "--queue", "--max-audio-seconds", "--turn-timeout",
                  "--upload-timeout", "--device", "127.0.0.1"):
        assert words in out
    # options are checked before the model is loaded (the folder does not even exist)
    # ... and named as typed (it said serve.queue_size for --queue)
    for flag, value in (("--workers", "0"), ("--upload-timeout", "0"), ("--queue", "-1"),
                        ("--idle-timeout", "inf"), ("--history-turns", "0")):
        assert main(["serve", "--model", str(tmp_path / "none"), flag, value]) == 2
        err = capsys.readouterr().err
        assert f"{flag} must be" in err and "serve." not in err.removeprefix("echox: error: serve options"), err
    # the engine's cap on the question's length: refused before the load, not after it
    assert main(["serve", "--model", str(tmp_path / "none"), "--max-audio-seconds", "900"]) == 2
    assert "is above 600 s" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["serve", "--model", str(tmp_path / "file"), "--port", "0"]) == 2
    assert "is a file, not a model bundle folder" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "none"), "--port", "0"]) == 2
    assert "none" in capsys.readouterr().err
    # port 0 with a host that does not resolve: uvicorn's log after the model load, exit 3
    assert main(["serve", "--model", str(tmp_path / "none"), "--port", "0", "--host", "bogus.invalid"]) == 2
    err = capsys.readouterr().err
    assert "--host bogus.invalid: cannot resolve it" in err and "none" not in err, err
    with socket.socket() as taken:  # a port in use: one line, before the model load
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", "--model", str(tmp_path / "none"), "--port", port]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"echox: error: cannot listen on 127.0.0.1:{port}") and "none" not in err
        assert len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["serve", "--threads", "0"])
    assert "--threads: must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "none"), "--token", " "]) == 2  # served openly
    assert "--token is empty" in capsys.readouterr().err
    for t in ("0", "nan", "inf"):
        assert main(["serve", "--model", str(tmp_path / "none"), "--header-timeout", t]) == 2
        assert "--header-timeout must be a finite number of seconds > 0" in capsys.readouterr().err
    for mb in ("inf", "nan", "0"):  # int(inf * 2**20) was an OverflowError traceback
        assert main(["serve", "--model", str(tmp_path / "none"), "--max-upload-mb", mb]) == 2
        assert "--max-upload-mb must be a finite number > 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- live server


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, voc = make_bundle_parts()
    return save_bundle(tmp_path_factory.mktemp("serve") / "tiny-random", model, voc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_refuses_an_answer_as_long_as_the_llm_at_start(bundle_dir: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """It started and failed every request; now one line before it listens."""
    assert main(["serve", "--model", str(bundle_dir), "--port", str(free_port()),
                 "--max-new-tokens", "99999999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("echox: error: max_new_tokens 99999999 is not below the LLM's 1024 positions: "
                       "give a smaller --max-new-tokens"), err


@contextmanager
def live(app: Any, guarded: bool = False, **kw: Any) -> Iterator[str]:
    """A live server on a free port: plain uvicorn, or `guarded` as `echox serve` runs it
    (`serve.connections.uvicorn_config`, with `kw`)."""
    import uvicorn

    from echox.serve.connections import uvicorn_config

    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, log_level="warning", **kw) if guarded
                            else uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        wait_until(lambda: server.started, 20)
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(10)


def test_live_server_frees_the_slot_of_a_client_that_hangs_up(engine: Engine) -> None:
    import httpx
    from websockets.sync.client import connect

    slow = EndlessEngine(engine)
    with live(create_app(slow, ServeConfig(workers=1, queue_size=0))) as addr:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up mid-answer and hangs up
            httpx.post(f"http://{addr}/v1/chat", json={"text": "forever"}, timeout=0.5)
        assert slow.closed.wait(3)
        wait_until(lambda: httpx.get(f"http://{addr}/health").json()["running"] == 0, 3)
        slow.closed.clear()
        with connect(f"ws://{addr}/v1/stream") as ws:
            assert json.loads(ws.recv())["type"] == "ready"
            ws.send(json.dumps({"type": "text", "text": "forever"}))
            assert json.loads(ws.recv())["type"] == "start"
            assert json.loads(ws.recv())["type"] == "text"
        assert slow.closed.wait(3)
        wait_until(lambda: httpx.get(f"http://{addr}/health").json()["running"] == 0, 3)
        h = httpx.get(f"http://{addr}/health").json()
        assert h["stopped"] == 2 and h["status"] == "ok"


def test_live_server_client_leaving_mid_upload_is_not_a_failure(
        engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    """A client that hangs up while sending its body is no model failure: nothing is logged
    as "turn failed", no turn runs, and the server answers the next request."""
    import httpx

    with live(create_app(engine, ServeConfig())) as addr:
        host, port = addr.split(":")
        with caplog.at_level(logging.INFO):
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(b"POST /v1/chat HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                             b'{"text": "hel')
            time.sleep(0.5)
            r = httpx.post(f"http://{addr}/v1/chat", json={"text": "hi"}, timeout=60)
        assert r.status_code == 200
        assert not [rec for rec in caplog.records if "turn failed" in rec.getMessage()]
        assert httpx.get(f"http://{addr}/health").json()["status"] == "ok"


def test_live_server_bounds_the_bodies_it_reads_at_once_and_their_time(engine: Engine) -> None:
    """Request bodies were read before the queue limit and with no time limit: any number of
    slow uploads held memory and connections for ever. Now as many bodies are read at once as
    turns may be admitted (workers + queue; past them 503 busy before reading), and a body must
    arrive within --upload-timeout (408)."""
    import httpx

    cfg = ServeConfig(workers=1, queue_size=1, upload_timeout=4.0, max_upload_bytes=1000)
    with live(create_app(engine, cfg)) as addr:
        host, port = addr.split(":")
        health = lambda: httpx.get(f"http://{addr}/health").json()  # noqa: E731
        socks = []
        try:
            for _ in range(2):  # two uploads that stall: workers + queue
                s = socket.create_connection((host, int(port)))
                s.sendall(b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                          b"\r\nContent-Length: 100000\r\n\r\n{\"text\": \"hel")
                socks.append(s)
            wait_until(lambda: health()["reading"] == 2, 5)
            r = httpx.post(f"http://{addr}/v1/chat", json={"text": "hi"}, timeout=30)
            assert r.status_code == 503 and r.json()["error"]["code"] == "busy"
            # what the headers alone refuse needs no place: its own error, not a 503
            r = httpx.post(f"http://{addr}/v1/chat", content=b"hi", timeout=30,
                           headers={"Content-Type": "text/plain"})
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
            r = httpx.post(f"http://{addr}/v1/chat", content=b"0" * 2_000_000, timeout=30,
                           headers={"Content-Type": "application/json"})
            assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
            for s in socks:  # each stalled upload is answered 408 at its timeout
                s.settimeout(20)
                data = b""
                while b"upload_timeout" not in data and (chunk := s.recv(4096)):
                    data += chunk
                assert data.startswith(b"HTTP/1.1 408") and b"upload_timeout" in data
        finally:
            for s in socks:
                s.close()
        wait_until(lambda: health()["reading"] == 0, 5)
        r = httpx.post(f"http://{addr}/v1/chat", json={"text": "hi"}, timeout=60)
        assert r.status_code == 200 and health()["refused"] == 1


def test_load_bench_on_a_live_echox_serve(bundle_dir: Path) -> None:
    """bench/load.py starts `echox serve` itself and reports served turns, errors, latency."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load.py"), "--model", str(bundle_dir),
         "--clients", "3", "--duration", "4", "--queue", "1", "--max-new-tokens", "8",
         "--json"],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["served"] > 0 and report["healthy_after"] is True
    assert set(report["errors"]) <= {"busy"}  # only clean 503s
    assert report["first_audio_ms"]["p50"] is not None and report["server_peak_rss_mb"] > 0


def test_a_huge_max_audio_seconds_decodes_uploads_instead_of_failing_them() -> None:
    """`--max-audio-seconds 1e308` made every upload a 500 (an OverflowError counting the
    samples a file may decode to); it now means no limit there, as it does for chat and demo."""
    from echox.serve.inputs import Limits, decode_file

    limits = Limits(max_upload_bytes=1 << 20, max_audio_seconds=1e308, max_text_chars=100)
    assert decode_file(wav(0.3), limits).size == 4800


def live_guarded(app: Any, **kw: Any) -> Any:
    return live(app, guarded=True, **kw)


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes `sock` within `within` s (what it still sends is read past)."""
    end = time.monotonic() + within
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if sock.recv(65536) == b"":
                return True
        except (socket.timeout, ConnectionResetError):
            return False
    return False


def test_live_server_closes_connections_whose_headers_never_come(engine: Engine) -> None:
    """Half a request header held a connection for ever (slowloris): 20,000 of them made the
    server unreachable. Now the headers must arrive within --header-timeout, and connections
    past the cap are closed at once, while whole requests are answered."""
    import httpx

    with live_guarded(create_app(engine, ServeConfig()), header_timeout=1.5, max_open=4) as addr:
        host, port = addr.split(":")
        slow = socket.create_connection((host, int(port)))
        slow.sendall(b"GET /health HTTP/1.1\r\nHo")
        assert httpx.get(f"http://{addr}/health").status_code == 200  # others are served
        assert _closed_by_server(slow, 5)
        slow.close()
        # a keep-alive connection's next request gets the same time for its headers
        kept = socket.create_connection((host, int(port)))
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        kept.settimeout(5)
        assert kept.recv(4096).startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /health HTTP/1.1\r\nHo")
        assert _closed_by_server(kept, 5)
        kept.close()
        # a request answered before its body arrived (415), the body trickling in past the
        # header time: the next request's headers still have their time limit
        early = socket.create_connection((host, int(port)))
        early.sendall(b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                      b"Content-Length: 10\r\n\r\nx")
        early.settimeout(5)
        assert early.recv(4096).startswith(b"HTTP/1.1 415")
        for _ in range(9):
            time.sleep(0.25)
            early.sendall(b"x")
        early.sendall(b"GET /health HTTP/1.1\r\nHo")
        assert _closed_by_server(early, 6)
        early.close()
        # the cap: past 4 open connections a new one is closed before it is read
        held = [socket.create_connection((host, int(port))) for _ in range(4)]
        time.sleep(0.3)
        extra = socket.create_connection((host, int(port)))
        assert _closed_by_server(extra, 1)
        extra.close()
        for s in held:
            s.close()
        wait_until(lambda: httpx.get(f"http://{addr}/health").status_code == 200, 10)


def test_live_server_frees_the_worker_of_a_client_that_closes(engine: Engine) -> None:
    """A client that closes its connection in the ordinary way (a FIN: `curl -m`, a request
    timeout, an aborted fetch) mid-answer frees its worker at once, as a reset one does. The
    server took the FIN for a half-close and answered to the end (turn_timeout at worst)."""
    import httpx

    slow = EndlessEngine(engine)
    with live_guarded(create_app(slow, ServeConfig(workers=1, queue_size=0))) as addr:
        host, port = addr.split(":")
        body = b'{"text": "forever"}'
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert slow.started.wait(10)
        assert slow.closed.wait(3)
        wait_until(lambda: httpx.get(f"http://{addr}/health").json()["running"] == 0, 3)
        assert httpx.get(f"http://{addr}/health").json()["stopped"] == 1


def test_live_server_frees_the_reading_place_of_a_client_that_closes_mid_upload(engine: Engine) -> None:
    """Closed (a FIN) with its body half sent: the place stayed held, and other requests got
    503 busy, until the upload timeout (60 s by default) ran out."""
    import httpx

    with live_guarded(create_app(engine, ServeConfig(queue_size=0))) as addr:
        host, port = addr.split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\n"
                      b"Content-Length: 100000\r\n\r\nRIFF")
            wait_until(lambda: httpx.get(f"http://{addr}/health").json()["reading"] == 1, 5)
        wait_until(lambda: httpx.get(f"http://{addr}/health").json()["reading"] == 0, 3)


def test_live_server_answers_malformed_http_with_the_api_error_body(engine: Engine, caplog: Any) -> None:
    """A request h11 cannot parse got uvicorn's plain-text 400; every other refusal is the
    API's JSON error body, and clients parse that. The server goes on serving."""
    import httpx

    with live_guarded(create_app(engine, ServeConfig())) as addr:
        host, port = addr.split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost x\r\n\r\n")  # a header without its colon
            s.settimeout(10)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head.lower(), got
        err = json.loads(body)["error"]
        assert err["status"] == 400 and err["code"] == "bad_http_request" and err["message"], err
        assert httpx.get(f"http://{addr}/health").status_code == 200
        # a bad chunked body after the app has answered (415, before reading it): no second
        # answer can be sent; the connection is closed without asyncio's traceback
        with caplog.at_level("ERROR"), socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")
            s.settimeout(10)
            assert s.recv(4096).startswith(b"HTTP/1.1 415")
            s.sendall(b"zz\r\nnot a chunk\r\n")
            assert _closed_by_server(s, 5)
        assert not [r for r in caplog.records if "data_received" in r.getMessage()], caplog.text
        assert httpx.get(f"http://{addr}/health").status_code == 200


class Keep(logging.Handler):
    """Keeps the records of a logger it is added to (uvicorn's loggers do not propagate)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_live_server_logs_a_bad_utf8_frame_in_one_line(engine: Engine) -> None:
    """uvicorn logged each client's invalid UTF-8 text frame with a full traceback."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    keep = Keep()
    logger = logging.getLogger("uvicorn.error")  # uvicorn's loggers do not propagate
    with live_guarded(create_app(engine, ServeConfig())) as addr:
        logger.addHandler(keep)
        try:
            with connect(f"ws://{addr}/v1/stream") as ws:
                ws.recv()
                ws.send(b"\xff\xfe{", text=True)
                with pytest.raises(ConnectionClosed) as e:
                    ws.recv()
                assert e.value.rcvd is not None and e.value.rcvd.code == 1007
            wait_until(lambda: any("Invalid UTF-8" in r.getMessage() for r in keep.records), 5)
        finally:
            logger.removeHandler(keep)
    bad = [r for r in keep.records if "Invalid UTF-8" in r.getMessage()]
    assert bad and all(r.exc_info is None for r in bad)


def test_live_server_answers_head_like_get_without_a_body(engine: Engine) -> None:
    """HEAD (monitors, `curl -I`) got 405 on /, /health and /v1/models."""
    import httpx

    with live_guarded(create_app(engine, ServeConfig())) as addr:
        for path in ("/", "/health", "/v1/models", "/static/app.js"):
            got, head = httpx.get(f"http://{addr}{path}"), httpx.head(f"http://{addr}{path}")
            assert head.status_code == got.status_code == 200, (path, head.status_code)
            assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]


def test_live_server_closes_the_connection_after_an_upload_timeout(engine: Engine) -> None:
    """The 408 left the connection open with the rest of the body unread, and said nothing
    of closing it."""
    with live_guarded(create_app(engine, ServeConfig(upload_timeout=1))) as addr:
        host, port = addr.split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\n"
                      b"Content-Length: 100000\r\n\r\nRIFF")
            s.settimeout(10)
            got = s.recv(65536)
            head, _, body = got.partition(b"\r\n\r\n")
            size = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))
            while len(body) < size:  # the body may come in a segment of its own
                more = s.recv(65536)
                if not more:
                    break
                body += more
            assert head.startswith(b"HTTP/1.1 408") and b"upload_timeout" in body, got[:300]
            assert b"\r\nconnection: close" in head.lower(), got[:300]
            assert _closed_by_server(s, 3)


def test_live_server_stopping_mid_upload_logs_one_line(engine: Engine) -> None:
    """A body still arriving at shutdown: uvicorn cancels its request after the graceful
    timeout and logged the cancellation with the handler's whole stack, as a failure."""
    keep = Keep()
    logger = logging.getLogger("uvicorn.error")  # after the start: uvicorn's config resets it
    try:
        with live_guarded(create_app(engine, ServeConfig()), timeout_graceful_shutdown=1) as addr:
            logger.addHandler(keep)
            host, port = addr.split(":")
            sock = socket.create_connection((host, int(port)))
            sock.sendall(b"POST /v1/chat HTTP/1.1\r\nHost: " + addr.encode() + b"\r\n"
                         b"Content-Type: audio/wav\r\nContent-Length: 100000\r\n\r\nRIFF")
            time.sleep(0.5)  # the handler is waiting for the rest of the body
        sock.close()
    finally:
        logger.removeHandler(keep)
    said = [r.getMessage() for r in keep.records]
    assert "a request still running at shutdown was cancelled" in said, said
    assert not [r for r in keep.records if r.exc_info], said


SIGNAL_SERVER = """
import contextlib, os, signal, sys, threading, time
import echox.serve.cli as scli
from echox import cli

async def app(scope, receive, send):  # a stand-in for the model's app: only its lifespan
    while True:
        m = await receive()
        if m["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        else:
            await send({"type": "lifespan.shutdown.complete"})
            return

scli.build = lambda args: (contextlib.nullcontext(), app)
sig = getattr(signal, sys.argv[2])
threading.Thread(target=lambda: (time.sleep(2), os.kill(os.getpid(), sig)), daemon=True).start()
sys.exit(cli.main(["serve", "--port", sys.argv[1], "--log-level", "warning"]))
"""


@pytest.mark.parametrize("sig,rc,line", [("SIGINT", 0, ""), ("SIGTERM", 143, "echox: stopped by SIGTERM")])
def test_serve_stops_on_ctrl_c_with_status_0_and_on_sigterm_with_143(sig, rc, line) -> None:
    """Ctrl-C is how a server run by hand is stopped: a clean stop, status 0 (it printed
    "echox: interrupted" and 130 once uvicorn.Server replaced uvicorn.run); SIGTERM keeps 143."""
    r = subprocess.run([sys.executable, "-c", SIGNAL_SERVER, str(free_port()), sig],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == rc, r.stderr
    assert "interrupted" not in r.stderr and (line in r.stderr), r.stderr
