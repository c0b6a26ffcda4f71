"""`echox serve`'s ASGI app: a streaming speech API and the web page, over one loaded engine.

    WS   /v1/stream   one conversation per connection: audio (a file, or PCM chunks and an end
                      message) or text in; JSON text deltas and binary 16-bit PCM audio out,
                      as the engine makes them; a final event with the latency stats
    POST /v1/chat     audio and/or text in, JSON out (text, stats, base64 wav)
    GET  /health      liveness, load and memory; no token needed
    GET  /v1/models   the loaded model
    GET  /            the web page (every asset is served from echox/serve/static)

The protocol is written down in docs/api.md. The model is loaded once; turns go through a
bounded worker (`TurnGate`): a full queue answers 503 with Retry-After. Every refusal is a
JSON error with a status, a code and a message, and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import ipaddress
import json
import logging
import resource
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import Headers, UploadFile
from starlette.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocketDisconnect

from echox.errors import AudioError, ConfigError, PromptError
from echox.infer.events import AudioChunk, Final, Segment, TextDelta
from echox.serve.gate import ThreadTurn, TurnGate
from echox.serve.inputs import (
    ApiError,
    AudioBuffer,
    Limits,
    check_history,
    check_text,
    decode_file,
    pcm_s16le,
    shown,
    wav_bytes,
)

__all__ = ["PROTOCOL", "STATIC", "ServeConfig", "create_app"]

log = logging.getLogger("echox.serve")

PROTOCOL = 1
STATIC = Path(__file__).parent / "static"
OUTPUT_FORMAT = "pcm_s16le"
ENVELOPE = 64 * 1024  # bytes allowed around an upload (multipart headers, text fields)
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "media-src 'self' blob:; connect-src 'self' ws: wss:; object-src 'none'; "
       "base-uri 'none'; frame-ancestors 'none'")
MESSAGE_TYPES = ("audio", "end", "text", "cancel", "reset", "ping")
# Browsers cannot set headers on a WebSocket: the page offers the subprotocols "echox" and
# "bearer.TOKEN" (a query string would put the token in access logs); "echox" is accepted.
SUBPROTOCOL = "echox"
TOKEN_PROTOCOL = "bearer."


@dataclass
class ServeConfig:
    """What `echox serve` allows; see `echox serve --help`."""

    token: str | None = None  # bearer token required on /v1/* (None: open)
    workers: int = 1  # turns decoded at once
    queue_size: int = 8  # turns that may wait for a worker; more get 503
    max_upload_bytes: int = 16 * 1024 * 1024  # one turn's audio (file or PCM)
    max_audio_seconds: float | None = None  # None: the model's limit
    max_text_chars: int = 2000
    turn_timeout: float = 120.0  # seconds a turn may run (queue time not included)
    upload_timeout: float = 60.0  # seconds an HTTP request body may take to arrive
    max_connections: int = 64  # open WebSocket conversations
    idle_timeout: float = 900.0  # seconds a conversation may send nothing, no turn running
    history_turns: int = 8  # exchanges a conversation remembers (older ones are dropped)
    allow_origins: tuple[str, ...] = ()  # browser origins besides the server's own ("*": any)
    model_id: str | None = None  # default: the bundle folder's name

    def __post_init__(self) -> None:
        def positive_int(name: str, minimum: int = 1) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ConfigError(f"serve.{name} must be an int >= {minimum}, got {v!r}")

        for name in ("workers", "max_upload_bytes", "max_text_chars", "max_connections",
                     "history_turns"):
            positive_int(name)
        positive_int("queue_size", 0)
        for name in ("turn_timeout", "upload_timeout", "idle_timeout", "max_audio_seconds"):
            v = getattr(self, name)
            if v is None and name == "max_audio_seconds":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise ConfigError(f"serve.{name} must be a number of seconds > 0, got {v!r}")
        if self.token is not None and not self.token.strip():
            raise ConfigError("serve.token must not be empty")
        self.allow_origins = tuple(_origin(o) for o in self.allow_origins)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(value: Any) -> str:
    """An allowed origin as a browser sends it (`scheme://host[:port]`, lower case, no default
    port): `https://a.example/` or `a.example`, pasted from the address bar, never matched any
    browser's Origin, and the page was refused with no word why."""
    if value in ("*", "null"):  # any origin; the pages a browser opens from files
        return str(value)
    hint = ("give the origin as a browser sends it, scheme://host[:port] with no path or "
            "trailing slash (e.g. https://app.example or http://localhost:3000), or '*'")
    if not isinstance(value, str):
        raise ConfigError(f"serve.allow_origins: {value!r} is not an origin; {hint}")
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        parts, port = None, None
    if (parts is None or parts.scheme.lower() not in _DEFAULT_PORTS or not parts.hostname
            or parts.path or parts.query or parts.fragment or "@" in parts.netloc):
        raise ConfigError(f"serve.allow_origins: {value!r} is not an origin; {hint}")
    scheme, host = parts.scheme.lower(), parts.hostname.lower()
    if ":" in host:  # an IPv6 address keeps its brackets
        host = f"[{host}]"
    keep_port = port is not None and port != _DEFAULT_PORTS[scheme]
    return f"{scheme}://{host}" + (f":{port}" if keep_port else "")


def model_audio_limit(engine: Any) -> float:
    """The longest speech the engine accepts: its own `max_audio_seconds`, else the model
    config's `encoder.max_seconds`, else one encoder window."""
    enc = getattr(getattr(engine.model, "config", None), "encoder", None)
    for value in (getattr(engine, "max_audio_seconds", None), getattr(enc, "max_seconds", None)):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return float(engine.model.frontend.max_seconds)


def _rss_mb() -> tuple[float | None, float]:
    """(current RSS, peak RSS) of this process in MiB."""
    current = hwm = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):  # kB
                current = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):  # the peak of that same count
                hwm = int(line.split()[1]) / 1024
    # getrusage's peak counts pages otherwise than VmRSS: it read below the current value
    peak = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return current, max(peak, current or 0.0)


def _api_error(e: BaseException) -> ApiError:
    """An engine or input error as the API reports it; unexpected ones are logged."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, AudioError):
        if type(e).__name__ == "AudioTooLongError" or "limit" in str(e):
            return ApiError(413, "audio_too_long", str(e))
        return ApiError(400, "bad_audio", str(e))
    if isinstance(e, (PromptError, ConfigError)):
        return ApiError(400, "bad_request", str(e))
    log.error("turn failed", exc_info=(type(e), e, e.__traceback__))
    return ApiError(500, "internal", f"the model failed on this turn ({type(e).__name__}); "
                    "see the server log")


def _direct_host(host: str) -> bool:
    """A Host header naming the server as no other site can: localhost or an IP address. A
    page of another site whose name was made to resolve to this machine (DNS rebinding) is
    same-origin with itself by its own name, which an open server does not take for its own."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _forbidden_origin(origin: str) -> ApiError:
    return ApiError(403, "forbidden_origin", f"requests from origin {origin} are not allowed "
                    "(start the server with --allow-origin to allow it)")


class _JsonCORS(CORSMiddleware):
    """Starlette's CORS, whose refused preflights (plain-text 400s) get the API's JSON error
    body: 403 `forbidden_origin` for another origin, 400 `bad_request` for a method or header
    the API does not take."""

    #: the paths a browser page may call across origins; a preflight to any other path goes
    #: to the app (its JSON 404 / 405), not a CORS grant for a route that does not exist
    API_PATHS = ("/v1/chat", "/v1/models", "/health")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") == "OPTIONS" \
                and scope.get("path") not in self.API_PATHS:
            await self.app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def preflight_response(self, request_headers: Headers) -> Response:
        r = super().preflight_response(request_headers)
        if r.status_code < 400:
            return r
        refused = bytes(r.body).decode().removeprefix("Disallowed CORS ").split(", ")
        kept = {k: v for k, v in r.headers.items() if k.lower() not in ("content-length", "content-type")}
        what = " and ".join(refused)  # method, headers, private-network
        e = (_forbidden_origin(request_headers["origin"]) if "origin" in refused else ApiError(
            400, "bad_request", f"CORS preflight: not allowed: the requested {what} (the API takes "
            "GET and POST, with Authorization, Content-Type and the CORS-safelisted headers)"))
        return JSONResponse({"error": e.body()}, status_code=e.status, headers=kept)


def _error_response(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else {}
    if e.status == 401:  # RFC 7235: a 401 names the scheme it wants
        headers["WWW-Authenticate"] = 'Bearer realm="echox"'
    if e.status == 426:
        headers["Upgrade"] = "websocket"
    if e.code == "upload_timeout":  # the rest of the body may still come: not a next request
        headers["Connection"] = "close"
    return JSONResponse({"error": e.body()}, status_code=e.status, headers=headers)


class _State:
    """What the routes share: the engine, the limits, the gate, counters."""

    def __init__(self, engine: Any, cfg: ServeConfig) -> None:
        self.engine = engine
        self.cfg = cfg
        self.limits = Limits(cfg.max_upload_bytes,
                             float(cfg.max_audio_seconds or model_audio_limit(engine)),
                             cfg.max_text_chars, cfg.history_turns)
        self.in_rate = int(engine.model.frontend.sample_rate)
        self.has_audio = getattr(engine, "vocoder", None) is not None
        self.out_rate = int(engine.sample_rate)
        bundle = getattr(engine, "bundle", None)
        path = getattr(bundle, "path", None)
        self.model_id = cfg.model_id or (Path(path).name if path else "echox")
        self.started = time.monotonic()
        self.connections = 0
        self._gate: TurnGate | None = None

    @property
    def gate(self) -> TurnGate:
        if self._gate is None:  # made in the running loop (lifespan, or first use)
            self._gate = TurnGate(self.cfg.workers, self.cfg.queue_size)
        return self._gate

    def close(self) -> None:
        if self._gate is not None:
            self._gate.close()
            self._gate = None

    # -- access
    def check_origin(self, headers: Headers) -> None:
        """Browsers send Origin: only the page's own origin (or an allowed one) may call.
        Stops other web sites from using a server on localhost through the visitor's
        browser. Clients that send no Origin (curl, scripts) are not browsers: allowed."""
        origin = headers.get("origin")
        if origin is None or "*" in self.cfg.allow_origins or origin in self.cfg.allow_origins:
            return
        try:
            netloc = urlsplit(origin).netloc
        except ValueError:  # "http://[::1": a 500 "the model failed" (a WebSocket: no answer)
            netloc = None
        host = headers.get("host", "").lower()
        if netloc is not None and netloc.lower() == host and (self.cfg.token is not None
                                                              or _direct_host(host)):
            return
        raise _forbidden_origin(origin)

    def check_token(self, headers: Headers, other: str | None = None) -> None:
        """`Authorization: Bearer TOKEN`, else `other` (a WebSocket's subprotocol or ?token=)."""
        token = self.cfg.token
        if token is None:
            return
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else other
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(401, "unauthorized", "a valid bearer token is required "
                           "(Authorization: Bearer TOKEN; WebSocket clients may instead offer "
                           "the subprotocol bearer.TOKEN, or pass ?token=TOKEN)")

    def info(self) -> dict[str, Any]:
        lim = self.limits
        return {"id": self.model_id, "object": "model", "protocol": PROTOCOL,
                "audio_output": self.has_audio, "output_format": OUTPUT_FORMAT,
                "sample_rate": self.out_rate, "input_sample_rate": self.in_rate,
                "limits": {"max_upload_bytes": lim.max_upload_bytes,
                           "max_audio_seconds": lim.max_audio_seconds,
                           "max_text_chars": lim.max_text_chars,
                           "turn_timeout": self.cfg.turn_timeout,
                           "upload_timeout": self.cfg.upload_timeout,
                           "idle_timeout": self.cfg.idle_timeout,
                           "history_turns": self.cfg.history_turns}}

    def final_stats(self, ev: Final, queue_ms: float) -> dict[str, Any]:
        stats = asdict(ev.stats)
        stats["queue_ms"] = round(queue_ms, 1)
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items()}


def _respond(session: Any, audio: np.ndarray | None, text: str | None,
             rate: int, speak: bool = True) -> Iterator[Any]:
    return session.respond(audio=audio, text=text, sample_rate=rate if audio is not None else None,
                           **({} if speak else {"speak": False}))


# ----------------------------------------------------------------------------- WebSocket


class _Conversation:
    """One WebSocket connection: its session, the audio being received, the running turn."""

    def __init__(self, st: _State, ws: WebSocket) -> None:
        self.st = st
        self.ws = ws
        self.session = st.engine.session()
        self.buffer: AudioBuffer | None = None
        self.rejected = False  # the audio in progress was refused: drop frames until "end"
        self.turns = 0
        self.task: asyncio.Task[None] | None = None
        self.replied = False  # the running turn has sent its final (or error) event
        self.lock = asyncio.Lock()  # an audio header and its binary frame go out together
        self.stalled = False  # a send timed out (`within`): nothing more is written to this client

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    async def send(self, msg: dict[str, Any], data: bytes | None = None) -> None:
        if self.stalled:  # a frame after a cut-off one (an audio header's missing bytes, say)
            raise WebSocketDisconnect(1008)  # would break the protocol: this client is gone
        async with self.lock:
            await self.ws.send_text(json.dumps(msg))
            if data is not None:
                await self.ws.send_bytes(data)

    async def send_error(self, e: ApiError, turn: int | None = None) -> None:
        msg: dict[str, Any] = {"type": "error", **e.body()}
        if turn is not None:
            msg["turn"] = turn
        with contextlib.suppress(Exception):  # the client may be gone
            await self.send(msg)

    async def run(self) -> None:
        info = {k: v for k, v in self.st.info().items() if k not in ("id", "object")}
        try:
            await self.send({"type": "ready", "model": self.st.model_id, **info})
        except Exception:  # noqa: BLE001 - the client left during the handshake: no one to serve
            return
        try:
            while True:
                try:  # a conversation that says nothing, with no turn running, keeps its place
                    msg = await asyncio.wait_for(self.ws.receive(), self.st.cfg.idle_timeout)
                except asyncio.TimeoutError:  # for others after --idle-timeout seconds
                    if self.busy:
                        continue
                    await self.close_idle()
                    break
                if msg["type"] == "websocket.disconnect":
                    break
                try:
                    if msg.get("bytes") is not None:
                        self.on_bytes(msg["bytes"])
                    elif msg.get("text") is not None:
                        await self.on_text(msg["text"])
                except ApiError as e:
                    await self.send_error(e)
                except WebSocketDisconnect:  # an answer (a pong) to a client that has left
                    break
                except Exception as e:  # noqa: BLE001 - a bug: a 500 answers this message
                    await self.send_error(_api_error(e))  # (logged); the conversation stays
        finally:
            await self.stop_turn()  # a client that left frees its slot now

    async def close_idle(self) -> None:
        secs = f"{self.st.cfg.idle_timeout:g}"
        with contextlib.suppress(Exception):  # a client gone meanwhile: nothing to tell
            await self.send_error(ApiError(408, "idle_timeout", f"nothing was sent for {secs} s; "
                                           "connect again to go on (the history starts anew)"))
            await self.ws.close(1000, f"idle for {secs} s")

    async def stop_turn(self) -> bool:
        """Stop the running turn, if any; returns whether one was stopped before its final (or
        error) event. One that has sent it is only tidying up: it keeps its slot until its
        thread has returned."""
        task, self.task = self.task, None
        if task is None or task.done():
            return False
        if self.replied:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
            return False
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return True

    def on_bytes(self, data: bytes) -> None:
        if self.rejected:
            return
        if self.buffer is None:  # binary frames without an "audio" message: an audio file
            self.buffer = AudioBuffer("file", None, self.st.limits)
        try:
            self.buffer.add(data)
        except ApiError:
            self.buffer, self.rejected = None, True
            raise

    async def on_text(self, raw: str) -> None:
        limit = _escaped(self.st.limits.max_text_chars) + 1024  # a "text" message at its limit
        if len(raw) > limit:  # parsed on the event loop: 15 MB of JSON held every client ~3 s
            raise ApiError(413, "message_too_large", f"a text message may hold {limit} "
                           f"characters (its text at most {self.st.limits.max_text_chars}); "
                           "send audio as binary frames")
        try:
            msg = json.loads(raw)
        except (ValueError, RecursionError):  # ValueError: also a number of 4301+ digits
            raise ApiError(400, "bad_message", "text messages must be JSON objects with a "
                           "\"type\"; this one is not JSON (or holds a number too long to "
                           "read)") from None
        kind = msg.get("type") if isinstance(msg, dict) else None
        if not isinstance(kind, str):
            raise ApiError(400, "bad_message", "a message must be a JSON object with a string "
                           "\"type\"")
        if kind == "ping":
            await self.send({"type": "pong"})
        elif kind == "audio":
            self.buffer, self.rejected = None, False
            fmt = msg.get("format")
            try:
                self.buffer = AudioBuffer("file" if fmt is None else fmt, msg.get("sample_rate"),
                                          self.st.limits)
            except ApiError:  # its frames are not read as a file: dropped up to the end
                self.rejected = True
                raise
        elif kind == "end":
            if self.rejected:  # its error was sent when the audio was refused
                self.buffer, self.rejected = None, False
                return
            # a turn still running or a refused text keeps the audio: the client may send
            # "end" again once the turn is over, or with a text that is allowed
            await self.idle()
            text = check_text(msg.get("text"), self.st.limits)
            buffer, self.buffer = self.buffer, None
            audio = await asyncio.to_thread(buffer.decode, self.st.in_rate) if buffer else None
            if audio is None and text is None:
                raise ApiError(400, "empty_turn", "an end message needs audio frames before it "
                               "or a \"text\"")
            self.start(audio, text)
        elif kind == "text":
            self.rejected = False  # a typed turn ends an upload that was refused
            await self.idle()
            text = check_text(msg.get("text"), self.st.limits)
            if text is None:
                raise ApiError(400, "empty_text", "a text message needs a non-empty \"text\"")
            self.buffer = None  # a new turn drops audio not yet ended, as a new audio message does
            self.start(None, text)
        elif kind == "cancel":  # always answered; "turn" names the turn it stopped, if any
            self.buffer, self.rejected = None, False
            turn = self.turns
            stopped = await self.stop_turn()
            await self.send({"type": "cancelled", "turn": turn} if stopped
                            else {"type": "cancelled"})
        elif kind == "reset":
            await self.idle()
            self.session.reset()
            self.buffer, self.rejected = None, False
            await self.send({"type": "reset"})
        else:
            raise ApiError(400, "bad_message", f"unknown message type {shown(kind)}; expected "
                           f"one of {', '.join(MESSAGE_TYPES)}")

    async def idle(self) -> None:
        """Refuse a new turn while one is answered. A turn that has sent its final event is
        only tidying up (its thread is returning): wait for it instead."""
        if self.busy and self.replied and self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.task)
        if self.busy:
            raise ApiError(409, "turn_in_progress", "a turn is being answered on this "
                           "connection; wait for its final event or send {\"type\": \"cancel\"}")

    def start(self, audio: np.ndarray | None, text: str | None) -> None:
        self.turns += 1
        self.replied = False
        self.task = asyncio.create_task(self.answer(self.turns, audio, text))

    async def answer(self, n: int, audio: np.ndarray | None, text: str | None) -> None:
        st, t0 = self.st, time.monotonic()

        async def queued(position: int) -> None:
            await self.within(time.monotonic() + st.cfg.turn_timeout,
                              self.send({"type": "queued", "turn": n, "position": position}))

        try:
            async with st.gate.slot(queued):
                queue_ms = (time.monotonic() - t0) * 1000
                deadline = time.monotonic() + st.cfg.turn_timeout
                await self.within(deadline, self.send({"type": "start", "turn": n,
                                                       "queue_ms": round(queue_ms, 1)}))
                turn = ThreadTurn(st.gate, lambda: _respond(self.session, audio, text, st.in_rate))
                try:
                    while (ev := await turn.next(max(0.0, deadline - time.monotonic()))) is not None:
                        await self.within(deadline, self.send_event(n, ev, queue_ms))
                finally:
                    await turn.stop()
            keep = 2 * st.cfg.history_turns
            if len(self.session.history) > keep:
                self.session.history = self.session.history[-keep:]
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes an error event
            self.replied = True
            await self.send_error(_api_error(e), n)

    async def within(self, deadline: float, sending: Awaitable[None]) -> None:
        """Await `sending` (a send) until `deadline` (time.monotonic()), else a 504: a client
        that stops reading must not hold its worker, or its place in the queue, for ever (its
        send used to wait for the client, past the turn timeout)."""
        task = asyncio.ensure_future(sending)
        # its failure (a client gone) is read here when this turn is cancelled before
        # task.result() below: else asyncio logs "Task exception was never retrieved"
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
        finally:
            if not task.done():  # timed out, or this turn was cancelled meanwhile
                task.cancel()
        if not done:
            self.stalled = True  # its 504 is not sent either: it would wait on the same client
            raise ApiError(504, "timeout", "the client did not read the answer within the "
                           f"server's turn timeout ({self.st.cfg.turn_timeout:g} s); the answer "
                           "was stopped")
        task.result()

    async def send_event(self, n: int, ev: Any, queue_ms: float) -> None:
        if isinstance(ev, TextDelta):
            await self.send({"type": "text", "turn": n, "text": ev.text})
        elif isinstance(ev, Segment):
            await self.send({"type": "segment", "turn": n, "index": ev.index, "text": ev.text})
        elif isinstance(ev, AudioChunk):
            if ev.audio.size:
                await self.send({"type": "audio", "turn": n, "segment": ev.index,
                                 "part": ev.part, "last": ev.last, "samples": int(ev.audio.size),
                                 "sample_rate": ev.sample_rate, "format": OUTPUT_FORMAT},
                                pcm_s16le(ev.audio))
        elif isinstance(ev, Final):
            self.replied = True
            await self.send({"type": "final", "turn": n, "text": ev.text,
                             "audio_seconds": round(ev.audio.size / ev.sample_rate, 3),
                             "sample_rate": ev.sample_rate, "segments": len(ev.segments),
                             "stats": self.st.final_stats(ev, queue_ms)})


# ----------------------------------------------------------------------------- HTTP helpers


def _check_length(request: Request, limit: int) -> None:
    """A Content-Length that is malformed (400) or over `limit` bytes (413)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not (length.isascii() and length.isdigit()):
            raise ApiError(400, "bad_request", f"bad Content-Length {shown(length)}")
        digits = length.lstrip("0") or "0"
        if len(digits) > 18 or int(digits) > limit:  # (int() refuses 4301+ digits)
            size = digits if len(digits) <= 18 else "over 10^18"
            raise ApiError(413, "too_large", f"the request is {size} bytes, over the limit "
                           f"of {limit} bytes")


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once past `limit` bytes (its Content-Length was
    checked against `limit` by `_check_length` before any place was taken)."""
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, "too_large", f"the request is over the limit of {limit} bytes")
    except ClientDisconnect:  # the client left while sending: nobody to answer, nothing failed
        raise ApiError(499, "client_disconnected", "the client left before the request ended") from None
    return bytes(body)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _flag(value: Any, name: str) -> bool:
    if value is None:
        return True
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
        return value.lower() in ("1", "true", "yes")
    raise ApiError(400, "bad_request", f"{name} must be true or false, got {value!r}")


def _check_multipart_end(content_type: str, body: bytes) -> None:
    """A multipart body must hold its closing delimiter ("--BOUNDARY--"): without it the body
    was cut short, and the parser would silently return the parts it had read so far."""
    boundary = None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise ApiError(400, "bad_request", "bad multipart body: the Content-Type has no boundary")
    if b"--" + boundary.encode("latin-1", "replace") + b"--" not in body:
        raise ApiError(400, "bad_request", "bad multipart body: it ends before its closing "
                       "boundary (was the upload cut short?)")


def _escaped(chars: int) -> int:
    """Characters (or bytes) `chars` characters of text may take JSON-escaped: up to 12 a
    character ("\\ud83d\\ude00")."""
    return 12 * chars


def _text_bytes(limits: Limits) -> int:
    """Bytes `text` and a whole `history` may take at their limits, JSON-escaped, so that a
    request within the limits fits its body."""
    return (2 * limits.history_turns + 1) * (_escaped(limits.max_text_chars) + 64)


def _body_kind(request: Request, st: _State) -> tuple[str, int]:
    """(Content-Type, the most bytes a `POST /v1/chat` body of it may hold); 415 for a type
    that is not read."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = st.limits.max_upload_bytes
    if ctype == "multipart/form-data":
        return ctype, limit + ENVELOPE + _text_bytes(st.limits)
    if ctype == "application/json":
        return ctype, limit * 4 // 3 + ENVELOPE + _text_bytes(st.limits)
    if ctype.startswith("audio/") or ctype == "application/octet-stream":
        return ctype, limit
    raise ApiError(415, "unsupported_media_type", f"unsupported Content-Type {ctype or '(none)'!r};"
                   " send multipart/form-data, application/json or an audio/* body")


class _StrictMultiPart(MultiPartParser):
    """Starlette's multipart parser, whose text fields must decode in their charset (UTF-8
    unless the Content-Type names another): it read bytes that do not as latin-1, and the
    model answered the garbled text."""

    def on_part_end(self) -> None:
        part = getattr(self, "_current_part", None)
        if part is not None and getattr(part, "file", None) is None:
            charset = getattr(self, "_charset", "") or "utf-8"
            try:
                bytes(part.data).decode(charset)
            except (UnicodeDecodeError, LookupError):
                raise MultiPartException(f"the field {shown(str(part.field_name))} is not valid "
                                         f"{charset} text") from None
        super().on_part_end()


def _query(request: Request) -> dict[str, str]:
    """The query string's parameters, decoded as strict UTF-8 (Starlette replaces bad bytes
    with U+FFFD, and `?text=%ff` reached the model as text)."""
    raw = request.scope.get("query_string", b"").decode("latin-1")
    try:
        return dict(parse_qsl(raw, keep_blank_values=True, encoding="utf-8", errors="strict"))
    except UnicodeDecodeError:
        raise ApiError(400, "bad_request", "the query string is not valid UTF-8 text") from None


async def _chat_inputs(request: Request, st: _State, ctype: str, body_limit: int
                       ) -> tuple[bytes | None, Any, Any, Any]:
    """(audio file bytes, text, history, return_audio) from a multipart, JSON or raw-audio
    body, of the Content-Type and size limit `_body_kind` gave."""
    texts = _text_bytes(st.limits)
    if ctype == "multipart/form-data":
        body = await _read_body(request, body_limit)
        _check_multipart_end(request.headers.get("content-type", ""), body)
        try:
            form = await _StrictMultiPart(request.headers, _once(body), max_files=1, max_fields=8,
                                          max_part_size=texts + 16 * 1024).parse()
        except MultiPartException as e:
            raise ApiError(400, "bad_request", f"bad multipart body: {e}") from e
        for key, value in form.multi_items():  # a file under another name: its audio was lost
            if isinstance(value, UploadFile) and key not in ("audio", "text", "history",
                                                             "return_audio"):
                raise ApiError(400, "bad_request", f"the file field {shown(key)} is not read: "
                               "send the audio file as the field 'audio'")
        upload = form.get("audio")
        audio = None
        if isinstance(upload, UploadFile):
            audio = await upload.read()
        elif upload is not None:
            raise ApiError(400, "bad_request", "the audio field must be a file upload")
        history = form.get("history")
        if isinstance(history, str):
            try:
                history = json.loads(history)
            except (ValueError, RecursionError):  # ValueError: also a number of 4301+ digits
                raise ApiError(400, "bad_request", "history must be JSON") from None
        return audio, form.get("text"), history, form.get("return_audio")
    if ctype == "application/json":
        body = await _read_body(request, body_limit)
        try:  # a large one (base64 audio) is parsed off the event loop, which serves everyone
            data = json.loads(body) if len(body) < 256 * 1024 else await asyncio.to_thread(json.loads, body)
        except UnicodeDecodeError:  # before ValueError, its base class
            raise ApiError(400, "bad_request", "the JSON body is not UTF-8 text (JSON is sent "
                           "as UTF-8)") from None
        except (ValueError, RecursionError):  # also a number of 4301+ digits
            raise ApiError(400, "bad_request", "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "bad_request", "the JSON body must be an object")
        audio = None
        b64 = data.get("audio_base64")
        if b64 is not None:
            if not isinstance(b64, str):
                raise ApiError(400, "bad_request", "audio_base64 must be a string")
            try:
                audio = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, "bad_request", "audio_base64 is not valid base64") from None
        return audio, data.get("text"), data.get("history"), data.get("return_audio")
    body = await _read_body(request, body_limit)  # audio/* or application/octet-stream
    q = _query(request)
    return body, q.get("text"), None, q.get("return_audio")


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)


# ----------------------------------------------------------------------------- the app


def create_app(engine: Any, cfg: ServeConfig | None = None) -> FastAPI:
    """The app over a loaded `echox.infer.engine.Engine` (the caller closes the engine)."""
    cfg = cfg or ServeConfig()
    st = _State(engine, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        st.gate  # noqa: B018 - made in the server's loop
        try:
            yield
        finally:
            st.close()

    app = FastAPI(title="EchoX", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.echox = st
    if cfg.allow_origins:  # pages of these origins may read the HTTP API too (CORS, preflight)
        app.add_middleware(_JsonCORS, allow_origins=list(cfg.allow_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"],
                           max_age=600)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return _error_response(ApiError(e.status_code, code, str(e.detail)))

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(ApiError(400, "bad_request", str(e.errors())))

    @app.exception_handler(Exception)
    async def on_exception(request: Request, e: Exception) -> JSONResponse:
        return _error_response(_api_error(e))

    def guard(request: Request) -> None:
        st.check_origin(request.headers)
        st.check_token(request.headers)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> dict[str, Any]:
        rss, peak = _rss_mb()
        return {"status": "ok", "model": st.model_id,
                "uptime_s": round(time.monotonic() - st.started, 1),
                "connections": st.connections, **st.gate.stats(),
                "rss_mb": None if rss is None else round(rss, 1), "peak_rss_mb": round(peak, 1)}

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models(request: Request) -> dict[str, Any]:
        guard(request)
        return {"object": "list", "data": [st.info()]}

    @app.post("/v1/chat")
    async def chat(request: Request) -> Response:
        guard(request)
        ctype, body_limit = _body_kind(request, st)
        _check_length(request, body_limit)  # 415 / 413 / 400 need no place
        with st.gate.intake():  # bodies read at once are bounded like turns: 503 busy past them
            try:
                raw, text, history, return_audio = await asyncio.wait_for(
                    _chat_inputs(request, st, ctype, body_limit), cfg.upload_timeout)
            except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11 on)
                raise ApiError(408, "upload_timeout", "the request body did not arrive within "
                               f"the server's upload timeout ({cfg.upload_timeout:g} s)") from None
            text = check_text(text, st.limits)
            turns = check_history(history, st.limits)
            want_audio = _flag(return_audio, "return_audio")
            audio = (await asyncio.to_thread(decode_file, raw, st.limits, st.in_rate)
                     if raw is not None else None)
        if audio is None and text is None:
            raise ApiError(400, "empty_turn", "send audio (a file) and/or a non-empty text")
        session = engine.session(turns)
        result: dict[str, Any] = {}

        async def run() -> None:
            t0 = time.monotonic()
            async with st.gate.slot():
                queue_ms = (time.monotonic() - t0) * 1000
                # return_audio=false: text only, the answer is not voiced at all
                turn = ThreadTurn(st.gate, lambda: _respond(session, audio, text, st.in_rate,
                                                            speak=want_audio))
                try:
                    deadline = time.monotonic() + cfg.turn_timeout
                    while (ev := await turn.next(max(0.0, deadline - time.monotonic()))) is not None:
                        if isinstance(ev, Final):
                            result["final"], result["queue_ms"] = ev, queue_ms
                finally:
                    await turn.stop()

        task = asyncio.create_task(run())
        watch = asyncio.create_task(_disconnected(request))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():  # the client left (or the server stops): free the slot now
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            return Response(status_code=499)  # nobody is listening
        try:
            task.result()
        except Exception as e:  # noqa: BLE001
            return _error_response(_api_error(e))
        ev: Final = result["final"]
        out: dict[str, Any] = {"model": st.model_id, "text": ev.text,
                               "stats": st.final_stats(ev, result["queue_ms"]), "audio": None}
        if want_audio and ev.audio.size:
            out["audio"] = {"format": "wav", "sample_rate": ev.sample_rate,
                            "seconds": round(ev.audio.size / ev.sample_rate, 3),
                            "base64": base64.b64encode(wav_bytes(ev.audio, ev.sample_rate)
                                                       ).decode("ascii")}
        return JSONResponse(out)

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket) -> None:
        offered = list(ws.scope.get("subprotocols") or [])
        from_protocol = next((p[len(TOKEN_PROTOCOL):] for p in offered
                              if p.startswith(TOKEN_PROTOCOL)), None)
        try:
            st.check_origin(ws.headers)
            st.check_token(ws.headers, from_protocol or ws.query_params.get("token"))
            refusal, code = None, 1000
        except ApiError as e:
            refusal, code = e, 1008  # policy violation
        if refusal is None and st.connections >= cfg.max_connections:
            refusal = ApiError(503, "too_many_connections", f"the server holds its limit of "
                               f"{cfg.max_connections} conversations; retry later", 5)
            code = 1013  # try again later
            st.gate.refused += 1  # /health's `refused` counts every 503
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in offered else None
        if refusal is not None:
            await ws.accept(subprotocol=subprotocol)
            with contextlib.suppress(Exception):
                await ws.send_text(json.dumps({"type": "error", **refusal.body()}))
                await ws.close(code)
            return
        st.connections += 1  # before the handshake's await: no two handshakes take one place
        try:
            await ws.accept(subprotocol=subprotocol)
            await _Conversation(st, ws).run()
        finally:
            st.connections -= 1

    @app.api_route("/v1/stream", methods=["GET", "HEAD", "POST"], include_in_schema=False)
    async def stream_over_http(request: Request) -> Response:
        raise ApiError(426, "upgrade_required", "/v1/stream is a WebSocket endpoint: connect "
                       "with a WebSocket client (ws:// or wss://); POST /v1/chat answers one "
                       "HTTP request")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                                     "X-Content-Type-Options": "nosniff"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
