"""What enforcement saw or did, as plain records: each ``message`` is one line for a person.

The watchdog emits them, and each host (a kernel's widget, the provisioner, ``chronos run``, the
service) decides where they go.
"""

from __future__ import annotations

from dataclasses import dataclass

from chronos.model import Action, LeaseState, OnIdle

#: When the watchdog warns before a lease's end (seconds left); here so that readers need no watchdog.
DEFAULT_WARN_AT = (600.0, 60.0)

__all__ = [
    "DEFAULT_WARN_AT",
    "ExpiryWarning",
    "HolderExitedEvent",
    "IdleWarning",
    "LeaseEndedEvent",
    "LedgerTroubleEvent",
    "OveruseEvent",
    "SignalEvent",
    "UnkillableEvent",
    "WatchdogEvent",
]


@dataclass(frozen=True)
class WatchdogEvent:
    """Something the watchdog saw or did; ``message`` is one line for a person."""

    lease_id: str
    at: float
    message: str


@dataclass(frozen=True)
class OveruseEvent(WatchdogEvent):
    """The tree used more than the cap on ``device`` for longer than the grace period."""

    device: int
    used_bytes: int
    cap_bytes: int
    estimated: bool
    action: Action


@dataclass(frozen=True)
class ExpiryWarning(WatchdogEvent):
    """The lease ends in ``remaining_s`` seconds (a warning mark was passed)."""

    remaining_s: float
    mark_s: float


@dataclass(frozen=True)
class IdleWarning(WatchdogEvent):
    """The lease's processes used no GPU time since ``idle_since``; ``action`` follows at ``action_at``
    (None: a warning only) unless the GPU is used or the lease extended."""

    idle_since: float
    action: OnIdle
    action_at: float | None


@dataclass(frozen=True)
class LeaseEndedEvent(WatchdogEvent):
    """The lease ended (expired, released or revoked) while the tree ran; ``action`` follows."""

    state: LeaseState
    reason: str | None
    action: Action | None


@dataclass(frozen=True)
class SignalEvent(WatchdogEvent):
    """Signal ``signal_name`` was sent to ``pids``."""

    signal_name: str
    pids: tuple[int, ...]
    cause: str


@dataclass(frozen=True)
class UnkillableEvent(WatchdogEvent):
    """Processes still there after SIGKILL (stuck in the kernel or the driver)."""

    pids: tuple[int, ...]


@dataclass(frozen=True)
class HolderExitedEvent(WatchdogEvent):
    """The watched process (the root of the tree) is gone; the watchdog stops."""

    pid: int


@dataclass(frozen=True)
class LedgerTroubleEvent(WatchdogEvent):
    """The ledger could not be read or written (a full disk, a lock held by another process): the
    watchdog goes on enforcing from what it knows and retries; ``recovered`` once it can again."""

    recovered: bool
