"""The records every layer shares: the lease record, its idle notice, a queued request's progress;
and, re-exported from :mod:`chronos.spellings`, the vocabulary they are written in (lease states,
priorities, enforcement actions), so that one import brings both.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from functools import cache
from typing import Any, TypeVar

from chronos.spellings import (
    ENDED_STATES,
    LIVE_STATES,
    Action,
    FindingKind,
    LeaseState,
    OnIdle,
    OnUnmanaged,
    Priority,
)

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
