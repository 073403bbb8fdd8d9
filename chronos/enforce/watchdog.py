"""Tier 2, the watchdog: a lease holder's process tree over its cap past a grace period, or a lease
past its end, gets a policy: warn, interrupt (SIGINT), terminate (SIGTERM, then SIGKILL after a
wait, as Slurm does at a job's time limit) or kill (SIGKILL).

One class, three hosts: :meth:`Watchdog.start` runs it in a daemon thread (a notebook kernel),
:meth:`Watchdog.run_async` as an asyncio task (the kernel provisioner), and ``chronos run`` starts
the thread around its child. Each poll makes one ``processes()`` call for all of the lease's
devices; the lease is re-read from the ledger about once a second so that an extension or a
release by someone else is seen.

Accounting, per device of the lease: the bytes NVML reports for processes of the tree. Where it
reports none for a process of the tree (``used_bytes`` None: MPS on older drivers, some
containers), that device is accounted whole: what the device uses, less what other processes are
known to use and less what was unattributed when the watchdog started. ``peak_bytes`` is the
largest figure seen on any one device (leases are sized per device); ``gpu_seconds`` counts, for
each poll interval, the devices on which the tree held memory (device-seconds of held memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chronos import procs
from chronos.accounting import TreeMembership
from chronos.errors import ChronosError, InvalidRequestError, LeaseNotFoundError
from chronos.lease import ACTIVE, EXPIRED, Lease
from chronos.units import format_bytes, format_duration

if TYPE_CHECKING:
    from chronos.devices.base import Backend, GpuProcess
    from chronos.engine import Engine

__all__ = [
    "DEFAULT_GRACE_S",
    "DEFAULT_KILL_WAIT_S",
    "DEFAULT_RATE_HZ",
    "DEFAULT_WARN_AT",
    "POLICIES",
    "ExpiryWarning",
    "HolderExitedEvent",
    "LeaseEndedEvent",
    "OveruseEvent",
    "SignalEvent",
    "UnkillableEvent",
    "Watchdog",
    "WatchdogEvent",
    "check_policy",
]

POLICIES = ("warn", "interrupt", "terminate", "kill")
DEFAULT_RATE_HZ = 4.0
DEFAULT_GRACE_S = 2.0
DEFAULT_KILL_WAIT_S = 30.0
DEFAULT_WARN_AT = (600.0, 60.0)
#: After SIGKILL, a process still there this long later is reported as unkillable.
UNKILLABLE_AFTER_S = 5.0


def check_policy(policy: str, what: str = "policy") -> str:
    """``policy`` lower-cased when it is one of :data:`POLICIES`; a one-line error otherwise."""
    value = str(policy).strip().lower()
    if value not in POLICIES:
        raise InvalidRequestError(f"{what} {policy!r} is not one of {', '.join(POLICIES)}")
    return value


# --------------------------------------------------------------------------- events


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
    action: str


@dataclass(frozen=True)
class ExpiryWarning(WatchdogEvent):
    """The lease ends in ``remaining_s`` seconds (a warning mark was passed)."""

    remaining_s: float
    mark_s: float


@dataclass(frozen=True)
class LeaseEndedEvent(WatchdogEvent):
    """The lease ended (expired, released or revoked) while the tree ran; ``action`` follows."""

    state: str
    reason: str | None
    action: str | None


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


# --------------------------------------------------------------------------- the watchdog


@dataclass
class _Enforcement:
    cause: str  # "overuse" or "expiry" or "release"
    policy: str
    stage: str  # "interrupt", "terminate", "kill", "done"
    since: float
    targets: list[tuple[int, float]] = field(default_factory=list)
    reported_unkillable: bool = False


class Watchdog:
    """Watches one lease's holder tree; see the module docstring.

    ``pid`` is the root of the watched tree (default: the lease's holder). ``on_event`` is called
    with each :class:`WatchdogEvent`: from the watchdog's thread in :meth:`start`, on the event
    loop in :meth:`run_async`. ``on_release`` is the policy for a lease released or revoked while
    the tree runs (None: stop watching and leave the processes alone).
    """

    def __init__(
        self,
        lease: Lease | str,
        *,
        engine: Engine | None = None,
        pid: int | None = None,
        rate_hz: float = DEFAULT_RATE_HZ,
        grace_s: float = DEFAULT_GRACE_S,
        kill_wait_s: float = DEFAULT_KILL_WAIT_S,
        on_overuse: str = "terminate",
        on_expiry: str | None = None,
        on_release: str | None = None,
        warn_at: Sequence[float] = DEFAULT_WARN_AT,
        on_event: Callable[[WatchdogEvent], None] | None = None,
        refresh_s: float = 1.0,
        record_s: float = 5.0,
        backend: Backend | None = None,
    ) -> None:
        if engine is None:
            engine = lease._engine if isinstance(lease, Lease) and lease._engine is not None else None
        if engine is None:
            from chronos.engine import default_engine

            engine = default_engine()
        self.engine = engine
        self.lease = engine.get(lease.id if isinstance(lease, Lease) else str(lease))
        if rate_hz <= 0 or not rate_hz < float("inf"):
            raise InvalidRequestError(
                f"watchdog rate must be a positive number of polls a second, got {rate_hz}"
            )
        if grace_s < 0 or kill_wait_s < 0:
            raise InvalidRequestError("grace and kill wait must be zero or more seconds")
        self.rate_hz = float(rate_hz)
        self.grace_s = float(grace_s)
        self.kill_wait_s = float(kill_wait_s)
        self.on_overuse = check_policy(on_overuse, "overuse policy")
        self.on_expiry = check_policy(
            on_expiry or str(getattr(engine.config, "on_expiry", None) or "terminate"), "expiry policy"
        )
        self.on_release = check_policy(on_release, "release policy") if on_release is not None else None
        self.warn_at = tuple(sorted((float(m) for m in warn_at if m > 0), reverse=True))
        self.on_event = on_event
        self.refresh_s = refresh_s
        self.record_s = record_s
        self.backend = backend if backend is not None else engine.backend
        root = pid if pid is not None else self.lease.pid
        if root is None:
            raise InvalidRequestError(
                f"lease {self.lease.id} has no holder process: bind it, or give the watchdog a pid to watch"
            )
        root_start = self.lease.pid_start if pid is None else procs.start_time(root)
        self.tree = TreeMembership(root, root_start)
        self.root_pid = root
        self.peak_bytes = 0
        self.gpu_seconds = 0.0
        self.usage: dict[int, int] = {}
        self.events: list[WatchdogEvent] = []
        self.end_reason: str | None = None
        self.polls = 0
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_poll: float | None = None
        self._last_refresh = time.monotonic()
        self._last_record = time.monotonic()
        self._recorded: tuple[int, float] | None = None
        self._over_since: dict[int, float] = {}
        self._warned_over: set[int] = set()
        self._enforcing: _Enforcement | None = None
        self._warned_marks: set[float] = set()
        self._baseline: dict[int, int] | None = None
        self._init_marks()

    # -- public --------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """True once the watchdog has nothing left to do (tree gone, lease over and acted on)."""
        return self._done.is_set()

    def start(self) -> Watchdog:
        """Run in a daemon thread; returns self."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(
            target=self.run, name=f"chronos-watchdog-{self.lease.id}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop polling, record usage, and wait for the thread (when there is one)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the watchdog is done; True when it is."""
        return self._done.wait(timeout)

    def run(self) -> None:
        """Poll at ``rate_hz`` until stopped or done (blocking: the thread host)."""
        interval = 1.0 / self.rate_hz
        next_at = time.monotonic()
        try:
            while not self._stop.is_set() and not self._done.is_set():
                self._dispatch(self.poll())
                next_at += interval
                delay = next_at - time.monotonic()
                if delay < 0:  # fell behind (a slow poll): do not burst to catch up
                    next_at = time.monotonic()
                    delay = 0
                self._stop.wait(delay)
        finally:
            self._finish()

    async def run_async(self) -> None:
        """Poll at ``rate_hz`` until stopped, done or cancelled (the asyncio host).

        Each poll runs in a worker thread so a slow ledger never blocks the event loop; events
        are handed to ``on_event`` on the loop.
        """
        interval = 1.0 / self.rate_hz
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        try:
            while not self._stop.is_set() and not self._done.is_set():
                self._dispatch(await asyncio.to_thread(self.poll))
                next_at += interval
                delay = next_at - loop.time()
                if delay < 0:
                    next_at = loop.time()
                    delay = 0
                await asyncio.sleep(delay)
        finally:
            await asyncio.shield(asyncio.to_thread(self._finish))

    def start_task(self) -> asyncio.Task[None]:
        """Schedule :meth:`run_async` on the running loop; cancel the task or call :meth:`stop`."""
        return asyncio.get_running_loop().create_task(
            self.run_async(), name=f"chronos-watchdog-{self.lease.id}"
        )

    # -- one poll ------------------------------------------------------------------------
    def poll(self) -> list[WatchdogEvent]:
        """Look once: lease state, expiry, usage, overuse, escalation. Returns new events."""
        now = time.monotonic()
        wall = time.time()
        out: list[WatchdogEvent] = []
        self.polls += 1
        if now - self._last_refresh >= self.refresh_s:
            self._last_refresh = now
            self._refresh(out, wall)
        enf = self._enforcing
        if (enf is None or (enf.stage == "interrupt" and enf.cause == "overuse")) and not self._done.is_set():
            self._check_lease(out, wall, now)
        if not procs.is_alive(self.tree.root_pid, self.tree.root_start):
            if self._enforcing is None or not self._alive_targets():
                out.append(
                    HolderExitedEvent(self.lease.id, wall, f"process {self.root_pid} exited", self.root_pid)
                )
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
        self.events.extend(events)
        if len(self.events) > 1000:
            del self.events[:-1000]
        return events

    def _dispatch(self, events: Iterable[WatchdogEvent]) -> None:
        if self.on_event is None:
            return
        for event in events:
            try:
                self.on_event(event)
            except Exception as exc:  # a broken callback must never stop enforcement
                print(f"chronos: watchdog event handler failed: {exc}", file=sys.stderr)

    # -- the lease -----------------------------------------------------------------------
    def _refresh(self, out: list[WatchdogEvent], wall: float) -> None:
        old_end = self.lease.expires_at
        try:
            self.lease = self.engine.get(self.lease.id)
        except LeaseNotFoundError:
            self.lease.state = "released"
            self.lease.end_reason = "lease no longer in the ledger"
        except ChronosError:
            return  # a busy or unreadable ledger: keep the last copy, try again next time
        if self.lease.expires_at != old_end:
            self._init_marks()

    def _init_marks(self) -> None:
        remaining = self.lease.remaining
        # marks already passed at the start (or after an extension, still passed) are not warned
        self._warned_marks = {m for m in self.warn_at if remaining <= m}

    def _check_lease(self, out: list[WatchdogEvent], wall: float, now: float) -> None:
        lease = self.lease
        past_end = lease.expires_at is not None and wall >= lease.expires_at
        if lease.state == ACTIVE and not past_end:
            remaining = (lease.expires_at or wall) - wall
            for mark in self.warn_at:
                if remaining <= mark and mark not in self._warned_marks:
                    self._warned_marks.add(mark)
                    out.append(
                        ExpiryWarning(
                            lease.id,
                            wall,
                            f"lease {lease.id} ends in {format_duration(max(1.0, remaining))}",
                            remaining,
                            mark,
                        )
                    )
            return
        if past_end or lease.state == EXPIRED:
            policy: str | None = self.on_expiry
            cause, state = "expiry", EXPIRED
            reason: str | None = "reached its end time"
        else:
            policy = self.on_release
            cause, state, reason = "release", lease.state, lease.end_reason
        what = f"lease {lease.id} {'expired' if cause == 'expiry' else lease.state}"
        if reason and cause != "expiry":
            what += f" ({reason})"
        out.append(LeaseEndedEvent(lease.id, wall, what, state, reason, policy))
        if policy is None or policy == "warn":
            self.end_reason = what if policy == "warn" else None
            self._done.set()
            return
        self.end_reason = what
        self._begin(out, cause, policy, wall, now)

    # -- usage ---------------------------------------------------------------------------
    def _account(self, out: list[WatchdogEvent], wall: float, now: float) -> None:
        devices = self.lease.devices
        try:
            gpu_procs = self.backend.processes(list(devices))
        except ChronosError:
            return
        usage, estimated = self._tree_usage(gpu_procs, devices)
        self.usage = usage
        if self._last_poll is not None:
            dt = min(now - self._last_poll, 2.0 / self.rate_hz + 1.0)
            self.gpu_seconds += dt * sum(1 for used in usage.values() if used > 0)
        self._last_poll = now
        top = max(usage.values(), default=0)
        self.peak_bytes = max(self.peak_bytes, top)
        cap = self.lease.memory_bytes
        for dev in devices:
            used = usage.get(dev, 0)
            if used <= cap:
                self._over_since.pop(dev, None)
                self._warned_over.discard(dev)
                continue
            since = self._over_since.setdefault(dev, now)
            if now - since < self.grace_s or dev in self._warned_over:
                continue
            if self._enforcing is not None:
                continue  # already acting on this tree
            self._warned_over.add(dev)
            policy = self.on_overuse
            message = (
                f"GPU {dev}: {format_bytes(used)} used, over the lease's {format_bytes(cap)} cap "
                f"for {now - since:.1f}s{' (estimated for the device)' if dev in estimated else ''}"
            )
            out.append(OveruseEvent(self.lease.id, wall, message, dev, used, cap, dev in estimated, policy))
            if policy != "warn":
                self.end_reason = message
                self._begin(out, "overuse", policy, wall, now)

    def _tree_usage(
        self, gpu_procs: list[GpuProcess], devices: Sequence[int]
    ) -> tuple[dict[int, int], set[int]]:
        usage: dict[int, int] = {}
        unknown: set[int] = set()
        others_known: dict[int, int] = {}
        for proc in gpu_procs:
            if proc.pid in self.tree:
                if proc.used_bytes is None:
                    unknown.add(proc.device_index)
                else:
                    usage[proc.device_index] = usage.get(proc.device_index, 0) + proc.used_bytes
            elif proc.used_bytes is not None:
                others_known[proc.device_index] = others_known.get(proc.device_index, 0) + proc.used_bytes
        if self._baseline is None or unknown:
            try:
                dev_used = {
                    d.index: d.memory_used_bytes for d in self.backend.devices() if d.index in devices
                }
            except ChronosError:
                dev_used = {}
            if self._baseline is None:
                # memory nobody is known to use when watching starts: driver overhead, hidden users
                self._baseline = {
                    i: max(0, u - others_known.get(i, 0) - usage.get(i, 0)) for i, u in dev_used.items()
                }
            for index in unknown:
                if index in dev_used:
                    whole = dev_used[index] - others_known.get(index, 0) - self._baseline.get(index, 0)
                    usage[index] = max(usage.get(index, 0), whole)
        return usage, unknown

    # -- acting --------------------------------------------------------------------------
    def _begin(self, out: list[WatchdogEvent], cause: str, policy: str, wall: float, now: float) -> None:
        members = self.tree.members()
        if not members:
            self._enforcing = _Enforcement(cause, policy, "done", now)
            return
        if policy == "interrupt":
            targets = members[:1]  # the main program, as Ctrl-C would reach it
            self._enforcing = _Enforcement(cause, policy, "interrupt", now, targets)
            self._send(out, signal.SIGINT, targets, cause, wall)
        elif policy == "terminate":
            self._enforcing = _Enforcement(cause, policy, "terminate", now, members)
            self._send(out, signal.SIGTERM, members, cause, wall)
        else:
            self._enforcing = _Enforcement(cause, policy, "kill", now, members)
            self._send(out, signal.SIGKILL, members, cause, wall)

    def _send(
        self,
        out: list[WatchdogEvent],
        sig: signal.Signals,
        targets: list[tuple[int, float]],
        cause: str,
        wall: float,
    ) -> None:
        sent = []
        for pid, started in targets:
            if procs.is_alive(pid, started):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
                    sent.append(pid)
        if sent:
            out.append(
                SignalEvent(
                    self.lease.id,
                    wall,
                    f"sent {sig.name} to {', '.join(map(str, sent))} ({cause})",
                    sig.name,
                    tuple(sent),
                    cause,
                )
            )

    def _alive_targets(self) -> list[tuple[int, float]]:
        enforcing = self._enforcing
        if enforcing is None:
            return []
        return [(p, s) for p, s in enforcing.targets if procs.is_alive(p, s)]

    def _escalate(self, out: list[WatchdogEvent], wall: float, now: float) -> None:
        enf = self._enforcing
        assert enf is not None
        if enf.stage == "done":
            self._done.set()
            return
        alive = self._alive_targets()
        if enf.stage == "interrupt":
            if enf.cause != "overuse":
                # the lease is over: SIGINT once, then the processes are left to end themselves
                self._done.set()
            elif not any(used > self.lease.memory_bytes for used in self.usage.values()):
                self._enforcing = None  # back under the cap: the episode is over
                self._warned_over.clear()
            elif now - enf.since >= self.kill_wait_s:
                self._warned_over.clear()  # still over: interrupt again at the next check
                self._enforcing = None
            return
        if not alive:
            enf.stage = "done"
            self._done.set()
            return
        if enf.stage == "terminate" and now - enf.since >= self.kill_wait_s:
            # new children may have appeared since SIGTERM: kill the whole tree as it is now
            current = {p: s for p, s in self.tree.members()}
            current.update(dict(alive))
            enf.targets = list(current.items())
            enf.stage = "kill"
            enf.since = now
            self._send(out, signal.SIGKILL, enf.targets, enf.cause, wall)
        elif enf.stage == "kill" and now - enf.since >= UNKILLABLE_AFTER_S and not enf.reported_unkillable:
            enf.reported_unkillable = True
            pids = tuple(p for p, _ in alive)
            out.append(
                UnkillableEvent(
                    self.lease.id,
                    wall,
                    f"process {', '.join(map(str, pids))} survived SIGKILL "
                    f"for {UNKILLABLE_AFTER_S:.0f}s (stuck in the kernel or driver)",
                    pids,
                )
            )
            self._done.set()

    # -- usage records -------------------------------------------------------------------
    def _record(self) -> None:
        figures = (self.peak_bytes, round(self.gpu_seconds, 3))
        if figures == self._recorded:
            return
        try:
            self.engine.record_usage(self.lease.id, figures[0], figures[1])
            self._recorded = figures
        except ChronosError:
            pass  # the next record (or the final one) tries again

    def _finish(self) -> None:
        self._record()
        self._done.set()
