"""What enforcement does to processes: one rule for the per-lease watchdog and the service's enforcer.

An :class:`~chronos.model.Action` becomes signals: ``interrupt`` is SIGINT to the first target (the
main program, as Ctrl-C would reach it), ``terminate`` SIGTERM to every target and SIGKILL to what is
left after the kill wait (as Slurm does at a job's time limit), ``kill`` SIGKILL at once; ``warn``
sends nothing. A process still there :data:`UNKILLABLE_AFTER_S` after SIGKILL is stuck in the kernel
or the driver, and is reported once. Targets are (pid, start time), so a reused pid is never signalled.
:func:`tell` writes the line that says why to the process's terminal or pipe, and nowhere else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from chronos import procs
from chronos.model import Action

__all__ = ["UNKILLABLE_AFTER_S", "Enforcement", "Step", "begin", "escalate", "send", "tell"]

#: After SIGKILL, a process still there this long later is reported as unkillable.
UNKILLABLE_AFTER_S = 5.0

Target = tuple[int, float]

#: tty majors (``/dev/tty*``, ``/dev/console``, ``/dev/pts/*``): a warning is written only to a terminal or a pipe.
_TTY_MAJORS = frozenset({4, 5, *range(136, 144)})


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


def tell(pid: int, line: str) -> None:
    """Write ``line`` to the process's stderr when that is a terminal or a pipe (never a file, whose
    content it would overwrite); nothing else is opened, and a full pipe is skipped."""
    path = f"/proc/{pid}/fd/2"
    try:
        before = os.stat(path)
        if not (stat.S_ISFIFO(before.st_mode)
                or (stat.S_ISCHR(before.st_mode) and os.major(before.st_rdev) in _TTY_MAJORS)):
            return
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        after = os.fstat(fd)
        if (after.st_dev, after.st_ino, after.st_rdev) == (before.st_dev, before.st_ino, before.st_rdev):
            os.write(fd, line.encode("utf-8", "replace"))
    except OSError:
        pass
    finally:
        os.close(fd)
