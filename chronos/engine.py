"""The lease engine: reserve, release, extend, list and wait, over the ledger, the devices and the scheduler.

Every write is one short ``BEGIN IMMEDIATE`` transaction that first reclaims expired leases and
leases whose holder died, so the accounting stays true with no daemon.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from chronos import accounting, procs, scheduler
from chronos.config import Config, load_config
from chronos.devices import Backend, Device, GpuProcess, get_backend
from chronos.errors import (
    InvalidRequestError,
    LeaseNotFoundError,
    NotAllowedError,
    UnavailableError,
)
from chronos.identity import User, current_user, is_admin, lookup_user
from chronos.lease import ACTIVE, EXPIRED, QUEUED, RELEASED, REVOKED, WITHDRAWN, Lease
from chronos.ledger import Event, Ledger  # noqa: TID251 - the engine owns the ledger
from chronos.state import state_dir
from chronos.units import MemorySpec, format_duration, parse_duration, parse_memory

__all__ = ["DeviceStatus", "Engine", "WaitUpdate", "default_engine", "reset_default_engine"]

#: How often a queued request re-checks whether it can start.
WAIT_POLL_S = 0.2
#: How often a waiter with a progress callback re-plans the queue for its estimated start.
ESTIMATE_EVERY_S = 5.0


@dataclass(frozen=True)
class DeviceStatus:
    """A device with its lease accounting: what is reserved, used outside leases, and still free."""

    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_reserved_bytes: int
    memory_available_bytes: int
    active_leases: int
    utilization_percent: int | None
    unmanaged_bytes: int
    #: GPU processes here that hold no lease, or whose lease does not name this device.
    unmanaged_processes: tuple[accounting.Unmanaged, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["unmanaged_processes"] = [
            {"pid": u.process.pid, "used_bytes": u.process.used_bytes, "reason": u.reason, "lease_id": u.lease_id}
            for u in self.unmanaged_processes
        ]
        return data


@dataclass(frozen=True)
class WaitUpdate:
    """Progress of a queued request, passed to ``reserve(on_wait=...)``."""

    lease_id: str
    position: int | None
    estimated_start: float | None
    reason: str


def _parse_devices(device: int | str | Sequence[int] | None) -> tuple[int, ...] | None:
    if device is None:
        return None
    if isinstance(device, bool):
        raise InvalidRequestError(f"invalid GPU {device!r}: give an index such as 0 or a list such as 0,1")
    if isinstance(device, int):
        items: list[Any] = [device]
    elif isinstance(device, str):
        items = [p for p in device.replace(" ", "").split(",")]
    else:
        items = list(device)
    out = []
    for item in items:
        try:
            index = int(item)
        except (TypeError, ValueError):
            raise InvalidRequestError(f"invalid GPU {item!r}: give an index such as 0 or a list such as 0,1") from None
        if index < 0:
            raise InvalidRequestError(f"invalid GPU {index}: indices start at 0")
        out.append(index)
    if not out:
        raise InvalidRequestError("no GPU named: give an index such as 0 or a list such as 0,1")
    return tuple(out)


def visible_devices(devices: list[Device], env: dict[str, str] | None = None) -> tuple[int, ...] | None:
    """Indices the caller may use under its CUDA_VISIBLE_DEVICES (None when unset)."""
    value = (env if env is not None else os.environ).get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    allowed = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        if entry.lstrip("-").isdigit():
            index = int(entry)
            if index < 0:
                break  # CUDA stops at the first invalid entry
            if any(d.index == index for d in devices):
                allowed.append(index)
            continue
        match = [d.index for d in devices if d.uuid.startswith(entry) or entry.startswith(d.uuid)]
        allowed.extend(match)
    return tuple(dict.fromkeys(allowed))


class Engine:
    """Leases on one machine: one ledger, one GPU backend, one configuration."""

    def __init__(
        self,
        state_dir: str | Path | None = None,
        backend: Backend | None = None,
        config: Config | None = None,
    ) -> None:
        self.config = config or load_config()
        if state_dir is not None:
            self.config = Config(**{**asdict(self.config), "state_dir": Path(state_dir), "state_dir_explicit": True})
        self._backend = backend
        self._ledger: Ledger | None = None
        self._lock = threading.RLock()

    # -- plumbing -------------------------------------------------------------------------
    @property
    def ledger(self) -> Ledger:
        with self._lock:
            if self._ledger is None:
                self._ledger = Ledger(state_dir(self.config))
            return self._ledger

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = get_backend()
        return self._backend

    def close(self) -> None:
        with self._lock:
            if self._ledger is not None:
                self._ledger.close()
                self._ledger = None

    def _bound(self, lease: Lease) -> Lease:
        lease._engine = self
        return lease

    def _event(self, lease_id: str, event: str, who: User, detail: dict[str, Any] | None = None) -> None:
        self.ledger.append_event(lease_id, event, uid=who.uid, user=who.name, pid=os.getpid(), detail=detail)

    # -- reclaiming -----------------------------------------------------------------------
    def _reclaim(self, now: float, who: User) -> list[Lease]:
        """End leases past their time and leases or queued requests whose holder died (inside a write).

        Returns the leases still live (active or queued), oldest first.
        """
        return [lease for lease in self.ledger.live() if self._reclaim_one(lease, now, who) is lease]

    def _reclaim_one(self, lease: Lease, now: float, who: User) -> Lease:
        """End ``lease`` if it is past its time or its holder died; returns it as it now stands."""
        if lease.state == ACTIVE and lease.expires_at is not None and lease.expires_at <= now:
            return self._end(lease, EXPIRED, "reached its end time", who, at=lease.expires_at)
        if lease.state in (ACTIVE, QUEUED) and lease.pid is not None and not procs.is_alive(lease.pid, lease.pid_start):
            if lease.state == QUEUED:
                return self._end(lease, WITHDRAWN, f"waiting process {lease.pid} exited", who, at=now)
            return self._end(lease, REVOKED, f"holder process {lease.pid} exited", who, at=now)
        return lease

    def _end(self, lease: Lease, state: str, reason: str, who: User, *, at: float) -> Lease:
        self.ledger.update(lease.id, state=state, ended_at=at, end_reason=reason)
        self._event(lease.id, state, who, {"reason": reason})
        return replace(lease, state=state, ended_at=at, end_reason=reason)

    # -- snapshot -------------------------------------------------------------------------
    def _poll_devices(self) -> tuple[list[Device], list[GpuProcess]]:
        backend = self.backend
        return backend.devices(), backend.processes()

    def _snapshot(
        self, now: float, devices: list[Device], gpu_procs: list[GpuProcess], live: list[Lease]
    ) -> scheduler.Snapshot:
        active = [lease for lease in live if lease.state == ACTIVE]
        unmanaged = unmanaged_bytes(devices, gpu_procs, active)
        queued = [lease for lease in live if lease.state == QUEUED]
        specs = self.ledger.queued_requests() if queued else {}
        queue = [_request_from_json(specs.get(lease.id, {}), lease) for lease in queued]
        try:
            distances = self.backend.distances()
            dist: tuple[tuple[int, ...], ...] | None = tuple(tuple(row) for row in distances)
        except Exception:  # topology is a preference, never a reason to fail
            dist = None
        return scheduler.Snapshot(
            now=now,
            devices=tuple(
                scheduler.DeviceState(d.index, d.uuid, d.memory_total_bytes, unmanaged.get(d.index, 0)) for d in devices
            ),
            active=tuple(
                scheduler.Holding(lease.id, lease.devices, lease.memory_bytes, lease.expires_at or now)
                for lease in active
            ),
            queue=tuple(queue),
            distances=dist,
        )

    def _queued_request(self, lease: Lease) -> scheduler.Request:
        spec = self.ledger.request_of(lease.id) or {}
        return _request_from_json(spec, lease)

    # -- operations -----------------------------------------------------------------------
    def reserve(
        self,
        memory: str | int | float | MemorySpec,
        duration: str | int | float | None = None,
        *,
        device: int | str | Sequence[int] | None = None,
        gpus: int | None = None,
        prefer: int | str | Sequence[int] | None = None,
        priority: str | None = None,
        label: str | None = None,
        user: str | None = None,
        bind: bool | int = True,
        wait: bool | float = False,
        on_wait: Callable[[WaitUpdate], None] | None = None,
    ) -> Lease:
        """Grant a lease now, or (with ``wait``) queue for one; see ``chronos.reserve``."""
        priority = priority or self.config.default_priority
        spec = parse_memory(memory)
        duration_s = parse_duration(duration) if duration is not None else self.config.default_duration_s
        devices_named = _parse_devices(device)
        preferred = _parse_devices(prefer) or ()
        scheduler.priority_rank(priority)
        if gpus is not None:
            if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
                raise InvalidRequestError(f"gpus must be a whole number of at least 1, got {gpus!r}")
            if devices_named is not None and len(devices_named) != gpus:
                raise InvalidRequestError(
                    f"--gpus {gpus} and --gpu {','.join(map(str, devices_named))} disagree: give one of them"
                )
        count = len(devices_named) if devices_named is not None else (gpus or 1)
        if label is not None and len(label) > 200:
            raise InvalidRequestError("label is too long: keep it under 200 characters")
        timeout = _wait_timeout(wait)
        caller = current_user()
        owner = caller
        if user is not None and user != caller.name:
            owner = lookup_user(user)
            if owner.uid != caller.uid and not is_admin(caller, self.config.admin_group):
                raise NotAllowedError(
                    f"only an admin may reserve for another user ({owner.name}); "
                    f"admins are root and members of group {self.config.admin_group!r}"
                )
        holder = _holder(bind)
        devices, gpu_procs = self._poll_devices()
        visible = visible_devices(devices)
        request = scheduler.Request(
            memory=spec, duration_s=duration_s, gpus=count, devices=devices_named, prefer=preferred,
            priority=priority, visible=visible,
        )
        request_json = _request_to_json(request, bind)
        with self.ledger.transaction():
            now = time.time()
            live = self._reclaim(now, caller)
            snapshot = self._snapshot(now, devices, gpu_procs, live)
            request = _with_seq(request, _next_seq(snapshot))
            decision = scheduler.decide(snapshot, request)
            self._check_policy(owner, request, snapshot, decision)
            if decision.granted:
                return self._grant_new(owner, caller, request, decision, holder, label, now, devices)
            if timeout is None:
                raise UnavailableError(decision.reason)
            waiter = procs.caller()
            queued = Lease(
                id="", owner=owner.name, uid=owner.uid, devices=devices_named or (), device_uuids=(),
                memory_bytes=spec.nbytes or 0, created_at=now, expires_at=None, duration_s=duration_s,
                priority=priority, state=QUEUED, label=label, pid=waiter[0], pid_start=waiter[1],
            )
            lease_id = self.ledger.insert(queued, request_json)
            self._event(lease_id, "queued", caller, {"memory": str(spec), "gpus": count, "priority": priority,
                                                     "reason": decision.reason})
        return self._wait(lease_id, caller, holder, timeout, on_wait)

    def _check_policy(self, owner: User, request: scheduler.Request, snapshot: scheduler.Snapshot,
                      decision: scheduler.Decision) -> None:
        """Hook for configured limits (chronos.policy)."""
        from chronos import policy

        config = self.config
        usage = policy.Usage()
        if config.max_memory_per_user_bytes is not None or config.max_leases_per_user is not None:
            usage = policy.usage_of(self.ledger.live(), owner.uid, snapshot.queue)
        groups: set[str] = set()
        admin = False
        if request.priority == "high" and config.high_priority_groups is not None:
            from chronos.identity import groups_of

            groups, admin = groups_of(owner), is_admin(owner, config.admin_group)
        info = policy.request_info(request, snapshot, decision)
        policy.check(config, info, owner.name, groups, usage, admin=admin)

    def _grant_new(
        self, owner: User, caller: User, request: scheduler.Request, decision: scheduler.Decision,
        holder: tuple[int, float] | None, label: str | None, now: float, devices: list[Device],
    ) -> Lease:
        assert decision.devices is not None
        uuids = _uuids(devices, decision.devices)
        lease = Lease(
            id="", owner=owner.name, uid=owner.uid, devices=decision.devices, device_uuids=uuids,
            memory_bytes=decision.memory_bytes, created_at=now, started_at=now, expires_at=now + request.duration_s,
            duration_s=request.duration_s, priority=request.priority, state=ACTIVE, label=label,
            pid=holder[0] if holder else None, pid_start=holder[1] if holder else None,
        )
        lease.id = self.ledger.insert(lease, _request_to_json(request, holder[0] if holder else False))
        self._event(lease.id, "granted", caller, _grant_detail(lease))
        return self._bound(lease)

    def _wait(
        self, lease_id: str, caller: User, holder: tuple[int, float] | None, timeout: float,
        on_wait: Callable[[WaitUpdate], None] | None,
    ) -> Lease:
        deadline = time.monotonic() + timeout
        next_estimate, estimated = 0.0, None
        try:
            while True:
                devices, gpu_procs = self._poll_devices()
                with self.ledger.transaction():
                    now = time.time()
                    live = self._reclaim(now, caller)
                    lease = self.ledger.get(lease_id)
                    assert lease is not None
                    if lease.state != QUEUED:
                        raise UnavailableError(f"queued request {lease_id} ended: {lease.end_reason or lease.state}")
                    snapshot = self._snapshot(now, devices, gpu_procs, live)
                    request = self._queued_request(lease)
                    decision = scheduler.decide(snapshot, request)
                    if decision.granted:
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
                        return self._bound(granted)
                if on_wait is not None:
                    if time.monotonic() >= next_estimate:  # outside the write lock, and not every poll
                        estimated = scheduler.estimate_start(snapshot, request)
                        # Planning costs ~0.1 ms per queued request: on a long queue, re-plan less often.
                        next_estimate = time.monotonic() + max(ESTIMATE_EVERY_S, 0.05 * len(snapshot.queue))
                    on_wait(WaitUpdate(lease_id, decision.position, estimated, decision.reason))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise UnavailableError(
                        f"gave up after waiting {format_duration(timeout)} in the queue: {decision.reason}"
                    )
                time.sleep(min(WAIT_POLL_S, left))
        except BaseException:
            self._withdraw(lease_id, caller)
            raise

    def _withdraw(self, lease_id: str, caller: User) -> None:
        with self.ledger.transaction():
            lease = self.ledger.get(lease_id)
            if lease is not None and lease.state == QUEUED:
                self._end(lease, WITHDRAWN, "withdrawn by the waiting process", caller, at=time.time())

    def _owned(self, lease_id: str, caller: User, action: str, live: list[Lease] | None = None) -> Lease:
        key = _lease_key(lease_id)
        lease = next((item for item in live or () if item.id == key), None) or self.ledger.get(key)
        if lease is None:
            raise LeaseNotFoundError(f"no lease {lease_id}; see `chronos list --all`")
        if lease.uid != caller.uid and not is_admin(caller, self.config.admin_group):
            raise NotAllowedError(
                f"lease {lease.id} belongs to {lease.owner}; only its owner or an admin may {action} it"
            )
        return lease

    def release(self, lease_id: str) -> Lease:
        """End a lease (or withdraw a queued request). Releasing an ended lease changes nothing."""
        caller = current_user()
        with self.ledger.transaction():
            # Only this lease is reclaimed here (did it already end?): releasing frees capacity, and
            # the next reservation reclaims the rest.
            now = time.time()
            lease = self._reclaim_one(self._owned(lease_id, caller, "release"), now, caller)
            if lease.state in (ACTIVE, QUEUED):
                state = RELEASED if lease.state == ACTIVE else WITHDRAWN
                lease = self._end(lease, state, f"released by {caller.name}", caller, at=time.time())
        return self._bound(lease)

    def extend(self, lease_id: str, duration: str | int | float) -> Lease:
        """Push an active lease's end back by ``duration``."""
        seconds = parse_duration(duration)
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
            self._check_extend_policy(lease, new_end)
            snapshot = self._snapshot(now, devices, gpu_procs, live)
            conflict = scheduler.extend_conflict(snapshot, lease.id, new_end)
            if conflict:
                raise UnavailableError(f"cannot extend lease {lease.id}: {conflict}")
            self.ledger.update(lease.id, expires_at=new_end)
            self._event(lease.id, "extended", caller, {"by_s": seconds, "expires_at": new_end})
            updated = self.ledger.get(lease.id)
            assert updated is not None
        return self._bound(updated)

    def _check_extend_policy(self, lease: Lease, new_end: float) -> None:
        """Hook for configured limits on extension (chronos.policy)."""
        from chronos import policy

        policy.check_extend(self.config, new_end - (lease.started_at or lease.created_at))

    def bind(self, lease_id: str, pid: int | None) -> Lease:
        """Make ``pid`` the lease's holder (its death ends the lease); None unbinds."""
        caller = current_user()
        holder = _holder(pid) if pid is not None else None
        with self.ledger.transaction():
            self._reclaim(time.time(), caller)
            lease = self._owned(lease_id, caller, "bind")
            if lease.state != ACTIVE:
                raise UnavailableError(f"lease {lease.id} is {lease.state}; only an active lease can be bound")
            self.ledger.update(lease.id, pid=holder[0] if holder else None, pid_start=holder[1] if holder else None)
            self._event(lease.id, "bound", caller, {"pid": holder[0] if holder else None})
            updated = self.ledger.get(lease.id)
            assert updated is not None
        return self._bound(updated)

    def get(self, lease_id: str) -> Lease:
        """One lease, in any state."""
        self._reclaim_if_due()
        lease = self.ledger.get(_lease_key(lease_id))
        if lease is None:
            raise LeaseNotFoundError(f"no lease {lease_id}; see `chronos list --all`")
        return self._bound(lease)

    def leases(self, *, all: bool = False, user: str | None = None) -> list[Lease]:
        """Active and queued leases (every lease, newest first, with ``all``); optionally one user's."""
        live = self._reclaim_if_due()
        uid = lookup_user(user).uid if user is not None else None
        if all:
            found = self.ledger.history(uid=uid)
        else:
            found = [lease for lease in live if uid is None or lease.uid == uid]
        return [self._bound(lease) for lease in found]

    def snapshot(self) -> tuple[scheduler.Snapshot, list[Lease]]:
        """The scheduler's view of the machine now, and the live leases it was built from (read-only)."""
        devices, gpu_procs = self._poll_devices()
        live = self._reclaim_if_due()
        return self._snapshot(time.time(), devices, gpu_procs, live), [self._bound(lease) for lease in live]

    def _reclaim_if_due(self) -> list[Lease]:
        """Reads reclaim too, but take the write lock only when something is due; returns the live leases."""
        now = time.time()
        live = self.ledger.live()
        due = any(
            (lease.state == ACTIVE and lease.expires_at is not None and lease.expires_at <= now)
            or (lease.pid is not None and not procs.is_alive(lease.pid, lease.pid_start))
            for lease in live
        )
        if not due:
            return live
        with self.ledger.transaction():
            return self._reclaim(time.time(), current_user())

    def devices(self) -> list[DeviceStatus]:
        """Every device with its memory reserved by leases, used outside them, and available."""
        devices, gpu_procs = self._poll_devices()
        active = [lease for lease in self._reclaim_if_due() if lease.state == ACTIVE]
        unmanaged = unmanaged_bytes(devices, gpu_procs, active)
        strays = accounting.unmanaged(gpu_procs, active) if gpu_procs else []
        out = []
        for d in devices:
            holding = [lease for lease in active if d.index in lease.devices]
            reserved = sum(lease.memory_bytes for lease in holding)
            extra = unmanaged.get(d.index, 0)
            out.append(
                DeviceStatus(
                    index=d.index, uuid=d.uuid, name=d.name, memory_total_bytes=d.memory_total_bytes,
                    memory_used_bytes=d.memory_used_bytes, memory_reserved_bytes=reserved,
                    memory_available_bytes=max(0, d.memory_total_bytes - reserved - extra),
                    active_leases=len(holding), utilization_percent=d.utilization_percent, unmanaged_bytes=extra,
                    unmanaged_processes=tuple(u for u in strays if u.process.device_index == d.index),
                )
            )
        return out

    def record_usage(self, lease_id: str, peak_bytes: int, gpu_seconds: float) -> None:
        """Store a lease's peak GPU memory and GPU time (the watchdog calls this)."""
        self.ledger.record_usage(_lease_key(lease_id), peak_bytes, gpu_seconds)

    def events(self, *, since: float | None = None, lease_id: str | None = None) -> list[Event]:
        """The audit log, oldest first."""
        return self.ledger.events(since=since, lease_id=_lease_key(lease_id) if lease_id is not None else None)


# -- helpers -------------------------------------------------------------------------------
def _uuids(devices: list[Device], indices: tuple[int, ...]) -> tuple[str, ...]:
    by_index = {d.index: d.uuid for d in devices}
    return tuple(by_index[i] for i in indices)


def _lease_key(lease_id: str | int) -> str:
    text = str(lease_id).strip()
    if text[:1] in ("L", "l"):
        text = text[1:]
    if not text.isdigit():
        raise LeaseNotFoundError(f"no lease {lease_id!r}: lease ids are numbers, see `chronos list`")
    return str(int(text))


def _wait_timeout(wait: bool | float) -> float | None:
    if wait is False or wait is None:
        return None
    if wait is True:
        return float("inf")
    seconds = float(wait)
    if seconds <= 0:
        raise InvalidRequestError(f"wait timeout must be positive, got {wait!r}")
    return seconds


def _holder(bind: bool | int | None) -> tuple[int, float] | None:
    if bind is True:
        return procs.caller()
    if bind is False or bind is None:
        return None
    started = procs.start_time(int(bind))
    if started is None:
        raise InvalidRequestError(f"no running process {bind} to bind the lease to")
    return int(bind), started


def _grant_detail(lease: Lease) -> dict[str, Any]:
    return {
        "devices": list(lease.devices), "memory_bytes": lease.memory_bytes, "expires_at": lease.expires_at,
        "priority": lease.priority, "holder": lease.pid,
    }


def _next_seq(snapshot: scheduler.Snapshot) -> int:
    return max((r.seq for r in snapshot.queue), default=0) + 1


def _with_seq(request: scheduler.Request, seq: int) -> scheduler.Request:
    return replace(request, seq=seq)


def _request_to_json(request: scheduler.Request, bind: bool | int) -> dict[str, Any]:
    return {
        "nbytes": request.memory.nbytes, "fraction": request.memory.fraction, "gpus": request.gpus,
        "devices": list(request.devices) if request.devices is not None else None, "prefer": list(request.prefer),
        "visible": list(request.visible) if request.visible is not None else None, "bind": bind,
    }


def _request_from_json(spec: dict[str, Any], lease: Lease) -> scheduler.Request:
    return scheduler.Request(
        memory=MemorySpec(nbytes=spec.get("nbytes"), fraction=spec.get("fraction")),
        duration_s=lease.duration_s,
        gpus=spec.get("gpus", 1),
        devices=tuple(spec["devices"]) if spec.get("devices") is not None else None,
        prefer=tuple(spec.get("prefer") or ()),
        priority=lease.priority,
        seq=int(lease.id),
        lease_id=lease.id,
        visible=tuple(spec["visible"]) if spec.get("visible") is not None else None,
    )


def unmanaged_bytes(devices: list[Device], gpu_procs: list[GpuProcess], active: list[Lease]) -> dict[int, int]:
    """Memory per device that no lease accounts for.

    A process that belongs to a lease (see :func:`chronos.accounting.lease_of_process`) counts
    against that lease, on the lease's devices, up to its size; anything else a device reports as
    used (other processes, usage above a lease, a lease's process on a device it does not name,
    driver overhead) is unmanaged.
    """
    covered: dict[tuple[str, int], int] = {}
    if gpu_procs and active:
        resolve = accounting.lease_of_process(active)
        by_id = {lease.id: lease for lease in active}
        for proc in gpu_procs:
            lease_id = resolve(proc.pid)
            if lease_id is not None and proc.used_bytes and proc.device_index in by_id[lease_id].devices:
                key = (lease_id, proc.device_index)
                covered[key] = covered.get(key, 0) + proc.used_bytes
    out = {}
    sizes = {lease.id: lease.memory_bytes for lease in active}
    for d in devices:
        within = sum(min(used, sizes[lid]) for (lid, idx), used in covered.items() if idx == d.index)
        out[d.index] = max(0, d.memory_used_bytes - within)
    return out


_default: tuple[tuple[str | None, ...], Engine] | None = None
_default_lock = threading.Lock()
_ENV_KEYS = ("CHRONOS_STATE_DIR", "CHRONOS_BACKEND", "CHRONOS_SIM_GPUS", "CHRONOS_CONFIG", "CHRONOS_USER_CONFIG")


def default_engine() -> Engine:
    """The process-wide engine for the current environment (rebuilt when CHRONOS_* variables change)."""
    global _default
    key = tuple(os.environ.get(k) for k in _ENV_KEYS)
    with _default_lock:
        if _default is None or _default[0] != key:
            if _default is not None:
                _default[1].close()
            _default = (key, Engine())
        return _default[1]


def reset_default_engine() -> None:
    global _default
    with _default_lock:
        if _default is not None:
            _default[1].close()
        _default = None

