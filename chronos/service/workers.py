"""The service's threads, shared fairly between users.

Reads of many leases, the GPUs' processes or the audit log run on a few workers. One user's requests run
on at most :data:`PER_USER` of them at once; the rest wait in that user's own line and are handed on one by
one as that user's earlier ones finish. A user who sends many long reads therefore delays only their own
requests, and another user's request waits for at most one running request to finish.

A queued reservation waits on a thread of its own: :class:`Threads` bounds those threads in all and per
user, so that one user's waiting requests leave room for everyone else's.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

__all__ = ["PER_USER", "FairWorkers", "Threads"]

#: The most workers one user's requests hold at once.
PER_USER = 2


class FairWorkers:
    """Run each user's jobs on ``pool``, at most ``per_user`` of one user's at a time, in the order sent."""

    def __init__(self, pool: ThreadPoolExecutor, per_user: int = PER_USER) -> None:
        self._pool = pool
        self._per_user = per_user
        self._lock = threading.Lock()
        self._running: dict[int, int] = {}
        self._waiting: dict[int, deque[Callable[[], None]]] = {}

    def submit(self, uid: int, job: Callable[[], None]) -> None:
        with self._lock:
            if self._running.get(uid, 0) >= self._per_user:
                self._waiting.setdefault(uid, deque()).append(job)
                return
            self._running[uid] = self._running.get(uid, 0) + 1
        self._pool.submit(self._run, uid, job)

    def queued(self, uid: int) -> int:
        """How many of a user's jobs wait for one of their running ones to finish."""
        with self._lock:
            return len(self._waiting.get(uid, ()))

    def _run(self, uid: int, job: Callable[[], None]) -> None:
        try:
            job()
        finally:
            self._next(uid)

    def _next(self, uid: int) -> None:
        """Hand the user's next waiting job to the pool, at the back of its queue (behind other users')."""
        with self._lock:
            line = self._waiting.get(uid)
            if not line:
                self._waiting.pop(uid, None)
                self._running[uid] -= 1
                if not self._running[uid]:
                    del self._running[uid]
                return
            job = line.popleft()
        try:
            self._pool.submit(self._run, uid, job)
        except RuntimeError:  # the pool is shut down (the service stops): nothing more runs
            pass


class Threads:
    """Jobs each on a thread of its own: at most ``total`` at once, and at most ``per_user`` of one user's."""

    def __init__(self, total: int, per_user: int, what: str) -> None:
        self._total, self._per_user, self._what = total, per_user, what
        self._lock = threading.Lock()
        self._held: dict[int, int] = {}

    def start(self, uid: int, job: Callable[[], None], name: str) -> str | None:
        """Start ``job`` for ``uid``; or, starting nothing, why not (a line for the user)."""
        with self._lock:
            mine = self._held.get(uid, 0)
            if mine >= self._per_user:
                return (f"too many of your {self._what} (at most {self._per_user} a user): end some, or try again "
                        "later")
            if sum(self._held.values()) >= self._total:
                return f"too many {self._what} (at most {self._total} in all): try again later"
            self._held[uid] = mine + 1

        def run() -> None:
            try:
                job()
            finally:
                self._give(uid)

        try:
            threading.Thread(target=run, name=name, daemon=True).start()
        except RuntimeError:  # no thread to be had now (a limit on the service's processes)
            self._give(uid)
            return f"the service cannot start a thread for more {self._what} now: try again later"
        return None

    def _give(self, uid: int) -> None:
        with self._lock:
            left = self._held[uid] - 1
            if left:
                self._held[uid] = left
            else:
                del self._held[uid]
