"""Waiting in tests for something that happens in another process or thread, never for a fixed time.

:func:`wait_for` polls a condition until it holds (:func:`wait_for_async` inside a coroutine, so that
the event loop keeps running); :func:`quiet_for` checks that something does *not* happen while a
watchdog makes a given number of polls (a window tied to what the watchdog observed, not to the
clock).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

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
