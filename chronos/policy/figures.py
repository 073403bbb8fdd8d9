"""Reports and metrics gathered from an engine (the pure parts are :mod:`~chronos.policy.report`
and :mod:`~chronos.policy.metrics`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Protocol

from chronos.identity import groups_of, lookup_user
from chronos.policy import metrics, report

__all__ = ["collect_metrics", "gather_report", "write_metrics"]


class Source(Protocol):
    """What the figures read from an engine."""

    @property
    def ledger(self) -> Any: ...

    @property
    def config(self) -> Any: ...

    def devices(self) -> Any: ...

    def events(self, *, since: float | None = None, lease_id: str | None = None, after: int | None = None,
               limit: int | None = None) -> Any: ...


#: The audit log is read a page of this many lines at a time: a report over months holds one page of the log
#: (and the leases still open at that point) in memory, and a read never takes longer than one page's.
REPORT_PAGE = 5000


def gather_report(engine: Source, *, since: float, by: str = "user", now: float | None = None,
                  page: int = REPORT_PAGE) -> report.Report:
    """:func:`chronos.policy.report.build` over the audit log since ``since`` and the leases it names."""
    now = time.time() if now is None else now

    def lines() -> Iterator[tuple[Any, Any]]:
        after = None
        while True:
            events = engine.events(since=since, after=after, limit=page)
            named = sorted({e.lease_id for e in events if e.lease_id != "0"})
            records = {r.id: r for r in engine.ledger.records(named)}
            yield from ((e, records.get(e.lease_id)) for e in events)
            if len(events) < page:
                return
            after = events[-1].id

    def groups(user: str) -> set[str]:
        try:
            return groups_of(lookup_user(user))
        except Exception:  # a user gone from the machine: no groups
            return set()

    return report.build(lines(), since=since, now=now, by=by, groups_of=groups)


def collect_metrics(engine: Source) -> str:
    """The Prometheus text for the machine now."""
    devices = engine.devices()
    ledger = engine.ledger
    live = ledger.live()
    booked = ledger.booked()
    counts = {event: sum(ledger.count_events(event).values()) for event in ("no-show", "idle-warning")}
    counts["granted"] = ledger.count_granted()
    return metrics.render(devices, live, booked, now=time.time(), refusals=ledger.count_events("refused"),
                          counts=counts)


def write_metrics(engine: Source) -> None:
    """Write the configured ``[metrics] textfile`` now."""
    path = engine.config.metrics_textfile
    if path is not None:
        metrics.write_textfile(path, collect_metrics(engine))
