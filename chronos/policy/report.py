"""Usage reports over the audit log: GPU-hours reserved, used and held idle, leases, waits, refusals,
no-shows. Pure: :func:`build` takes the events, each with the lease record it names.

A lease counts in the window it was granted in, whole (its hours are not cut at the window's edge),
so that each lease is in exactly one report of consecutive windows. Figures:

* ``gpu_hours_reserved``: GPUs x hours from its grant to its end (or now, for one still active);
* ``gib_hours_reserved``: the same weighted by memory per GPU, in GiB·h;
* ``gpu_hours_used``: the GPU time the watchdog recorded (GPUs x hours with memory in use), for
  leases that had a watchdog (``chronos run``, kernels, ``%chronos``); None when none did;
* ``peak_percent``: recorded peak memory against the lease's size, weighted by hours held;
* ``idle_gpu_hours``: GPUs x hours between an ``idle`` event and the next ``active`` event or the end;
* ``waits`` and ``wait_s``: requests that queued, and how long the granted ones waited in all;
* ``refusals``, ``no_shows``, ``bookings``: events of those kinds in the window.

``by`` is ``user`` (the owner), ``group`` (each of the owner's groups: a user in two groups counts in
both, the total once), ``label`` or ``gpu`` (a lease on two GPUs counts half its GPU-hours on each).
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from chronos.errors import InvalidRequestError
from chronos.model import LeaseRecord
from chronos.spellings import REPORT_GROUPS
from chronos.text import plain

__all__ = ["BY", "END_EVENTS", "Report", "ReportRow", "build"]

BY = REPORT_GROUPS
END_EVENTS = frozenset({"released", "expired", "revoked"})
GIB = float(1 << 30)


@dataclass
class ReportRow:
    """The figures for one user, group, label or GPU (or the total)."""

    key: str
    leases: int = 0
    gpu_hours_reserved: float = 0.0
    gib_hours_reserved: float = 0.0
    gpu_hours_used: float | None = None
    peak_percent: float | None = None
    idle_gpu_hours: float = 0.0
    waits: int = 0
    wait_s: float = 0.0
    refusals: int = 0
    no_shows: int = 0
    bookings: int = 0
    _peak_weight: float = field(default=0.0, repr=False)
    _peak_sum: float = field(default=0.0, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        for name in ("gpu_hours_reserved", "gib_hours_reserved", "idle_gpu_hours", "wait_s"):
            data[name] = round(data[name], 6)
        if data["gpu_hours_used"] is not None:
            data["gpu_hours_used"] = round(data["gpu_hours_used"], 6)
        if data["peak_percent"] is not None:
            data["peak_percent"] = round(data["peak_percent"], 2)
        return data


COLUMNS = tuple(f.name for f in fields(ReportRow) if not f.name.startswith("_"))


@dataclass(frozen=True)
class Report:
    since: float
    until: float
    by: str
    rows: list[ReportRow]
    total: ReportRow

    def to_dict(self) -> dict[str, Any]:
        return {"since": self.since, "until": self.until, "by": self.by,
                "rows": [r.to_dict() for r in self.rows], "total": self.total.to_dict()}

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([self.by, *COLUMNS[1:]])
        for row in [*self.rows, self.total]:
            data = row.to_dict()
            writer.writerow([_cell(data[c]) for c in COLUMNS])
        return out.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".") or "0"
    return plain(value)  # a label a user chose reaches whoever reads the CSV as text


@dataclass
class _Lease:
    record: LeaseRecord
    granted_at: float
    devices: tuple[int, ...]
    memory_bytes: int
    ended_at: float | None = None
    waited_s: float | None = None
    idle: list[tuple[float, float | None]] = field(default_factory=list)


def _add(row: ReportRow, lease: _Lease, now: float, share: float) -> None:
    end = lease.ended_at if lease.ended_at is not None else min(now, lease.record.expires_at or now)
    hours = max(0.0, end - lease.granted_at) / 3600.0
    gpus = max(1, len(lease.devices))
    row.leases += 1
    row.gpu_hours_reserved += hours * gpus * share
    row.gib_hours_reserved += hours * gpus * share * lease.memory_bytes / GIB
    for start, stop in lease.idle:
        row.idle_gpu_hours += max(0.0, min(stop if stop is not None else end, end) - start) / 3600.0 * gpus * share
    if lease.record.gpu_seconds is not None:
        row.gpu_hours_used = (row.gpu_hours_used or 0.0) + lease.record.gpu_seconds / 3600.0 * share
    if lease.record.peak_memory_bytes is not None and lease.memory_bytes and hours > 0:
        row._peak_weight += hours * share
        row._peak_sum += hours * share * 100.0 * lease.record.peak_memory_bytes / lease.memory_bytes
        row.peak_percent = row._peak_sum / row._peak_weight
    if lease.waited_s is not None:
        row.wait_s += lease.waited_s


def build(lines: Iterable[tuple[Any, LeaseRecord | None]], *, since: float, now: float, by: str = "user",
          groups_of: Callable[[str], Iterable[str]] = lambda user: ()) -> Report:
    """The report over ``lines`` (the audit log, oldest first, each line with the record of its lease, or
    None where the lease is no longer on file) for leases granted in ``[since, now]``.

    A lease is added to its rows as its end is read, and forgotten: the report holds the leases still
    open at that point of the log, not every lease of the window."""
    if by not in BY:
        raise InvalidRequestError(f"cannot report by {by!r}: use one of {', '.join(BY)}")
    rows: dict[str, ReportRow] = {}
    total = ReportRow("TOTAL")

    def row(key: str) -> ReportRow:
        return rows.setdefault(key, ReportRow(key))

    def count(lease: _Lease) -> None:
        _add(total, lease, now, 1.0)
        owner, label = lease.record.owner, lease.record.label
        if by == "gpu":
            for index in lease.devices or (0,):
                _add(row(str(index)), lease, now, 1.0 / max(1, len(lease.devices)))
        else:
            for key in _keys(by, owner, label, groups_of):
                _add(row(key), lease, now, 1.0)

    leases: dict[str, _Lease] = {}  # granted in the window and not ended yet, as far as the log has been read
    counts: Counter[tuple[str, str, str | None]] = Counter()  # (kind, owner, label) of waits, refusals, ...
    for event, record in lines:
        detail = event.detail
        if event.event == "refused" and since <= event.at <= now:
            counts["refusals", str(detail.get("owner", event.user)), None] += 1
            continue
        if record is None:
            continue
        if event.event == "granted" and since <= event.at <= now:
            leases[event.lease_id] = _Lease(record, event.at, tuple(detail.get("devices", record.devices)),
                                            int(detail.get("memory_bytes", record.memory_bytes)),
                                            waited_s=detail.get("waited_s"))
        elif event.event in ("queued", "no-show", "booked") and since <= event.at <= now:
            kind = {"queued": "waits", "no-show": "no_shows", "booked": "bookings"}[event.event]
            counts[kind, record.owner, record.label] += 1
        lease = leases.get(event.lease_id)
        if lease is None:
            continue
        if event.event in END_EVENTS:
            lease.ended_at = float(detail.get("ended_at", event.at))
            count(leases.pop(event.lease_id))
        elif event.event == "idle":
            lease.idle.append((float(detail.get("since", event.at)), None))
        elif event.event == "active" and lease.idle and lease.idle[-1][1] is None:
            lease.idle[-1] = (lease.idle[-1][0], event.at)
    for lease in leases.values():  # still active
        count(lease)
    for (kind, owner, label), n in counts.items():
        setattr(total, kind, getattr(total, kind) + n)
        keys = ["-"] if by == "gpu" else _keys(by, owner, label, groups_of)
        for key in keys:
            setattr(row(key), kind, getattr(row(key), kind) + n)
    ordered = sorted(rows.values(), key=lambda r: (-r.gpu_hours_reserved, r.key))
    return Report(since, now, by, ordered, total)


def _keys(by: str, owner: str, label: str | None, groups_of: Callable[[str], Iterable[str]]) -> list[str]:
    if by == "user":
        return [owner]
    if by == "label":
        return [label or "-"]
    return sorted(set(groups_of(owner))) or ["-"]
