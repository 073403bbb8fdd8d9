"""The vocabulary every layer shares: lease states, priorities, enforcement actions, and the lease record.

Each is defined once here and imported everywhere (CLI ``choices=``, config validation, traits),
so a spelling means the same thing in every front end. The enums are ``str`` subclasses: they
compare equal to their spelling, print as it, and go into JSON and SQLite as plain text.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum
from functools import cache
from typing import Any, TypeVar

from chronos.errors import InvalidRequestError

__all__ = [
    "ENDED_STATES",
    "LIVE_STATES",
    "Action",
    "FindingKind",
    "IdleNotice",
    "LeaseRecord",
    "LeaseState",
    "OnIdle",
    "OnUnmanaged",
    "Priority",
    "WaitUpdate",
    "build",
    "evolve",
    "plain_fields",
]


_E = TypeVar("_E", bound="_Spelled")
_R = TypeVar("_R")


@cache
def plain_fields(cls: type) -> frozenset[str] | None:
    """The fields of a record whose ``__init__`` only stores them: a dataclass with its generated
    ``__init__`` taking every field, no ``__post_init__`` and no slots. Such a record may be made
    without running ``__init__`` (:func:`build`), which for a frozen one sets each field through
    ``object.__setattr__``. None for any other class."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.init or hasattr(cls, "__post_init__") or "__slots__" in vars(cls):
        return None
    found = fields(cls)
    return frozenset(f.name for f in found) if all(f.init for f in found) else None


def build(cls: type[_R], values: Mapping[str, Any]) -> _R:
    """A record of a :func:`plain_fields` class from the values of all its fields, ``__init__`` not run."""
    record = object.__new__(cls)
    record.__dict__.update(values)
    return record


def evolve(record: _R, **changes: Any) -> _R:
    """``dataclasses.replace``, about eight times cheaper for the plain records (:func:`plain_fields`),
    which every lease operation copies several times. A name that is not a field is a TypeError, as there."""
    cls: type = type(record)
    names = plain_fields(cls)
    if names is None:
        return replace(record, **changes)  # type: ignore[type-var]
    unknown = changes.keys() - names
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {sorted(unknown)[0]!r}")
    return build(cls, {**record.__dict__, **changes})


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
    WITHDRAWN = "withdrawn"  # a queued request given up (Ctrl-C, timeout, waiter died), or a booking cancelled
    BOOKED = "booked"  # capacity booked ahead for a time window, not yet claimed
    NO_SHOW = "no-show"  # a booking nobody claimed within its grace period

    @property
    def live(self) -> bool:
        return self in LIVE_STATES

    @classmethod
    def _what(cls) -> str:
        return "lease state"


LIVE_STATES = (LeaseState.QUEUED, LeaseState.ACTIVE, LeaseState.BOOKED)
ENDED_STATES = (LeaseState.RELEASED, LeaseState.EXPIRED, LeaseState.REVOKED, LeaseState.WITHDRAWN,
                LeaseState.NO_SHOW)


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


class OnIdle(_Spelled):
    """What the idle policy does to a lease whose processes used no GPU time for long enough, mildest first.

    ``warn`` only says so; ``release`` ends the lease (its holder's own policy then applies, as for any
    release from outside); ``terminate`` ends it and stops its processes (SIGTERM, then SIGKILL).
    """

    WARN = "warn"
    RELEASE = "release"
    TERMINATE = "terminate"

    @property
    def rank(self) -> int:
        return list(OnIdle).index(self)

    @classmethod
    def _what(cls) -> str:
        return "idle action"


class OnUnmanaged(_Spelled):
    """What the service's enforcer does to a GPU process that holds no lease, mildest first.

    ``report`` logs it once; ``warn`` logs it and tells the process (a line on its stderr when that is
    a terminal or a pipe), again every ten minutes; ``terminate`` is SIGTERM, then SIGKILL after the wait.
    """

    REPORT = "report"
    WARN = "warn"
    TERMINATE = "terminate"

    @classmethod
    def _what(cls) -> str:
        return "unmanaged action"


class FindingKind(_Spelled):
    """Why the service's enforcer acted on a process."""

    OVER_CAP = "over_cap"  # a lease's processes used more than its memory on a device, past the grace period
    PAST_EXPIRY = "past_expiry"  # a lease reached its end (or was ended with an action) while its processes ran
    UNMANAGED = "unmanaged"  # a GPU process that holds no lease, or uses a device its lease does not name
    NO_ACCESS = "no_access"  # with device gating: a process holds a GPU's device file its owner may no longer open

    @classmethod
    def _what(cls) -> str:
        return "finding kind"


@dataclass(frozen=True)
class IdleNotice:
    """A warning that an idle lease will be acted on: given ``at``, ``action`` due at ``action_at``
    (None for a warning only)."""

    at: float
    action: OnIdle
    action_at: float | None = None


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
    #: A booking's planned start (None for a lease that was never booked ahead).
    starts_at: float | None = None
    #: Since when none of the lease's processes used GPU time (None: in use, or not watched for idleness).
    idle_since: float | None = None
    #: The warning its holder was given in this idle spell, if any.
    idle_warning: IdleNotice | None = None
    #: What whoever ended the lease asks of its processes (None: the holder's own policy).
    end_action: Action | None = None

    @property
    def ends_at(self) -> float | None:
        """When the lease ends (or, for a booking, would end): its expiry, else start plus duration."""
        if self.expires_at is not None:
            return self.expires_at
        return self.starts_at + self.duration_s if self.starts_at is not None else None

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
        data["end_action"] = str(self.end_action) if self.end_action is not None else None
        if self.idle_warning is not None:
            data["idle_warning"]["action"] = str(self.idle_warning.action)
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
