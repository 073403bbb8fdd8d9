"""Configured limits, checked before a request is granted or queued. Pure: no I/O here.

Every refusal is a NotAllowedError (exit 4) whose message names the rule, its value, and the file
it was set in, so a user knows what to ask for and whom to ask.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from chronos import scheduler
from chronos.config import SETTING_NAMES, Config
from chronos.errors import NotAllowedError
from chronos.model import LeaseRecord, Priority
from chronos.units import format_bytes, format_duration

__all__ = ["RequestInfo", "Usage", "check", "check_extend", "request_info", "usage_of"]


@dataclass(frozen=True)
class RequestInfo:
    """What a request asks for, as the limits see it.

    ``memory_bytes`` is per device; a fraction is resolved against the largest device it could get.
    """

    memory_bytes: int
    gpus: int
    duration_s: float
    priority: Priority = Priority.NORMAL


@dataclass(frozen=True)
class Usage:
    """What a user holds now: active and queued leases, and their memory over all their devices."""

    leases: int = 0
    memory_bytes: int = 0


def usage_of(leases: Iterable[LeaseRecord], uid: int, queue: Iterable[scheduler.Request] = ()) -> Usage:
    """``uid``'s usage among ``leases`` (active and queued ones count).

    A queued lease knows its GPUs only once granted; ``queue`` (the snapshot's queued requests) gives
    how many it asked for.
    """
    wanted = {r.lease_id: (len(r.devices) if r.devices is not None else r.gpus) for r in queue}
    count = 0
    total = 0
    for lease in leases:
        if lease.uid == uid and lease.state.live:
            count += 1
            gpus = len(lease.devices) or wanted.get(lease.id, 1)
            total += lease.memory_bytes * max(1, gpus)
    return Usage(count, total)


def _rule(config: Config, field: str) -> str:
    return f"{SETTING_NAMES[field]} in {config.source(field)}"


def check(config: Config, request: RequestInfo, user: str, groups: Iterable[str], usage: Usage,
          *, admin: bool | None = None) -> None:
    """Raise NotAllowedError when ``request`` by ``user`` would break a configured limit.

    ``groups`` are the user's group names; members of the admin group (and root, passed as
    ``admin=True``) may use the ``high`` priority whatever ``high_priority_groups`` says. Limits on
    size, time and count apply to everyone.
    """
    groups = set(groups)
    if config.max_duration_s is not None and request.duration_s > config.max_duration_s:
        raise NotAllowedError(
            f"{format_duration(request.duration_s)} is longer than the maximum of "
            f"{format_duration(config.max_duration_s)} per lease ({_rule(config, 'max_duration_s')}); "
            f"ask for less, or extend later"
        )
    limit = config.max_memory_per_lease_bytes
    if limit is not None and request.memory_bytes > limit:
        per = " per GPU" if request.gpus > 1 else ""
        raise NotAllowedError(
            f"{format_bytes(request.memory_bytes)}{per} is more than the maximum of {format_bytes(limit)} "
            f"per lease ({_rule(config, 'max_memory_per_lease_bytes')})"
        )
    limit = config.max_memory_per_user_bytes
    wanted = request.memory_bytes * request.gpus
    if limit is not None and usage.memory_bytes + wanted > limit:
        raise NotAllowedError(
            f"{user} holds {format_bytes(usage.memory_bytes)} in leases; {format_bytes(wanted)} more would "
            f"pass the maximum of {format_bytes(limit)} per user ({_rule(config, 'max_memory_per_user_bytes')}); "
            f"release a lease first"
        )
    count = config.max_leases_per_user
    if count is not None and usage.leases + 1 > count:
        raise NotAllowedError(
            f"{user} already has {usage.leases} active or queued lease(s), the maximum of {count} per user "
            f"({_rule(config, 'max_leases_per_user')}); release one first"
        )
    allowed = config.high_priority_groups
    if request.priority == Priority.HIGH and allowed is not None:
        is_admin = admin if admin is not None else config.admin_group in groups
        if not is_admin and not groups.intersection(allowed):
            who = f"members of {', '.join(allowed)} and admins" if allowed else "admins"
            raise NotAllowedError(
                f"priority high is for {who} ({_rule(config, 'high_priority_groups')}); "
                f"{user} may use normal or low"
            )


def check_extend(config: Config, total_duration_s: float) -> None:
    """Raise NotAllowedError when a lease extended to ``total_duration_s`` in all would pass the maximum."""
    limit = config.max_duration_s
    if limit is not None and total_duration_s > limit + 1e-6:
        raise NotAllowedError(
            f"extended, the lease would last {format_duration(total_duration_s)} in all, longer than the "
            f"maximum of {format_duration(limit)} per lease ({_rule(config, 'max_duration_s')})"
        )


def request_info(request: scheduler.Request, snapshot: scheduler.Snapshot,
                 decision: scheduler.Decision | None = None) -> RequestInfo:
    """The limits' view of a scheduler request: a granted size, or a fraction at its largest."""
    count = len(request.devices) if request.devices is not None else request.gpus
    if decision is not None and decision.granted:
        memory = decision.memory_bytes
    elif request.memory.nbytes is not None:
        memory = request.memory.nbytes
    else:
        totals = [d.total_bytes for d in snapshot.devices
                  if request.devices is None or d.index in request.devices] or [0]
        memory = max(request.memory.resolve(total) for total in totals)
    return RequestInfo(memory, count, request.duration_s, request.priority)
