"""Which processes belong to which lease, and how much GPU memory each lease uses.

This is the one rule. Admission (memory no lease accounts for counts against a device), the
watchdog (what it enforces) and the widget and ``chronos stats`` (what a user sees) all ask
:class:`Membership`, so the figure shown and the figure enforced are the same figure.

A process belongs to a lease when, in this order:

1. it, or one of its ancestors, is the lease's holder (pid *and* start time);
2. its environment names the lease and its ledger (``CHRONOS_LEASE_ID`` and ``CHRONOS_LEDGER``,
   which ``lease.env()`` sets) and it runs as the lease's owner: a program that detaches (a double
   fork, ``nohup … &``, a daemon) keeps them. The ledger's name keeps lease 7 of one state
   directory from being taken for lease 7 of another, and the owner check keeps anyone from
   charging their processes to someone else's lease by setting the variables. Environments are
   readable for one's own processes, or by root;
3. its owner holds exactly one active lease with no holder, which it is then given.

A process keeps the answer it first got while it lives, so a child re-parented to init when its
parent exits stays with its lease. The functions below are pure given a :class:`Judge`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from chronos import procs
from chronos.devices.base import Device, GpuProcess
from chronos.model import LeaseRecord, LeaseState

__all__ = [
    "LEASE_ENV",
    "LEDGER_ENV",
    "NO_LEASE",
    "WRONG_DEVICE",
    "DeviceStatus",
    "Judge",
    "Membership",
    "Unmanaged",
    "carries",
    "device_status",
    "unmanaged",
    "unmanaged_bytes",
    "usage",
]

#: The variables ``lease.env()`` sets in a lease's processes: the lease's id, and its ledger's name.
LEASE_ENV = "CHRONOS_LEASE_ID"
LEDGER_ENV = "CHRONOS_LEDGER"
NO_LEASE = "no lease"
WRONG_DEVICE = "device not in lease"
_TOLERANCE_S = 0.05
_CACHE_LIMIT = 4096


@dataclass(frozen=True)
class Unmanaged:
    """A GPU process outside the leases: ``reason`` is :data:`NO_LEASE` or :data:`WRONG_DEVICE`."""

    process: GpuProcess
    reason: str
    lease_id: str | None = None


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
    unmanaged_processes: tuple[Unmanaged, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["unmanaged_processes"] = [
            {"pid": u.process.pid, "used_bytes": u.process.used_bytes, "reason": u.reason, "lease_id": u.lease_id}
            for u in self.unmanaged_processes
        ]
        return data


class Judge(Protocol):
    """Who decides which lease a pid belongs to: :class:`Membership`, or a table in a pure test."""

    @property
    def leases(self) -> Sequence[LeaseRecord]: ...

    def lease_of(self, pid: int) -> str | None: ...


class Membership:
    """The lease each process belongs to, over one set of active leases (see the module doc).

    ``roots`` overrides a lease's holder as the root of its tree (``lease id -> (pid, start)``):
    ``chronos run`` and a kernel's watchdog watch the command they started. ``ledger`` is the name
    of the ledger the leases live in (:attr:`chronos.ledger.Ledger.identity`); a process's
    environment must name it too. None (pure tests only) accepts any.
    """

    def __init__(self, leases: Sequence[LeaseRecord] = (),
                 roots: dict[str, tuple[int, float | None]] | None = None, *, ledger: str | None = None) -> None:
        self.ledger = ledger
        self._roots = dict(roots or {})
        self._cache: dict[int, tuple[float | None, str | None]] = {}
        self._leases: tuple[LeaseRecord, ...] = ()
        self.update(leases)

    @property
    def leases(self) -> tuple[LeaseRecord, ...]:
        """The active leases judged against."""
        return self._leases

    def update(self, leases: Sequence[LeaseRecord]) -> None:
        """Judge against a new set of leases; answers for leases still there are kept."""
        active = tuple(lease for lease in leases if lease.state == LeaseState.ACTIVE)
        self._leases = active
        self._by_id = {lease.id: lease for lease in active}
        self._holders: dict[int, tuple[str, float | None]] = {}
        for lease in active:
            root = self._roots.get(lease.id)
            if root is None and lease.pid is not None:
                root = (lease.pid, lease.pid_start)
            if root is not None:
                self._holders[root[0]] = (lease.id, root[1])
        unbound: dict[int, list[str]] = {}
        for lease in active:
            if lease.pid is None and lease.id not in self._roots:
                unbound.setdefault(lease.uid, []).append(lease.id)
        self._unbound = {uid: ids[0] for uid, ids in unbound.items() if len(ids) == 1}
        self._cache = {pid: entry for pid, entry in self._cache.items()
                       if entry[1] is not None and entry[1] in self._by_id}

    def lease_of(self, pid: int) -> str | None:
        """The id of the lease ``pid`` belongs to, or None."""
        started = procs.start_time(pid)
        cached = self._cache.get(pid)
        if cached is not None and _same(cached[0], started):
            return cached[1]
        found, sure = self._judge(pid)
        if sure:
            if len(self._cache) > _CACHE_LIMIT:
                self._cache.clear()
            self._cache[pid] = (started, found)
        return found

    def _judge(self, pid: int) -> tuple[str | None, bool]:
        """The lease ``pid`` belongs to, and whether the answer may be kept: an environment read empty may
        be a process caught inside ``execve`` (the kernel sets it up after the parent sees the exec done)."""
        for ancestor, started in _ancestors(pid):
            holder = self._holders.get(ancestor)
            if holder is not None and _same(holder[1], started):
                return holder[0], True
        uid: int | None = None
        environ: dict[str, str] = {}
        import psutil  # only when a process is judged: a CLI start that judges none does not pay for it

        try:
            proc = psutil.Process(pid)
            uid = int(proc.uids().real)
            environ = proc.environ()
        except (psutil.Error, OSError):
            pass
        named = self._by_id.get(environ.get(LEASE_ENV, ""))
        if named is not None and carries(environ, uid, named, self.ledger):
            return named.id, True
        return (self._unbound.get(uid) if uid is not None else None), bool(environ)

    def members(self, lease_id: str) -> list[tuple[int, float]]:
        """The lease's processes now, the root of its tree first: the tree as it is, plus every
        process judged a member earlier that still runs. The calling process is left out unless
        it is the root (a kernel's watchdog never signals the server hosting it)."""
        root: tuple[int, float | None] | None = self._roots.get(lease_id)
        lease = self._by_id.get(lease_id)
        if root is None and lease is not None and lease.pid is not None:
            root = (lease.pid, lease.pid_start)
        me = os.getpid()
        found: dict[int, float] = {}
        if root is not None and procs.is_alive(root[0], root[1]):
            for pid in sorted(procs.descendants(root[0]), key=lambda p: p != root[0]):
                started = procs.start_time(pid)
                if started is not None and (pid != me or pid == root[0]):
                    found[pid] = started
        for pid, (started, owner) in list(self._cache.items()):
            if owner == lease_id and pid not in found and pid != me and started is not None \
                    and procs.is_alive(pid, started):
                found[pid] = started
        return list(found.items())


def carries(environ: dict[str, str], uid: int | None, lease: LeaseRecord, ledger: str | None) -> bool:
    """Rule 2 alone: a process with this environment and real uid carries ``lease`` of ``ledger``
    (None, in pure tests only, accepts any ledger)."""
    return (environ.get(LEASE_ENV) == lease.id and uid == lease.uid
            and (ledger is None or environ.get(LEDGER_ENV) == ledger))


def _same(a: float | None, b: float | None) -> bool:
    return a is None or b is None or abs(a - b) <= _TOLERANCE_S


def _ancestors(pid: int) -> list[tuple[int, float | None]]:
    """``pid`` and its parents up to (not including) init, each with its start time."""
    out: list[tuple[int, float | None]] = []
    seen: set[int] = set()
    current: int | None = pid
    import psutil

    while current and current > 1 and current not in seen:
        seen.add(current)
        try:
            proc = psutil.Process(current)
            out.append((current, procs.start_time(current)))
            current = proc.ppid()
        except (psutil.Error, OSError):
            break
    return out


def usage(processes: Iterable[GpuProcess], membership: Judge) -> dict[str, dict[int, int | None]]:
    """Memory each lease's processes use, per device of the lease: ``lease id -> device -> bytes``.

    None for a device where the driver hides a member's usage (MPS on older drivers, some
    containers). A lease's process on a device the lease does not name is not counted here
    (:func:`unmanaged` reports it).
    """
    by_id = {lease.id: lease for lease in membership.leases}
    out: dict[str, dict[int, int | None]] = {}
    for proc in processes:
        lease_id = membership.lease_of(proc.pid)
        lease = by_id.get(lease_id) if lease_id is not None else None
        if lease is None or proc.device_index not in lease.devices:
            continue
        per = out.setdefault(lease.id, {})
        if proc.used_bytes is None:
            per[proc.device_index] = None
        elif per.get(proc.device_index, 0) is not None:
            per[proc.device_index] = (per.get(proc.device_index) or 0) + proc.used_bytes
    return out


def unmanaged(processes: Iterable[GpuProcess], membership: Judge) -> list[Unmanaged]:
    """GPU processes that hold no lease or use a device their lease does not name."""
    by_id = {lease.id: lease for lease in membership.leases}
    out: list[Unmanaged] = []
    for proc in processes:
        lease_id = membership.lease_of(proc.pid)
        lease = by_id.get(lease_id) if lease_id is not None else None
        if lease is None:
            out.append(Unmanaged(proc, NO_LEASE))
        elif proc.device_index not in lease.devices and proc.device_uuid not in lease.device_uuids:
            out.append(Unmanaged(proc, WRONG_DEVICE, lease.id))
    return out


def unmanaged_bytes(devices: Iterable[Device], processes: Sequence[GpuProcess],
                    membership: Judge) -> dict[int, int]:
    """Memory per device that no lease accounts for.

    A lease's processes count against the lease, on its devices, up to its size; anything else a
    device reports as used (other processes, usage above a lease, driver overhead) is unmanaged.
    """
    sizes = {lease.id: lease.memory_bytes for lease in membership.leases}
    covered: dict[int, int] = {}
    if processes and sizes:
        for lease_id, per_device in usage(processes, membership).items():
            for index, used in per_device.items():
                covered[index] = covered.get(index, 0) + min(used or 0, sizes[lease_id])
    return {d.index: max(0, d.memory_used_bytes - covered.get(d.index, 0)) for d in devices}


def device_status(devices: Sequence[Device], processes: Sequence[GpuProcess], membership: Judge) -> list[DeviceStatus]:
    """Every device with the memory its active leases reserve, the memory used outside them, and what is free."""
    active = membership.leases
    extra = unmanaged_bytes(devices, processes, membership)
    strays = unmanaged(processes, membership) if processes else []
    out = []
    for d in devices:
        holding = [lease for lease in active if d.index in lease.devices]
        reserved = sum(lease.memory_bytes for lease in holding)
        outside = extra.get(d.index, 0)
        out.append(DeviceStatus(
            index=d.index, uuid=d.uuid, name=d.name, memory_total_bytes=d.memory_total_bytes,
            memory_used_bytes=d.memory_used_bytes, memory_reserved_bytes=reserved,
            memory_available_bytes=max(0, d.memory_total_bytes - reserved - outside),
            active_leases=len(holding), utilization_percent=d.utilization_percent, unmanaged_bytes=outside,
            unmanaged_processes=tuple(u for u in strays if u.process.device_index == d.index),
        ))
    return out
