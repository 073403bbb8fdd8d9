"""Blocking Chronos calls off a Jupyter server's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Cancelled", "in_background", "in_daemon_thread", "in_thread"]

T = TypeVar("T")


class Cancelled(Exception):
    """Raised inside a queue wait (through on_wait) to withdraw the request."""


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking Chronos call off the event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def in_daemon_thread(fn: Callable[[threading.Event], T], *, interrupt: Callable[[], None] | None = None,
                           discard: Callable[[T], None] | None = None) -> T:
    """Run a possibly long call (a queue wait) in a daemon thread.

    A daemon thread never holds up the server's exit. Cancelling the awaiting task sets the event,
    which the call checks whenever it wakes, and runs ``interrupt`` (in a thread of its own) to wake it
    now; a result the call still returns after that is handed to ``discard`` (so that a lease granted
    just as its kernel start was given up is not left behind).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    cancel = threading.Event()
    guard = threading.Lock()
    handed: list[T] = []

    def settle(value: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)  # type: ignore[arg-type]

    def body() -> None:
        try:
            value = fn(cancel)
        except BaseException as exc:  # handed to the awaiting task
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with guard:
            late = cancel.is_set()
            if not late:
                handed.append(value)
        if late:
            if discard is not None:
                _quietly(discard, value)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, value, None)

    threading.Thread(target=body, name="chronos-kernel-lease", daemon=True).start()
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with guard:
            cancel.set()
            value_handed = list(handed)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        if value_handed:  # it came just before the cancel: nobody will take it now
            in_background(discard, value_handed[0])
        else:
            in_background(interrupt)
        raise


def in_background(fn: Callable[..., object] | None, *args: Any) -> None:
    """Clean up after a given-up call in a daemon thread of its own, never blocking the event loop.

    Nobody is left to tell of a failure; what it could not end, the reaper ends when its holder exits.
    """
    if fn is not None:
        threading.Thread(target=_quietly, args=(fn, *args), name="chronos-cleanup", daemon=True).start()


def _quietly(fn: Callable[..., object], *args: Any) -> None:
    with contextlib.suppress(Exception):
        fn(*args)
