"""Hooks into Jupyter Server's own handlers: a kernel start that waits in Chronos's queue ends with its client.

A kernelspec with ``wait`` makes ``POST /api/kernels`` (or ``POST /api/sessions``) wait until the
lease is granted. Tornado does not stop a handler whose client went away, so without this a closed
browser tab, a client that timed out, or a proxy that gave up would leave the request queued, and
the lease would be granted later to a kernel nobody wants. Each such request gets an event, set when
its connection closes; the provisioner's queue wait (same task, so the same context) withdraws the
request when it is set.

Installed by Chronos's server extension (:mod:`chronos_jupyter.server`, enabled by the file
``etc/jupyter/jupyter_server_config.d/chronos_jupyter.json`` that the package installs), which also
makes the stop signals right (see :mod:`chronos_jupyter.teardown`) before any kernel starts.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import Any

from tornado import web

__all__ = ["ClientGone", "client_gone", "hook_handlers", "install"]


class ClientGone(threading.Event):
    """Set when the HTTP client starting a kernel closed its request; what was asked to run then, runs then."""

    def __init__(self) -> None:
        super().__init__()
        self._guard = threading.Lock()
        self._then: list[Callable[[], None]] = []

    def then(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (which must not block: it runs on the server's event loop) when the client goes."""
        with self._guard:
            if not self.is_set():
                self._then.append(fn)
                return
        fn()

    def set(self) -> None:
        with self._guard:
            super().set()
            then, self._then = self._then, []
        for fn in then:
            fn()


#: Set when the HTTP request that is starting a kernel in this context was closed by its client.
client_gone: contextvars.ContextVar[ClientGone | None] = contextvars.ContextVar("chronos_client_gone", default=None)


def install(serverapp: Any) -> None:
    """Hook the kernel and session handlers, and make SIGINT stop the server as SIGTERM does."""
    from jupyter_server.services.kernels.handlers import MainKernelHandler
    from jupyter_server.services.sessions.handlers import SessionRootHandler

    from chronos_jupyter.teardown import install_stop_signals

    hook_handlers(MainKernelHandler, SessionRootHandler)
    install_stop_signals(serverapp.log)


def hook_handlers(*classes: type[Any]) -> None:
    """Give each handler class's ``post`` a ``client_gone`` event, set by ``on_connection_close``."""
    for cls in classes:
        if getattr(cls, "_chronos_hooked", False):
            continue
        cls.post = _with_event(cls.post)
        cls.on_connection_close = _closing(cls.on_connection_close)
        cls._chronos_hooked = True


def _with_event(post: Callable[..., Any]) -> Callable[..., Any]:
    async def hooked(self: Any, *args: Any, **kwargs: Any) -> Any:
        gone = ClientGone()
        self._chronos_client_gone = gone
        token = client_gone.set(gone)
        try:
            return await post(self, *args, **kwargs)
        finally:
            client_gone.reset(token)

    hooked.__wrapped__ = post  # type: ignore[attr-defined]
    # The handler's own post is @web.authenticated; so is its wrapper, so that Jupyter Server's check
    # that every core endpoint authenticates still sees it does (and it is asked first).
    return web.authenticated(hooked)


def _closing(close: Callable[[Any], None]) -> Callable[[Any], None]:
    def hooked(self: Any) -> None:
        gone = getattr(self, "_chronos_client_gone", None)
        if gone is not None and not self._finished:
            gone.set()
        close(self)

    return hooked
