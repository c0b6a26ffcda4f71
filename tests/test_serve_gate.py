"""The bounded worker (`echox.serve.gate`): a stopped turn keeps its slot until its thread has
returned, however often the task that waits for it is cancelled."""

from __future__ import annotations

import asyncio
import threading

import pytest

from echox.serve.gate import Busy, ThreadTurn, TurnGate


def test_slot_is_held_until_the_thread_returns_even_when_cancelled_twice() -> None:
    release = threading.Event()
    returned = threading.Event()

    def events():
        try:
            yield "first"
            release.wait(10)  # the engine busy on one step: the cancel flag is seen after it
            yield "second"
        finally:
            returned.set()

    async def main() -> None:
        gate = TurnGate(workers=1, queue_size=0)
        seen: list[int] = []

        async def answer() -> None:
            async with gate.slot():
                turn = ThreadTurn(gate, events)
                try:
                    assert await turn.next(5) == "first"
                    await asyncio.sleep(10)  # cancelled here (the client left)
                finally:
                    await turn.stop()

        task = asyncio.create_task(answer())
        while gate.running == 0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the turn has read its first event
        task.cancel()  # the first cancel: stop() starts waiting for the thread
        await asyncio.sleep(0.1)
        task.cancel()  # a second one (server shutdown) used to give the slot back at once
        await asyncio.sleep(0.2)
        seen.append(gate.running)
        with pytest.raises(Busy):  # the slot is still taken: no second turn runs beside it
            async with gate.slot():
                pass
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert returned.is_set() and gate.running == 0 and gate.admitted == 0
        assert gate.stopped == 1 and gate.served == 0
        assert seen == [1]
        gate.close()

    asyncio.run(main())


def test_a_finished_turn_is_counted_served() -> None:
    async def main() -> None:
        gate = TurnGate(workers=1, queue_size=0)
        async with gate.slot():
            turn = ThreadTurn(gate, lambda: iter(["a", "b"]))
            got = [await turn.next(5), await turn.next(5), await turn.next(5)]
            await turn.stop()
        assert got == ["a", "b", None] and gate.served == 1 and gate.stopped == 0
        gate.close()

    asyncio.run(main())
