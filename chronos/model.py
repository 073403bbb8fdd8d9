"""The vocabulary every layer shares: lease states, priorities, enforcement actions, and the lease record.

Each is defined once here and imported everywhere (CLI ``choices=``, config validation, traits),
so a spelling means the same thing in every front end. The enums are ``str`` subclasses: they
compare equal to their spelling, print as it, and go into JSON and SQLite as plain text.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, TypeVar

from chronos.errors import InvalidRequestError

__all__ = [
    "ENDED_STATES",
    "LIVE_STATES",
    "Action",
    "LeaseRecord",
    "LeaseState",
    "Priority",
    "WaitUpdate",
]


_E = TypeVar("_E", bound="_Spelled")


class _Spelled(str, Enum):
    """A str enum that prints as its value (as ``enum.StrEnum`` does from Python 3.11)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def choices(cls) -> tuple[str, ...]:
        """Every spelling, in definition order (for ``argparse`` and traits)."""
        return tuple(member.value for member in cls)

    @classmethod
    def parse(cls: type[_E], value: object, what: str | None = None) -> _E:
        """The member spelled ``value`` (case and spaces ignored); a one-line error otherwise."""
        if isinstance(value, cls):
            return value
        text = str(value).strip().lower() if isinstance(value, str) else None
        for member in cls:
            if member.value == text:
                return member
        name = what or cls._what()
        raise InvalidRequestError(f"unknown {name} {value!r}: use one of {', '.join(cls.choices())}")

    @classmethod
    def _what(cls) -> str:
        return cls.__name__.lower()


class LeaseState(_Spelled):
    """Where a lease is in its life. Queued and active are live; the rest are ends."""

    QUEUED = "queued"
    ACTIVE = "active"
    RELEASED = "released"  # ended by a release or its holder's clean exit
    EXPIRED = "expired"  # reached its end time
    REVOKED = "revoked"  # its holder process died
    WITHDRAWN = "withdrawn"  # a queued request given up (Ctrl-C, timeout, waiter died)

    @property
    def live(self) -> bool:
        return self in LIVE_STATES

    @classmethod
    def _what(cls) -> str:
        return "lease state"


LIVE_STATES = (LeaseState.QUEUED, LeaseState.ACTIVE)
ENDED_STATES = (LeaseState.RELEASED, LeaseState.EXPIRED, LeaseState.REVOKED, LeaseState.WITHDRAWN)


class Priority(_Spelled):
    """Queue classes, lowest first: the rank is the position."""

    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"

    @property
    def rank(self) -> int:
        return _RANKS[self]


_RANKS = {member: rank for rank, member in enumerate(Priority)}


class Action(_Spelled):
    """What enforcement does to a lease's processes, mildest first.

    ``interrupt`` is SIGINT; ``terminate`` is SIGTERM, then SIGKILL after a wait (as Slurm does at a
    job's time limit); ``kill`` is SIGKILL.
    """

    WARN = "warn"
    INTERRUPT = "interrupt"
    TERMINATE = "terminate"
    KILL = "kill"

    @classmethod
    def _what(cls) -> str:
        return "action"


@dataclass(frozen=True)
class LeaseRecord:
    """One lease as the ledger holds it: plain data, safe to pickle, copy and send.

    ``memory_bytes`` is per device. ``expires_at`` is None while the request is queued. The holder
    is ``pid`` plus ``pid_start`` (its start time), so a reused pid is never taken for it.
    """

    id: str
    owner: str
    uid: int
    devices: tuple[int, ...]
    device_uuids: tuple[str, ...]
    memory_bytes: int
    created_at: float
    expires_at: float | None
    duration_s: float
    priority: Priority = Priority.NORMAL
    state: LeaseState = LeaseState.ACTIVE
    label: str | None = None
    pid: int | None = None
    pid_start: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    end_reason: str | None = None
    peak_memory_bytes: int | None = None
    gpu_seconds: float | None = None

    def remaining_at(self, now: float) -> float:
        """Seconds left at ``now`` (0 once ended; the full duration while queued)."""
        if self.state == LeaseState.QUEUED or self.expires_at is None:
            return self.duration_s
        if self.state != LeaseState.ACTIVE:
            return 0.0
        return max(0.0, self.expires_at - now)

    @property
    def remaining(self) -> float:
        return self.remaining_at(time.time())

    @property
    def active(self) -> bool:
        """Granted, and not yet past its end."""
        return self.state == LeaseState.ACTIVE and self.remaining > 0

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form used by ``--json``."""
        data = asdict(self)
        del data["pid_start"]
        data["state"] = str(self.state)
        data["priority"] = str(self.priority)
        data["devices"] = list(self.devices)
        data["device_uuids"] = list(self.device_uuids)
        data["remaining_s"] = round(self.remaining, 3)
        return data


@dataclass(frozen=True)
class WaitUpdate:
    """Progress of a queued request, passed to ``reserve(on_wait=...)``."""

    lease_id: str
    position: int | None
    estimated_start: float | None
    reason: str
