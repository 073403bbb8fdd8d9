"""Polling at a steady rate in one of two hosts: a daemon thread, or a task on an asyncio loop.

The watchdog is one such loop; a subclass gives :meth:`PollLoop.poll` (one look, returning the
events it produced) and may extend :meth:`PollLoop._finish`. Events go to ``on_event``: from the
thread in :meth:`start`, on the event loop in :meth:`run_async`. A callback that raises is
reported on stderr and never stops the loop; nor does a poll that raises.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from chronos import threads

__all__ = ["PollLoop"]

E = TypeVar("E")
L = TypeVar("L", bound="PollLoop[Any]")


class PollLoop(Generic[E]):
    """Calls :meth:`poll` ``rate_hz`` times a second until stopped or done."""

    def __init__(self, rate_hz: float, on_event: Callable[[E], None] | None = None, *, name: str = "chronos-loop"
                 ) -> None:
        self.rate_hz = rate_hz
        self.on_event = on_event
        self.name = name
        self.polls = 0
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures: set[str] = set()

    def poll(self) -> list[E]:
        raise NotImplementedError

    @property
    def done(self) -> bool:
        """True once there is nothing left to do."""
        return self._done.is_set()

    def start(self: L) -> L:
        """Run in a daemon thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.run, name=self.name, daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop polling and wait for the thread (when there is one)."""
        self._stop.set()
        threads.join(self._thread, timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done; True when it is."""
        return self._done.wait(timeout)

    def run(self) -> None:
        """Poll until stopped or done (blocking: the thread host)."""
        interval = 1.0 / self.rate_hz
        next_at = time.monotonic()
        try:
            while not self._stop.is_set() and not self._done.is_set():
                self._dispatch(self._poll_once())
                next_at += interval
                delay = next_at - time.monotonic()
                if delay < 0:  # fell behind (a slow poll): do not burst to catch up
                    next_at, delay = time.monotonic(), 0
                self._stop.wait(delay)
        finally:
            self._finish()

    async def run_async(self) -> None:
        """Poll until stopped, done or cancelled (the asyncio host); each poll runs in a worker
        thread, so a slow ledger never blocks the event loop."""
        interval = 1.0 / self.rate_hz
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        try:
            while not self._stop.is_set() and not self._done.is_set():
                self._dispatch(await asyncio.to_thread(self._poll_once))
                next_at += interval
                delay = next_at - loop.time()
                if delay < 0:
                    next_at, delay = loop.time(), 0
                await asyncio.sleep(delay)
        finally:
            await asyncio.shield(asyncio.to_thread(self._finish))

    def start_task(self) -> asyncio.Task[None]:
        """Schedule :meth:`run_async` on the running loop; cancel the task or call :meth:`stop`."""
        return asyncio.get_running_loop().create_task(self.run_async(), name=self.name)

    def _poll_once(self) -> Iterable[E]:
        """One poll; a poll that fails is reported on stderr (once per kind of failure) and the loop goes on."""
        try:
            return self.poll()
        except Exception as exc:  # enforcement never stops silently, nor stops at all for one bad poll
            text = f"{type(exc).__name__}: {exc}"
            if text not in self._failures:
                self._failures.add(text)
                print(f"chronos: {self.name}: a poll failed ({text}); polling goes on", file=sys.stderr)
            return ()

    def _dispatch(self, events: Iterable[E]) -> None:
        if self.on_event is None:
            return
        for event in events:
            try:
                self.on_event(event)
            except Exception as exc:  # a broken callback must never stop enforcement
                print(f"chronos: event handler failed: {exc}", file=sys.stderr)

    def _finish(self) -> None:
        self._done.set()
