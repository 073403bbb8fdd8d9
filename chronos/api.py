"""The module-level calls, each a thin shim over the process's default engine.

These, the CLI, the magics, the provisioner and the Jupyter server extension are the only places
that fetch the default engine;
everything else is handed an engine. The default engine follows this process's settings
(:func:`chronos.settings.current`): change ``CHRONOS_STATE_DIR`` or ``CHRONOS_SIM_GPUS`` and the
next call uses a new one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from chronos import settings
from chronos.engine import DeviceStatus, Engine, WaitUpdate
from chronos.errors import InvalidRequestError
from chronos.lease import Lease
from chronos.limits import Limits
from chronos.model import Priority
from chronos.ops import EngineOps
from chronos.request import parse_request
from chronos.units import MemorySpec

if TYPE_CHECKING:  # loaded by the calls that use them: a CLI start that does not pays nothing for them
    from chronos import stats
    from chronos import status as status_module
    from chronos.policy import report as policy_report

__all__ = [
    "book",
    "bookings",
    "claim",
    "default_engine",
    "detailed_stats",
    "extend",
    "forecast",
    "get_lease",
    "gpus",
    "leases",
    "limits_for",
    "machine_status",
    "metrics",
    "queue",
    "release",
    "report",
    "reserve",
    "reset_default_engine",
    "suggest",
]

_default: EngineOps | None = None
_lock = threading.Lock()


def default_engine() -> EngineOps:
    """The engine for this process's current settings (a new one when they change).

    With a service configured (``CHRONOS_SERVER``, or ``server`` in the system file) it is the
    service's client, and this process never opens a ledger; otherwise the local engine.
    """
    global _default
    current = settings.current()
    with _lock:
        if _default is None or _default.settings is not current:
            if _default is not None:
                _default.close()
            if current.server is not None:
                from chronos.service.client import ServiceEngine

                _default = ServiceEngine(current.server, settings=current)
            else:
                _default = Engine(settings=current)
        return _default


def reset_default_engine() -> None:
    """Close the default engine and forget the settings; the next call reads them again."""
    global _default
    settings.refresh()
    with _lock:
        if _default is not None:
            _default.close()
        _default = None


def reserve(
    memory: str | int | float | MemorySpec,
    duration: str | int | float | None = None,
    *,
    device: int | str | Sequence[int] | None = None,
    gpus: int | None = None,
    prefer: int | str | Sequence[int] | None = None,
    priority: Priority | str | None = None,
    label: str | None = None,
    user: str | None = None,
    bind: bool | int = True,
    wait: bool | float | str | None = False,
    on_wait: Callable[[WaitUpdate], None] | None = None,
    idle_after: str | int | float | None = None,
    on_idle: str | None = None,
) -> Lease:
    """Reserve ``memory`` on GPUs for ``duration`` (default 1h) and return the lease.

    ``memory`` is ``"8G"``, ``"512M"``, ``"8GiB"``, ``"50%"`` or ``0.5`` (of each device); ``duration``
    is ``"2h"``, ``"90m"``, ``"1h30m"``, ``"45s"``, ``"1d"`` or seconds. ``device`` names one or more
    indices (all or none), ``gpus`` asks for N devices at once; otherwise the least-loaded device that
    fits is chosen. By default the lease is bound to the calling process and ends when it exits
    (``bind=False`` keeps it until released or expired; an int binds it to that pid). Without
    ``wait`` a request that does not fit now raises UnavailableError; ``wait=True`` (or
    ``"forever"``) queues it, ``wait="10m"`` (or seconds) queues it at most that long. ``idle_after``
    and ``on_idle`` add an idle rule of the lease's own (it can tighten the configured one, never lift it).
    A request its owner makes in the window of a matching booking of theirs claims that booking.
    """
    return default_engine().reserve(
        memory, duration, device=device, gpus=gpus, prefer=prefer, priority=priority, label=label, user=user,
        bind=bind, wait=wait, on_wait=on_wait, idle_after=idle_after, on_idle=on_idle,
    )


def book(memory: str | int | float | MemorySpec, duration: str | int | float | None, at: str | float, *,
         device: int | str | Sequence[int] | None = None, gpus: int | None = None, label: str | None = None,
         user: str | None = None) -> Lease:
    """Book ``memory`` per GPU for ``duration`` from ``at`` (``"tomorrow 09:00"``, ``"2026-12-24 14:00"``,
    ``"+2h"``, local time): a lease in state ``booked``, protected by the planner, claimed in its window."""
    return default_engine().book(memory, duration, at, device=device, gpus=gpus, label=label, user=user)


def claim(booking_id: str | int, *, bind: bool | int = True) -> Lease:
    """Claim a booking in its window; it becomes an active lease until the booking's end."""
    return default_engine().claim(str(booking_id), bind=bind)


def bookings(*, all: bool = False, user: str | None = None) -> list[Lease]:
    """Bookings to come, by start (every booking ever made with ``all=True``)."""
    return default_engine().bookings(all=all, user=user)


def report(since: str | int | float = "30d", by: str = "user") -> policy_report.Report:
    """Usage over the audit log since ``since`` (a duration back, or a time), by user, group, label or gpu."""
    import time

    from chronos.units import parse_duration, parse_instant

    try:
        start = time.time() - parse_duration(since)
    except InvalidRequestError:
        start = parse_instant(since)
    return default_engine().report(since=start, by=by)


def metrics() -> str:
    """The machine's figures in the Prometheus text exposition format."""
    return default_engine().metrics()


def limits_for(user: str | None = None) -> Limits:
    """A user's effective limits (default: yours), each with the rule that set it."""
    return default_engine().limits_for(user)


def release(lease_id: str | int) -> Lease:
    """End a lease by id (owner or admin only)."""
    return default_engine().release(str(lease_id))


def extend(lease_id: str | int, duration: str | int | float) -> Lease:
    """Push a lease's end back by ``duration`` (owner or admin only)."""
    return default_engine().extend(str(lease_id), duration)


def get_lease(lease_id: str | int) -> Lease:
    """One lease by id, in any state."""
    return default_engine().get(str(lease_id))


def leases(*, all: bool = False, user: str | None = None, limit: int | None = None,
           before: str | int | None = None) -> list[Lease]:
    """Active and queued leases; every lease with ``all=True``, newest first (``limit`` of them, older than
    lease ``before``: a page)."""
    return default_engine().leases(all=all, user=user, limit=limit, before=before)


def gpus() -> list[DeviceStatus]:
    """Every GPU with its memory total, used, reserved by leases and available (also ``chronos.devices()``)."""
    return default_engine().devices()


def queue() -> list[stats.QueueEntry]:
    """Every queued request in grant order, with its position and estimated start."""
    from chronos import stats

    return stats.queue(default_engine())


def suggest(user: str | None = None) -> stats.Suggestion:
    """Advice for your next request (or ``user``'s): how much, how long, where, and the command."""
    from chronos import stats

    return stats.suggest(default_engine(), user)


def detailed_stats(user: str | None = None) -> stats.DetailedStats:
    """Per-GPU reserved against used memory, and GPU-hours (every user's, or only ``user``'s)."""
    from chronos import stats

    return stats.detailed(default_engine(), user=user)


def forecast(
    memory: str | int | float | MemorySpec,
    duration: str | int | float | None = None,
    *,
    device: int | str | Sequence[int] | None = None,
    gpus: int | None = None,
    prefer: int | str | Sequence[int] | None = None,
    priority: Priority | str | None = None,
    user: str | None = None,
) -> status_module.Forecast:
    """Whether ``reserve`` with these arguments would be granted now, else its place and estimated start.

    Nothing is reserved. A request that would be refused outright (bad input, a configured limit)
    comes back with ``error`` set rather than raising, so a front end can show every answer alike.
    """
    spec = parse_request(memory, duration, device=device, gpus=gpus, prefer=prefer, priority=priority)
    from chronos import status as status_module

    return status_module.forecast(default_engine(), spec, user=user)


def machine_status(user: str | None = None) -> status_module.MachineStatus:
    """Every GPU, your leases (or ``user``'s) live and recently ended, and the queue, in one snapshot."""
    from chronos import status as status_module

    return status_module.machine_status(default_engine(), user=user)
