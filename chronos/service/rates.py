"""How fast one user may write: a token bucket per user, for the service's writes (but releases).

Every write adds to the ledger's disk: a reservation, granted or refused, is a line of the audit log (and a
lease), and retention forgets them only after months. Without a bound, one user looping on requests that
are refused at once could fill the file system that holds the ledger, for everyone, at a few megabytes a
minute. A user may make :data:`BURST` writes at once and :data:`PER_SECOND` a second on average; past that
a write is refused before it reaches the engine, so it writes nothing. Root and the admin group, trusted
with the machine anyway, are not limited.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from chronos.errors import UnavailableError

__all__ = ["BURST", "PER_SECOND", "WriteRates"]

#: The writes a user may make a second, on average.
PER_SECOND = 10.0
#: The writes a user may make at once, after a quiet spell.
BURST = 200
#: A user refused is named in the service's log at most this often.
WARN_EVERY_S = 60.0

log = logging.getLogger("chronos.service")


class WriteRates:
    """One token bucket per uid: :meth:`take` spends a token, or says when the next one comes."""

    def __init__(self, per_second: float = PER_SECOND, burst: int = BURST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._per_second = per_second
        self._burst = float(burst)
        self._clock = clock
        self._lock = threading.Lock()
        #: uid -> (tokens, when counted); a bucket that has filled up again is forgotten.
        self._buckets: dict[int, tuple[float, float]] = {}
        #: uid -> when the service's log last said it was refused.
        self._warned: dict[int, float] = {}

    def take(self, uid: int, exempt: Callable[[], bool] = lambda: False) -> None:
        """Spend one of ``uid``'s writes; past the limit, raises :class:`UnavailableError` (nothing spent)
        unless ``exempt()``. That is asked only then: whether a user is an admin may mean a lookup of the
        groups (NSS, perhaps LDAP), which the service's I/O thread should not wait for on every write."""
        now = self._clock()
        with self._lock:
            tokens, then = self._buckets.get(uid, (self._burst, now))
            tokens = min(self._burst, tokens + (now - then) * self._per_second)
            if tokens >= 1.0:
                self._buckets[uid] = (tokens - 1.0, now)
                if len(self._buckets) > 1024:
                    self._forget_full(now)
                return
            self._buckets[uid] = (tokens, now)
        if exempt():
            return
        with self._lock:
            warn = now - self._warned.get(uid, -WARN_EVERY_S) >= WARN_EVERY_S
            if warn:
                self._warned[uid] = now
        if warn:
            log.warning("uid %d writes faster than %g a second: its writes are refused until it slows down", uid,
                        self._per_second)
        raise UnavailableError(f"too many writes: one user may make {self._burst:.0f} at once and "
                               f"{self._per_second:g} a second after that; try again in "
                               f"{(1.0 - tokens) / self._per_second:.2f} s")

    def _forget_full(self, now: float) -> None:
        full = [uid for uid, (tokens, then) in self._buckets.items()
                if tokens + (now - then) * self._per_second >= self._burst]
        for uid in full:
            del self._buckets[uid]
            self._warned.pop(uid, None)
