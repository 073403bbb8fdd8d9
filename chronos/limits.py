"""Configured limits, checked before a request is granted or queued. Pure: no I/O here.

Every refusal is a :class:`~chronos.errors.LimitError` (a NotAllowedError, exit 4) whose message
names the rule, its value, and the file and table it was set in, so a user knows what to ask for and
whom to ask.

A user's limits (:func:`effective`) are ``[limits]``, overridden by the tables of the groups they
are in (``[limits.groups.NAME]``), overridden by their own table (``[limits.users.NAME]``). When
several of their groups set the same limit, the most generous of those values applies (no limit
over any number, a larger number over a smaller one, ``warn`` over ``release`` over ``terminate``,
``high_priority = true`` over false), so that adding a user to a group never takes anything away
that another of their groups grants. A group's value replaces the global one even when it is
stricter; a user's own value replaces both.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from chronos import scheduler
from chronos.config import OVERRIDE_NAMES, SETTING_NAMES, Config
from chronos.errors import LimitError
from chronos.model import LeaseRecord, LeaseState, OnIdle, Priority
from chronos.units import format_bytes, format_duration

__all__ = ["LIMIT_FIELDS", "Limits", "RequestInfo", "Usage", "check", "check_extend", "effective", "may_use_high",
           "request_info", "usage_of"]

#: Every Config field a user's or group's table may override, in display order.
LIMIT_FIELDS = (
    "max_duration_s", "max_memory_per_lease_bytes", "max_memory_per_user_bytes", "max_leases_per_user",
    "max_gpus_per_user", "high_priority", "idle_after_s", "on_idle", "idle_warning_s", "booking_grace_s",
    "max_booking_lead_s", "max_booked_s_per_week", "max_bookings_per_user",
)


@dataclass(frozen=True)
class Limits:
    """One user's effective limits, each with the rule that set it (``limits.groups.ml.max_duration in
    /etc/chronos/config.toml``). ``high_priority`` None: decided by ``limits.high_priority_groups``."""

    user: str
    max_duration_s: float | None = None
    max_memory_per_lease_bytes: int | None = None
    max_memory_per_user_bytes: int | None = None
    max_leases_per_user: int | None = None
    max_gpus_per_user: int | None = None
    high_priority: bool | None = None
    idle_after_s: float | None = None
    on_idle: OnIdle = OnIdle.RELEASE
    idle_warning_s: float = 300.0
    booking_grace_s: float = 900.0
    max_booking_lead_s: float | None = None
    max_booked_s_per_week: float | None = None
    max_bookings_per_user: int | None = None
    rules: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    high_priority_groups: tuple[str, ...] | None = None
    admin_group: str = "chronos-admin"

    def rule(self, name: str) -> str:
        return self.rules[name]

    @property
    def values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in LIMIT_FIELDS}

    @property
    def counts_usage(self) -> bool:
        """Whether a check needs the user's current usage (a per-user limit is set)."""
        return (self.max_memory_per_user_bytes is not None or self.max_leases_per_user is not None
                or self.max_gpus_per_user is not None)


def _generosity(name: str, value: Any) -> tuple[int, float]:
    """Sort key: larger is more generous (no limit above every number)."""
    if name == "on_idle":
        return (1, float(2 - OnIdle(value).rank))
    if name == "high_priority":
        return (1, float(bool(value)))
    if value is None:
        return (2, 0.0)
    return (1, float(value))


def effective(config: Config, user: str, groups: Iterable[str] = ()) -> Limits:
    """``user``'s limits: ``[limits]``, then their groups' tables (the most generous where several set a
    limit), then their own table; see the module doc."""
    values: dict[str, Any] = {name: getattr(config, name) for name in LIMIT_FIELDS if name != "high_priority"}
    values["high_priority"] = None
    def where(name: str) -> str:
        source = config.source(name)
        return f"{SETTING_NAMES[name]} in {source}" if source != "default" else "default (not set)"

    rules = {name: where(name) for name in values if name in SETTING_NAMES}
    rules["high_priority"] = where("high_priority_groups")
    member = set(groups)
    by_field: dict[str, list[tuple[Any, str]]] = {}
    for name, pairs in config.group_limits:
        if name in member:
            for key, value in pairs:
                by_field.setdefault(key, []).append((value, name))
    for key, found in by_field.items():
        value, group = max(sorted(found, key=lambda item: item[1]), key=lambda item: _generosity(key, item[0]))
        values[key] = value
        rules[key] = f"limits.groups.{group}.{OVERRIDE_NAMES[key]} in {config.source('groups.' + group)}"
    for name, pairs in config.user_limits:
        if name == user:
            for key, value in pairs:
                values[key] = value
                rules[key] = f"limits.users.{name}.{OVERRIDE_NAMES[key]} in {config.source('users.' + name)}"
    return Limits(user, **values, rules=rules, high_priority_groups=config.high_priority_groups,
                  admin_group=config.admin_group)


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
    gpus: int = 0


def usage_of(leases: Iterable[LeaseRecord], uid: int, queue: Iterable[scheduler.Request] = ()) -> Usage:
    """``uid``'s usage among ``leases`` (active and queued ones count).

    A queued lease knows its GPUs only once granted; ``queue`` (the snapshot's queued requests) gives
    how many it asked for.
    """
    wanted = {r.lease_id: (len(r.devices) if r.devices is not None else r.gpus) for r in queue}
    count = 0
    total = 0
    devices = 0
    for lease in leases:
        if lease.uid == uid and lease.state.live and lease.state != LeaseState.BOOKED:
            count += 1
            gpus = len(lease.devices) or wanted.get(lease.id, 1)
            total += lease.memory_bytes * max(1, gpus)
            devices += max(1, gpus)
    return Usage(count, total, devices)


def _limits(config: Config | Limits, user: str, groups: Iterable[str]) -> Limits:
    return config if isinstance(config, Limits) else effective(config, user, groups)


def check(config: Config | Limits, request: RequestInfo, user: str, groups: Iterable[str], usage: Usage,
          *, admin: bool | None = None) -> None:
    """Raise LimitError when ``request`` by ``user`` would break one of their limits (:func:`effective`).

    ``groups`` are the user's group names; members of the admin group (and root, passed as
    ``admin=True``) may use the ``high`` priority whatever the limits say. Limits on size, time and
    count apply to everyone.
    """
    groups = set(groups)
    mine = _limits(config, user, groups)
    limit = mine.max_duration_s
    if limit is not None and request.duration_s > limit:
        raise LimitError("max_duration",
                         f"{format_duration(request.duration_s)} is longer than the maximum of "
                         f"{format_duration(limit)} per lease ({mine.rule('max_duration_s')}), "
                         f"extensions included; ask for {format_duration(limit)} or less")
    limit = mine.max_memory_per_lease_bytes
    if limit is not None and request.memory_bytes > limit:
        per = " per GPU" if request.gpus > 1 else ""
        raise LimitError("max_memory_per_lease",
                         f"{format_bytes(request.memory_bytes)}{per} is more than the maximum of "
                         f"{format_bytes(limit)} per lease ({mine.rule('max_memory_per_lease_bytes')})")
    limit = mine.max_memory_per_user_bytes
    wanted = request.memory_bytes * request.gpus
    if limit is not None and usage.memory_bytes + wanted > limit:
        raise LimitError("max_memory_per_user",
                         f"{user} holds {format_bytes(usage.memory_bytes)} in leases; {format_bytes(wanted)} more "
                         f"would pass the maximum of {format_bytes(limit)} per user "
                         f"({mine.rule('max_memory_per_user_bytes')}); release a lease first")
    count = mine.max_leases_per_user
    if count is not None and usage.leases + 1 > count:
        raise LimitError("max_leases_per_user",
                         f"{user} already has {usage.leases} active or queued lease(s), the maximum of {count} "
                         f"per user ({mine.rule('max_leases_per_user')}); release one first")
    count = mine.max_gpus_per_user
    if count is not None and usage.gpus + request.gpus > count:
        raise LimitError("max_gpus_per_user",
                         f"{user} holds {usage.gpus} GPU(s) in leases; {request.gpus} more would pass the "
                         f"maximum of {count} per user ({mine.rule('max_gpus_per_user')}); release a lease first")
    if request.priority == Priority.HIGH and not may_use_high(mine, groups, admin):
        allowed = mine.high_priority_groups
        if mine.high_priority is False:
            who = "not for this user"
        else:
            who = f"for members of {', '.join(allowed)} and admins" if allowed else "for admins"
        raise LimitError("high_priority", f"priority high is {who} ({mine.rule('high_priority')}); "
                                          f"{user} may use normal or low")


def may_use_high(mine: Limits, groups: Iterable[str], admin: bool | None = None) -> bool:
    """Whether priority high is open to a user with these limits and groups (admins always)."""
    groups = set(groups)
    if admin if admin is not None else mine.admin_group in groups:
        return True
    if mine.high_priority is not None:
        return bool(mine.high_priority)
    allowed = mine.high_priority_groups
    return allowed is None or bool(groups.intersection(allowed))


def check_extend(config: Config | Limits, total_duration_s: float, user: str = "", groups: Iterable[str] = ()
                 ) -> None:
    """Raise LimitError when a lease extended to ``total_duration_s`` in all would pass its owner's maximum."""
    mine = _limits(config, user, groups)
    limit = mine.max_duration_s
    if limit is not None and total_duration_s > limit + 1e-6:
        raise LimitError("max_duration",
                         f"extended, the lease would last {format_duration(total_duration_s)} in all, longer "
                         f"than the maximum of {format_duration(limit)} per lease ({mine.rule('max_duration_s')})")


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
