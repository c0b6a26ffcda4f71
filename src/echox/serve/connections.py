"""The HTTP connections uvicorn accepts, bounded: a time limit on a request's headers and a cap
on open connections below the process's file limit.

uvicorn (0.54, h11) waits for ever for the headers of a connection's first request, and
accepts connections until the process runs out of file descriptors. A client that sends half
a header and never the rest (slowloris) held its connection for ever; 20,000 of them made the
server unreachable, and asyncio logged "socket.accept() out of system resource" with a
traceback hundreds of thousands of times. Here a connection whose request headers have not
all arrived within `header_timeout` seconds is closed, and one accepted beyond `max_open`
open connections is closed at once, so the descriptors never run out and the server goes on
answering the clients that do send their requests. The end of a client's input (a close, or
a half-close after its request: the server cannot tell them apart) is the client gone, as
uvicorn and nginx take it: its turn stops and its worker is free at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from typing import Any

from echox.serve.inputs import ApiError

#: file descriptors kept free beside the open connections: the model's files, logs, the
#: worker threads' files, uploads read into memory (an estimate with room to spare)
FD_RESERVE = 128


def default_max_open() -> int:
    """Open connections allowed: the process's file limit less `FD_RESERVE` (at least 16)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 65536
    return max(16, int(soft) - FD_RESERVE)


def guarded_h11(header_timeout: float, max_open: int | None = None) -> type:
    """uvicorn's h11 protocol with the two bounds above (a class for `uvicorn.Config(http=)`)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    cap = default_max_open() if max_open is None else max_open

    class GuardedH11Protocol(H11Protocol):  # type: ignore[misc]
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > cap:  # closed before anything is read (connection_lost
                transport.close()            # takes it out of the count)
                return
            self._arm()

        def _arm(self) -> None:
            self._deadline = self.loop.call_later(header_timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_late(self) -> None:
            self._deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # no request began in time: nothing to answer
            # mid-body (a request answered before its body was read: 401, 415, 503 ...):
            # `data_received` arms the time again once the next request's headers are due

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are in (or it upgraded)
                self._disarm()
            elif self._deadline is None and not self.transport.is_closing():
                self._arm()  # waiting for the next request's headers, with no time running

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._deadline is None and not self.transport.is_closing():
                self._arm()  # the next request on this connection gets the same time

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            # a request h11 cannot parse gets the API's JSON error body (uvicorn's is plain
            # text). Where no response can be sent any more (the app has answered, a HEAD
            # request takes no body), the connection is closed: uvicorn raised there, and
            # asyncio logged a traceback for each such client.
            body = json.dumps({"error": ApiError(400, "bad_http_request", msg).body()}).encode()
            try:
                if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                    raise h11.LocalProtocolError("a response was sent already")
                out = [self.conn.send(h11.Response(status_code=400, reason=b"Bad Request", headers=[
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()), (b"connection", b"close")]))]
                out += [self.conn.send(h11.Data(data=body)), self.conn.send(h11.EndOfMessage())]
            except h11.LocalProtocolError:
                out = []
            for chunk in out:
                if chunk:
                    self.transport.write(chunk)
            self.transport.close()

    return GuardedH11Protocol


class ClientErrorsInOneLine(logging.Filter):
    """Two of uvicorn's records in one line, without their tracebacks:

    - a client's invalid UTF-8 WebSocket text (uvicorn's own error, answered with close code
      1007): any client could fill the log with them;
    - a request still running when the server stops (an upload half sent, a long answer):
      uvicorn cancels it once the graceful shutdown times out, and logged the cancellation as
      an "Exception in ASGI application" with the handler's whole stack, as if it had failed.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and str(record.msg).startswith("Invalid UTF-8"):
            record.exc_info, record.exc_text = None, None
        elif (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError)
              and str(record.msg).startswith("Exception in ASGI application")):
            record.msg, record.args = "a request still running at shutdown was cancelled", ()
            record.exc_info, record.exc_text = None, None
        return True


def uvicorn_config(app: Any, host: str, port: int, *, header_timeout: float = 10.0,
                   max_open: int | None = None, **kw: Any) -> Any:
    """The `uvicorn.Config` that `echox serve` runs: the guarded h11 protocol, the rest as
    given (log level, WebSocket sizes and pings, ...)."""
    import uvicorn

    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, ClientErrorsInOneLine) for f in logger.filters):
        logger.addFilter(ClientErrorsInOneLine())
    return uvicorn.Config(app, host=host, port=port, http=guarded_h11(header_timeout, max_open), **kw)
