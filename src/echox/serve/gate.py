"""The bounded worker: at most `workers` turns run at once, at most `queue_size` wait.

A turn runs the engine's (blocking) event iterator on a worker thread and hands each event to
the event loop as it is made (`ThreadTurn`). A turn that is stopped (the client left, cancelled
or ran out of time) sets a flag the thread checks after every event, closes the engine's
iterator (which cancels its queued speech work and frees the KV cache) and gives its slot back
as soon as the thread has returned: one token or one audio piece later, not at the end of the
answer.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from echox.serve.inputs import ApiError

__all__ = ["Busy", "ThreadTurn", "TurnGate"]

_END = object()


class Busy(ApiError):
    """All workers are busy and the queue is full: HTTP 503 with Retry-After."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(503, "busy", "the server is busy: all workers are answering and the "
                         f"queue is full; retry in {retry_after} s", retry_after)


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class TurnGate:
    """Admission and scheduling of turns. Create it inside the running event loop."""

    def __init__(self, workers: int = 1, queue_size: int = 8) -> None:
        self.workers = workers
        self.queue_size = queue_size
        self.capacity = workers + queue_size
        self.admitted = 0  # running + waiting
        self.running = 0
        self.served = 0  # turns that ran to their end
        self.stopped = 0  # turns stopped early (client gone, cancelled, timed out, failed)
        self.refused = 0  # 503s
        self.reading = 0  # HTTP requests whose body is being read and decoded (`intake`)
        self._avg_s: float | None = None  # moving average of a turn's run time
        self._sem = asyncio.Semaphore(workers)
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="echox-serve")

    @property
    def waiting(self) -> int:
        return self.admitted - self.running

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead, at the average turn time."""
        avg = self._avg_s if self._avg_s is not None else 2.0
        return max(1, min(600, math.ceil(avg * (self.waiting + 1) / self.workers)))

    def observe(self, seconds: float) -> None:
        self._avg_s = seconds if self._avg_s is None else 0.8 * self._avg_s + 0.2 * seconds

    @contextmanager
    def intake(self) -> Iterator[None]:
        """One of `capacity` places for an HTTP request whose body is read and decoded before
        its turn can ask for a `slot`: past them it is `Busy` before any of its body is read,
        so that uploads held in memory at once stay bounded as the turns are."""
        if self.reading >= self.capacity:
            self.refused += 1
            raise Busy(self.retry_after())
        self.reading += 1
        try:
            yield
        finally:
            self.reading -= 1

    @asynccontextmanager
    async def slot(self, on_queued: Callable[[int], Awaitable[None]] | None = None
                   ) -> AsyncIterator[None]:
        """Hold a worker slot; raises `Busy` at once when the queue is full. `on_queued(n)` is
        awaited when the turn has to wait behind `n` others (running ones included)."""
        if self.admitted >= self.capacity:
            self.refused += 1
            raise Busy(self.retry_after())
        self.admitted += 1
        try:
            if self._sem.locked() and on_queued is not None:
                await on_queued(self.admitted - 1)
            async with self._sem:
                self.running += 1
                try:
                    yield
                finally:
                    self.running -= 1
        finally:
            self.admitted -= 1

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict[str, Any]:
        return {"workers": self.workers, "queue_size": self.queue_size, "running": self.running,
                "waiting": self.waiting, "reading": self.reading, "served": self.served, "stopped": self.stopped,
                "refused": self.refused}


class ThreadTurn:
    """One turn's events, made on a worker thread and read here with `next()`."""

    def __init__(self, gate: TurnGate, make_events: Callable[[], Iterator[Any]]) -> None:
        self.gate = gate
        self.cancel = threading.Event()
        self.started = time.monotonic()
        self.finished = False  # the iterator ran to its end
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: the server is shutting down
                self.cancel.set()

        def work() -> None:
            try:
                events = make_events()
                try:
                    for ev in events:
                        if self.cancel.is_set():
                            break
                        put(ev)
                        if self.cancel.is_set():
                            break
                finally:
                    close = getattr(events, "close", None)
                    if close is not None:
                        close()  # the engine stops its speech workers and frees the cache
            except BaseException as e:  # noqa: BLE001 - handed to the reader
                put(_Failed(e))
            else:
                put(_END)

        self._future = asyncio.wrap_future(gate.executor.submit(work))

    async def next(self, timeout: float | None) -> Any | None:
        """The next event; None at the end. Raises the engine's error, or `ApiError` 504 when
        nothing came within `timeout` seconds."""
        try:
            item = await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", "the turn ran past the server's turn timeout; "
                           "the answer was stopped") from None
        if item is _END:
            self.finished = True
            return None
        if isinstance(item, _Failed):
            raise item.error
        return item

    async def stop(self) -> None:
        """Stop the thread (if it still runs) and wait until it has returned, even when the
        waiting task is cancelled again meanwhile (say at shutdown): the caller's slot is
        given back only then, and the cancellation is passed on after."""
        self.cancel.set()
        cancelled = False
        try:
            while True:
                try:
                    await asyncio.shield(self._future)  # `work` reports errors through the queue
                    break
                except asyncio.CancelledError:
                    if not self._future.cancelled():  # this task was: wait on for the thread
                        cancelled = True
                    if self._future.done():  # returned, or cancelled before it started
                        break
        finally:
            if self.finished:
                self.gate.served += 1
                self.gate.observe(time.monotonic() - self.started)
            else:
                self.gate.stopped += 1
        if cancelled:
            raise asyncio.CancelledError
