"""Tier 2, the watchdog: a lease's processes over its cap past a grace period, or a lease past its
end, get an :class:`~chronos.model.Action`: warn, interrupt (SIGINT), terminate (SIGTERM, then
SIGKILL after a wait, as Slurm does at a job's time limit) or kill (SIGKILL).

One class, three hosts: :meth:`Watchdog.start` runs it in a daemon thread (a notebook kernel),
:meth:`Watchdog.run_async` as an asyncio task (the kernel provisioner), and ``chronos run`` starts
the thread around its child. Each poll makes one ``processes()`` call for the lease's devices; the
lease is re-read about once a second so that an extension or a release by someone else is seen.

Which processes are the lease's is :mod:`chronos.accounting`'s rule, the one admission and the
widget use too. ``peak_bytes`` is the largest figure seen on any one device (leases are sized per
device); ``gpu_seconds`` counts, for each poll interval, the devices on which the lease held
memory (device-seconds of held memory).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

from chronos import procs
from chronos.accounting import Membership, usage
from chronos.devices.base import Backend, GpuProcess
from chronos.enforce import actions
from chronos.enforce.actions import UNKILLABLE_AFTER_S
from chronos.enforce.events import (
    DEFAULT_WARN_AT,
    ExpiryWarning,
    HolderExitedEvent,
    IdleWarning,
    LeaseEndedEvent,
    LedgerTroubleEvent,
    OveruseEvent,
    SignalEvent,
    UnkillableEvent,
    WatchdogEvent,
)
from chronos.enforce.loop import PollLoop
from chronos.errors import ChronosError, InvalidRequestError, LeaseNotFoundError
from chronos.lease import Lease
from chronos.model import Action, LeaseRecord, LeaseState
from chronos.units import format_bytes, format_clock, format_duration

__all__ = [
    "DEFAULT_GRACE_S",
    "DEFAULT_KILL_WAIT_S",
    "DEFAULT_RATE_HZ",
    "DEFAULT_WARN_AT",
    "ExpiryWarning",
    "HolderExitedEvent",
    "IdleWarning",
    "LeaseEndedEvent",
    "LedgerTroubleEvent",
    "OveruseEvent",
    "SignalEvent",
    "UnkillableEvent",
    "Watchdog",
    "WatchdogEvent",
    "WatchdogHost",
]

DEFAULT_RATE_HZ = 4.0
DEFAULT_GRACE_S = 2.0
DEFAULT_KILL_WAIT_S = 30.0
#: How long one of the watchdog's ledger writes waits for another process's lock (the last one: longer).
LEDGER_PATIENCE_S, FINAL_PATIENCE_S = 0.2, 3.0
_log = logging.getLogger("chronos.watchdog")


class WatchdogHost(Protocol):
    """What the watchdog needs of the engine that owns its lease."""

    @property
    def backend(self) -> Backend: ...

    @property
    def on_expiry(self) -> Action: ...

    def get(self, lease_id: str) -> Lease: ...

    def active_records(self) -> list[LeaseRecord]: ...

    def membership(self, leases: Sequence[LeaseRecord],
                   roots: dict[str, tuple[int, float | None]] | None = None) -> Membership: ...

    def record_usage(self, lease_id: str, peak_bytes: int, gpu_seconds: float, *,
                     note: str | None = None) -> None: ...


# --------------------------------------------------------------------------- the watchdog


def _seconds(value: float, what: str) -> float:
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise InvalidRequestError(f"{what} must be zero or more seconds, got {value!r}")
    return number


class Watchdog(PollLoop[WatchdogEvent]):
    """Watches one lease's processes; see the module docstring.

    ``lease`` is a handle (its engine is used) or an id with ``engine``. ``pid`` is the root of the
    watched tree (default: the lease's holder). ``on_event`` is called with each
    :class:`WatchdogEvent`: from the watchdog's thread in :meth:`start`, on the event loop in
    :meth:`run_async`. ``on_release`` is the action for a lease released or revoked while its
    processes run (None: stop watching and leave them alone).
    """

    def __init__(
        self,
        lease: Lease | str,
        *,
        engine: WatchdogHost | None = None,
        pid: int | None = None,
        rate_hz: float = DEFAULT_RATE_HZ,
        grace_s: float = DEFAULT_GRACE_S,
        kill_wait_s: float = DEFAULT_KILL_WAIT_S,
        on_overuse: Action | str = Action.TERMINATE,
        on_expiry: Action | str | None = None,
        on_release: Action | str | None = None,
        warn_at: Sequence[float] = DEFAULT_WARN_AT,
        on_event: Callable[[WatchdogEvent], None] | None = None,
        refresh_s: float = 1.0,
        record_s: float = 5.0,
        backend: Backend | None = None,
    ) -> None:
        if engine is None:
            if not isinstance(lease, Lease):
                raise InvalidRequestError("a watchdog needs the lease itself, or its id and the engine= it lives in")
            engine = lease.engine  # type: ignore[assignment]
        assert engine is not None
        self.engine: WatchdogHost = engine
        self.lease: LeaseRecord = engine.get(lease.id if isinstance(lease, Lease) else str(lease)).record
        if not rate_hz > 0 or not math.isfinite(rate_hz):
            raise InvalidRequestError(f"watchdog rate must be a positive number of polls a second, got {rate_hz}")
        self.rate_hz = float(rate_hz)
        self.grace_s = _seconds(grace_s, "the grace period")
        self.kill_wait_s = _seconds(kill_wait_s, "the kill wait")
        self.on_overuse = Action.parse(on_overuse, "overuse action")
        self.on_expiry = Action.parse(on_expiry if on_expiry is not None else engine.on_expiry, "expiry action")
        self.on_release = Action.parse(on_release, "release action") if on_release is not None else None
        self.warn_at = tuple(sorted((float(m) for m in warn_at if m > 0), reverse=True))
        self.refresh_s = refresh_s
        self.record_s = record_s
        self.backend = backend if backend is not None else engine.backend
        root = pid if pid is not None else self.lease.pid
        if root is None:
            raise InvalidRequestError(
                f"lease {self.lease.id} has no holder process: bind it, or give the watchdog a pid to watch"
            )
        root_start = self.lease.pid_start if pid is None else procs.start_time(root)
        self.root_pid = root
        self.root_start = root_start
        self.membership = engine.membership(self._leases(), roots={self.lease.id: (root, root_start)})
        self.peak_bytes = 0
        self.gpu_seconds = 0.0
        self.usage: dict[int, int] = {}
        self.events: list[WatchdogEvent] = []
        self.end_reason: str | None = None
        super().__init__(self.rate_hz, on_event, name=f"chronos-watchdog-{self.lease.id}")
        self._last_poll: float | None = None
        self._last_refresh = time.monotonic()
        self._last_record = time.monotonic()
        self._recorded: tuple[int, float] | None = None
        self._trouble: str | None = None  # what the ledger last failed at, until a record succeeds
        self._pending: list[WatchdogEvent] = []
        self._over_since: dict[int, float] = {}
        self._warned_over: set[int] = set()
        self._enforcing: actions.Enforcement | None = None
        self._warned_marks: set[float] = set()
        self._baseline: dict[int, int] | None = None
        self._idle_warned: float | None = self.lease.idle_warning.at if self.lease.idle_warning else None
        self._init_marks()

    # -- one poll ------------------------------------------------------------------------
    def poll(self) -> list[WatchdogEvent]:
        """Look once: lease state, expiry, usage, overuse, escalation. Returns new events."""
        now = time.monotonic()
        wall = time.time()
        out: list[WatchdogEvent] = []
        self.polls += 1
        if now - self._last_refresh >= self.refresh_s:
            self._last_refresh = now
            self._refresh()
            self._check_idle(out, wall)
        enf = self._enforcing
        if (enf is None or (enf.stage == "interrupt" and enf.cause == "overuse")) and not self._done.is_set():
            self._check_lease(out, wall, now)
        if not procs.is_alive(self.root_pid, self.root_start):
            if self._enforcing is None or not self._alive_targets():
                out.append(HolderExitedEvent(self.lease.id, wall, f"process {self.root_pid} exited", self.root_pid))
                self._done.set()
                return self._log(out)
        self._account(out, wall, now)
        if self._enforcing is not None:
            self._escalate(out, wall, now)
        if now - self._last_record >= self.record_s:
            self._last_record = now
            self._record()
        return self._log(out)

    def _log(self, events: list[WatchdogEvent]) -> list[WatchdogEvent]:
        if self._pending:
            events[:0], self._pending = self._pending, []
        self.events.extend(events)
        if len(self.events) > 1000:
            del self.events[:-1000]
        return events

    # -- the lease -----------------------------------------------------------------------
    def _leases(self) -> list[LeaseRecord]:
        """Every active lease (the membership rule looks at all of them), this one included."""
        others = [r for r in self.engine.active_records() if r.id != self.lease.id]
        return [*others, self.lease]

    def _patient(self, seconds: float = LEDGER_PATIENCE_S) -> contextlib.AbstractContextManager[None]:
        """The host's short wait for the ledger's lock (a host with no file lock offers none)."""
        patience = getattr(self.engine, "patience", lambda _s: contextlib.nullcontext())
        return patience(seconds)

    def _refresh(self) -> None:
        old_end = self.lease.expires_at
        try:
            with self._patient():
                self.lease = self.engine.get(self.lease.id).record
                self.membership.update(self._leases())
        except LeaseNotFoundError:
            self.lease = _ended(self.lease, "lease no longer in the ledger")
        except ChronosError as exc:
            self._troubled(f"cannot read the ledger: {exc}")
            return  # keep the last copy: enforcement goes on from it, and the next refresh tries again
        if self.lease.expires_at != old_end:
            self._init_marks()

    def _check_idle(self, out: list[WatchdogEvent], wall: float) -> None:
        """A new idle warning on the lease (the engine's idle policy gave it): say so once."""
        notice, since = self.lease.idle_warning, self.lease.idle_since
        if notice is None or since is None or notice.at == self._idle_warned or self.lease.state != LeaseState.ACTIVE:
            return
        self._idle_warned = notice.at
        text = f"lease {self.lease.id} has used no GPU time since {format_clock(since)}"
        if notice.action_at is not None:
            verb = "released" if notice.action == "release" else "ended and its processes stopped"
            text += (f"; it will be {verb} at {format_clock(notice.action_at)} unless the GPU is used or the lease "
                     f"is extended")
        out.append(IdleWarning(self.lease.id, wall, text, since, notice.action, notice.action_at))

    def _init_marks(self) -> None:
        remaining = self.lease.remaining
        # marks already passed at the start (or after an extension, still passed) are not warned
        self._warned_marks = {m for m in self.warn_at if remaining <= m}

    def _check_lease(self, out: list[WatchdogEvent], wall: float, now: float) -> None:
        lease = self.lease
        past_end = lease.expires_at is not None and wall >= lease.expires_at
        if lease.state == LeaseState.ACTIVE and not past_end:
            remaining = (lease.expires_at or wall) - wall
            for mark in self.warn_at:
                if remaining <= mark and mark not in self._warned_marks:
                    self._warned_marks.add(mark)
                    text = f"lease {lease.id} ends in {format_duration(max(1.0, remaining))}"
                    out.append(ExpiryWarning(lease.id, wall, text, remaining, mark))
            return
        action: Action | None
        if past_end or lease.state == LeaseState.EXPIRED:
            action, cause, state = self.on_expiry, "expiry", LeaseState.EXPIRED
            reason: str | None = "reached its end time"
            what = f"lease {lease.id} expired"
        else:
            # whoever ended the lease may ask for an action (an idle lease terminated), else the host's own
            action = lease.end_action if lease.end_action is not None else self.on_release
            cause, state, reason = "release", lease.state, lease.end_reason
            what = f"lease {lease.id} {lease.state}" + (f" ({reason})" if reason else "")
        out.append(LeaseEndedEvent(lease.id, wall, what, state, reason, action))
        if action is None or action == Action.WARN:
            self.end_reason = what if action == Action.WARN else None
            self._done.set()
            return
        self.end_reason = what
        self._begin(out, cause, action, wall, now)

    # -- usage ---------------------------------------------------------------------------
    def _account(self, out: list[WatchdogEvent], wall: float, now: float) -> None:
        devices = self.lease.devices
        try:
            gpu_procs = self.backend.processes(list(devices))
        except ChronosError:
            return
        used, estimated = self._lease_usage(gpu_procs, devices)
        self.usage = used
        if self._last_poll is not None:
            dt = min(now - self._last_poll, 2.0 / self.rate_hz + 1.0)
            self.gpu_seconds += dt * sum(1 for nbytes in used.values() if nbytes > 0)
        self._last_poll = now
        self.peak_bytes = max(self.peak_bytes, max(used.values(), default=0))
        cap = self.lease.memory_bytes
        for dev in devices:
            nbytes = used.get(dev, 0)
            if nbytes <= cap:
                self._over_since.pop(dev, None)
                self._warned_over.discard(dev)
                continue
            since = self._over_since.setdefault(dev, now)
            if now - since < self.grace_s or dev in self._warned_over or self._enforcing is not None:
                continue
            self._warned_over.add(dev)
            guess = " (estimated for the device)" if dev in estimated else ""
            message = (f"GPU {dev}: {format_bytes(nbytes)} used, over the lease's {format_bytes(cap)} cap "
                       f"for {now - since:.1f}s{guess}")
            out.append(OveruseEvent(self.lease.id, wall, message, dev, nbytes, cap, dev in estimated,
                                    self.on_overuse))
            if self.on_overuse != Action.WARN:
                self.end_reason = message
                self._begin(out, "overuse", self.on_overuse, wall, now)

    def _lease_usage(self, gpu_procs: list[GpuProcess], devices: Sequence[int]) -> tuple[dict[int, int], set[int]]:
        """Bytes per device from :func:`chronos.accounting.usage`; where the driver hides a member's
        figure, the device is accounted whole (its use, less what others are known to use and less
        what was unattributed when watching began)."""
        ours = usage(gpu_procs, self.membership).get(self.lease.id, {})
        unknown = {index for index, nbytes in ours.items() if nbytes is None}
        used = {index: nbytes for index, nbytes in ours.items() if nbytes is not None}
        if self._baseline is not None and not unknown:
            return used, unknown
        members = {p.pid for p in gpu_procs if self.membership.lease_of(p.pid) == self.lease.id}
        others: dict[int, int] = {}
        for proc in gpu_procs:
            if proc.pid not in members and proc.used_bytes is not None:
                others[proc.device_index] = others.get(proc.device_index, 0) + proc.used_bytes
        try:
            device_used = {d.index: d.memory_used_bytes for d in self.backend.devices() if d.index in devices}
        except ChronosError:
            device_used = {}
        if self._baseline is None:
            # memory nobody is known to use when watching starts: driver overhead, hidden users
            self._baseline = {i: max(0, u - others.get(i, 0) - used.get(i, 0)) for i, u in device_used.items()}
        for index in unknown:
            if index in device_used:
                whole = device_used[index] - others.get(index, 0) - self._baseline.get(index, 0)
                used[index] = max(used.get(index, 0), whole)
        return used, unknown

    # -- acting --------------------------------------------------------------------------
    def _begin(self, out: list[WatchdogEvent], cause: str, action: Action, wall: float, now: float) -> None:
        self._enforcing, step = actions.begin(cause, action, self.membership.members(self.lease.id), now)
        self._report(out, step, cause, wall)

    def _report(self, out: list[WatchdogEvent], step: actions.Step, cause: str, wall: float) -> None:
        if step.signal_name is not None:
            text = f"sent {step.signal_name} to {', '.join(map(str, step.pids))} ({cause})"
            out.append(SignalEvent(self.lease.id, wall, text, step.signal_name, step.pids, cause))
        if step.unkillable:
            text = (f"process {', '.join(map(str, step.unkillable))} survived SIGKILL for "
                    f"{UNKILLABLE_AFTER_S:.0f}s (stuck in the kernel or driver)")
            out.append(UnkillableEvent(self.lease.id, wall, text, step.unkillable))
            self._done.set()

    def _alive_targets(self) -> list[tuple[int, float]]:
        return self._enforcing.alive() if self._enforcing is not None else []

    def _escalate(self, out: list[WatchdogEvent], wall: float, now: float) -> None:
        enf = self._enforcing
        assert enf is not None
        if enf.stage == "done":
            self._done.set()
            return
        if enf.stage == "interrupt":
            if enf.cause != "overuse":
                self._done.set()  # the lease is over: SIGINT once, then the processes end themselves
            elif not any(nbytes > self.lease.memory_bytes for nbytes in self.usage.values()):
                self._enforcing = None  # back under the cap: the episode is over
                self._warned_over.clear()
            elif now - enf.since >= self.kill_wait_s:
                self._warned_over.clear()  # still over: interrupt again at the next check
                self._enforcing = None
            return
        step = actions.escalate(enf, now, self.kill_wait_s, lambda: self.membership.members(self.lease.id))
        if enf.stage == "done":
            self._done.set()
            return
        self._report(out, step, enf.cause, wall)

    # -- usage records -------------------------------------------------------------------
    def _record(self, patience_s: float = LEDGER_PATIENCE_S) -> None:
        figures = (self.peak_bytes, round(self.gpu_seconds, 3))
        if figures == self._recorded and self._trouble is None:
            return
        note = self._trouble
        try:
            with self._patient(patience_s):
                self.engine.record_usage(self.lease.id, figures[0], figures[1], note=note)
        except ChronosError as exc:
            self._troubled(f"cannot record the lease's usage (peak {format_bytes(figures[0])}): {exc}")
            return  # the next record (or the final one) tries again
        self._recorded = figures
        if note is not None:
            self._trouble = None
            text = f"lease {self.lease.id}: the ledger works again; usage recorded (earlier: {note})"
            self._say(text)
            self._pending.append(LedgerTroubleEvent(self.lease.id, time.time(), text, True))

    def _troubled(self, what: str) -> None:
        """Say once per spell that the ledger failed (a log line and an event); it goes in the audit log later."""
        if self._trouble is not None:
            return
        self._trouble = what
        text = f"lease {self.lease.id}: {what}; enforcement goes on, and the ledger is tried again"
        self._say(text)
        self._pending.append(LedgerTroubleEvent(self.lease.id, time.time(), text, False))

    def _say(self, text: str) -> None:
        """The log (stderr when nothing else is set up) hears of ledger trouble when no host takes the events."""
        if self.on_event is None:
            _log.warning("chronos: %s", text)

    @property
    def trouble(self) -> str | None:
        """What the ledger last failed at, while the failure lasts (None: every figure is recorded)."""
        return self._trouble

    def _finish(self) -> None:
        self._record(FINAL_PATIENCE_S)
        if self._trouble is not None:  # the host may wait longer for the ledger (``chronos run`` does)
            self._say(f"lease {self.lease.id}: its usage (peak {format_bytes(self.peak_bytes)}) is not yet "
                      f"recorded in the ledger: {self._trouble}")
        super()._finish()


def _ended(record: LeaseRecord, reason: str) -> LeaseRecord:
    return replace(record, state=LeaseState.RELEASED, end_reason=reason)
