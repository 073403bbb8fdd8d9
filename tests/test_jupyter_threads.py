"""Blocking Chronos calls run off the event loop: a cancelled wait is cut short, and a result that comes
after its task gave up is handed back for clean-up rather than dropped."""

from __future__ import annotations

import asyncio
import threading

import pytest

from chronos_jupyter.threads import in_daemon_thread


def test_cancelling_a_blocked_call_interrupts_it() -> None:
    woken = threading.Event()
    seen: list[str] = []

    def call(cancel: threading.Event) -> str:
        woken.wait(30)  # a queue wait that only its interrupt ends
        seen.append(f"cancel set: {cancel.is_set()}")
        return "late"

    async def scenario() -> None:
        task = asyncio.create_task(in_daemon_thread(call, interrupt=woken.set, discard=seen.append))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    for _ in range(300):
        if len(seen) == 2:
            break
        threading.Event().wait(0.01)
    assert seen == ["cancel set: True", "late"]  # interrupted, then its late result handed to discard


def test_a_result_handed_over_just_before_the_cancel_is_discarded() -> None:
    discarded = threading.Event()
    got: list[object] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        blocker = threading.Event()

        def call(cancel: threading.Event) -> str:
            return "granted"

        # The loop is kept busy while the call returns, so its result is handed over but not yet taken
        # when the task is cancelled.
        task = asyncio.create_task(in_daemon_thread(call, discard=lambda v: (got.append(v), discarded.set())))
        await asyncio.sleep(0)
        loop.call_soon(blocker.wait, 0.3)
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert discarded.wait(10) and got == ["granted"]


def test_a_call_not_cancelled_returns_its_result_and_discards_nothing() -> None:
    got: list[object] = []

    async def scenario() -> str:
        return await in_daemon_thread(lambda cancel: "granted", interrupt=lambda: got.append("interrupt"),
                                      discard=got.append)

    assert asyncio.run(scenario()) == "granted"
    assert got == []
