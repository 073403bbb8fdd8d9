"""The vocabulary every layer shares: lease states, priorities, enforcement actions, report groupings.

Each is defined once here and imported everywhere (CLI ``choices=``, config validation, traits),
so a spelling means the same thing in every front end. The enums are ``str`` subclasses: they
compare equal to their spelling, print as it, and go into JSON and SQLite as plain text. This
module imports nothing heavier than :mod:`enum`: the CLI builds its parser from it at every start.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from chronos.errors import InvalidRequestError

__all__ = ["ENDED_STATES", "LIVE_STATES", "REPORT_GROUPS", "Action", "FindingKind", "LeaseState", "OnIdle",
           "OnUnmanaged", "Priority"]

_E = TypeVar("_E", bound="_Spelled")

#: What a row of a usage report (``chronos report --by``) stands for.
REPORT_GROUPS = ("user", "group", "label", "gpu")


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
