"""Blocking Chronos calls off a Jupyter server's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Cancelled", "in_daemon_thread", "in_thread"]

T = TypeVar("T")


class Cancelled(Exception):
    """Raised inside a queue wait (through on_wait) to withdraw the request."""


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking Chronos call off the event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def in_daemon_thread(fn: Callable[[threading.Event], T]) -> T:
    """Run a possibly long call (a queue wait) in a daemon thread.

    A daemon thread never holds up the server's exit; cancelling the awaiting task sets the event,
    which the call polls so that it can withdraw its queued request.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    cancel = threading.Event()

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
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, value, None)

    threading.Thread(target=body, name="chronos-kernel-lease", daemon=True).start()
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise
