"""Watching lease holders with pidfds, so a dead holder's lease ends when it dies, not at the next call.

One thread polls a pidfd per live holder (Linux 5.3+; elsewhere it looks every
:data:`FALLBACK_POLL_S`) and a wake-up pipe the server pokes after each write. When a holder dies,
or the next lease reaches its end, it asks the engine for the live leases, which reclaims whatever
is due (the engine's one rule for that), and looks again.
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

    def wake(self) -> None:
        """Look again soon (the ledger changed)."""
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # a wake-up is already pending

    def sweep(self) -> float | None:
        """Reclaim what is due, watch the holders that remain; returns the next lease end, if any."""
        self.sweeps += 1
        live = [lease.record for lease in self.engine.leases()]
        wanted = {(r.pid, r.pid_start) for r in live if r.pid is not None}
        for key in [k for k in self._fds if k not in wanted]:
            os.close(self._fds.pop(key))
        again = False
        for pid, started in wanted - set(self._fds):
            if not self.pidfds:
                continue
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                again = True
                continue
            except OSError:  # no pidfds here after all (ENOSYS, a seccomp filter): poll instead
                self.pidfds = False
                continue
            if not procs.is_alive(pid, started):  # the pid was reused: that holder is already gone
                os.close(fd)
                again = True
                continue
            self._fds[(pid, started)] = fd
        if again:
            return time.time()
        ends = [r.expires_at for r in live if r.state == LeaseState.ACTIVE and r.expires_at is not None]
        return min(ends, default=None)

    def run(self, stop: threading.Event) -> None:
        """Loop until ``stop`` is set; an error is logged and the loop goes on."""
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        registered: set[int] = set()
        while not stop.is_set():
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
            poller.poll(sleep * 1000)
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def close(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)
