"""Ending a leased kernel for good: its whole process tree, then its lease, however the server stops.

Jupyter Server shuts its kernels down on SIGTERM and on a normal stop, but on SIGINT it does so only
when its stdin is a terminal: otherwise (a JupyterHub spawner, a service manager) SIGINT raises
KeyboardInterrupt in the event loop and the server exits with its kernels still running. JupyterHub
stops a server with SIGINT first (the stop button, the REST API, the idle culler). So the first
Chronos kernel of a server makes SIGINT stop the server as SIGTERM does
(:func:`install_stop_signals`), and an ``atexit`` hook ends what is left of every live kernel
(:func:`track`) should the server exit any other way.

A kernel's processes are its process group (Jupyter starts each kernel in a new session), the
processes below it, and every process that carries the kernel's lease in its environment
(:func:`chronos.accounting.carries`: the lease's id and its ledger's name, and the lease's owner),
which is how a child that left the group is still found.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import psutil

import chronos
from chronos import procs
from chronos.accounting import carries
from chronos.api import default_engine

__all__ = ["Teardown", "at_exit_unless_done", "end_kernel", "end_processes", "install_stop_signals",
           "kernel_processes", "track", "untrack"]

_log = logging.getLogger("chronos.jupyter")


class Teardown(Protocol):
    """What the exit hook asks of a live kernel's provisioner."""

    def end_at_exit(self) -> None: ...


_live: weakref.WeakSet[Any] = weakref.WeakSet()
_hooked = False
_lock = threading.Lock()


def track(provisioner: Teardown) -> None:
    """End ``provisioner``'s kernel at interpreter exit unless it was shut down before."""
    global _hooked
    with _lock:
        _live.add(provisioner)
        if not _hooked:
            atexit.register(_at_exit)
            _hooked = True


def untrack(provisioner: Teardown) -> None:
    with _lock:
        _live.discard(provisioner)


_pending: dict[int, Callable[[], None]] = {}


def at_exit_unless_done(fn: Callable[[], None]) -> Callable[[], None]:
    """Run ``fn`` at interpreter exit unless the returned ``done`` is called first: a kernel start that
    waits in the queue withdraws its request when the server exits under it (its waiting thread is a
    daemon, which the exit does not wait for)."""
    global _hooked
    key = id(fn)
    with _lock:
        _pending[key] = fn
        if not _hooked:
            atexit.register(_at_exit)
            _hooked = True

    def done() -> None:
        with _lock:
            _pending.pop(key, None)

    return done


def _at_exit() -> None:
    with _lock:
        left = list(_live)
        _live.clear()
        waiting = list(_pending.values())
        _pending.clear()
    for withdraw in waiting:
        try:
            withdraw()
        except Exception:  # every request gets its turn; what stays is withdrawn once its waiter is seen gone
            _log.exception("Chronos: could not withdraw a queued kernel start at exit")
    for provisioner in left:
        try:
            provisioner.end_at_exit()
        except Exception:  # every kernel gets its turn
            _log.exception("Chronos: could not end a kernel at exit")


def install_stop_signals(log: logging.Logger | logging.LoggerAdapter[Any] | None = None) -> bool:
    """In a Jupyter server without a terminal, make SIGINT stop it as SIGTERM does (kernels shut down).

    Only Python's default SIGINT handler is replaced, only from the main thread, and only in a
    process that runs a ServerApp; returns whether it was replaced.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return False  # someone (the server with a terminal, the host program) chose a handler
    server = _server_app()
    if server is None:
        return False
    stop: Callable[[Any, Any], None] = server._signal_stop
    signal.signal(signal.SIGINT, stop)
    (log or _log).info("Chronos: SIGINT now stops this server as SIGTERM does, shutting its kernels down")
    return True


def _server_app() -> Any:
    try:
        from jupyter_server.serverapp import ServerApp
    except ImportError:  # pragma: no cover - the provisioner runs in a Jupyter server
        return None
    if not ServerApp.initialized():
        return None
    return ServerApp.instance()


def kernel_processes(lease_id: str | None, pgid: int | None,
                     known: Iterable[tuple[int, float]] = ()) -> list[tuple[int, float]]:
    """The live processes of a kernel (see the module doc), never this process; each with its start time."""
    me, uid = os.getpid(), os.getuid()
    lease, ledger = None, None
    if lease_id is not None:
        with contextlib.suppress(chronos.ChronosError):
            engine = default_engine()
            lease, ledger = engine.get(lease_id).record, engine.ledger_id
    found: dict[int, float] = {}
    for pid, started in known:
        if pid != me and procs.is_alive(pid, started):
            found[pid] = started
    for proc in psutil.process_iter(["pid", "uids"]):
        pid = proc.info["pid"]
        if pid == me or pid in found or proc.info["uids"] is None or proc.info["uids"].real != uid:
            continue
        member = False
        with contextlib.suppress(OSError, psutil.Error):
            member = pgid is not None and os.getpgid(pid) == pgid
        if not member and lease is not None:
            with contextlib.suppress(OSError, psutil.Error):
                member = carries(proc.environ(), uid, lease, ledger)
        if member and (began := procs.start_time(pid)) is not None:
            found[pid] = began
    return list(found.items())


def end_kernel(lease_id: str | None, pgid: int | None, known: list[tuple[int, float]], wait_s: float) -> None:
    """Synchronously (at exit): hold the lease by this process, so that ending its holder does not end
    it as revoked; end the kernel's processes; release the lease."""
    if lease_id is not None:
        with contextlib.suppress(chronos.ChronosError):
            chronos.get_lease(lease_id).bind(os.getpid())
    end_processes(kernel_processes(lease_id, pgid, known), wait_s)
    if lease_id is not None:
        with contextlib.suppress(chronos.ChronosError):
            chronos.release(lease_id)


def end_processes(targets: list[tuple[int, float]], wait_s: float) -> list[int]:
    """SIGTERM, then SIGKILL to those still there after ``wait_s``; returns the pids that were signalled."""
    if not targets:
        return []
    _signal(targets, signal.SIGTERM)
    deadline = time.monotonic() + max(0.0, wait_s)
    alive = targets
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [(pid, started) for pid, started in alive if procs.is_alive(pid, started)]
    if alive:
        _signal(alive, signal.SIGKILL)
        deadline = time.monotonic() + 2.0
        while alive and time.monotonic() < deadline:
            time.sleep(0.02)
            alive = [(pid, started) for pid, started in alive if procs.is_alive(pid, started)]
    return [pid for pid, _ in targets]


def _signal(targets: list[tuple[int, float]], signum: signal.Signals) -> None:
    for pid, started in targets:
        if procs.is_alive(pid, started):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)
