"""Idle leases: no SM time used by a lease's processes for a configured window. Pure: no I/O here.

A sample (:func:`attribute`) says which active leases it judged and which of them had a member
process (:class:`chronos.accounting.Membership`'s rule, the one admission and the watchdog use) using
SM time on one of the lease's GPUs; a process whose use the driver cannot report counts as busy, so
"unknown" is never taken for "idle". A lease with no process at all is idle.

:func:`evaluate` turns a sample and the leases' rules into transitions. ``idle_since`` is the time of
the first sample in an idle spell that saw the lease idle (time nobody observed is never counted), a
warning comes before any action, and the action comes no earlier than the warning's full lead after
the warning was given, however sparse the samples. GPU use, or an extension, ends the spell.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from chronos.accounting import Judge
from chronos.devices.base import ProcessUtilization
from chronos.model import IdleNotice, LeaseRecord, LeaseState, OnIdle
from chronos.units import format_clock, format_duration

__all__ = ["IdleDecision", "IdleRule", "Sample", "attribute", "evaluate", "plan", "rule_from_json", "rule_json"]


@dataclass(frozen=True)
class IdleRule:
    """Act (``action``) on a lease idle for ``after_s``; warn ``warning_s`` before (at ``after_s`` for warn)."""

    after_s: float
    action: OnIdle = OnIdle.RELEASE
    warning_s: float = 300.0


def plan(rules: Iterable[IdleRule]) -> tuple[float | None, float | None, OnIdle | None, float]:
    """``(warn at, act at, action, warning lead)`` in idle seconds for a lease under all of ``rules``.

    Every rule holds: a kernelspec's own rule can add a stricter one, never lift the system's. The
    first acting rule (release or terminate) decides the action; warnings come at a warn-only rule's
    window or the acting rule's window less its warning, whichever is first.
    """
    rules = list(rules)
    acting = sorted((r for r in rules if r.action != OnIdle.WARN), key=lambda r: (r.after_s, -r.action.rank))
    act = acting[0] if acting else None
    points = [r.after_s for r in rules if r.action == OnIdle.WARN]
    lead = 0.0
    if act is not None:
        lead = min(act.warning_s, act.after_s)
        points.append(act.after_s - lead)
    return (min(points) if points else None, act.after_s if act else None, act.action if act else None, lead)


@dataclass(frozen=True)
class Sample:
    """One look at the GPUs: when, which active leases it judged (with the end each had then, so an
    extension since is noticed), and which of those were busy."""

    at: float
    judged: Mapping[str, float | None]
    busy: frozenset[str]


def attribute(samples: Iterable[ProcessUtilization], leases: Sequence[LeaseRecord], judge: Judge,
              at: float) -> Sample:
    """Which of ``leases`` (the active ones) used SM time in ``samples``, by the membership rule."""
    active = {lease.id: lease for lease in leases if lease.state == LeaseState.ACTIVE}
    busy: set[str] = set()
    for sample in samples:
        if sample.sm_percent == 0:
            continue
        lease_id = judge.lease_of(sample.pid)
        lease = active.get(lease_id) if lease_id is not None else None
        if lease is not None and sample.device_index in lease.devices:
            busy.add(lease.id)
    return Sample(at, {lease_id: lease.expires_at for lease_id, lease in active.items()}, frozenset(busy))


@dataclass(frozen=True)
class IdleDecision:
    """One transition. ``kind``: ``idle`` (a spell begins at ``idle_since``), ``active`` (it ends),
    ``warn`` (``notice`` is the warning), ``release`` or ``terminate`` (act on the lease now)."""

    lease_id: str
    kind: str
    idle_since: float | None = None
    notice: IdleNotice | None = None
    message: str = ""


def _verb(action: OnIdle) -> str:
    return {OnIdle.RELEASE: "released", OnIdle.TERMINATE: "ended and its processes stopped"}.get(action, "")


def evaluate(leases: Iterable[LeaseRecord], sample: Sample, rules: Mapping[str, Sequence[IdleRule]]
             ) -> list[IdleDecision]:
    """The transitions ``sample`` calls for, for each active lease with rules; see the module doc."""
    out: list[IdleDecision] = []
    at = sample.at
    for lease in leases:
        mine = rules.get(lease.id) or ()
        if lease.state != LeaseState.ACTIVE or not mine or lease.id not in sample.judged:
            continue
        if sample.judged[lease.id] != lease.expires_at:
            continue  # extended since the sample was taken: the user said "still here"
        if lease.id in sample.busy:
            if lease.idle_since is not None:
                out.append(IdleDecision(lease.id, "active", message=f"lease {lease.id} uses its GPU again"))
            continue
        since = lease.idle_since
        if since is None:
            since = at
            out.append(IdleDecision(lease.id, "idle", since, message=f"lease {lease.id} is idle since "
                                                                     f"{format_clock(since)}"))
        idle_for = at - since
        warn_at, act_at, action, lead = plan(mine)
        notice = lease.idle_warning if lease.idle_warning is not None and lease.idle_warning.at >= since else None
        if notice is None:
            if warn_at is not None and idle_for >= warn_at:
                due = max(since + act_at, at + lead) if act_at is not None and action is not None else None
                notice = IdleNotice(at, action or OnIdle.WARN, due)
                if due is not None and action is not None:
                    what = (f"it will be {_verb(action)} at {format_clock(due)} unless its GPU is used or it is "
                            f"extended (chronos extend {lease.id} 30m)")
                else:
                    what = "use its GPU or release it (chronos release " + lease.id + ")"
                out.append(IdleDecision(lease.id, "warn", since, notice,
                                        f"lease {lease.id} has used no GPU time since {format_clock(since)} "
                                        f"({format_duration(idle_for)}); {what}"))
            continue
        if action is not None and notice.action_at is not None and at >= notice.action_at:
            out.append(IdleDecision(lease.id, str(action), since, notice,
                                    f"idle since {format_clock(since)}: no GPU time used for "
                                    f"{format_duration(idle_for)}"))
    return out


def rule_json(after_s: float | None, action: OnIdle | str | None) -> dict[str, object]:
    """A request's own idle rule as stored beside it ({} when it has none)."""
    if after_s is None:
        return {}
    return {"idle": {"after_s": float(after_s), "action": str(OnIdle.parse(action or OnIdle.RELEASE))}}


def rule_from_json(stored: Mapping[str, object] | None, warning_s: float) -> IdleRule | None:
    """The rule :func:`rule_json` stored, or None."""
    data = (stored or {}).get("idle")
    if not isinstance(data, dict):
        return None
    try:
        return IdleRule(float(data["after_s"]), OnIdle(data.get("action", "release")), warning_s)
    except (KeyError, TypeError, ValueError):
        return None
