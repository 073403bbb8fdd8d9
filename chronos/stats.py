"""Figures over the ledger: the queue with start estimates, device detail, GPU-hours, and suggestions.

The functions named ``*_from`` (and ``gpu_hours``) are pure: they take what the engine already
knows (a scheduler snapshot, leases, device status) and compute, so they are tested with plain
data. ``queue``, ``detailed`` and ``suggest`` gather that data from an engine and call them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from chronos import scheduler
from chronos.engine import DeviceStatus
from chronos.identity import current_user
from chronos.model import LeaseRecord, LeaseState
from chronos.ops import EngineOps
from chronos.policy import fairshare
from chronos.units import MemorySpec, duration_text, format_bytes, format_duration, size_text

__all__ = [
    "DAY",
    "WEEK",
    "DetailedStats",
    "DeviceDetail",
    "QueueEntry",
    "Suggestion",
    "UserUsage",
    "detailed",
    "detailed_from",
    "gpu_hours",
    "queue",
    "queue_from",
    "suggest",
    "suggest_from",
]

DAY = 86400.0
WEEK = 7 * DAY
GIB = 1 << 30


# -- the queue ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueueEntry:
    """One queued request: its place, who asked, what for, and when it is expected to start."""

    lease_id: str
    position: int
    owner: str
    priority: str
    memory: str
    memory_bytes: int | None
    gpus: int
    devices_wanted: tuple[int, ...] | None
    duration_s: float
    queued_at: float
    estimated_start: float | None
    planned_devices: tuple[int, ...]
    label: str | None = None
    #: Why it stands where it does (its class, with fair share its owner's recent use, its arrival).
    why: str = ""
    #: With fair share, its owner's decayed recent use in GiB·h (None when fair share is off).
    owner_use_gib_hours: float | None = None

    @property
    def wanted(self) -> str:
        """``GPU 1,3``, ``any GPU`` or ``any 2 GPUs``."""
        if self.devices_wanted is not None:
            return "GPU " + ",".join(str(i) for i in self.devices_wanted)
        return "any GPU" if self.gpus == 1 else f"any {self.gpus} GPUs"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["devices_wanted"] = list(self.devices_wanted) if self.devices_wanted is not None else None
        data["planned_devices"] = list(self.planned_devices)
        data["wanted"] = self.wanted
        return data


def queue_from(snapshot: scheduler.Snapshot, leases: Iterable[LeaseRecord],
               half_life_s: float | None = None) -> list[QueueEntry]:
    """The queued requests of ``snapshot`` in grant order, joined with their leases for owner and label.

    ``half_life_s`` is fair share's half-life when it is on (the requests' ``share`` is then their owner's
    recent use), so that each entry can say why it stands where it does.
    """
    by_id = {lease.id: lease for lease in leases}
    requests = {r.lease_id: r for r in snapshot.queue}
    out = []
    previous: fairshare.Standing | None = None
    for slot in scheduler.plan(snapshot):
        if slot.lease_id is None:
            continue
        request = requests[slot.lease_id]
        lease = by_id.get(slot.lease_id)
        count = len(request.devices) if request.devices is not None else request.gpus
        standing = fairshare.Standing(lease.owner if lease is not None else "?", str(request.priority),
                                      request.share if half_life_s is not None else None,
                                      lease.created_at if lease is not None else snapshot.now)
        out.append(QueueEntry(
            lease_id=slot.lease_id,
            position=slot.position,
            owner=lease.owner if lease is not None else "?",
            priority=str(request.priority),
            memory=str(request.memory),
            memory_bytes=request.memory.nbytes,
            gpus=count,
            devices_wanted=request.devices,
            duration_s=request.duration_s,
            queued_at=lease.created_at if lease is not None else snapshot.now,
            estimated_start=None if math.isinf(slot.start) else slot.start,
            planned_devices=slot.devices,
            label=lease.label if lease is not None else None,
            why=fairshare.explain(standing, previous, half_life_s),
            owner_use_gib_hours=round(request.share, 3) if half_life_s is not None else None,
        ))
        previous = standing
    return out


# -- devices and users --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceDetail:
    """One GPU: memory reserved by leases against memory really used, utilisation, and its queue."""

    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_reserved_bytes: int
    memory_used_bytes: int
    memory_used_in_leases_bytes: int
    unmanaged_bytes: int
    memory_available_bytes: int
    active_leases: int
    utilization_percent: int | None
    queued: int
    peak_in_leases_bytes: int | None

    @property
    def reserved_used_percent(self) -> float | None:
        """How much of the reserved memory is in use now (None with nothing reserved)."""
        if not self.memory_reserved_bytes:
            return None
        return 100.0 * self.memory_used_in_leases_bytes / self.memory_reserved_bytes

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["reserved_used_percent"] = self.reserved_used_percent
        return data


@dataclass(frozen=True)
class UserUsage:
    """One user's leases over the last day and week, in GPU-hours held (devices x hours)."""

    user: str
    gpu_hours_day: float
    gpu_hours_week: float
    leases_day: int
    leases_week: int
    active: int
    queued: int
    peak_to_cap_percent: float | None = None
    #: GPU-hours held by leases of the last week while they used no GPU time (the idle policy's view).
    idle_gpu_hours_week: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DetailedStats:
    devices: list[DeviceDetail]
    users: list[UserUsage]
    queue_length: int
    now: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "now": self.now,
            "queue_length": self.queue_length,
            "devices": [d.to_dict() for d in self.devices],
            "users": [u.to_dict() for u in self.users],
        }


def _held(lease: LeaseRecord, now: float, since: float) -> float:
    """Device-seconds ``lease`` held within ``[since, now]``."""
    if lease.started_at is None:
        return 0.0
    active = lease.state == LeaseState.ACTIVE
    end = lease.ended_at if lease.ended_at is not None else (now if active else lease.started_at)
    if active and lease.expires_at is not None:
        end = min(end, lease.expires_at)
    span = min(end, now) - max(lease.started_at, since)
    return max(0.0, span) * max(1, len(lease.devices))


def gpu_hours(leases: Iterable[LeaseRecord], now: float, window_s: float) -> dict[str, float]:
    """GPU-hours held per user over the last ``window_s`` seconds (a 2-GPU lease for 1h is 2)."""
    out: dict[str, float] = {}
    for lease in leases:
        held = _held(lease, now, now - window_s)
        if held > 0:
            out[lease.owner] = out.get(lease.owner, 0.0) + held / 3600.0
    return out


def detailed_from(devices: Sequence[DeviceStatus], snapshot: scheduler.Snapshot, leases: Sequence[LeaseRecord],
                  now: float, idle_week: dict[str, float] | None = None) -> DetailedStats:
    """Per-device and per-user figures from device status, the scheduler's snapshot and every lease
    (``idle_week``: each user's idle GPU-hours over the last week, from the report)."""
    planned: dict[int, int] = {}
    for slot in scheduler.plan(snapshot) if snapshot.queue else []:
        for index in slot.devices:
            planned[index] = planned.get(index, 0) + 1
    active = [lease for lease in leases if lease.state == LeaseState.ACTIVE]
    out = []
    for d in devices:
        mine = [lease for lease in active if d.index in lease.devices]
        peaks = [lease.peak_memory_bytes for lease in mine if lease.peak_memory_bytes is not None]
        out.append(DeviceDetail(
            index=d.index, uuid=d.uuid, name=d.name, memory_total_bytes=d.memory_total_bytes,
            memory_reserved_bytes=d.memory_reserved_bytes, memory_used_bytes=d.memory_used_bytes,
            memory_used_in_leases_bytes=max(0, d.memory_used_bytes - d.unmanaged_bytes),
            unmanaged_bytes=d.unmanaged_bytes, memory_available_bytes=d.memory_available_bytes,
            active_leases=d.active_leases, utilization_percent=d.utilization_percent,
            queued=planned.get(d.index, 0), peak_in_leases_bytes=sum(peaks) if peaks else None,
        ))
    day = gpu_hours(leases, now, DAY)
    week = gpu_hours(leases, now, WEEK)
    users = sorted({lease.owner for lease in leases})
    usage = []
    for user in users:
        theirs = [lease for lease in leases if lease.owner == user]
        started = [lease for lease in theirs if lease.started_at is not None]
        ratios = [100.0 * lease.peak_memory_bytes / lease.memory_bytes for lease in started
                  if lease.peak_memory_bytes is not None and lease.memory_bytes > 0
                  and (lease.started_at or 0) >= now - WEEK]
        usage.append(UserUsage(
            user=user,
            gpu_hours_day=round(day.get(user, 0.0), 3),
            gpu_hours_week=round(week.get(user, 0.0), 3),
            leases_day=sum(1 for lease in started if _held(lease, now, now - DAY) > 0),
            leases_week=sum(1 for lease in started if _held(lease, now, now - WEEK) > 0),
            active=sum(1 for lease in theirs if lease.state == LeaseState.ACTIVE),
            queued=sum(1 for lease in theirs if lease.state == LeaseState.QUEUED),
            peak_to_cap_percent=round(sum(ratios) / len(ratios), 1) if ratios else None,
            idle_gpu_hours_week=round((idle_week or {}).get(user, 0.0), 3),
        ))
    usage.sort(key=lambda u: (-u.gpu_hours_week, u.user))
    return DetailedStats(devices=out, users=usage, queue_length=len(snapshot.queue), now=now)


# -- suggestions ----------------------------------------------------------------------------------------
#: Memory headroom over the peak a user's past leases really used.
MEMORY_HEADROOM = 1.2
#: Time headroom over how long a user's past leases were really held.
TIME_HEADROOM = 1.25
#: How many of the user's most recent leases are looked at.
HISTORY = 20
DEFAULT_MEMORY = 8 * GIB


@dataclass(frozen=True)
class Suggestion:
    """Advice for the next request: how much, how long, where, and the command that asks for it."""

    memory_bytes: int
    duration_s: float
    device: int | None
    fits_now: bool
    estimated_start: float | None
    command: str
    reasons: list[str] = field(default_factory=list)
    based_on: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _round_memory(nbytes: float) -> int:
    """Up to a whole GiB from 1 GiB, else to 256 MiB."""
    step = GIB if nbytes >= GIB else 256 << 20
    return max(step, math.ceil(nbytes / step) * step)


def _round_duration(seconds: float) -> float:
    """Up to 15 minutes below 2 hours, else to the half hour."""
    step = 900 if seconds < 7200 else 1800
    return float(max(step, math.ceil(seconds / step) * step))


def suggest_from(snapshot: scheduler.Snapshot, history: Sequence[LeaseRecord], *, default_duration_s: float = 3600.0,
                 max_duration_s: float | None = None, max_memory_bytes: int | None = None) -> Suggestion:
    """Advice from the machine now (``snapshot``) and the caller's own past leases (``history``).

    Memory: the peak the user's recent leases really used, where the watchdog recorded one, plus
    20% headroom; else what they usually asked for; else 8 GiB. Time: how long their recent leases
    were really held, plus 25%; longer when most of them ran to their end. Device: where that fits
    now without delaying the queue, else where it would start first.
    """
    recent = sorted((lease for lease in history if lease.state != LeaseState.QUEUED),
                    key=lambda lease: lease.created_at, reverse=True)[:HISTORY]
    reasons: list[str] = []
    largest = max((d.total_bytes - d.unmanaged_bytes for d in snapshot.devices), default=0)
    peaks = [lease.peak_memory_bytes for lease in recent if lease.peak_memory_bytes]
    if peaks:
        peak = _percentile(peaks, 0.9)
        memory = _round_memory(peak * MEMORY_HEADROOM)
        reasons.append(f"your last {len(peaks)} lease(s) with a recorded peak used up to {format_bytes(peak)} "
                       f"(90th percentile); +{round((MEMORY_HEADROOM - 1) * 100)}% headroom")
    elif recent:
        asked = [lease.memory_bytes for lease in recent if lease.memory_bytes]
        memory = _round_memory(_percentile(asked, 0.5)) if asked else DEFAULT_MEMORY
        reasons.append(f"no peak memory recorded yet; what you usually ask for ({len(asked)} lease(s))")
    else:
        memory = DEFAULT_MEMORY
        reasons.append("no leases of yours yet; a common starting size")
    if max_memory_bytes is not None and memory > max_memory_bytes:
        memory = max_memory_bytes
        reasons.append(f"capped at the limit of {format_bytes(max_memory_bytes)} per lease")
    if largest and memory > largest:
        memory = largest
        reasons.append(f"capped at the largest GPU's {format_bytes(largest)}")

    ended = [lease for lease in recent if lease.started_at is not None and lease.ended_at is not None]
    ran_out = [lease for lease in ended if lease.state == LeaseState.EXPIRED]
    if ended and len(ran_out) * 2 >= len(ended):
        longest = max(lease.duration_s for lease in ran_out)
        duration = _round_duration(longest * 1.5)
        reasons.append(f"{len(ran_out)} of your last {len(ended)} lease(s) ran to their end; "
                       f"asking for 1.5x the longest ({format_duration(longest)})")
    elif ended:
        used = [max(1.0, (lease.ended_at or 0) - (lease.started_at or 0)) for lease in ended]
        held = _percentile(used, 0.75)
        duration = _round_duration(held * TIME_HEADROOM)
        reasons.append(f"your last {len(ended)} lease(s) were held up to {format_duration(held)} "
                       f"(75th percentile); +{round((TIME_HEADROOM - 1) * 100)}%")
    else:
        duration = default_duration_s
        reasons.append(f"the default duration ({format_duration(default_duration_s)})")
    if max_duration_s is not None and duration > max_duration_s:
        duration = max_duration_s
        reasons.append(f"capped at the limit of {format_duration(max_duration_s)} per lease")

    device: int | None = None
    start: float | None = None
    fits_now = False
    if snapshot.devices:
        request = scheduler.Request(memory=MemorySpec(nbytes=memory), duration_s=duration)
        decision = scheduler.decide(snapshot, request)
        if decision.granted and decision.devices:
            device, fits_now, start = decision.devices[0], True, snapshot.now
            reasons.append(f"GPU {device} has room now ({format_bytes(decision.free_bytes.get(device, 0))} free)")
        else:
            slot = scheduler.forecast(snapshot, request)
            if slot.devices and not math.isinf(slot.start):
                device, start = slot.devices[0], slot.start
                reasons.append(f"nothing fits now; GPU {device} is expected first, "
                               f"in about {format_duration(slot.start - snapshot.now)}")
            else:
                reasons.append("nothing fits now and no known end time frees enough memory")
    command = f"chronos reserve {size_text(memory)} {duration_text(math.ceil(duration / 60) * 60)}"
    if device is not None:
        command += f" --prefer {device}"
    if not fits_now:
        command += " --wait"
    return Suggestion(memory_bytes=memory, duration_s=duration, device=device, fits_now=fits_now,
                      estimated_start=start, command=command, reasons=reasons, based_on=len(recent))


# -- gathering from an engine ------------------------------------------------------------------------------
def queue(engine: EngineOps) -> list[QueueEntry]:
    """Every queued request in grant order with its estimated start and why it stands there."""
    snapshot, live = engine.snapshot()
    config = engine.config
    return queue_from(snapshot, [lease.record for lease in live],
                      config.fair_share_half_life_s if config.fair_share else None)


def detailed(engine: EngineOps, *, user: str | None = None) -> DetailedStats:
    """Device detail and GPU-hours (every user's, or only ``user``'s)."""
    import time

    devices = engine.devices()
    snapshot, _ = engine.snapshot()
    now = time.time()
    # Only the week the figures cover is read: the cost does not grow with the ledger's history.
    history = [lease.record for lease in engine.leases(ended_since=now - WEEK, user=user)]
    idle_week = {row.key: row.idle_gpu_hours for row in engine.report(since=now - WEEK).rows}
    return detailed_from(devices, snapshot, history, now, idle_week)


def suggest(engine: EngineOps, user: str | None = None) -> Suggestion:
    """Advice for your next request (or ``user``'s) from the machine now and your past leases."""
    import time

    snapshot, _ = engine.snapshot()
    name = user or current_user().name
    # The newest HISTORY leases that are not queued: one page of the owner index, whatever the history's size.
    waiting = sum(1 for lease in engine.leases(user=name) if lease.state == LeaseState.QUEUED)
    history = [lease.record for lease in engine.leases(all=True, user=name, limit=HISTORY + waiting)]
    config = engine.config
    advice = suggest_from(snapshot, history, default_duration_s=config.default_duration_s,
                          max_duration_s=config.max_duration_s, max_memory_bytes=config.max_memory_per_lease_bytes)
    now = time.time()
    for booking in engine.bookings(user=name):
        if booking.starts_at is not None and booking.starts_at <= now:
            advice.reasons.insert(0, f"your booking {booking.id} is in its window: chronos claim {booking.id} "
                                     f"(or any request of yours that fits it claims it)")
    return advice
