"""Bounded history: ended leases (and their audit lines) older than ``[history] keep`` are forgotten.

Pruning runs after an operation, outside its transaction, in batches of :data:`BATCH` leases, each
its own short write, so no write holds the ledger's lock for long however much history is due. A
full batch means more is due and the next operation prunes again; otherwise the next look is
:data:`EVERY_S` later. Every process shares the work, and none has to run as a daemon.
"""

from __future__ import annotations

import time
from typing import Protocol

from chronos.errors import ChronosError

__all__ = ["BATCH", "EVERY_S", "Retention"]

#: Leases forgotten per write (a few milliseconds of lock at most).
BATCH = 200
#: How often a process looks for history to prune when the last look found little.
EVERY_S = 60.0


class Pruner(Protocol):
    def prune(self, before: float, batch: int) -> int: ...


class Retention:
    """When to prune: at most one small batch per call, and rarely when nothing is due."""

    def __init__(self) -> None:
        self._next = 0.0
        self.pruned = 0

    def after(self, ledger: Pruner, keep_s: float | None) -> int:
        """Prune one batch if a look is due; returns how many leases went."""
        now = time.monotonic()
        if keep_s is None or now < self._next:
            return 0
        try:
            gone = ledger.prune(time.time() - keep_s, BATCH)
        except ChronosError:
            gone = 0  # the lock is busy: someone else's turn, or ours a minute later
        self._next = now if gone >= BATCH else now + EVERY_S
        self.pruned += gone
        return gone
