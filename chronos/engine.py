"""The lease engine, and the composition root: one settings snapshot, one ledger, one backend.

Everything below it (caps, the watchdog, accounting, stats, run, the widget) is handed what it
needs from here and never looks anything up for itself. Every write is one short
``BEGIN IMMEDIATE`` transaction that first reclaims expired leases and leases whose holder died,
so the accounting stays true with no daemon.
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chronos import accounting, limits, procs, scheduler, waiting
from chronos import settings as settings_module
from chronos.accounting import DeviceStatus
from chronos.config import Config
from chronos.devices import Backend, Device, GpuProcess, backend_for, visible_indices
from chronos.enforce import caps
from chronos.errors import (
    ChronosError,
    InvalidRequestError,
    LeaseNotFoundError,
    NamespaceError,
    NotAllowedError,
    StateError,
    UnavailableError,
)
from chronos.identity import User, current_user, groups_of, is_admin, lookup_user
from chronos.lease import Lease
from chronos.ledger import Event, Ledger, queue_patience  # noqa: TID251 - the engine owns the ledger
from chronos.ledger import patience as ledger_patience  # noqa: TID251
from chronos.limits import Limits
from chronos.live import LiveView
from chronos.model import ENDED_STATES, Action, LeaseRecord, LeaseState, Priority, WaitUpdate, evolve
from chronos.policy import bookings, idle
from chronos.policy.retention import Retention
from chronos.policy.runtime import Policies
from chronos.request import RequestSpec, lease_duration, parse_lease_id, parse_request
from chronos.settings import Settings
from chronos.state import state_dir as checked_state_dir
from chronos.units import MemorySpec, check_duration, format_duration, parse_instant

if TYPE_CHECKING:  # the report and the metrics load with the calls that make them: most commands never do
    from chronos.policy.report import Report

__all__ = ["DeviceStatus", "Engine", "WaitUpdate"]

#: How often a queued request re-checks whether it can start.
WAIT_POLL_S = 0.2
#: How often a waiter with a progress callback re-plans the queue for its estimated start (when it polls).
ESTIMATE_EVERY_S = 5.0
#: How often the queue's leader checks every holder and the GPUs' memory even when the ledger did not change,
#: and how often it re-plans with nothing changed (estimates drift as time passes).
LEADER_FULL_S = 1.0
#: How long a holder seen alive is taken to be alive without reading /proc again.
ALIVE_TTL_S = 1.0
LEADER_REPLAN_S = 30.0

ACTIVE, QUEUED = LeaseState.ACTIVE, LeaseState.QUEUED
#: Audit events after which the device files' ACLs change (device gating): a grant, and every end.
_GATED_EVENTS = frozenset({"granted", *(str(state) for state in ENDED_STATES)})


class Engine:
    """Leases on one machine: one ledger, one GPU backend, one settings snapshot.

    ``settings`` default to this process's (:func:`chronos.settings.current`); ``state_dir``,
    ``config`` and ``backend`` override parts of them (a backend given here reaches everything
    the engine hands a backend to: caps, the watchdog, the widget).
    """

    def __init__(self, state_dir: str | Path | None = None, backend: Backend | None = None,
                 config: Config | None = None, *, settings: Settings | None = None) -> None:
        chosen = settings or settings_module.current()
        if config is not None:
            chosen = replace(chosen, config=config)
        if state_dir is not None:
            chosen = chosen.with_state_dir(state_dir)
        self.settings = chosen
        self._injected = backend
        self._backend = backend
        self._ledger: Ledger | None = None
        self._lock = threading.RLock()
        #: Idle sampling, limits per user and group, bookings, fair share (:mod:`chronos.policy.runtime`).
        self.policies = Policies(self)
        self.policies.on_tick = self._write_metrics
        #: Pruning of history past ``[history] keep`` (:mod:`chronos.policy.retention`).
        self.retention = Retention()
        #: What the queue's leader last saw, when this process leads (:meth:`_lead`).
        self._leading = _Leading()
        #: Holders seen alive (pid, start) -> when; queued leases' requests by id.
        self._seen_alive: dict[tuple[int, float | None], float] = {}
        self._requests: dict[str, scheduler.Request] = {}
        #: The group commit under way (:meth:`batch`), and what it read once for all its operations.
        self._group: _Group | None = None
        #: The open leases' derived facts, kept between writes (:mod:`chronos.live`).
        self._view = LiveView()
        self._waiters_due = 0.0  # when the queued requests' waiters are next looked at in a write
        self._queue: tuple[int, tuple[scheduler.Request, ...]] | None = None
        self._states: tuple[tuple[tuple[int, str, int, int], ...], tuple[scheduler.DeviceState, ...]] | None = None
        #: History read apart from the writes (:meth:`read_history_apart`).
        self._history_apart = False
        _engines.setdefault((chosen, id(backend)), self)

    # -- plumbing -------------------------------------------------------------------------
    @property
    def config(self) -> Config:
        return self.settings.config

    @property
    def on_expiry(self) -> Action:
        return self.settings.config.on_expiry

    @property
    def ledger(self) -> Ledger:
        ledger = self._ledger  # open already (every lease operation asks many times): no lock to take
        if ledger is not None:
            return ledger
        with self._lock:
            if self._ledger is None:
                ledger = Ledger(checked_state_dir(self.config))
                try:
                    _check_host(ledger)
                except ChronosError:
                    ledger.close()
                    raise
                if self._history_apart:
                    ledger.read_history_apart()
                self._ledger = ledger
            return self._ledger

    @property
    def ledger_id(self) -> str:
        """The ledger's name on this machine, carried by every lease's processes (``CHRONOS_LEDGER``)."""
        return self.ledger.identity

    def membership(self, leases: Sequence[LeaseRecord],
                   roots: dict[str, tuple[int, float | None]] | None = None) -> accounting.Membership:
        """The one rule for which processes are whose (:class:`chronos.accounting.Membership`), over this ledger."""
        return accounting.Membership(leases, roots, ledger=self.ledger_id)

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = backend_for(self.settings)
        return self._backend

    def read_history_apart(self) -> None:
        """Reads of history from threads outside a write go through a connection of their own
        (:meth:`chronos.ledger.Ledger.read_history_apart`): the service asks it, so that one client's long
        read never holds the others' writes."""
        with self._lock:
            self._history_apart = True
            if self._ledger is not None:
                self._ledger.read_history_apart()

    def close(self) -> None:
        with self._lock:
            if self._ledger is not None:
                self._ledger.close()
                self._ledger = None

    def __reduce__(self) -> tuple[Any, ...]:
        # A pickled lease finds an engine of the same settings (and injected backend) again.
        return (_restore, (self.settings, self._injected))

    def _handle(self, record: LeaseRecord) -> Lease:
        return Lease(record, self)

    def _event(self, lease_id: str, event: str, who: User, detail: dict[str, Any] | None = None) -> None:
        self.ledger.append_event(lease_id, event, uid=who.uid, user=who.name, pid=procs.caller()[0], detail=detail)
        if event in _GATED_EVENTS and self.config.gate_devices:
            self.sync_gate(strict=event == "granted")
            self.ledger.on_undo(self._regate)  # a rollback takes the grant or the end back: so must the ACLs

    def _regate(self) -> None:
        self.sync_gate(strict=False)

    def sync_gate(self, *, strict: bool = True) -> list[str]:
        """Device gating (``[enforce] gate_devices``, :mod:`chronos.enforce.gating`): the device files'
        ACLs made equal to the active leases. Every grant and every end passes here (through the audit
        log's one writer), inside its transaction, and the service's enforcer repeats it every pass.
        A grant whose ACL cannot be written fails (``strict``); an end never does."""
        if not self.config.gate_devices:
            return []
        from chronos.enforce.gating import DeviceGate

        active = [lease for lease in self.ledger.live() if lease.state == ACTIVE]
        try:
            return DeviceGate(self.config.device_dir).sync(active)
        except StateError as exc:
            if strict:
                raise
            import logging  # only here: every command start would pay for it

            logging.getLogger("chronos.gating").warning("%s (the next enforcement pass tries again)", exc)
            return []

    # -- reclaiming -----------------------------------------------------------------------
    def _reclaim(self, now: float, who: User, *, waiters: bool = False) -> list[LeaseRecord]:
        """End leases past their time and leases or queued requests whose holder died (inside a write).

        Returns the leases still live (active or queued), oldest first. Only the leases past their end and
        those with a process to look at are visited (:class:`chronos.live.LiveView` keeps both): every
        holder each time, the queued requests' waiters once per :data:`ALIVE_TTL_S` (or with ``waiters``).
        """
        view = self._synced()
        due = {lease.id: lease for lease in view.expired(now)}
        for lease in view.holders():
            due.setdefault(lease.id, lease)
        mono = time.monotonic()
        if waiters or mono >= self._waiters_due:
            self._waiters_due = mono + ALIVE_TTL_S
            for lease in view.waiters():
                due.setdefault(lease.id, lease)
        changed = False
        for lease_id in sorted(due, key=int):
            changed = self._reclaim_one(due[lease_id], now, who) is not due[lease_id] or changed
        if changed:
            view = self._synced()
        live, booked = view.open_leases()
        return self.policies.reclaim(live, booked, now, who)

    def _decide(self, snapshot: scheduler.Snapshot, request: scheduler.Request, live: list[LeaseRecord],
                now: float, who: User, devices: list[Device], gpu_procs: list[GpuProcess]
                ) -> tuple[scheduler.Decision, scheduler.Snapshot, list[LeaseRecord]]:
        """Decide ``request`` (inside a write). One refused for the requests that wait ahead of it is decided
        again once their waiters were looked at afresh: each is trusted alive for :data:`ALIVE_TTL_S`, and
        a request whose waiter just exited must not hold anyone back."""
        decision = scheduler.decide(snapshot, request)
        if decision.granted or decision.cause not in ("queue", "depth") or not snapshot.queue:
            return decision, snapshot, live
        view = self._synced()
        withdrawn = False
        for waiter in list(view.waiters()):
            withdrawn = self._reclaim_one(waiter, now, who, fresh=True) is not waiter or withdrawn
        if not withdrawn:
            return decision, snapshot, live
        live = self._synced().open_leases()[0]
        snapshot = self._snapshot(now, devices, gpu_procs, live)
        return scheduler.decide(snapshot, request), snapshot, live

    def _synced(self) -> LiveView:
        """The view of the open leases brought up to date with the ledger (hold the ledger's lock while
        reading it: a transaction does)."""
        ledger = self.ledger
        with ledger.locked():
            token, rows, changed = ledger.open_changes(self._view.token)
            if token != self._view.token:
                self._view.sync(token, rows, changed)
            return self._view

    def _reclaim_one(self, lease: LeaseRecord, now: float, who: User, *, fresh: bool = False) -> LeaseRecord:
        """End ``lease`` if it is past its time or its holder died; returns it as it now stands."""
        if lease.state == ACTIVE and lease.expires_at is not None and lease.expires_at <= now:
            return self._end(lease, LeaseState.EXPIRED, "reached its end time", who, at=lease.expires_at)
        # A queued request's waiter seen alive lately is trusted (hundreds may wait); a holder is always looked
        # at, since its death gives memory back at once.
        if lease.state.live and lease.pid is not None \
                and not self._alive(lease.pid, lease.pid_start, fresh=fresh or lease.state == ACTIVE):
            if lease.state == QUEUED:
                return self._end(lease, LeaseState.WITHDRAWN, f"waiting process {lease.pid} exited", who, at=now)
            return self._end(lease, LeaseState.REVOKED, f"holder process {lease.pid} exited", who, at=now)
        return lease

    def _end(self, lease: LeaseRecord, state: LeaseState, reason: str, who: User, *, at: float) -> LeaseRecord:
        self.ledger.update(lease.id, state=state, ended_at=at, end_reason=reason)
        self._event(lease.id, str(state), who, {"reason": reason, "ended_at": at})
        return evolve(lease, state=state, ended_at=at, end_reason=reason)

    def _alive(self, pid: int, started: float | None, *, fresh: bool = False) -> bool:
        """Whether a holder or waiter still runs. Unless ``fresh``, a live answer is trusted for
        :data:`ALIVE_TTL_S`, so a write does not read ``/proc`` for every queued request each time (a dead
        waiter's request then leaves the queue that much later at most). In a group commit each holder is
        looked at once for the whole group."""
        group = self._in_group()
        if group is None:
            return self._alive_now(pid, started, fresh)
        if (pid, started, fresh) not in group.alive:
            group.alive[pid, started, fresh] = self._alive_now(pid, started, fresh)
        return group.alive[pid, started, fresh]

    def _alive_now(self, pid: int, started: float | None, fresh: bool) -> bool:
        key = (pid, started)
        mono = time.monotonic()
        seen = self._seen_alive.get(key)
        if not fresh and seen is not None and mono - seen < ALIVE_TTL_S:
            return True
        alive = procs.is_alive(pid, started)
        if alive:
            if len(self._seen_alive) > 8192:
                self._seen_alive.clear()
            self._seen_alive[key] = mono
        else:
            self._seen_alive.pop(key, None)
        return alive

    def _reclaim_if_due(self) -> list[LeaseRecord]:
        """Reads reclaim too, but take the write lock only when something is due; returns the live leases."""
        now = time.time()
        with self.ledger.locked():
            view = self._synced()
            live, _ = view.open_leases()
            holders, waiters, expired = view.holders(), view.waiters(), view.expired(now)
        self.policies.forget_write()
        self.policies.sample(live)
        gone = any(not self._alive(lease.pid, lease.pid_start, fresh=True) for lease in holders if lease.pid) \
            or any(not self._alive(lease.pid, lease.pid_start) for lease in waiters if lease.pid)
        if expired or gone or self.policies.due(live, now):
            with self.ledger.transaction():
                live = self._reclaim(time.time(), current_user(), waiters=True)
        self.policies.tick()
        self.retention.after(self.ledger, self.config.history_keep_s)
        return live

    # -- snapshot -------------------------------------------------------------------------
    def _poll_devices(self) -> tuple[list[Device], list[GpuProcess]]:
        group = self._in_group()
        if group is not None:
            if group.polled is None:
                group.polled = self._read_devices()
            return list(group.polled[0]), list(group.polled[1])
        return self._read_devices()

    def _read_devices(self) -> tuple[list[Device], list[GpuProcess]]:
        backend = self.backend
        return backend.devices(), backend.processes()

    def _snapshot(self, now: float, devices: list[Device], gpu_procs: list[GpuProcess],
                  live: list[LeaseRecord]) -> scheduler.Snapshot:
        with self.ledger.locked():
            view = self._synced()
            kept = view.gave(live)  # ``live`` is the view's own list, nothing changed since: reuse its sums
            held: tuple[tuple[int, int], ...] | None = None
            if kept:
                holdings, held, queued, version = view.holdings(), view.held(), view.queued(), view.queued_version
        if not kept:
            holdings = tuple(_holding(lease.id, lease.devices, lease.memory_bytes, lease.expires_at or now)
                             for lease in live if lease.state == ACTIVE)
            queued = [lease for lease in live if lease.state == QUEUED]
        # With no process on any GPU there is nothing to judge: every used byte is outside the leases.
        judge = self.membership([lease for lease in live if lease.state == ACTIVE]) if gpu_procs \
            else accounting.Membership(ledger=self.ledger_id)
        unmanaged = accounting.unmanaged_bytes(devices, gpu_procs, judge)
        shares = self.policies.use(now) if queued and self.config.fair_share else {}
        last = self._queue  # read once: another thread may replace it
        if kept and not shares and last is not None and last[0] == version:
            queue = last[1]  # the same tuple as the last write's: the planner keeps its order for it
        else:
            requests = self._queued_requests(queued)
            queue = tuple(replace(request, share=shares.get(lease.owner, 0.0)) if shares else request
                          for lease, request in zip(queued, requests, strict=True))
            self._queue = (version, queue) if kept and not shares else None
        try:
            dist: tuple[tuple[int, ...], ...] | None = tuple(tuple(row) for row in self.backend.distances())
        except Exception:  # topology is a preference, never a reason to fail
            dist = None
        return scheduler.Snapshot(
            now=now,
            devices=self._device_states(devices, unmanaged),
            active=holdings,
            held=held,
            queue=queue,
            distances=dist,
            bookings=self.policies.snapshot_bookings(now),
        )

    def _device_states(self, devices: list[Device], unmanaged: Mapping[int, int]) -> tuple[scheduler.DeviceState, ...]:
        """The devices as admission sees them; the last snapshot's (frozen) states while nothing about them changed."""
        key = tuple((d.index, d.uuid, d.memory_total_bytes, unmanaged.get(d.index, 0)) for d in devices)
        last = self._states  # read once: another thread may replace it
        if last is not None and last[0] == key:
            return last[1]
        states = tuple(scheduler.DeviceState(*fields) for fields in key)
        self._states = (key, states)
        return states

    def _queued_requests(self, queued: list[LeaseRecord]) -> list[scheduler.Request]:
        """The stored request of each queued lease; read once per lease (it never changes while queued)."""
        cache = self._requests
        if any(lease.id not in cache for lease in queued):
            specs = self.ledger.queued_requests()
            if len(cache) > 2 * len(queued) + 64:
                cache.clear()
            for lease in queued:
                if lease.id not in cache:
                    cache[lease.id] = _stored(specs.get(lease.id), lease)
        return [cache[lease.id] for lease in queued]

    def snapshot(self) -> tuple[scheduler.Snapshot, list[Lease]]:
        """The scheduler's view of the machine now, and the live leases it was built from (read-only)."""
        devices, gpu_procs = self._poll_devices()
        live = self._reclaim_if_due()
        return self._snapshot(time.time(), devices, gpu_procs, live), [self._handle(r) for r in live]

    # -- operations -----------------------------------------------------------------------
    def reserve(
        self,
        memory: str | int | float | MemorySpec,
        duration: str | int | float | None = None,
        *,
        device: int | str | Sequence[int] | None = None,
        gpus: int | None = None,
        prefer: int | str | Sequence[int] | None = None,
        priority: Priority | str | None = None,
        label: str | None = None,
        user: str | None = None,
        bind: bool | int = True,
        wait: bool | float | str | None = False,
        on_wait: Callable[[WaitUpdate], None] | None = None,
        idle_after: str | int | float | None = None,
        on_idle: str | None = None,
    ) -> Lease:
        """Grant a lease now, or (with ``wait``) queue for one; see ``chronos.reserve``."""
        spec = parse_request(memory, duration, device=device, gpus=gpus, prefer=prefer, priority=priority,
                             wait=wait, label=label, idle_after=idle_after, on_idle=on_idle,
                             longest=self.config.longest_duration_s)
        return self.submit(spec, user=user, bind=bind, on_wait=on_wait)

    def submit(self, spec: RequestSpec, *, user: str | None = None, bind: bool | int = True,
               on_wait: Callable[[WaitUpdate], None] | None = None) -> Lease:
        """Grant or queue a request already read by :func:`chronos.request.parse_request`."""
        duration_s = spec.duration_s if spec.duration_s is not None else self.config.default_duration_s
        check_duration(duration_s, longest=self.config.longest_duration_s)
        caller = current_user()
        owner = self._owner(caller, user, "reserve")
        holder = self._holder(bind, caller)
        devices, gpu_procs = self._poll_devices()
        request = self._request_for(spec, devices)
        own_rule = idle.rule_json(spec.idle_after_s, spec.on_idle)
        cause = "capacity"
        try:
            with queue_patience(spec.wait_s), self.ledger.transaction():
                now = time.time()
                live = self._reclaim(now, caller)
                claimed = bookings.claim_matching(self, owner, caller, spec, holder, now, devices, request.visible)
                if claimed is not None:
                    return self._handle(claimed)
                snapshot = self._snapshot(now, devices, gpu_procs, live)
                request = evolve(request, seq=scheduler.next_seq(snapshot),
                                  share=self.policies.share_of(owner.name, now))
                decision, snapshot, live = self._decide(snapshot, request, live, now, caller, devices, gpu_procs)
                cause = decision.cause or cause
                self._check_limits(owner, request, snapshot, decision, live)
                if decision.granted:
                    return self._grant_new(owner, caller, request, decision, holder, spec.label, now, devices,
                                           own_rule)
                if spec.wait_s is None:
                    raise UnavailableError(decision.reason, could_wait=True)
                waiter = procs.caller()
                queued = LeaseRecord(
                    id="", owner=owner.name, uid=owner.uid, devices=spec.devices or (), device_uuids=(),
                    memory_bytes=spec.memory.nbytes or 0, created_at=now, expires_at=None, duration_s=duration_s,
                    priority=request.priority, state=QUEUED, label=spec.label, pid=waiter[0], pid_start=waiter[1],
                )
                lease_id = self.ledger.insert(queued, {**request.to_json(bind), **own_rule})
                self._event(lease_id, "queued", caller, {"memory": str(spec.memory), "gpus": spec.count,
                                                         "priority": str(request.priority), "reason": decision.reason})
        except (UnavailableError, NotAllowedError) as exc:
            self._refused(owner, caller, spec, duration_s, getattr(exc, "rule", None) or cause, str(exc))
            raise
        return self._wait(lease_id, caller, holder, spec.wait_s, on_wait)

    def _owner(self, caller: User, user: str | None, action: str) -> User:
        """Whom a request is for: the caller, or (for an admin) ``user``."""
        if user is None or user == caller.name:
            return caller
        owner = lookup_user(user)
        if owner.uid != caller.uid and not is_admin(caller, self.config.admin_group):
            raise NotAllowedError(
                f"only an admin may {action} for another user ({owner.name}); "
                f"admins are root and members of group {self.config.admin_group!r}"
            )
        return owner

    def _holder(self, bind: bool | int | None, caller: User) -> tuple[int, float] | None:
        """The holder asked for: the caller's own process, or (for an admin) anyone's; a lease bound to
        another user's process would count that user's memory twice, and end when they stop it."""
        holder = procs.holder(bind)
        if holder is not None and bind is not True and procs.uid_of(holder[0]) != caller.uid \
                and not is_admin(caller, self.config.admin_group):
            raise NotAllowedError(f"process {holder[0]} is not yours; a lease may be bound only to your own "
                                  "processes (an admin may bind to anyone's)")
        return holder

    def _request_for(self, spec: RequestSpec, devices: list[Device]) -> scheduler.Request:
        """The scheduler's request for ``spec``: the configured defaults filled in, this process's GPUs."""
        return scheduler.Request(
            memory=spec.memory, gpus=spec.count, devices=spec.devices, prefer=spec.prefer,
            duration_s=spec.duration_s if spec.duration_s is not None else self.config.default_duration_s,
            priority=spec.priority or self.config.default_priority,
            visible=visible_indices(devices, os.environ.get("CUDA_VISIBLE_DEVICES")),
        )

    def forecast(self, spec: RequestSpec, *, user: str | None = None) -> scheduler.Decision:
        """What :meth:`submit` would decide for ``spec`` now, changing nothing: the devices it would get,
        or why not, its place in the queue and its estimated start. Bad input and limits raise as there."""
        owner = self._owner(current_user(), user, "reserve")
        devices, gpu_procs = self._poll_devices()
        live = self._reclaim_if_due()
        now = time.time()
        snapshot = self._snapshot(now, devices, gpu_procs, live)
        request = replace(self._request_for(spec, devices), seq=scheduler.next_seq(snapshot),
                          share=self.policies.share_of(owner.name, now))
        decision = scheduler.decide(snapshot, request, estimate=True)
        self._check_limits(owner, request, snapshot, decision, live)
        return decision

    def _refused(self, owner: User, caller: User, spec: RequestSpec, duration_s: float, reason: str,
                 message: str) -> None:
        """A refusal in the audit log (lease id 0: no lease came of it), for reports and metrics."""
        try:
            with self.ledger.transaction():
                self._event("0", "refused", caller, {
                    "reason": reason, "owner": owner.name, "memory": str(spec.memory), "gpus": spec.count,
                    "duration_s": duration_s, "message": message[:300]})
        except ChronosError:
            pass  # a busy ledger: the refusal itself still reaches the caller

    def _check_limits(self, owner: User, request: scheduler.Request, snapshot: scheduler.Snapshot,
                      decision: scheduler.Decision, live: list[LeaseRecord]) -> None:
        """Configured limits, the owner's own and their groups' included (:mod:`chronos.limits`)."""
        mine = self.policies.limits_of(owner)
        usage = limits.usage_of(live, owner.uid, snapshot.queue) if mine.counts_usage else limits.Usage()
        groups: set[str] = set()
        admin = False
        if request.priority == Priority.HIGH and (mine.high_priority_groups is not None
                                                  or mine.high_priority is not None):
            groups, admin = groups_of(owner), is_admin(owner, self.config.admin_group)
        limits.check(mine, limits.request_info(request, snapshot, decision), owner.name, groups, usage,
                     admin=admin)

    def _grant_new(self, owner: User, caller: User, request: scheduler.Request, decision: scheduler.Decision,
                   holder: tuple[int, float] | None, label: str | None, now: float, devices: list[Device],
                   own_rule: dict[str, Any]) -> Lease:
        assert decision.devices is not None
        record = LeaseRecord(
            id="", owner=owner.name, uid=owner.uid, devices=decision.devices,
            device_uuids=_uuids(devices, decision.devices), memory_bytes=decision.memory_bytes, created_at=now,
            started_at=now, expires_at=now + request.duration_s, duration_s=request.duration_s,
            priority=request.priority, state=ACTIVE, label=label,
            pid=holder[0] if holder else None, pid_start=holder[1] if holder else None,
        )
        stored = {**request.to_json(holder[0] if holder else False), **own_rule}
        record = evolve(record, id=self.ledger.insert(record, stored))
        self._event(record.id, "granted", caller, _grant_detail(record))
        return self._handle(record)

    def _wait(self, lease_id: str, caller: User, holder: tuple[int, float] | None, timeout: float,
              on_wait: Callable[[WaitUpdate], None] | None) -> Lease:
        """Sleep on the lease's doorbell until the queue's leader says it can start (:mod:`chronos.waiting`);
        decide under the write lock only then, at the deadline, or where no leader can ring."""
        deadline = time.monotonic() + timeout
        bell: waiting.Doorbell | None = None
        lead: waiting.Leadership | None = None
        position: int | None = None
        estimated: float | None = None
        reason, decide, next_estimate = "", True, 0.0
        try:  # from the first step: a signal while the doorbell is made still withdraws the request
            bell = waiting.Doorbell(self.ledger_id, lease_id)
            lead = waiting.Leadership(self.ledger.path, self._lead)
            while True:
                if decide:
                    with queue_patience(deadline - time.monotonic()):
                        granted, decision, snapshot, request = self._try_grant(lease_id, caller, holder)
                    if granted is not None:
                        return granted
                    reason, position = decision.reason, decision.position
                    # Its own estimate when it joins the queue (and on every poll where nobody leads); after
                    # that the leader's plan says where it stands.
                    if on_wait is not None and (not bell.usable or next_estimate == 0.0) \
                            and time.monotonic() >= next_estimate:
                        estimated = scheduler.estimate_start(snapshot, request)  # outside the write lock
                        # Planning costs ~0.1 ms per queued request: on a long queue, re-plan less often.
                        next_estimate = time.monotonic() + max(ESTIMATE_EVERY_S, 0.05 * len(snapshot.queue))
                else:
                    lease = self.ledger.get(lease_id)
                    if lease is None or lease.state != QUEUED:
                        ended = lease.end_reason or lease.state if lease is not None else "gone"
                        raise UnavailableError(f"queued request {lease_id} ended: {ended}")
                if on_wait is not None:
                    on_wait(WaitUpdate(lease_id, position, estimated, reason))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise UnavailableError(f"gave up after waiting {format_duration(timeout)} in the queue: "
                                           f"{reason}")
                if not bell.usable:
                    time.sleep(min(WAIT_POLL_S, left))
                    continue
                if not lead.held:
                    lead.try_take()
                messages = bell.wait(min(left, waiting.check_after()))
                decide = any(m.get("go") is True for m in messages)
                for message in messages:
                    if isinstance(message.get("position"), int):
                        position = message["position"]
                        start = message.get("start")
                        estimated = float(start) if isinstance(start, (int, float)) else None
                    if message.get("lead") is True and not lead.held:
                        lead.try_take()
                # Woken by nobody: lead if nobody does; decide for itself if the leader went quiet.
                if not messages and not lead.held and not lead.try_take() and not lead.leader_alive():
                    decide = True
        except BaseException:
            self._withdraw(lease_id, caller)
            raise
        finally:
            if bell is not None:
                bell.close()
            if lead is not None and lead.held:
                lead.give_up()
                # The next few in line are asked to take over (the first to try wins): one of them may be
                # leaving just now too.
                for nxt in [i for i in sorted(self._leading.queued, key=int) if i != lease_id][:4]:
                    waiting.ring(self.ledger_id, nxt, {"lead": True})

    def _try_grant(self, lease_id: str, caller: User, holder: tuple[int, float] | None
                   ) -> tuple[Lease | None, scheduler.Decision, scheduler.Snapshot, scheduler.Request]:
        """Decide a queued request under the write lock, and grant it when it can start now."""
        devices, gpu_procs = self._poll_devices()
        with self.ledger.transaction():
            now = time.time()
            live = self._reclaim(now, caller)
            lease = self.ledger.get(lease_id)
            assert lease is not None
            if lease.state != QUEUED:
                raise UnavailableError(f"queued request {lease_id} ended: {lease.end_reason or lease.state}")
            snapshot = self._snapshot(now, devices, gpu_procs, live)
            request = _stored(self.ledger.request_of(lease.id), lease)
            # Not decided again for a waiter ahead that died: the leader looks at every waiter each second,
            # withdraws the dead one's request and rings this one again.
            decision = scheduler.decide(snapshot, request)
            if not decision.granted:
                return None, decision, snapshot, request
            assert decision.devices is not None
            self.ledger.update(
                lease_id, state=ACTIVE, devices=decision.devices,
                device_uuids=_uuids(devices, decision.devices), memory_bytes=decision.memory_bytes,
                started_at=now, expires_at=now + lease.duration_s,
                pid=holder[0] if holder else None, pid_start=holder[1] if holder else None,
            )
            granted = self.ledger.get(lease_id)
            assert granted is not None
            self._event(lease_id, "granted", caller,
                        {**_grant_detail(granted), "waited_s": round(now - lease.created_at, 3)})
            return self._handle(granted), decision, snapshot, request

    def _lead(self) -> None:
        """One round of the queue's leader: notice a change cheaply, reclaim what is due, plan once, ring
        the waiters that can start now and those whose place changed.

        The queue is planned again at once when a request joined or left it or memory was freed; a change
        that frees nothing (a lease granted, memory taken outside the leases, a lease's end moved) is
        planned for within :data:`LEADER_FULL_S` (a backfill it makes possible waits that long at most), and
        not at all when the inputs are back as last planned (a lease granted and released in between).
        """
        state = self._leading
        mono, now = time.monotonic(), time.time()
        version = self.ledger.data_version()
        full = mono >= state.next_full
        if version == state.version and not full and now < state.next_end and mono < state.replan_at:
            return
        state.version = version
        if full:
            state.next_full = mono + LEADER_FULL_S
        live = self._reclaim_if_due()
        with self.ledger.locked():
            view = self._synced()
            queued_records, next_end = view.queued(), view.next_end()
        queued = {r.id for r in queued_records}
        for gone in state.queued - queued:
            waiting.ring(self.ledger_id, gone, {"ended": True})
        state.queued = queued
        state.next_end = next_end if next_end is not None else math.inf
        if not queued:
            return
        devices, gpu_procs = self._poll_devices()
        snapshot = self._snapshot(time.time(), devices, gpu_procs, live)
        free = _free(snapshot)
        grew = any(free.get(index, 0) > before for index, before in state.free.items()) or not state.free
        inputs = (frozenset((h.lease_id, h.expires_at) for h in snapshot.active), snapshot.bookings)
        if queued == state.planned and not grew:
            if inputs == state.inputs and free == state.free:
                state.replan_at = math.inf  # as planned last: nothing new can start
            elif state.replan_at == math.inf:
                state.replan_at = mono + LEADER_FULL_S
            if mono < state.replan_at and mono < state.next_plan:
                return
        state.planned, state.inputs, state.free = set(queued), inputs, free
        state.next_plan, state.replan_at = mono + LEADER_REPLAN_S, math.inf
        for slot in scheduler.plan(snapshot):
            if slot.lease_id is None:
                continue
            if slot.start <= snapshot.now:
                waiting.ring(self.ledger_id, slot.lease_id, {"go": True, "position": slot.position})
                continue
            start = slot.start if math.isfinite(slot.start) else None
            told = (slot.position, None if start is None else round(start / 10))
            if state.told.get(slot.lease_id) != told:
                state.told[slot.lease_id] = told
                waiting.ring(self.ledger_id, slot.lease_id, {"position": slot.position, "start": start})

    def _withdraw(self, lease_id: str, caller: User) -> None:
        with self.ledger.transaction():
            lease = self.ledger.get(lease_id)
            if lease is not None and lease.state == QUEUED:
                self._end(lease, LeaseState.WITHDRAWN, "withdrawn by the waiting process", caller, at=time.time())

    def _owned(self, lease_id: str, caller: User, action: str, live: list[LeaseRecord] | None = None) -> LeaseRecord:
        key = parse_lease_id(lease_id)
        lease = next((item for item in live or () if item.id == key), None)
        if lease is None:  # an open lease as the view holds it (kept true to the ledger), else a read
            with self.ledger.locked():
                lease = self._synced().record(int(key))
        if lease is None:
            lease = self.ledger.get(key)
        if lease is None:
            raise LeaseNotFoundError(f"no lease {lease_id}; see `chronos list --all`")
        if lease.uid != caller.uid and not is_admin(caller, self.config.admin_group):
            raise NotAllowedError(f"lease {lease.id} belongs to {lease.owner}; only its owner or an admin may "
                                  f"{action} it")
        return lease

    def release(self, lease_id: str) -> Lease:
        """End a lease (or withdraw a queued request). Releasing an ended lease changes nothing."""
        caller = current_user()
        with self.ledger.transaction():
            # Only this lease is reclaimed here (did it already end?): releasing frees capacity, and
            # the next reservation reclaims the rest.
            now = time.time()
            lease = self._reclaim_one(self._owned(lease_id, caller, "release"), now, caller)
            withdrawn = lease.state == QUEUED
            if lease.state.live:
                state = LeaseState.RELEASED if lease.state == ACTIVE else LeaseState.WITHDRAWN
                lease = self._end(lease, state, f"released by {caller.name}", caller, at=time.time())
        if withdrawn:  # its waiter (another thread, or process) learns now, not at its next look
            waiting.ring(self.ledger_id, lease.id, {"ended": True})
        self.retention.after(self.ledger, self.config.history_keep_s)
        return self._handle(lease)

    def extend(self, lease_id: str, duration: str | int | float) -> Lease:
        """Push an active lease's end back by ``duration``; the lease's whole length stays within the
        configuration's ``longest_duration``."""
        seconds = lease_duration(duration, self.config.longest_duration_s)
        caller = current_user()
        devices, gpu_procs = self._poll_devices()
        with self.ledger.transaction():
            now = time.time()
            live = self._reclaim(now, caller)
            lease = self._owned(lease_id, caller, "extend", live)
            if lease.state == QUEUED:
                raise UnavailableError(f"lease {lease.id} is still queued; it can be extended once granted")
            if lease.state != ACTIVE:
                raise UnavailableError(f"lease {lease.id} has ended ({lease.state}); reserve a new one")
            assert lease.expires_at is not None
            new_end = lease.expires_at + seconds
            length = new_end - (lease.started_at or lease.created_at)
            if length > self.config.longest_duration_s:
                raise InvalidRequestError(
                    f"cannot extend lease {lease.id} by {format_duration(seconds)}: it would last "
                    f"{format_duration(length)} in all, and the longest lease here is "
                    f"{format_duration(self.config.longest_duration_s)}")
            limits.check_extend(self.policies.limits_of(User(lease.uid, lease.owner)),
                                new_end - (lease.started_at or lease.created_at))
            conflict = scheduler.extend_conflict(self._snapshot(now, devices, gpu_procs, live), lease.id, new_end)
            if conflict:
                raise UnavailableError(f"cannot extend lease {lease.id}: {conflict}")
            self.ledger.update(lease.id, expires_at=new_end, idle_since=None, idle_warning=None)
            if lease.idle_since is not None:  # "still here": the idle spell is over
                self._event(lease.id, "active", caller, {"idle_since": lease.idle_since, "by": "extend"})
            self._event(lease.id, "extended", caller, {"by_s": seconds, "expires_at": new_end})
        return self._handle(evolve(lease, expires_at=new_end, idle_since=None, idle_warning=None))

    def bind(self, lease_id: str, pid: int | None) -> Lease:
        """Make ``pid`` the lease's holder (its death ends the lease); None unbinds."""
        caller = current_user()
        holder = self._holder(pid, caller) if pid is not None else None
        with self.ledger.transaction():
            live = self._reclaim(time.time(), caller)
            lease = self._owned(lease_id, caller, "bind", live)
            if lease.state != ACTIVE:
                raise UnavailableError(f"lease {lease.id} is {lease.state}; only an active lease can be bound")
            pid_, start = holder if holder else (None, None)
            self.ledger.update(lease.id, pid=pid_, pid_start=start)
            self._event(lease.id, "bound", caller, {"pid": pid_})
        return self._handle(evolve(lease, pid=pid_, pid_start=start))

    # -- bookings (:mod:`chronos.policy.bookings`) ---------------------------------------------
    def book(self, memory: str | int | float | MemorySpec, duration: str | int | float | None, at: str | float, *,
             device: int | str | Sequence[int] | None = None, gpus: int | None = None, label: str | None = None,
             user: str | None = None) -> Lease:
        """Book ``memory`` per GPU for ``duration`` from ``at`` (``tomorrow 09:00``, ``+2h``); see ``chronos.book``."""
        spec = parse_request(memory, duration, device=device, gpus=gpus, label=label,
                             longest=self.config.longest_duration_s)
        caller = current_user()
        return bookings.book(self, self._owner(caller, user, "book"), caller, spec, parse_instant(at))

    def claim(self, booking_id: str, *, bind: bool | int = True) -> Lease:
        """Claim a booking in its window: it becomes an active lease (bound as ``reserve`` binds)."""
        caller = current_user()
        holder = self._holder(bind, caller)

        def usage_check(booking: LeaseRecord) -> None:
            owner = User(booking.uid, booking.owner)
            live = [r for r in self.ledger.live() if r.id != booking.id]
            info = limits.RequestInfo(booking.memory_bytes, len(booking.devices), booking.duration_s)
            mine = self.policies.limits_of(owner)
            limits.check(replace(mine, max_duration_s=None), info, owner.name, (), limits.usage_of(live, owner.uid))

        return bookings.claim(self, booking_id, caller, holder, self._owned, usage_check)

    def bookings(self, *, all: bool = False, user: str | None = None, limit: int | None = None,
                 after: str | None = None) -> list[Lease]:
        """Bookings to come (every booking, claimed and past ones too, with ``all``: ``limit`` at most, those
        after booking ``after``, a page), by start."""
        self._reclaim_if_due()
        uid = lookup_user(user).uid if user is not None else None
        page = parse_lease_id(after) if after is not None else None
        found = self.ledger.bookings_of(uid, after=page, limit=limit) if all else \
            [b for b in self.ledger.booked() if uid is None or b.uid == uid]
        return [self._handle(record) for record in found]

    def get(self, lease_id: str) -> Lease:
        """One lease, in any state."""
        self._reclaim_if_due()
        record = self.ledger.get(parse_lease_id(lease_id))
        if record is None:
            raise LeaseNotFoundError(f"no lease {lease_id}; see `chronos list --all`")
        return self._handle(record)

    def leases(self, *, all: bool = False, user: str | None = None, limit: int | None = None,
               before: str | int | None = None, ended_since: float | None = None) -> list[Lease]:
        """Active and queued leases; or one user's. With ``all``, every lease newest first: ``limit`` at most,
        older than lease ``before`` (a page); with ``ended_since``, live leases and those ended since then (newest
        first, a page the same way)."""
        live = self._reclaim_if_due()
        uid = lookup_user(user).uid if user is not None else None
        page = parse_lease_id(str(before)) if before is not None else None
        if ended_since is not None:
            found = self.ledger.recent(ended_since, uid, limit=limit, before=page)
        elif all:
            found = self.ledger.history(uid=uid, limit=limit, before=page)
        else:
            found = [r for r in live if uid is None or r.uid == uid]
        return [self._handle(record) for record in found]

    def active_records(self) -> list[LeaseRecord]:
        """Every active lease as plain records (what the membership rule judges against)."""
        return [record for record in self._reclaim_if_due() if record.state == ACTIVE]

    def devices(self) -> list[DeviceStatus]:
        """Every device with its memory reserved by leases, used outside them, and available."""
        devices, gpu_procs = self._poll_devices()
        active = [lease for lease in self._reclaim_if_due() if lease.state == ACTIVE]
        return accounting.device_status(devices, gpu_procs, self.membership(active))

    def record_usage(self, lease_id: str, peak_bytes: int, gpu_seconds: float, *, note: str | None = None) -> None:
        """Store a lease's peak GPU memory and GPU time (the watchdog calls this); ``note`` says what kept
        the watchdog from recording them before, and goes into the audit log (``unrecorded``) with them."""
        key = parse_lease_id(lease_id)
        with self.ledger.transaction():
            self.ledger.record_usage(key, peak_bytes, gpu_seconds)
            if note is not None:
                self._event(key, "unrecorded", current_user(), {"reason": note, "peak_memory_bytes": peak_bytes})

    def patience(self, seconds: float) -> AbstractContextManager[None]:
        """Inside it, this thread's ledger writes wait at most ``seconds`` for another process's lock
        (the watchdog's: enforcement never stalls behind a held lock)."""
        return ledger_patience(seconds)

    def batch(self) -> AbstractContextManager[Ledger]:
        """Group commit for the service, the ledger's only writer: the operations this thread runs inside it
        share one ledger transaction (:meth:`chronos.ledger.Ledger.batch`). Each is decided, in turn, on
        what the ones before it left, and a refused one undoes only itself; all commit together, or none.
        The GPUs are read once for the group, and each holder's liveness once (a few milliseconds: what
        one write alone sees of them is no fresher by the time it commits)."""
        return self._batch()

    @contextmanager
    def _batch(self) -> Iterator[Ledger]:
        with self.ledger.batch() as ledger:
            self._group = _Group(threading.get_ident())
            try:
                yield ledger
            finally:
                self._group = None

    def _in_group(self) -> _Group | None:
        """The group commit this thread runs, if any (other threads read the GPUs and /proc as ever)."""
        group = self._group
        return group if group is not None and group.thread == threading.get_ident() else None

    def record_enforcement(self, lease_id: str, detail: dict[str, Any]) -> None:
        """Append what the service's enforcer did to a lease's processes to the audit log (``enforced``)."""
        with self.ledger.transaction():
            self._event(parse_lease_id(lease_id), "enforced", current_user(), detail)

    def events(self, *, since: float | None = None, lease_id: str | None = None, after: int | None = None,
               limit: int | None = None) -> list[Event]:
        """The audit log, oldest first; with ``limit``, a page of at most that many lines after line ``after``."""
        return self.ledger.events(since=since, lease_id=parse_lease_id(lease_id) if lease_id is not None else None,
                                  after=after, limit=limit)

    def report(self, *, since: float, by: str = "user") -> Report:
        """Usage over the audit log since ``since`` (:func:`chronos.policy.figures.gather_report`)."""
        from chronos.policy import figures

        return figures.gather_report(self, since=since, by=by)

    def metrics(self) -> str:
        """The machine's figures in the Prometheus text format (:func:`chronos.policy.figures.collect_metrics`)."""
        from chronos.policy import figures

        return figures.collect_metrics(self)

    def _write_metrics(self) -> None:
        """The ``[metrics] textfile`` written now (the policies' tick calls it, only where one is configured)."""
        from chronos.policy import figures

        figures.write_metrics(self)

    def limits_for(self, user: str | None = None) -> Limits:
        """A user's effective limits (default: the caller's), each with the rule that set it."""
        return self.policies.limits_of(lookup_user(user) if user is not None else current_user())

    # -- a lease in a process ---------------------------------------------------------------
    def _totals(self) -> dict[str, int]:
        return {d.uuid: d.memory_total_bytes for d in self.backend.devices()}

    def lease_env(self, record: LeaseRecord, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment for a child process inside ``record``'s caps (:mod:`chronos.enforce.caps`)."""
        return caps.lease_env(record, self._totals(), base, self.settings.context_reserve_bytes, self.ledger_id)

    def apply_caps(self, record: LeaseRecord) -> list[str]:
        """Cap frameworks already imported in this process (:func:`chronos.enforce.caps.apply_caps`)."""
        return caps.apply_caps(record, self._totals(), reserve_bytes=self.settings.context_reserve_bytes,
                               ledger=self.ledger_id)

    def lease_usage(self, record: LeaseRecord) -> dict[int, int | None]:
        """GPU memory ``record``'s processes use now, per device (:mod:`chronos.accounting`'s rule)."""
        if record.state != ACTIVE or not record.devices:
            return {}
        membership = self.membership([r for r in self.active_records() if r.id != record.id] + [record])
        found = accounting.usage(self.backend.processes(list(record.devices)), membership).get(record.id, {})
        return {index: found.get(index, 0) for index in record.devices}

    def activate(self, lease: Lease, **options: Any) -> AbstractContextManager[Any]:
        """Environment, caps and a watchdog for ``lease`` in this process (:mod:`chronos.enforce.activation`)."""
        from chronos.enforce.activation import Activation  # the watchdog is only loaded where it runs

        return Activation(lease, **options)


# -- helpers -------------------------------------------------------------------------------
def _foreign(namespace: str, recorded: str) -> NamespaceError:
    return NamespaceError(
        f"this process is in a different pid namespace ({namespace}) from the ledger's ({recorded}), so it cannot "
        "tell which lease holders are alive; use the Chronos service (chronos serve), or run Chronos outside the "
        "container")


def _check_host(ledger: Ledger) -> None:
    """Holders are judged only where their pids mean what they meant: in the ledger's pid namespace (else
    :class:`NamespaceError`), and in its boot (a ledger opened first after a reboot lets every holder go)."""
    facts, namespace, boot = ledger.host_facts(), procs.pid_namespace(), procs.boot_id()
    recorded = facts.get("pid_namespace")
    if namespace is not None and recorded is not None and recorded != namespace:
        raise _foreign(namespace, recorded)
    if (namespace is None or recorded is not None) and (boot is None or facts.get("boot_id") == boot):
        return
    with ledger.transaction():
        facts = ledger.host_facts()  # again, under the write lock
        if namespace is not None and facts.get("pid_namespace") is None:
            ledger.set_host_fact("pid_namespace", namespace)
        elif namespace is not None and facts["pid_namespace"] != namespace:
            raise _foreign(namespace, facts["pid_namespace"])
        if boot is not None and facts.get("boot_id") != boot:
            if facts.get("boot_id") is not None:
                ledger.forget_holders()
            ledger.set_host_fact("boot_id", boot)



#: Live engines by what they were built from, so that an unpickled lease finds its engine again.
_engines: weakref.WeakValueDictionary[tuple[Settings, int], Engine] = weakref.WeakValueDictionary()


def _restore(settings: Settings, backend: Backend | None) -> Engine:
    return _engines.get((settings, id(backend))) or Engine(backend=backend, settings=settings)


def _uuids(devices: list[Device], indices: tuple[int, ...]) -> tuple[str, ...]:
    by_index = {d.index: d.uuid for d in devices}
    return tuple(by_index[i] for i in indices)


def _grant_detail(lease: LeaseRecord) -> dict[str, Any]:
    return {"devices": list(lease.devices), "memory_bytes": lease.memory_bytes, "expires_at": lease.expires_at,
            "priority": str(lease.priority), "holder": lease.pid}


@dataclass
class _Group:
    """A group commit's thread, and what it read once: the GPUs, and holders' liveness."""

    thread: int
    polled: tuple[list[Device], list[GpuProcess]] | None = None
    alive: dict[tuple[int, float | None, bool], bool] = field(default_factory=dict)


@dataclass
class _Leading:
    """The queue leader's memory between rounds."""

    version: int = -1
    next_full: float = 0.0
    next_end: float = math.inf
    next_plan: float = 0.0
    queued: set[str] = field(default_factory=set)
    #: What the last plan was made from: the queued ids, the active leases' ends and the bookings, free memory.
    planned: set[str] = field(default_factory=set)
    inputs: tuple[frozenset[tuple[str, float]], tuple[scheduler.Booked, ...]] = (frozenset(), ())
    free: dict[int, int] = field(default_factory=dict)
    replan_at: float = math.inf
    told: dict[str, tuple[int, int | None]] = field(default_factory=dict)


@lru_cache(maxsize=8192)
def _holding(lease_id: str, devices: tuple[int, ...], memory_bytes: int, expires_at: float) -> scheduler.Holding:
    """An active lease as the planner holds it; the same leases recur in every write's snapshot."""
    return scheduler.Holding(lease_id, devices, memory_bytes, expires_at)


def _free(snapshot: scheduler.Snapshot) -> dict[int, int]:
    """Free memory per device now: what a grant could take."""
    held = {d.index: d.unmanaged_bytes for d in snapshot.devices}
    if snapshot.held is not None:
        for index, nbytes in snapshot.held:
            held[index] = held.get(index, 0) + nbytes
        return {d.index: d.total_bytes - held[d.index] for d in snapshot.devices}
    for holding in snapshot.active:
        for index in holding.devices:
            held[index] = held.get(index, 0) + holding.memory_bytes
    return {d.index: d.total_bytes - held[d.index] for d in snapshot.devices}


def _stored(spec: dict[str, Any] | None, lease: LeaseRecord) -> scheduler.Request:
    return scheduler.Request.from_json(spec or {}, lease.id, lease.duration_s, lease.priority)
