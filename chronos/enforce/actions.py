"""What enforcement does to processes: one rule for the per-lease watchdog and the service's enforcer.

An :class:`~chronos.model.Action` becomes signals: ``interrupt`` is SIGINT to the first target (the
main program, as Ctrl-C would reach it), ``terminate`` SIGTERM to every target and SIGKILL to what is
left after the kill wait (as Slurm does at a job's time limit), ``kill`` SIGKILL at once; ``warn``
sends nothing. A process still there :data:`UNKILLABLE_AFTER_S` after SIGKILL is stuck in the kernel
or the driver, and is reported once. Targets are (pid, start time), so a reused pid is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from chronos import procs
from chronos.model import Action

__all__ = ["UNKILLABLE_AFTER_S", "Enforcement", "Step", "begin", "escalate", "send"]

#: After SIGKILL, a process still there this long later is reported as unkillable.
UNKILLABLE_AFTER_S = 5.0

Target = tuple[int, float]


@dataclass
class Enforcement:
    """One episode of acting on a set of processes: why, how, how far it got, and since when."""

    cause: str  # "overuse", "expiry", "release", "unmanaged", "no_access"
    action: Action
    stage: str  # "interrupt", "terminate", "kill", "done"
    since: float
    targets: list[Target] = field(default_factory=list)
    reported_unkillable: bool = False

    def alive(self) -> list[Target]:
        return [(p, s) for p, s in self.targets if procs.is_alive(p, s)]


@dataclass(frozen=True)
class Step:
    """What one call of :func:`begin` or :func:`escalate` did: the signal sent and to whom, and the
    processes found unkillable (each reported once)."""

    signal_name: str | None = None
    pids: tuple[int, ...] = ()
    unkillable: tuple[int, ...] = ()


def send(sig: signal.Signals, targets: Sequence[Target]) -> tuple[int, ...]:
    """Send ``sig`` to each target still alive (a process one may not signal is skipped); the pids reached."""
    sent = []
    for pid, started in targets:
        if procs.is_alive(pid, started):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
                sent.append(pid)
    return tuple(sent)


def begin(cause: str, action: Action, members: Sequence[Target], now: float) -> tuple[Enforcement, Step]:
    """Start acting on ``members`` (the root of a tree first) as ``action`` says."""
    if action == Action.WARN or not members:
        return Enforcement(cause, action, "done", now), Step()
    if action == Action.INTERRUPT:
        targets, sig, stage = list(members[:1]), signal.SIGINT, "interrupt"
    elif action == Action.TERMINATE:
        targets, sig, stage = list(members), signal.SIGTERM, "terminate"
    else:
        targets, sig, stage = list(members), signal.SIGKILL, "kill"
    enf = Enforcement(cause, action, stage, now, targets)
    sent = send(sig, targets)
    return enf, Step(sig.name if sent else None, sent)


def escalate(enf: Enforcement, now: float, kill_wait_s: float,
             members: Callable[[], Sequence[Target]] = lambda: ()) -> Step:
    """Move a ``terminate`` or ``kill`` episode on: done once no target lives; SIGKILL to every target
    still alive, and to ``members()`` as they are now, once ``kill_wait_s`` has passed since SIGTERM;
    the survivors reported once, :data:`UNKILLABLE_AFTER_S` after SIGKILL."""
    if enf.stage not in ("terminate", "kill"):
        return Step()
    alive = enf.alive()
    if not alive:
        enf.stage = "done"
        return Step()
    if enf.stage == "terminate" and now - enf.since >= kill_wait_s:
        # new processes may have appeared since SIGTERM: kill every member as it is now
        current = dict(members())
        current.update(dict(alive))
        enf.targets = list(current.items())
        enf.stage = "kill"
        enf.since = now
        sent = send(signal.SIGKILL, enf.targets)
        return Step("SIGKILL" if sent else None, sent)
    if enf.stage == "kill" and now - enf.since >= UNKILLABLE_AFTER_S and not enf.reported_unkillable:
        enf.reported_unkillable = True
        return Step(unkillable=tuple(p for p, _ in alive))
    return Step()
