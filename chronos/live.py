"""The open leases as a write needs them, kept between writes and changed only by what changed.

A write reclaims, snapshots and decides over every active, queued and booked lease; at a thousand
of them one Python pass per write costs more than the write itself. :class:`LiveView` keeps what
those passes computed (the planner's holdings, the memory they hold per device, the next lease end,
the leases whose holder must be looked at) and applies the ledger's list of changed leases since its
last look (:meth:`chronos.ledger.Ledger.open_changes`). When another connection commits, the ledger
reads every open lease again and the view is rebuilt from them, so it never trusts a stale copy.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping

from chronos.model import LeaseRecord, LeaseState
from chronos.scheduler import Holding

__all__ = ["LiveView"]

ACTIVE, QUEUED, BOOKED = LeaseState.ACTIVE, LeaseState.QUEUED, LeaseState.BOOKED


class LiveView:
    """Derived facts about the open leases, as of one ledger token (never read without :meth:`sync`)."""

    def __init__(self) -> None:
        self.token: tuple[int, int] = (-1, 0)
        self._live: dict[int, LeaseRecord] = {}  # active and queued, oldest first
        self._booked: dict[int, LeaseRecord] = {}
        self._holdings: dict[int, Holding] = {}
        self._held: dict[int, int] = {}  # device index -> bytes held by active leases
        self._holders: dict[int, LeaseRecord] = {}  # active leases with a holder process
        self._waiters: dict[int, LeaseRecord] = {}  # queued requests with a waiting process
        self._queued: dict[int, LeaseRecord] = {}
        #: Changes whenever a queued request is added, changed or leaves (what the planner's queue is built from).
        self.queued_version = 0
        self._ends: list[tuple[float, int]] = []  # (expires_at, seq) of active leases; stale entries skipped
        self._lists: tuple[list[LeaseRecord], list[LeaseRecord]] | None = None
        self._active_tuple: tuple[Holding, ...] | None = None
        self._given: list[LeaseRecord] | None = None

    # -- keeping it true ------------------------------------------------------------------
    def sync(self, token: tuple[int, int], rows: Mapping[int, LeaseRecord], changed: Iterable[int] | None) -> None:
        """Bring the view to ``token``: apply the leases ``changed`` since the last token, or (None) rebuild
        it from ``rows``, the ledger's open leases by id."""
        if changed is None:
            version = self.queued_version
            self.__init__()  # type: ignore[misc]
            self.queued_version = version + 1
            for seq, record in rows.items():
                self._add(seq, record)
            heapq.heapify(self._ends)
        else:
            for seq in changed:
                self._remove(seq)
                self._add(seq, rows.get(seq), push=True)
            if len(self._ends) > 2 * len(self._holdings) + 64:
                self._ends = [(end, seq) for end, seq in self._ends if self._ends_at(seq) == end]
                heapq.heapify(self._ends)
        self.token = token

    def _ends_at(self, seq: int) -> float | None:
        record = self._live.get(seq)
        return record.expires_at if record is not None and record.state == ACTIVE else None

    def _remove(self, seq: int) -> None:
        """Take ``seq``'s sums out; its place in the ordered maps stays until :meth:`_add` decides."""
        holding = self._holdings.pop(seq, None)
        if holding is not None:
            self._active_tuple = None
            for index in holding.devices:
                self._held[index] -= holding.memory_bytes

    def _add(self, seq: int, record: LeaseRecord | None, *, push: bool = False) -> None:
        """Put ``seq`` as ``record`` now stands (None: it is no longer open) in every map, each kept oldest first."""
        self._lists = None
        state = record.state if record is not None else None
        _put(self._booked, seq, record if state == BOOKED else None)
        live = record if state in (ACTIVE, QUEUED) else None
        _put(self._live, seq, live)
        _put(self._holders, seq, live if state == ACTIVE and live is not None and live.pid is not None else None)
        _put(self._waiters, seq, live if state == QUEUED and live is not None and live.pid is not None else None)
        if seq in self._queued or state == QUEUED:
            self.queued_version += 1
            _put(self._queued, seq, live if state == QUEUED else None)
        if live is None or state != ACTIVE:
            return
        holding = Holding(live.id, live.devices, live.memory_bytes, live.expires_at or live.created_at)
        self._holdings[seq] = holding
        self._active_tuple = None
        for index in live.devices:
            self._held[index] = self._held.get(index, 0) + live.memory_bytes
        if live.expires_at is not None:
            if push:
                heapq.heappush(self._ends, (live.expires_at, seq))
            else:
                self._ends.append((live.expires_at, seq))

    # -- what a write reads ---------------------------------------------------------------
    def record(self, seq: int) -> LeaseRecord | None:
        """Open lease ``seq`` (active, queued or booked) as the ledger holds it; None if it is not open."""
        return self._live.get(seq) or self._booked.get(seq)

    def open_leases(self) -> tuple[list[LeaseRecord], list[LeaseRecord]]:
        """Active and queued leases, and unclaimed bookings (each oldest first); fresh lists, the caller's own."""
        if self._lists is None:
            self._lists = (list(self._live.values()), list(self._booked.values()))  # each kept in id order
        self._given = list(self._lists[0])
        return self._given, list(self._lists[1])

    def gave(self, live: list[LeaseRecord]) -> bool:
        """Whether ``live`` is the last list :meth:`open_leases` gave, unchanged, and the view has not changed
        since: then the view's holdings, sums and queue are those of ``live``."""
        return self._lists is not None and live is self._given and len(live) == len(self._lists[0])

    def expired(self, now: float) -> list[LeaseRecord]:
        """Active leases whose end is at or before ``now``, soonest first."""
        ends = self._ends
        while ends and self._ends_at(ends[0][1]) != ends[0][0]:
            heapq.heappop(ends)  # an ended, extended or re-read lease's old entry
        if not ends or ends[0][0] > now:
            return []
        return [self._live[seq] for end, seq in sorted(ends) if end <= now and self._ends_at(seq) == end]

    def next_end(self) -> float | None:
        """The soonest end of an active lease."""
        found = self.expired(float("-inf"))
        assert not found
        return self._ends[0][0] if self._ends else None

    def holders(self) -> list[LeaseRecord]:
        """Active leases with a holder process to look at, oldest first."""
        return list(self._holders.values())

    def waiters(self) -> list[LeaseRecord]:
        """Queued requests with a waiting process to look at, oldest first."""
        return list(self._waiters.values())

    def queued(self) -> list[LeaseRecord]:
        """Queued requests, oldest first."""
        return list(self._queued.values())

    def holdings(self) -> tuple[Holding, ...]:
        """Every active lease as the planner holds it."""
        if self._active_tuple is None:
            self._active_tuple = tuple(self._holdings.values())
        return self._active_tuple

    def held(self) -> tuple[tuple[int, int], ...]:
        """Bytes held by the active leases per device index (the sum of :meth:`holdings`)."""
        return tuple(sorted((index, nbytes) for index, nbytes in self._held.items() if nbytes))


def _put(kept: dict[int, LeaseRecord], seq: int, record: LeaseRecord | None) -> None:
    """Set or drop ``seq`` in ``kept``, which stays in id order: a key set again keeps its place, a new id is
    normally the largest, and a smaller one (a booking claimed, a lease bound) puts the map in order again."""
    if record is None:
        kept.pop(seq, None)
        return
    if seq in kept or not kept or seq > next(reversed(kept)):
        kept[seq] = record
        return
    kept[seq] = record
    ordered = sorted(kept.items())
    kept.clear()
    kept.update(ordered)
