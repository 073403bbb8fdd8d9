"""Reports and metrics gathered from an engine (the pure parts are :mod:`~chronos.policy.report`
and :mod:`~chronos.policy.metrics`)."""

from __future__ import annotations

import time
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

    def events(self, *, since: float | None = None, lease_id: str | None = None) -> Any: ...


def gather_report(engine: Source, *, since: float, by: str = "user", now: float | None = None) -> report.Report:
    """:func:`chronos.policy.report.build` over the audit log since ``since`` and the leases it names."""
    now = time.time() if now is None else now
    events = engine.events(since=since)
    ids = {e.lease_id for e in events if e.lease_id != "0"}
    records = {r.id: r for r in engine.ledger.records(sorted(ids))}

    def groups(user: str) -> set[str]:
        try:
            return groups_of(lookup_user(user))
        except Exception:  # a user gone from the machine: no groups
            return set()

    return report.build(events, records, since=since, now=now, by=by, groups_of=groups)


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
