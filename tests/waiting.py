"""Waiting in tests for something that happens in another process or thread, never for a fixed time.

:func:`wait_for` polls a condition until it holds (:func:`wait_for_async` inside a coroutine, so that
the event loop keeps running); :func:`quiet_for` checks that something does *not* happen while a
watchdog makes a given number of polls (a window tied to what the watchdog observed, not to the
clock). :class:`WaiterPolls` counts the polls of a process waiting in the queue, for the same check.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import chronos
from chronos import procs
from chronos.api import default_engine

T = TypeVar("T")

#: What was waited for: a fixed text, or a function giving one when the wait fails (to show state).
What = str | Callable[[], str]


def _text(what: What) -> str:
    return what() if callable(what) else what


def wait_for(condition: Callable[[], T], *, timeout: float = 15.0, interval: float = 0.02,
             what: What = "the condition") -> T:
    """The first truthy value of ``condition()``; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {_text(what)}")
        time.sleep(interval)


async def wait_for_async(condition: Callable[[], T | Awaitable[T]], *, timeout: float = 15.0,
                         interval: float = 0.02, what: What = "the condition") -> T:
    """:func:`wait_for` on an event loop: sleeps with ``asyncio.sleep``; ``condition`` may be a coroutine
    function."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {_text(what)}")
        await asyncio.sleep(interval)


class _Polls(Protocol):
    polls: int


def quiet_for(dog: _Polls, polls: int, condition: Callable[[], bool], *, timeout: float = 30.0,
              what: str = "nothing to happen") -> None:
    """Assert ``condition()`` stays false while ``dog`` makes ``polls`` more polls, each one finished.

    A watchdog counts a poll when it begins one, so the last of them is known to be over (its events
    logged and dispatched) only once the next has begun: the window ends at ``polls + 1`` more. A
    watchdog that stops (``dog.done``) before then fails the check: it was not watching.
    """
    start = dog.polls
    target = start + polls + 1
    deadline = time.monotonic() + timeout
    while dog.polls < target:
        assert not condition(), f"{what} failed after {max(0, dog.polls - start - 1)} more watchdog poll(s)"
        if getattr(dog, "done", False):
            raise AssertionError(f"the watchdog stopped after {dog.polls - start} of {polls} polls")
        if time.monotonic() > deadline:
            raise AssertionError(f"the watchdog made fewer than {polls} polls in {timeout:g}s")
        time.sleep(0.01)
    assert not condition(), f"{what} failed"


class WaiterPolls:
    """The polls of a process waiting in the queue, counted from outside it, for :func:`quiet_for`.

    Each poll of a queued request ends, inside its write, every lease past its end time, and the audit
    log names the process that ended it. So this keeps one lease of ``memory`` for 50 ms on ``device``
    (take memory the waiter cannot use, so that the queue is not changed) and counts a poll each time
    the waiter has ended it, then takes the next one: each count is a later poll of the waiter than
    the one before. While it counts, nothing else may read leases in a way that ends them
    (``chronos.leases()``, ``get_lease``, ``devices()``); the engine's ``events()`` does not.
    """

    def __init__(self, pid: int, *, device: int, memory: str = "1G") -> None:
        self.pid, self.device, self.memory = pid, device, memory
        self.count = 0
        self._marker = self._take()

    def _take(self) -> str:
        # No one may ask for a lease shorter than a second, so the marker is granted for one and its end
        # then moved 50 ms ahead, in the ledger's own transaction.
        engine = default_engine()
        lease_id = chronos.reserve(self.memory, "1s", device=self.device, bind=False).id
        with engine.ledger.transaction():
            engine.ledger.update(lease_id, expires_at=time.time() + 0.05)
        return lease_id

    @property
    def polls(self) -> int:
        ended = [e for e in default_engine().events(lease_id=self._marker) if e.event == "expired"]
        if ended:
            assert ended[0].pid == self.pid, (
                f"lease {self._marker} was ended by process {ended[0].pid}, not by the waiter {self.pid}: "
                "something else read the ledger while the waiter's polls were being counted")
            self.count += 1
            self._marker = self._take()
        return self.count

    @property
    def done(self) -> bool:
        """The waiter is gone: it makes no more polls."""
        return not procs.is_alive(self.pid, None)

    def close(self) -> None:
        """End the lease still kept for counting."""
        chronos.release(self._marker)

    def __enter__(self) -> WaiterPolls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
