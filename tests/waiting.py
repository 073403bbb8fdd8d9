"""Waiting in tests for something that happens in another process or thread, never for a fixed time.

:func:`wait_for` polls a condition until it holds; :func:`quiet_for` checks that something does
*not* happen while a watchdog makes a given number of polls (a window tied to what the watchdog
observed, not to the clock).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], *, timeout: float = 15.0, interval: float = 0.02,
             what: str = "the condition") -> T:
    """The first truthy value of ``condition()``; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class _Polls(Protocol):
    polls: int


def quiet_for(dog: _Polls, polls: int, condition: Callable[[], bool], *, timeout: float = 30.0,
              what: str = "nothing to happen") -> None:
    """Assert ``condition()`` stays false while ``dog`` makes ``polls`` more polls."""
    target = dog.polls + polls
    deadline = time.monotonic() + timeout
    while dog.polls < target:
        assert not condition(), f"{what} failed after {dog.polls - target + polls} watchdog poll(s)"
        if time.monotonic() > deadline:
            raise AssertionError(f"the watchdog made fewer than {polls} polls in {timeout:g}s")
        time.sleep(0.01)
    assert not condition(), f"{what} failed"
