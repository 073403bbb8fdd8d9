"""The public calls, each a thin shim over the process-wide engine."""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence

from chronos.engine import DeviceStatus, WaitUpdate, default_engine
from chronos.lease import Lease
from chronos.units import MemorySpec

__all__ = ["devices", "extend", "get_lease", "leases", "make_devices_callable", "release", "reserve"]


def reserve(
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
    """Reserve ``memory`` on GPUs for ``duration`` (default 1h) and return the lease.

    ``memory`` is ``"8G"``, ``"512M"``, ``"8GiB"``, ``"50%"`` or ``0.5`` (of each device); ``duration``
    is ``"2h"``, ``"90m"``, ``"1h30m"``, ``"45s"``, ``"1d"`` or seconds. ``device`` names one or more
    indices (all or none), ``gpus`` asks for N devices at once; otherwise the least-loaded device that
    fits is chosen. By default the lease is bound to the calling process and ends when it exits
    (``bind=False`` keeps it until released or expired; an int binds it to that pid). Without
    ``wait`` a request that does not fit now raises UnavailableError; ``wait=True`` (or seconds)
    queues it.
    """
    return default_engine().reserve(
        memory, duration, device=device, gpus=gpus, prefer=prefer, priority=priority, label=label, user=user,
        bind=bind, wait=wait, on_wait=on_wait,
    )


def release(lease_id: str | int) -> Lease:
    """End a lease by id (owner or admin only)."""
    return default_engine().release(str(lease_id))


def extend(lease_id: str | int, duration: str | int | float) -> Lease:
    """Push a lease's end back by ``duration`` (owner or admin only)."""
    return default_engine().extend(str(lease_id), duration)


def get_lease(lease_id: str | int) -> Lease:
    """One lease by id, in any state."""
    return default_engine().get(str(lease_id))


def leases(*, all: bool = False, user: str | None = None) -> list[Lease]:
    """Active and queued leases; every lease with ``all=True``."""
    return default_engine().leases(all=all, user=user)


def devices() -> list[DeviceStatus]:
    """Every GPU with its memory total, used, reserved by leases and available."""
    return default_engine().devices()


class _CallableDevicesModule(types.ModuleType):
    """``chronos.devices`` is both the backends package and the ``chronos.devices()`` call."""

    def __call__(self) -> list[DeviceStatus]:
        return devices()


def make_devices_callable() -> None:
    """Let ``chronos.devices()`` work while ``chronos.devices.simulated`` stays importable."""
    import chronos.devices as package

    package.__class__ = _CallableDevicesModule
