"""Who uses which GPU memory: pure functions over a backend's process list and the active leases.

``chronos stats`` uses :func:`unmanaged` to report GPU processes that hold no lease, or that use a
device their lease does not name; the watchdog uses :class:`TreeMembership` to tell which GPU
processes belong to a lease holder's process tree.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import psutil

from chronos import procs
from chronos.devices.base import GpuProcess
from chronos.lease import Lease

__all__ = ["NO_LEASE", "WRONG_DEVICE", "TreeMembership", "Unmanaged", "lease_of_process", "unmanaged"]

NO_LEASE = "no lease"
WRONG_DEVICE = "device not in lease"
_TOLERANCE_S = 0.05


@dataclass(frozen=True)
class Unmanaged:
    """A GPU process outside the leases: ``reason`` is :data:`NO_LEASE` or :data:`WRONG_DEVICE`."""

    process: GpuProcess
    reason: str
    lease_id: str | None = None


def unmanaged(
    processes: Iterable[GpuProcess],
    leases: Sequence[Lease],
    owner_of: Callable[[int], str | None] | None = None,
) -> list[Unmanaged]:
    """GPU processes that hold no lease or use a device their lease does not name.

    ``owner_of(pid)`` names the lease a process belongs to (None: no lease). The default follows
    each process's parents up to a lease holder (pid and start time), then looks for
    ``CHRONOS_LEASE_ID`` in its environment (readable for one's own processes, or as root), and
    last gives it to its owner's only unbound lease, if there is one. Only active leases count.
    Pure when ``owner_of`` is given.
    """
    active = [lease for lease in leases if lease.state == "active"]
    by_id = {lease.id: lease for lease in active}
    resolve = owner_of if owner_of is not None else lease_of_process(active)
    out: list[Unmanaged] = []
    for proc in processes:
        lease_id = resolve(proc.pid)
        lease = by_id.get(lease_id) if lease_id else None
        if lease is None:
            out.append(Unmanaged(proc, NO_LEASE))
        elif proc.device_index not in lease.devices and proc.device_uuid not in lease.device_uuids:
            out.append(Unmanaged(proc, WRONG_DEVICE, lease.id))
    return out


def lease_of_process(leases: Sequence[Lease]) -> Callable[[int], str | None]:
    """A resolver pid -> lease id over ``leases``, by ancestry first, then by environment."""
    holders = {lease.pid: lease for lease in leases if lease.pid is not None}
    ids = {lease.id for lease in leases}

    def resolve(pid: int) -> str | None:
        for ancestor, started in _ancestors(pid):
            lease = holders.get(ancestor)
            if lease is not None and (
                lease.pid_start is None or started is None or abs(started - lease.pid_start) <= _TOLERANCE_S
            ):
                return lease.id
        env_id: str | None = None
        uid: int | None = None
        try:
            proc = psutil.Process(pid)
            uid = _uid(proc)
            env_id = proc.environ().get("CHRONOS_LEASE_ID")
        except (psutil.Error, OSError):
            pass
        if env_id in ids:
            return env_id
        unbound = [lease.id for lease in leases if lease.pid is None and lease.uid == uid]
        return unbound[0] if len(unbound) == 1 else None

    return resolve


def _uid(proc: psutil.Process) -> int | None:
    try:
        return int(proc.uids().real)
    except (psutil.Error, OSError):
        return None


def _ancestors(pid: int) -> list[tuple[int, float | None]]:
    """``pid`` and its parents up to (not including) init, each with its start time."""
    out: list[tuple[int, float | None]] = []
    seen: set[int] = set()
    current: int | None = pid
    while current and current > 1 and current not in seen:
        seen.add(current)
        try:
            proc = psutil.Process(current)
            out.append((current, proc.create_time()))
            current = proc.ppid()
        except (psutil.Error, OSError):
            break
    return out


class TreeMembership:
    """Whether a pid belongs to the tree under one root process, cached per (pid, start time).

    A process keeps the answer it first got while it lives, so one seen inside the tree stays a
    member even when re-parented (a daemonised grandchild still counts against the lease).
    Walking each GPU process's parents costs far less than listing the whole machine's processes every poll.
    """

    def __init__(self, root_pid: int, root_start: float | None = None) -> None:
        self.root_pid = root_pid
        self.root_start = root_start if root_start is not None else procs.start_time(root_pid)
        self._cache: dict[int, tuple[float | None, bool]] = {}

    def __contains__(self, pid: object) -> bool:
        if not isinstance(pid, int):
            return False
        if pid == self.root_pid:
            return True
        started = procs.start_time(pid)
        cached = self._cache.get(pid)
        if cached is not None and (
            cached[0] is None or started is None or abs(cached[0] - started) <= _TOLERANCE_S
        ):
            return cached[1]
        member = any(p == self.root_pid for p, _ in _ancestors(pid)[1:])
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[pid] = (started, member)
        return member

    def members(self) -> list[tuple[int, float]]:
        """The tree now (root first), each with its start time; the calling process left out
        unless it is the root."""
        me = os.getpid()
        out: list[tuple[int, float]] = []
        for pid in sorted(procs.descendants(self.root_pid), key=lambda p: p != self.root_pid):
            if pid == me and pid != self.root_pid:
                continue
            started = procs.start_time(pid)
            if started is not None:
                out.append((pid, started))
        return out
