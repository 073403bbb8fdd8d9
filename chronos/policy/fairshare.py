"""Fair share: each owner's recent use of GPU memory, decayed, to order a priority class. Pure.

Use is GiB of GPU memory held times hours held (a lease of 8 GiB on each of 2 GPUs for 3 hours is
48 GiB·h), each moment weighted by ``2 ** -(age / half_life)``: use a half-life ago counts half.
Within a priority class the scheduler grants the owner with less recent use first; an owner's own
requests stay first come, first served. The scheduler's guarantees are unchanged: a request is
granted at once only if it delays no request ahead of it in this order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from chronos.model import LeaseRecord, LeaseState
from chronos.units import format_duration

__all__ = ["GIB_HOUR", "HORIZON_HALF_LIVES", "Standing", "explain", "horizon", "shares_of", "usage"]

GIB_HOUR = float((1 << 30) * 3600)
#: Use older than this many half-lives (under 0.4%) is left out.
HORIZON_HALF_LIVES = 8


def horizon(now: float, half_life_s: float) -> float:
    """The oldest end time whose use still counts."""
    return now - HORIZON_HALF_LIVES * half_life_s


def _decayed(start: float, end: float, now: float, half_life_s: float) -> float:
    """Integral over [start, end] of 2 ** -((now - t) / half_life) dt, in seconds."""
    if end <= start:
        return 0.0
    rate = math.log(2) / half_life_s
    return (math.exp(-rate * (now - end)) - math.exp(-rate * (now - start))) / rate


def usage(leases: Iterable[LeaseRecord], now: float, half_life_s: float) -> dict[str, float]:
    """Decayed GiB·h per owner over ``leases`` (active ones up to ``now``)."""
    out: dict[str, float] = {}
    for lease in leases:
        if lease.started_at is None:
            continue
        if lease.state == LeaseState.ACTIVE:
            end = min(now, lease.expires_at or now)
        elif lease.ended_at is not None:
            end = lease.ended_at
        else:
            continue
        weight = _decayed(lease.started_at, min(end, now), now, half_life_s)
        held = lease.memory_bytes * max(1, len(lease.devices)) * weight / GIB_HOUR
        if held > 0:
            out[lease.owner] = out.get(lease.owner, 0.0) + held
    return out


@dataclass(frozen=True)
class Standing:
    """Why a queued request stands where it does: its class, its owner's recent use, its arrival."""

    owner: str
    priority: str
    gib_hours: float | None
    queued_at: float


def explain(mine: Standing, ahead: Standing | None, half_life_s: float | None) -> str:
    """One line: why ``mine`` comes after ``ahead`` (the request just before it), and its owner's use."""
    use = ""
    if half_life_s is not None and mine.gib_hours is not None:
        use = f"{mine.owner} used {mine.gib_hours:.1f} GiB·h recently (half-life {format_duration(half_life_s)})"
    if ahead is None:
        head = f"first: {mine.priority} priority, the highest waiting"
        return f"{head}; {use}" if use else head
    if ahead.priority != mine.priority:
        why = f"after a {ahead.priority} priority request"
    elif half_life_s is not None and ahead.owner != mine.owner and (ahead.gib_hours or 0) < (mine.gib_hours or 0):
        why = f"after {ahead.owner}, who used less ({ahead.gib_hours or 0:.1f} GiB·h)"
    else:
        why = f"after a {mine.priority} priority request queued earlier"
    return f"{why}; {use}" if use else why


def shares_of(owners: Mapping[str, str], used: Mapping[str, float]) -> dict[str, float]:
    """``lease id -> its owner's use`` for the scheduler, from ``lease id -> owner``."""
    return {lease_id: used.get(owner, 0.0) for lease_id, owner in owners.items()}
