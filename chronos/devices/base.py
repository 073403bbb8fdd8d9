"""Plain data for GPUs and their processes, and the one interface every backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "LINK_HOST_BRIDGE",
    "LINK_NUMA",
    "LINK_NVLINK",
    "LINK_PCIE_MULTI",
    "LINK_PCIE_SWITCH",
    "LINK_SAME",
    "LINK_SYSTEM",
    "Backend",
    "Device",
    "GpuProcess",
    "ProcessUtilization",
]

# Distances between two devices, smaller is closer (NVML's topology levels, NVLink first).
LINK_SAME = 0
LINK_NVLINK = 5
LINK_PCIE_SWITCH = 10
LINK_PCIE_MULTI = 20
LINK_HOST_BRIDGE = 30
LINK_NUMA = 40
LINK_SYSTEM = 50


@dataclass(frozen=True)
class Device:
    """One GPU as a backend sees it at one instant."""

    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_percent: int | None = None

    @property
    def memory_free_bytes(self) -> int:
        return max(0, self.memory_total_bytes - self.memory_used_bytes)


@dataclass(frozen=True)
class GpuProcess:
    """One process using GPU memory on one device; ``used_bytes`` is None where the driver hides it."""

    device_index: int
    device_uuid: str
    pid: int
    used_bytes: int | None


@dataclass(frozen=True)
class ProcessUtilization:
    """How busy one process kept one device's streaming multiprocessors lately.

    ``sm_percent`` is the highest share of SM time (0-100) the driver sampled for the process since the
    backend's previous call (at first, over the last few seconds); None where the driver cannot say for
    this device, so that nobody mistakes "unknown" for "idle".
    """

    device_index: int
    device_uuid: str
    pid: int
    sm_percent: int | None


@runtime_checkable
class Backend(Protocol):
    """What Chronos needs from a source of GPUs: real (NVML) or simulated."""

    #: ``"nvml"`` or ``"simulated"``.
    name: str

    def devices(self) -> list[Device]:
        """Every device, ordered by index."""
        ...

    def processes(self, indices: list[int] | None = None) -> list[GpuProcess]:
        """GPU processes on the given devices (all devices when None), in one poll."""
        ...

    def utilization(self, indices: list[int] | None = None) -> list[ProcessUtilization]:
        """SM use per process on the given devices (all when None), in one poll. A process left out
        used no SM time; a device that cannot report it lists its processes with ``sm_percent`` None."""
        ...

    def distances(self) -> list[list[int]]:
        """An n x n matrix of ``LINK_*`` distances between devices."""
        ...

    def driver_version(self) -> str | None:
        """The driver's version string, or None where there is no driver."""
        ...
