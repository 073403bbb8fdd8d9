"""Watching lease holders with pidfds, so a dead holder's lease ends when it dies, not at the next call.

One thread polls a pidfd per live holder (Linux 5.3+; elsewhere it looks every
:data:`FALLBACK_POLL_S`) and a wake-up pipe the server pokes with each new holder. When a holder
dies, the next lease reaches its end, or a second has passed, it asks the engine for the live
leases, which reclaims whatever is due (the engine's one rule for that), and looks again. A new
holder costs one ``pidfd_open``, not a look at the ledger.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time

from chronos import procs
from chronos.engine import Engine
from chronos.model import LeaseState

__all__ = ["FALLBACK_POLL_S", "HolderWatch"]

#: How often to look when this kernel has no pidfds.
FALLBACK_POLL_S = 0.25
#: At most this long between looks, for the policies (idle, bookings, metrics) and for safety.
MAX_SLEEP_S = 1.0

log = logging.getLogger("chronos.service")


class HolderWatch:
    """Ends the lease of a holder that died, and leases that reach their end, as it happens."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._fds: dict[tuple[int, float | None], int] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.pidfds = hasattr(os, "pidfd_open")
        self.sweeps = 0
        self._lock = threading.Lock()
        self._added: list[tuple[int, float | None]] = []
        self._due = False
        self.next_end: float | None = None

    def wake(self, holder: tuple[int, float | None] | None = None) -> None:
        """Watch ``holder`` too (a lease was just granted or bound to it); without one, look again soon."""
        with self._lock:
            if holder is None:
                self._due = True
            elif holder not in self._fds:
                self._added.append(holder)
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # a wake-up is already pending

    def _watch_added(self) -> bool:
        """Open pidfds for the holders handed in since the last look; True when one is gone already."""
        with self._lock:
            added, self._added = self._added, []
            due, self._due = self._due, False
        for pid, started in added:
            if (pid, started) in self._fds:
                continue
            gone = self._open(pid, started)
            due = due or gone
        return due

    def _open(self, pid: int, started: float | None) -> bool:
        """Watch one holder; True when it is already gone."""
        if not self.pidfds:
            return False
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return True
        except OSError:  # no pidfds here after all (ENOSYS, a seccomp filter): poll instead
            self.pidfds = False
            return False
        if not procs.is_alive(pid, started):  # the pid was reused: that holder is already gone
            os.close(fd)
            return True
        self._fds[(pid, started)] = fd
        return False

    def sweep(self) -> float | None:
        """Reclaim what is due, watch the holders that remain; returns the next lease end, if any."""
        self.sweeps += 1
        live = [lease.record for lease in self.engine.leases()]
        wanted = {(r.pid, r.pid_start) for r in live if r.pid is not None}
        for key in [k for k in self._fds if k not in wanted]:
            os.close(self._fds.pop(key))
        again = False
        for pid, started in wanted - set(self._fds):
            again = self._open(pid, started) or again
        ends = [r.expires_at for r in live if r.state == LeaseState.ACTIVE and r.expires_at is not None]
        self.next_end = min(ends, default=None)
        return time.time() if again else self.next_end

    def run(self, stop: threading.Event) -> None:
        """Loop until ``stop`` is set; an error is logged and the loop goes on."""
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        registered: set[int] = set()
        due, last = True, 0.0
        next_end: float | None = None
        while not stop.is_set():
            now = time.time()
            if due or now - last >= MAX_SLEEP_S or (next_end is not None and now >= next_end):
                last = now
                try:
                    next_end = self.sweep()
                except Exception:
                    log.exception("holder watch: sweep failed; trying again")
                    next_end = None
            for fd in registered - set(self._fds.values()):
                poller.unregister(fd)
            for fd in set(self._fds.values()) - registered:
                poller.register(fd, select.POLLIN)
            registered = set(self._fds.values())
            sleep = MAX_SLEEP_S if self.pidfds else FALLBACK_POLL_S
            if next_end is not None:
                sleep = max(0.0, min(sleep, next_end - time.time() + 0.001))
            ready = {fd for fd, _ in poller.poll(sleep * 1000)}
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
            timed_out = not ready  # a lease's end, or the periodic look
            due = self._watch_added() or bool(ready - {self._wake_r}) or timed_out or not self.pidfds
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def close(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)
