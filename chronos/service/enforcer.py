"""Enforcement for every user, from one place: the service's one poll loop over all GPUs and leases.

In embedded mode each lease's processes are watched by a watchdog in the holder's own process
(:mod:`chronos.enforce.watchdog`), which a user can stop and which may only signal that user's
processes. The service runs as root and instead runs one :class:`Enforcer`: each pass makes one
backend read of every GPU's processes, judges them with the one membership rule
(:class:`chronos.accounting.Membership`), and acts with the one set of actions
(:mod:`chronos.enforce.actions`), whoever owns the processes:

* ``over_cap``: a lease's processes above its memory on a device for ``[enforce] grace`` get
  ``[enforce] on_overuse``;
* ``past_expiry``: a lease that reached its end (or was ended asking for an action, as the idle
  policy's ``terminate`` does) while its processes run gets the lease's action, else ``on_expiry``;
* ``unmanaged``: a GPU process that holds no lease (or uses a GPU its lease does not name) gets
  ``[enforce] unmanaged`` once it has been seen for ``[enforce] unmanaged_grace``;
* ``no_access``: with device gating on, a process still holding a GPU's device file its user may no
  longer open is ended (:mod:`chronos.enforce.gating`).

Enforcement never stops silently: a pass whose ledger read fails acts on the leases it last knew, a
failing audit-log write is kept and retried on the next pass, and :meth:`Enforcer.run` logs a pass
that raised and goes on.
"""

from __future__ import annotations

import logging
import os
import pwd
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from chronos import accounting, procs
from chronos.devices.base import GpuProcess
from chronos.enforce import actions
from chronos.enforce.gating import DeviceGate
from chronos.engine import Engine
from chronos.errors import ChronosError, LeaseNotFoundError
from chronos.model import Action, FindingKind, LeaseRecord, LeaseState, OnUnmanaged
from chronos.units import format_bytes

__all__ = ["WARN_AGAIN_S", "Enforcer", "Finding"]

log = logging.getLogger("chronos.enforcer")

#: An unmanaged process under ``unmanaged = "warn"`` is told again this often while it runs.
WARN_AGAIN_S = 600.0
#: Audit-log writes kept for retry while the ledger fails (the oldest are dropped past this, said in the log).
PENDING_LIMIT = 1000
#: The same failure is logged at most this often (the count of passes it hit is in the next line).
SAY_AGAIN_S = 60.0

Target = tuple[int, float]


@dataclass(frozen=True)
class Finding:
    """What one enforcement pass found about one process (or one lease's processes) and did.

    ``action`` is the configured answer (an :class:`~chronos.model.Action` or
    :class:`~chronos.model.OnUnmanaged` spelling); ``signal`` the signal sent this time (None: only
    reported or warned, or the process was already gone); ``pids`` every process it reached.
    """

    kind: FindingKind
    lease_id: str | None
    pid: int
    uid: int | None
    device: int | None
    action: str
    signal: str | None
    message: str
    at: float
    pids: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = str(self.kind)
        data["pids"] = list(self.pids)
        return data


@dataclass
class _Episode:
    enforcement: actions.Enforcement
    kind: FindingKind
    lease_id: str | None
    uid: int | None
    device: int | None
    members: Callable[[], Sequence[Target]]


class Enforcer:
    """One poll loop over every GPU and every active lease (see the module docstring).

    ``Enforcer(engine).run(stop)`` in a thread is how the service hosts it; :meth:`poll` is one pass.
    The settings are the engine's ``[enforce]`` table; ``on_finding`` gets each :class:`Finding`.
    """

    def __init__(self, engine: Engine, *, on_finding: Callable[[Finding], None] | None = None) -> None:
        self.engine = engine
        self.config = engine.config
        self.on_finding = on_finding
        self.membership = engine.membership([])
        self.gate = DeviceGate(self.config.device_dir) if self.config.gate_devices else None
        self.polls = 0
        self.errors = 0
        self.findings: deque[Finding] = deque(maxlen=1000)
        self._active: dict[str, LeaseRecord] = {}
        self._over_since: dict[tuple[str, int], float] = {}
        self._episodes: dict[tuple[str, str], _Episode] = {}
        self._seen: dict[Target, float] = {}
        self._told: dict[Target, float] = {}
        self._pending: deque[tuple[str, dict[str, Any]]] = deque()
        self._exempt = _uids(self.config.unmanaged_exempt)
        self._said: dict[str, tuple[float, int]] = {}
        self._gate_problems: set[str] = set()

    # -- the loop -----------------------------------------------------------------------
    def run(self, stop: threading.Event, interval: float | None = None) -> None:
        """Pass after pass until ``stop`` is set; a pass that raises is logged and the next one runs."""
        every = self.config.enforce_interval_s if interval is None else interval
        log.info("enforcing every %gs: over the cap %s after %gs, unmanaged processes %s after %gs%s",
                 every, self.config.on_overuse, self.config.overuse_grace_s, self.config.unmanaged,
                 self.config.unmanaged_grace_s, f", device files in {self.gate.device_dir} gated" if self.gate else "")
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.poll()
            except ChronosError as exc:
                self.errors += 1
                log.error("enforcement pass failed: %s; the next pass runs as usual", exc)
            except Exception:
                self.errors += 1
                log.exception("enforcement pass failed; the next pass runs as usual")
            stop.wait(max(0.0, every - (time.monotonic() - started)))

    # -- one pass -----------------------------------------------------------------------
    def poll(self) -> list[Finding]:
        """One pass: one ledger read, one read of every GPU's processes, then every action due."""
        self.polls += 1
        now, mono = time.time(), time.monotonic()
        out: list[Finding] = []
        records = self._leases()
        gpu = self._processes()
        current = records if records is not None else \
            [lease for lease in self._active.values() if not _past(lease, now)]
        by_id = {lease.id: lease for lease in current}
        for lease in list(self._active.values()):
            fresh = by_id.get(lease.id)  # an extension since the last pass moves the end
            if fresh is None or _past(fresh, now):
                self._lease_ended(out, fresh or lease, now, mono)
        self._active = {lease.id: lease for lease in current}
        self.membership.update(current)
        if gpu is not None:
            self._over_cap(out, gpu, now, mono)
            self._unmanaged(out, gpu, now, mono)
        if self.gate is not None:
            self._gated(out, current, now, mono)
        self._escalate(out, now, mono)
        self._flush()
        for finding in out:
            self._emit(finding)
        return out

    def _leases(self) -> list[LeaseRecord] | None:
        try:
            return self.engine.active_records()  # ends expired leases and dead holders' (a ledger write)
        except Exception as exc:
            self._error("ledger", f"enforcer: cannot read the ledger ({exc}); acting on the {len(self._active)} "
                                  "leases last read")
            return None

    def _processes(self) -> list[GpuProcess] | None:
        try:
            return self.engine.backend.processes()  # one read covering every GPU
        except Exception as exc:
            self._error("backend", f"enforcer: cannot read the GPUs' processes ({exc}); this pass checks expiry "
                                   "only")
            return None

    # -- leases that ended ----------------------------------------------------------------
    def _lease_ended(self, out: list[Finding], lease: LeaseRecord, now: float, mono: float) -> None:
        """``lease`` was active at the last pass and is not now: act as its end asks, on its members
        as the last pass knew them (the membership still holds the lease here)."""
        action: Action | None
        if _past(lease, now):
            state, action = LeaseState.EXPIRED, lease.end_action or self.config.on_expiry
        else:
            try:
                fresh = self.engine.get(lease.id).record
            except LeaseNotFoundError:
                return
            except Exception as exc:
                log.error("enforcer: cannot read lease %s (%s); its processes are left as they are", lease.id, exc)
                return
            state = fresh.state
            action = fresh.end_action or (self.config.on_expiry if state == LeaseState.EXPIRED else None)
        key = ("end", lease.id)
        if action is None or key in self._episodes:
            return
        members = self.membership.members(lease.id)
        if not members:
            return
        enf, step = actions.begin("expiry" if state == LeaseState.EXPIRED else "release", action, members, mono)
        self._episodes[key] = _Episode(enf, FindingKind.PAST_EXPIRY, lease.id, lease.uid, None, lambda: ())
        what = "reached its end" if state == LeaseState.EXPIRED else f"was {state} asking for {action}"
        if action == Action.WARN:
            self._tell([pid for pid, _ in members], f"lease {lease.id} {what}; release the GPU")
        out.append(self._finding(FindingKind.PAST_EXPIRY, lease.id, members[0][0], lease.uid, None, str(action),
                                 step, f"lease {lease.id} of {lease.owner} {what}", now))

    # -- over the cap ---------------------------------------------------------------------
    def _over_cap(self, out: list[Finding], gpu: list[GpuProcess], now: float, mono: float) -> None:
        used = accounting.usage(gpu, self.membership)
        over: set[tuple[str, int]] = set()
        for lease_id, per_device in used.items():
            lease = self._active[lease_id]
            for device, nbytes in per_device.items():
                if nbytes is not None and nbytes > lease.memory_bytes:
                    over.add((lease_id, device))
                    self._one_over(out, lease, device, nbytes, gpu, now, mono)
        for key in [k for k in self._over_since if k not in over]:
            del self._over_since[key]
            self._episodes.pop(("overuse", f"{key[0]}:{key[1]}"), None)

    def _one_over(self, out: list[Finding], lease: LeaseRecord, device: int, nbytes: int, gpu: list[GpuProcess],
                  now: float, mono: float) -> None:
        since = self._over_since.setdefault((lease.id, device), mono)
        key = ("overuse", f"{lease.id}:{device}")
        episode = self._episodes.get(key)
        if episode is not None:
            enf = episode.enforcement
            rearm = (enf.stage == "interrupt" and mono - enf.since >= self.config.kill_wait_s) or \
                    (enf.stage == "done" and enf.action != Action.WARN)
            if not rearm:
                return
            del self._episodes[key]  # still over after an interrupt's wait, or new processes after the last
        if mono - since < self.config.overuse_grace_s:
            return
        action = self.config.on_overuse
        members = self.membership.members(lease.id)
        enf, step = actions.begin("overuse", action, members, mono)
        self._episodes[key] = _Episode(enf, FindingKind.OVER_CAP, lease.id, lease.uid, device,
                                       lambda: self.membership.members(lease.id))
        text = (f"lease {lease.id} of {lease.owner}: GPU {device}: {format_bytes(nbytes)} used, over its "
                f"{format_bytes(lease.memory_bytes)} cap for {mono - since:.1f}s")
        if action == Action.WARN:
            self._tell([pid for pid, _ in members], text)
        biggest = max((p for p in gpu if p.device_index == device and self.membership.lease_of(p.pid) == lease.id),
                      key=lambda p: p.used_bytes or 0, default=None)
        pid = biggest.pid if biggest is not None else (members[0][0] if members else 0)
        out.append(self._finding(FindingKind.OVER_CAP, lease.id, pid, lease.uid, device, str(action), step, text,
                                 now))

    # -- processes that hold no lease -------------------------------------------------------
    def _unmanaged(self, out: list[Finding], gpu: list[GpuProcess], now: float, mono: float) -> None:
        me = os.getpid()
        found: dict[Target, accounting.Unmanaged] = {}
        for item in accounting.unmanaged(gpu, self.membership):
            started = procs.start_time(item.process.pid)
            if item.process.pid != me and started is not None:
                found.setdefault((item.process.pid, started), item)
        for key in [k for k in self._seen if k not in found]:
            self._seen.pop(key, None)
            self._told.pop(key, None)
        policy = self.config.unmanaged
        for target, item in found.items():
            seen = self._seen.setdefault(target, mono)
            uid = _uid_of(target[0])
            if mono - seen < self.config.unmanaged_grace_s or ("pid", _key(target)) in self._episodes:
                continue
            told = self._told.get(target)
            exempt = uid in self._exempt
            if told is not None and (policy != OnUnmanaged.WARN or exempt or mono - told < WARN_AGAIN_S):
                continue
            self._told[target] = mono
            proc = item.process
            where = f"GPU {proc.device_index}" + (f" (lease {item.lease_id} does not name it)" if item.lease_id else "")
            text = (f"process {target[0]} of {_name(uid)} uses {where} with "
                    f"{format_bytes(proc.used_bytes) if proc.used_bytes is not None else 'hidden'} memory and "
                    f"holds no lease for it")
            step = actions.Step()
            if exempt:
                text += " (exempt: reported only)"
            elif policy == OnUnmanaged.WARN:
                self._tell([target[0]], text + "; reserve it with `chronos reserve` or stop using the GPU")
            elif policy == OnUnmanaged.TERMINATE:
                enf, step = actions.begin("unmanaged", Action.TERMINATE, [target], mono)
                self._episodes[("pid", _key(target))] = _Episode(enf, FindingKind.UNMANAGED, item.lease_id, uid,
                                                                 proc.device_index, lambda: ())
            out.append(self._finding(FindingKind.UNMANAGED, item.lease_id, target[0], uid, proc.device_index,
                                     str(OnUnmanaged.REPORT if exempt else policy), step, text, now))

    # -- device gating ----------------------------------------------------------------------
    def _gated(self, out: list[Finding], current: list[LeaseRecord], now: float, mono: float) -> None:
        assert self.gate is not None
        # Every pass, since a root program may make a file 0666 again at any time (ModifyDeviceFiles=1):
        # each problem is logged when it appears, and again when it is gone.
        mode = self.config.device_mode
        if mode is not None:
            try:
                for line in self.gate.keep_mode(mode):
                    log.warning("%s", line)
            except ChronosError as exc:
                self._error("mode", str(exc))
        try:
            problems = set(self.gate.problems(mode_kept=mode is not None))
        except ChronosError as exc:  # the directory cannot be listed: the sync below says so too
            self._error("problems", str(exc))
            problems = self._gate_problems
        for line in sorted(problems - self._gate_problems):
            self.errors += 1
            log.error("%s", line)
        for line in sorted(self._gate_problems - problems):
            log.info("device gating, fixed since the last pass: %s", line)
        self._gate_problems = problems
        try:
            for change in self.engine.sync_gate(strict=True):
                log.info("device gating: %s", change)
        except Exception as exc:
            self._error("gate", str(exc))
        allowed = {(lease.uid, index) for lease in current for index in lease.devices}
        targeted = {t for episode in self._episodes.values() for t in episode.enforcement.targets}
        try:
            holders = self.gate.holders(lambda uid, index: (uid, index) in allowed)
        except Exception as exc:
            self._error("holders", f"device gating: cannot look for processes holding the device files ({exc})")
            return
        for holder in holders:
            target = (holder.pid, holder.started)
            key = ("pid", _key(target))
            if target in targeted or key in self._episodes:
                continue
            enf, step = actions.begin("no_access", Action.TERMINATE, [target], mono)
            self._episodes[key] = _Episode(enf, FindingKind.NO_ACCESS, None, holder.uid, holder.index, lambda: ())
            text = (f"process {holder.pid} of {_name(holder.uid)} still holds GPU {holder.index}'s device file and "
                    "holds no lease on it")
            out.append(self._finding(FindingKind.NO_ACCESS, None, holder.pid, holder.uid, holder.index,
                                     str(Action.TERMINATE), step, text, now))

    # -- escalation -------------------------------------------------------------------------
    def _escalate(self, out: list[Finding], now: float, mono: float) -> None:
        for key, episode in list(self._episodes.items()):
            enf = episode.enforcement
            step = actions.escalate(enf, mono, self.config.kill_wait_s, episode.members)
            if step.signal_name is not None or step.unkillable:
                text = (f"sent SIGKILL to {', '.join(map(str, step.pids))} ({enf.cause}): still running "
                        f"{self.config.kill_wait_s:g}s after SIGTERM") if step.signal_name else \
                    (f"process {', '.join(map(str, step.unkillable))} survived SIGKILL for "
                     f"{actions.UNKILLABLE_AFTER_S:.0f}s (stuck in the kernel or driver)")
                pid = (step.pids or step.unkillable)[0]
                out.append(self._finding(episode.kind, episode.lease_id, pid, episode.uid, episode.device,
                                         str(enf.action), step, text, now))
            if key[0] != "overuse" and enf.stage in ("done", "interrupt"):
                del self._episodes[key]

    # -- reporting --------------------------------------------------------------------------
    def _finding(self, kind: FindingKind, lease_id: str | None, pid: int, uid: int | None, device: int | None,
                 action: str, step: actions.Step, text: str, now: float) -> Finding:
        if step.signal_name is not None:
            text += f"; sent {step.signal_name} to {', '.join(map(str, step.pids))}"
        finding = Finding(kind, lease_id, pid, uid, device, action, step.signal_name, text, now,
                          step.pids or step.unkillable)
        if lease_id is not None:
            self._pending.append((lease_id, {"kind": str(kind), "pid": pid, "device": device, "action": action,
                                             "signal": step.signal_name, "pids": list(finding.pids),
                                             "message": finding.message}))
        return finding

    def _emit(self, finding: Finding) -> None:
        self.findings.append(finding)
        level = logging.INFO if finding.signal is None and finding.action == str(OnUnmanaged.REPORT) \
            else logging.WARNING
        log.log(level, "%s: %s", finding.kind, finding.message)
        if self.on_finding is not None:
            try:
                self.on_finding(finding)
            except Exception as exc:  # a broken callback never stops enforcement
                log.error("enforcer: finding handler failed: %s", exc)

    def _flush(self) -> None:
        """Write the findings about leases to the audit log; what fails is kept for the next pass."""
        if len(self._pending) > PENDING_LIMIT:
            dropped = len(self._pending) - PENDING_LIMIT
            for _ in range(dropped):
                self._pending.popleft()
            log.error("enforcer: the ledger has failed for a while; %d audit entries dropped (the log above has "
                      "them)", dropped)
        while self._pending:
            lease_id, detail = self._pending[0]
            try:
                self.engine.record_enforcement(lease_id, detail)
            except Exception as exc:
                self._error("audit", f"enforcer: cannot write to the audit log ({exc}); {len(self._pending)} "
                                     "entries kept, retried next pass")
                return
            self._pending.popleft()

    @property
    def pending(self) -> int:
        """Audit-log entries waiting for the ledger to accept them."""
        return len(self._pending)

    def _error(self, what: str, text: str) -> None:
        """Count a failure and log it: at once the first time, then at most every :data:`SAY_AGAIN_S`
        with how many passes it hit meanwhile, so a lasting fault is in the log without flooding it."""
        self.errors += 1
        now = time.monotonic()
        last, missed = self._said.get(what, (-SAY_AGAIN_S, 0))
        if now - last >= SAY_AGAIN_S:
            log.error("%s%s", text, f" ({missed} more times since the last report)" if missed else "")
            self._said[what] = (now, 0)
        else:
            self._said[what] = (last, missed + 1)

    def _tell(self, pids: Sequence[int], text: str) -> None:
        for pid in pids:
            actions.tell(pid, f"chronos: {text}\n")


# -- helpers -------------------------------------------------------------------------------
def _past(lease: LeaseRecord, now: float) -> bool:
    return lease.expires_at is not None and lease.expires_at <= now


def _key(target: Target) -> str:
    return f"{target[0]}:{target[1]:.3f}"


def _uid_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _name(uid: int | None) -> str:
    if uid is None:
        return "an unknown user"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _uids(names: Sequence[str]) -> set[int]:
    out = set()
    for name in names:
        try:
            out.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            log.warning("[enforce] unmanaged_exempt names %r, who is no user on this machine", name)
    return out
