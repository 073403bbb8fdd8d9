"""Prometheus metrics: the text exposition format, for ``chronos metrics`` and node_exporter's
textfile collector. :func:`render` is pure; :func:`write_textfile` replaces the file atomically.

Names follow Prometheus's conventions: a ``chronos_`` prefix, base units (``_bytes``,
``_seconds``), ``_total`` for counters. Figures are per GPU and aggregated per user; no pid and no
lease label is ever a label, so the series stay few and say nothing a user did not choose to show.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from chronos.accounting import DeviceStatus
from chronos.model import LeaseRecord, LeaseState

__all__ = ["render", "write_textfile"]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, text: str, samples: Iterable[tuple[Mapping[str, str], float]]) -> None:
        self.lines.append(f"# HELP {name} {text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_number(value)}")


def render(devices: Sequence[DeviceStatus], live: Sequence[LeaseRecord], booked: Sequence[LeaseRecord], *,
           now: float, refusals: Mapping[str, int], counts: Mapping[str, int]) -> str:
    """The exposition text: GPUs, users, the queue, and counters from the audit log."""
    out = _Writer()

    def gpu(d: DeviceStatus) -> dict[str, str]:
        return {"gpu": str(d.index), "uuid": d.uuid}

    out.family("chronos_gpu_info", "gauge", "A GPU Chronos manages (its name as a label), always 1.",
               [({**gpu(d), "name": d.name}, 1) for d in devices])
    for field, text in (("memory_total_bytes", "GPU memory in all."),
                        ("memory_used_bytes", "GPU memory in use, as the driver reports it."),
                        ("memory_reserved_bytes", "GPU memory reserved by active leases."),
                        ("unmanaged_bytes", "GPU memory in use that no lease accounts for."),
                        ("memory_available_bytes", "GPU memory a new lease could still get.")):
        name = field if field.startswith("memory") else "memory_" + field
        out.family(f"chronos_gpu_{name}", "gauge", text, [(gpu(d), getattr(d, field)) for d in devices])
    out.family("chronos_gpu_leases", "gauge", "Active leases on a GPU.", [(gpu(d), d.active_leases) for d in devices])
    users = sorted({lease.owner for lease in [*live, *booked]})
    states = (LeaseState.ACTIVE, LeaseState.QUEUED, LeaseState.BOOKED)
    out.family("chronos_user_leases", "gauge", "A user's leases by state (booked: bookings to come).",
               [({"user": u, "state": str(s)}, sum(1 for x in [*live, *booked] if x.owner == u and x.state == s))
                for u in users for s in states])
    active = [lease for lease in live if lease.state == LeaseState.ACTIVE]

    def held(lease: LeaseRecord) -> int:
        return lease.memory_bytes * max(1, len(lease.devices))

    out.family("chronos_user_reserved_bytes", "gauge", "GPU memory a user's active leases reserve, over all GPUs.",
               [({"user": u}, sum(held(x) for x in active if x.owner == u)) for u in users])
    out.family("chronos_user_idle_bytes", "gauge", "GPU memory a user's idle leases (no GPU time used) reserve.",
               [({"user": u}, sum(held(x) for x in active if x.owner == u and x.idle_since is not None))
                for u in users])
    queued = [lease for lease in live if lease.state == LeaseState.QUEUED]
    out.family("chronos_queue_length", "gauge", "Requests waiting in the queue.", [({}, len(queued))])
    oldest = max((now - lease.created_at for lease in queued), default=0.0)
    out.family("chronos_queue_oldest_wait_seconds", "gauge", "How long the longest waiting request has waited.",
               [({}, round(max(0.0, oldest), 3))])
    out.family("chronos_refusals_total", "counter", "Requests refused, by reason (capacity, queue, booking, "
               "or the limit that refused them).", [({"reason": r}, n) for r, n in sorted(refusals.items())])
    for event, name, text in (("granted", "chronos_leases_granted_total", "Leases granted (bookings claimed too)."),
                              ("no-show", "chronos_booking_no_shows_total", "Bookings nobody claimed in time."),
                              ("idle-warning", "chronos_idle_warnings_total", "Warnings given to idle leases.")):
        out.family(name, "counter", text, [({}, counts.get(event, 0))])
    return "\n".join(out.lines) + "\n"


def write_textfile(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (a temporary file in the same directory, then a rename),
    as node_exporter's textfile collector asks, readable by everyone."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with_suppress_unlink(tmp)
        raise


def with_suppress_unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
