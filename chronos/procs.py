"""Process identity: a pid plus its start time, so a reused pid is never taken for the holder.

On Linux the start time is read straight from ``/proc/PID/stat`` (the same figure psutil's
``create_time`` gives: boot time plus the start tick), which is fast enough for every
admission to check every holder. Elsewhere psutil answers.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import psutil

from chronos.errors import InvalidRequestError

__all__ = ["acting_for", "caller", "descendants", "holder", "is_alive", "owner_uid", "start_time"]

# Equal processes agree exactly; the tolerance only absorbs float rounding in stored values.
_TOLERANCE_S = 0.05
_LINUX = sys.platform.startswith("linux") and os.path.exists("/proc/stat")
_boot_time: float | None = None
_ticks = os.sysconf("SC_CLK_TCK") if _LINUX else 100
_caller: tuple[int, float] | None = None


def _linux_boot_time() -> float:
    global _boot_time
    if _boot_time is None:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime"):
                    _boot_time = float(line.split()[1])
                    break
            else:  # pragma: no cover - every Linux has btime
                _boot_time = psutil.boot_time()
    return _boot_time


def _linux_start_time(pid: int) -> float | None:
    # os.open/os.read: no buffered file object, since admission calls this for every holder.
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # The command name may hold spaces and parentheses: fields resume after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    if not fields or fields[0] in (b"Z", b"X", b"x"):
        return None  # zombie or dead: it will never use the GPU again
    return _linux_boot_time() + int(fields[19]) / _ticks


def start_time(pid: int) -> float | None:
    """The start time of ``pid`` (epoch seconds), or None when no such live process exists."""
    if pid <= 0:
        return None
    if _LINUX:
        return _linux_start_time(pid)
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None


def is_alive(pid: int, started: float | None) -> bool:
    """True while ``pid`` runs and, when ``started`` is known, is the same process that started then."""
    now_started = start_time(pid)
    if now_started is None:
        return False
    return started is None or abs(now_started - started) <= _TOLERANCE_S


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it; empty when it is gone."""
    try:
        proc = psutil.Process(pid)
        return {pid} | {child.pid for child in proc.children(recursive=True)}
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return set()


#: The process a service request is served for (its pid from SO_PEERCRED, in this pid namespace), else None.
_peer: ContextVar[tuple[int, float] | None] = ContextVar("chronos_peer_process", default=None)


@contextmanager
def acting_for(pid: int, started: float) -> Iterator[None]:
    """Serve the code inside for process ``pid`` (started at ``started``): it is the caller and default holder."""
    token = _peer.set((pid, started))
    try:
        yield
    finally:
        _peer.reset(token)


def owner_uid(pid: int) -> int | None:
    """The real uid ``pid`` runs as, or None when there is no such process."""
    try:
        return int(psutil.Process(pid).uids().real)
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None


def caller() -> tuple[int, float]:
    """The calling process as (pid, start time); cached, and refreshed after a fork.

    While the service serves a request, the caller is the client's process, as the kernel named it.
    """
    global _caller
    peer = _peer.get()
    if peer is not None:
        return peer
    pid = os.getpid()
    if _caller is None or _caller[0] != pid:
        started = start_time(pid)
        assert started is not None
        _caller = (pid, started)
    return _caller


def holder(bind: bool | int | None) -> tuple[int, float] | None:
    """A lease's holder as asked for: the caller (True), none (False/None), or a process id."""
    if bind is True:
        return caller()
    if bind is False or bind is None:
        return None
    if isinstance(bind, bool) or not isinstance(bind, int) or bind <= 0:
        raise InvalidRequestError(f"bind takes True, False or a process id, got {bind!r}")
    started = start_time(bind)
    if started is None:
        raise InvalidRequestError(f"no running process {bind} to bind the lease to")
    return bind, started
