"""Process identity: a pid plus its start, so a reused pid is never taken for the holder.

On Linux a process's start is its start tick, read straight from ``/proc/PID/stat`` (clock ticks
since boot): a figure that never moves, so stepping the wall clock (which moves the boot time the
kernel reports) never makes a holder look like another process. Ticks count within one boot, and
the ledger records the boot they belong to (:func:`boot_id`) and the pid namespace its pids are
read in (:func:`pid_namespace`). Elsewhere psutil's start time answers.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from chronos.errors import InvalidRequestError

__all__ = ["acting_for", "boot_id", "boottime_offset", "caller", "clock_ticks", "descendants", "holder", "is_alive",
           "legacy_boot_time", "pid_namespace", "start_ticks", "start_time", "uid_of"]

# Equal processes agree exactly; the tolerance only absorbs float rounding in stored values.
_TOLERANCE_S = 0.05
_LINUX = sys.platform.startswith("linux") and os.path.exists("/proc/stat")
_ticks = os.sysconf("SC_CLK_TCK") if _LINUX else 100
_caller: tuple[int, float] | None = None
_boot: tuple[str | None] | None = None
_offset: int | None = None


def start_ticks(stat: bytes) -> int | None:
    """The start tick in one ``/proc/PID/stat`` text (None for a zombie or dead process): the one input
    of a process's identity on Linux, so nothing about the wall clock enters it."""
    # The command name may hold spaces and parentheses: fields resume after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X", b"x"):
        return None  # zombie or dead: it will never use the GPU again
    return int(fields[19])


def _linux_start(pid: int) -> float | None:
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
    ticks = start_ticks(data)
    return float(ticks - boottime_offset()) if ticks is not None else None


def boottime_offset() -> int:
    """A time namespace's boot-time offset in ticks (``/proc/self/timens_offsets``): the kernel adds it to
    every start tick read inside the namespace, so it is taken off again and every namespace agrees."""
    global _offset
    if _offset is None:
        _offset = 0
        try:
            # Bytes, no codec: this runs wherever a start is read, in a kernel's teardown too.
            with open("/proc/self/timens_offsets", "rb") as f:
                for line in f:
                    name, seconds, nanos = line.split()
                    if name == b"boottime":
                        _offset = round((int(seconds) + int(nanos) / 1e9) * _ticks)
        except (OSError, ValueError):
            pass
    return _offset


def boot_id() -> str | None:
    """This boot's id (``/proc/sys/kernel/random/boot_id``): start ticks count within it. None off Linux."""
    global _boot
    if _boot is None:
        try:
            with open("/proc/sys/kernel/random/boot_id", "rb") as f:
                _boot = (f.read().strip().decode("latin-1") or None,)
        except OSError:
            _boot = (None,)
    return _boot[0]


def pid_namespace() -> str | None:
    """The pid namespace this process reads pids in (``pid:[4026531836]``); None where it cannot be told."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def legacy_boot_time() -> float:
    """The boot time ``/proc/stat`` reports now (it moves with the wall clock): only to convert start
    times stored by older versions, which added it to the start tick."""
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime"):
                return float(line.split()[1])
    import psutil

    return float(psutil.boot_time())  # pragma: no cover - every Linux has btime


def clock_ticks() -> int:
    """Clock ticks per second, the unit of a start tick."""
    return int(_ticks)


def start_time(pid: int) -> float | None:
    """The start of ``pid`` (on Linux its start tick, elsewhere epoch seconds), or None when no such live
    process exists. Only ever compared with another reading of it."""
    if pid <= 0:
        return None
    if _LINUX:
        return _linux_start(pid)
    import psutil  # only off Linux, and for process trees: it costs a CLI start ~15 ms

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None


def is_alive(pid: int, started: float | None) -> bool:
    """True while ``pid`` runs and, when ``started`` is known, is the same process that started then."""
    if _caller is not None and pid == _caller[0] == os.getpid():  # this process: running, its start read once
        now_started: float | None = _caller[1]
    else:
        now_started = start_time(pid)
    if now_started is None:
        return False
    return started is None or abs(now_started - started) <= _TOLERANCE_S


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it; empty when it is gone."""
    import psutil

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


def uid_of(pid: int) -> int | None:
    """The real uid of ``pid`` (whose process it is), or None when there is no such process."""
    import psutil

    try:
        return int(psutil.Process(pid).uids().real)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
