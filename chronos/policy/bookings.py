"""Bookings: capacity booked ahead for a window, protected by the planner, claimed by its owner.

A booking is a lease row in state ``booked`` with a planned start (``starts_at``), its GPUs chosen
when it is made. The planner holds its memory over its window as it holds a queued request's slot
(:class:`chronos.scheduler.Booked`): a lease, an extension or a backfill that would run into it is
refused, and it is placed only where it delays no queued request. From its start until
``booking_grace`` later its owner claims it (:func:`claim`, or any matching request of theirs,
which :func:`claim_matching` catches); it then becomes an active lease with the same id, ending at
the booking's end. Unclaimed after the grace, it ends as a ``no-show``.

The checks (:func:`check`) are pure; :func:`book`, :func:`claim` and :func:`claim_matching` run inside
the engine (the ``Engine`` methods of the same names call them).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any, Protocol

from chronos import scheduler
from chronos.devices.base import Device, GpuProcess
from chronos.errors import LimitError, UnavailableError
from chronos.identity import User
from chronos.lease import Lease
from chronos.limits import Limits, RequestInfo
from chronos.model import LeaseRecord, LeaseState, Priority
from chronos.request import RequestSpec
from chronos.units import format_bytes, format_duration, format_instant, local_epoch

__all__ = ["EngineCore", "book", "check", "claim", "claim_matching", "matches", "week_of"]

#: A booking may start this long in the past ("now" typed a moment ago).
PAST_SLACK_S = 60.0


class EngineCore(Protocol):
    """The engine internals a booking operation runs with."""

    @property
    def ledger(self) -> Any: ...

    @property
    def policies(self) -> Any: ...

    def _poll_devices(self) -> tuple[list[Device], list[GpuProcess]]: ...

    def _reclaim(self, now: float, who: User) -> list[LeaseRecord]: ...

    def _snapshot(self, now: float, devices: list[Device], gpu_procs: list[GpuProcess],
                  live: list[LeaseRecord]) -> scheduler.Snapshot: ...

    def _event(self, lease_id: str, event: str, who: User, detail: dict[str, Any] | None = None) -> None: ...

    def _handle(self, record: LeaseRecord) -> Lease: ...


def week_of(epoch: float) -> tuple[float, float]:
    """The local calendar week (Monday 00:00 to the next Monday) that ``epoch`` falls in."""
    day = time.localtime(epoch)
    monday = local_epoch(day.tm_year, day.tm_mon, day.tm_mday) - day.tm_wday * 86400.0
    start = time.localtime(monday + 43200)  # noon of that Monday, so that DST shifts do not matter
    first = local_epoch(start.tm_year, start.tm_mon, start.tm_mday)
    after = time.localtime(first + 7 * 86400 + 43200)
    return first, local_epoch(after.tm_year, after.tm_mon, after.tm_mday)


def _gpu_hours(booking: LeaseRecord) -> float:
    return booking.duration_s * max(1, len(booking.devices))


def check(mine: Limits, user: str, start: float, duration_s: float, gpus: int, now: float,
          open_bookings: int, booked_that_week: Iterable[LeaseRecord]) -> None:
    """Raise LimitError when a booking breaks one of ``user``'s booking limits (:mod:`chronos.limits`)."""
    lead = mine.max_booking_lead_s
    if lead is not None and start - now > lead:
        raise LimitError("max_booking_lead",
                         f"{format_instant(start)} is more than {format_duration(lead)} ahead, the furthest a "
                         f"booking may start ({mine.rule('max_booking_lead_s')}); book nearer the time")
    count = mine.max_bookings_per_user
    if count is not None and open_bookings + 1 > count:
        raise LimitError("max_bookings_per_user",
                         f"{user} already has {open_bookings} booking(s) to come, the maximum of {count} per user "
                         f"({mine.rule('max_bookings_per_user')}); cancel one with chronos release ID")
    limit = mine.max_booked_s_per_week
    if limit is not None:
        held = sum(_gpu_hours(b) for b in booked_that_week)
        wanted = duration_s * gpus
        if held + wanted > limit + 1e-6:
            monday = time.strftime("%Y-%m-%d", time.localtime(week_of(start)[0]))
            raise LimitError("max_booked_hours_per_week",
                             f"{user} has booked {format_duration(held)} of GPU time in the week of {monday}; "
                             f"{format_duration(wanted)} more would pass the maximum of {format_duration(limit)} "
                             f"per week ({mine.rule('max_booked_s_per_week')})")


def book(engine: EngineCore, owner: User, caller: User, spec: RequestSpec, start: float) -> Lease:
    """Book ``spec`` for ``owner`` from ``start``; see the module doc. Refusals: LimitError (exit 4),
    UnavailableError (exit 3, naming the earliest start that would fit), InvalidRequestError (exit 2)."""
    from chronos import limits

    duration_s = spec.duration_s if spec.duration_s is not None else engine.policies.config.default_duration_s
    devices, gpu_procs = engine._poll_devices()
    request = scheduler.Request(memory=spec.memory, duration_s=duration_s, gpus=spec.count, devices=spec.devices,
                                prefer=spec.prefer, lease_id=None)
    mine: Limits = engine.policies.limits_of(owner)
    with engine.ledger.transaction():
        now = time.time()
        if start < now - PAST_SLACK_S:
            raise UnavailableError(f"{format_instant(start)} has passed; book a time to come")
        start = max(start, now)
        live = engine._reclaim(now, caller)
        snapshot = engine._snapshot(now, devices, gpu_procs, live)
        scheduler.validate(snapshot, request)
        info = limits.request_info(request, snapshot)
        limits.check(mine, RequestInfo(info.memory_bytes, info.gpus, duration_s, Priority.NORMAL), owner.name, (),
                     limits.Usage())
        week = week_of(start)
        theirs = [b for b in engine.ledger.bookings_of(owner.uid, week[0] - 7 * 86400, week[1])
                  if b.state != LeaseState.WITHDRAWN]
        check(mine, owner.name, start, duration_s, info.gpus, now,
              sum(1 for b in engine.ledger.booked() if b.uid == owner.uid),
              [b for b in theirs if b.starts_at is not None and week[0] <= b.starts_at < week[1]])
        slot = scheduler.place_booking(snapshot, request, start)
        if slot.start != start:
            later = "" if math.isinf(slot.start) else \
                f"; the earliest it could start is {format_instant(slot.start)}"
            raise UnavailableError(f"no room for {spec.memory} x {info.gpus} GPU(s) for {format_duration(duration_s)} "
                                   f"from {format_instant(start)}: leases, bookings or queued requests hold it{later}")
        by_index = {d.index: d.uuid for d in devices}
        record = LeaseRecord(
            id="", owner=owner.name, uid=owner.uid, devices=slot.devices,
            device_uuids=tuple(by_index[i] for i in slot.devices), memory_bytes=slot.memory_bytes,
            created_at=now, expires_at=None, duration_s=duration_s, state=LeaseState.BOOKED, label=spec.label,
            starts_at=start,
        )
        record = replace(record, id=engine.ledger.insert(record, request.to_json(False)))
        engine.policies.changed(record.id)
        engine._event(record.id, "booked", caller, {
            "starts_at": start, "ends_at": start + duration_s, "devices": list(slot.devices),
            "memory_bytes": slot.memory_bytes, "owner": owner.name})
    return engine._handle(record)


def _claim(engine: EngineCore, booking: LeaseRecord, caller: User, holder: tuple[int, float] | None, now: float,
           label: str | None = None) -> LeaseRecord:
    """Turn ``booking`` into an active lease (inside the caller's transaction)."""
    assert booking.starts_at is not None
    end = booking.starts_at + booking.duration_s
    fields: dict[str, Any] = {"state": LeaseState.ACTIVE, "started_at": now, "expires_at": end,
                              "pid": holder[0] if holder else None, "pid_start": holder[1] if holder else None}
    if label and not booking.label:
        fields["label"] = label
    engine.ledger.update(booking.id, **fields)
    engine.policies.changed(booking.id)
    claimed = replace(booking, state=LeaseState.ACTIVE, started_at=now, expires_at=end, pid=fields["pid"],
                      pid_start=fields["pid_start"], label=fields.get("label", booking.label))
    engine._event(booking.id, "granted", caller, {
        "devices": list(claimed.devices), "memory_bytes": claimed.memory_bytes, "expires_at": end,
        "priority": str(claimed.priority), "holder": claimed.pid, "booking": True,
        "late_s": round(max(0.0, now - booking.starts_at), 3)})
    return claimed


def _window(booking: LeaseRecord, grace_s: float, now: float) -> str | None:
    """Why ``booking`` cannot be claimed at ``now``; None when it can."""
    assert booking.starts_at is not None
    if now < booking.starts_at:
        return (f"booking {booking.id} starts at {format_instant(booking.starts_at)} "
                f"(in {format_duration(booking.starts_at - now)}); claim it then")
    return None


def claim(engine: EngineCore, booking_id: str, caller: User, holder: tuple[int, float] | None,
          owned: Any, usage_check: Any) -> Lease:
    """Claim booking ``booking_id`` for its owner (``owned`` checks who may; ``usage_check`` the per-user limits)."""
    with engine.ledger.transaction():
        now = time.time()
        engine._reclaim(now, caller)
        booking = owned(booking_id, caller, "claim")
        if booking.state != LeaseState.BOOKED:
            if booking.starts_at is None:
                raise UnavailableError(f"lease {booking.id} is not a booking; see chronos bookings")
            raise UnavailableError(f"booking {booking.id} is {booking.state}"
                                   + (f" ({booking.end_reason})" if booking.end_reason else ""))
        why = _window(booking, engine.policies.grace_of(booking), now)
        if why:
            raise UnavailableError(why)
        usage_check(booking)
        claimed = _claim(engine, booking, caller, holder, now)
    return engine._handle(claimed)


def matches(booking: LeaseRecord, spec: RequestSpec, totals: dict[int, int],
            visible: Sequence[int] | None) -> bool:
    """Whether a request fits what ``booking`` holds: as many GPUs, the same ones if named, no more memory."""
    if spec.count != len(booking.devices):
        return False
    if spec.devices is not None and set(spec.devices) != set(booking.devices):
        return False
    if visible is not None and not set(booking.devices) <= set(visible):
        return False
    need = max((spec.memory.resolve(totals.get(i, 0)) for i in booking.devices), default=0)
    return 0 < need <= booking.memory_bytes


def claim_matching(engine: EngineCore, owner: User, caller: User, spec: RequestSpec, holder: tuple[int, float] | None,
                   now: float, devices: list[Device], visible: Sequence[int] | None) -> LeaseRecord | None:
    """Inside a request's write: its owner's booking in its window that the request fits, claimed; or None."""
    if spec.wait_s is not None and spec.wait_s < 0:
        return None
    mine = [b for b in engine.policies.started(now) if b.uid == owner.uid]
    if not mine:
        return None
    totals = {d.index: d.memory_total_bytes for d in devices}
    for booking in mine:
        if booking.uid != owner.uid or booking.starts_at is None or now < booking.starts_at:
            continue
        if matches(booking, spec, totals, visible):
            return _claim(engine, booking, caller, holder, now, spec.label)
    return None


def describe(booking: LeaseRecord) -> str:
    """One line about a booking, naming its id and window."""
    assert booking.starts_at is not None
    gpus = ",".join(str(i) for i in booking.devices)
    return (f"booking {booking.id}: {format_bytes(booking.memory_bytes)} on GPU {gpus} from "
            f"{format_instant(booking.starts_at)} for {format_duration(booking.duration_s)}")
