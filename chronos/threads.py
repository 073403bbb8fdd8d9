"""Stopping a helper thread where an exception may land anywhere.

The CLI turns SIGTERM and SIGHUP into an exception in the main thread, and a kernel's interrupt is
one too: either can arrive inside ``Thread.start()`` itself. ``join`` of a thread whose ``start()``
did not return raises, and a stop path that raises then turns a clean stop into a traceback.
"""

from __future__ import annotations

import threading

__all__ = ["join"]


def join(thread: threading.Thread | None, timeout: float | None = None) -> None:
    """Wait up to ``timeout`` for ``thread`` to end; nothing for none, the calling thread, or one whose
    ``start()`` never returned. The caller sets the thread's stop flag first, so such a thread either
    never runs or sees the flag on its first look and ends."""
    if thread is None or thread is threading.current_thread():
        return
    try:
        thread.join(timeout)
    except RuntimeError:  # "cannot join thread before it is started"
        pass
