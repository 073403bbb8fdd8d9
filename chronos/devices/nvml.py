"""Real GPUs through NVML (the ``nvidia-ml-py`` package, imported as ``pynvml``).

This is the only module that imports pynvml. NVML is initialised lazily, once per process (again
in a forked child), under a lock. Every NVML failure leaves this module as a
:class:`~chronos.errors.BackendError` with a one-line message; values NVML marks as not available
(utilisation on some GPUs and MIG instances, per-process memory under some drivers) become None.

Process ids are those NVML reports: the host's pid namespace. Inside a container with its own pid
namespace they do not match the container's pids.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pynvml

from chronos.devices.base import (
    LINK_HOST_BRIDGE,
    LINK_NUMA,
    LINK_NVLINK,
    LINK_PCIE_MULTI,
    LINK_PCIE_SWITCH,
    LINK_SAME,
    LINK_SYSTEM,
    Device,
    GpuProcess,
)
from chronos.errors import BackendError, InvalidRequestError

__all__ = [
    "DriverNotFoundError",
    "NvmlBackend",
    "cuda_driver_version",
    "driver_version",
    "has_cgroup_memory_limits",
    "init",
]

T = TypeVar("T")

_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
_NO_DRIVER = {pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED}
_NO_V2 = {_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
          getattr(pynvml, "NVML_ERROR_ARGUMENT_VERSION_MISMATCH", 25)}
_VALUE_NOT_AVAILABLE = (1 << 64) - 1  # NVML_VALUE_NOT_AVAILABLE as an unsigned long long
_LEVELS = {
    pynvml.NVML_TOPOLOGY_INTERNAL: LINK_SAME,
    pynvml.NVML_TOPOLOGY_SINGLE: LINK_PCIE_SWITCH,
    pynvml.NVML_TOPOLOGY_MULTIPLE: LINK_PCIE_MULTI,
    pynvml.NVML_TOPOLOGY_HOSTBRIDGE: LINK_HOST_BRIDGE,
    pynvml.NVML_TOPOLOGY_NODE: LINK_NUMA,
    pynvml.NVML_TOPOLOGY_SYSTEM: LINK_SYSTEM,
}

_init_lock = threading.Lock()
_init_pid: int | None = None
_memory_v2: bool | None = None  # whether nvmlDeviceGetMemoryInfo_v2 works here; None: not tried


class DriverNotFoundError(BackendError):
    """NVML could not load: no NVIDIA driver (or its library) on this machine."""


def _code(exc: BaseException) -> int | None:
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


def _message(what: str, exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"NVML {what} failed: {text}"


def _call(what: str, fn: Callable[..., T], *args: Any) -> T:
    """Run one NVML call; its failure becomes a one-line BackendError."""
    try:
        return fn(*args)
    except (pynvml.NVMLError, pynvml.NVMLLibraryMismatchError) as exc:
        raise BackendError(_message(what, exc)) from None


def _optional(what: str, fn: Callable[..., T], *args: Any) -> T | None:
    """Like :func:`_call`, but None where NVML says the query is not supported here."""
    try:
        return fn(*args)
    except pynvml.NVMLError as exc:
        if _code(exc) in (_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND):
            return None
        raise BackendError(_message(what, exc)) from None
    except pynvml.NVMLLibraryMismatchError:
        return None


def init() -> None:
    """Initialise NVML once for this process (thread-safe; again after a fork)."""
    global _init_pid
    pid = os.getpid()
    if _init_pid == pid:
        return
    with _init_lock:
        if _init_pid == pid:
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            if _code(exc) in _NO_DRIVER:
                raise DriverNotFoundError(
                    "no NVIDIA driver found (NVML could not load libnvidia-ml.so.1); "
                    "set CHRONOS_BACKEND=simulated to use simulated GPUs"
                ) from None
            raise BackendError(_message("initialisation", exc)) from None
        except OSError as exc:
            raise DriverNotFoundError(f"no NVIDIA driver found ({exc}); "
                                      "set CHRONOS_BACKEND=simulated to use simulated GPUs") from None
        _init_pid = pid


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def driver_version() -> str:
    """The NVIDIA driver's version, e.g. ``550.54.15``."""
    init()
    return _text(_call("driver version query", pynvml.nvmlSystemGetDriverVersion))


def cuda_driver_version() -> str | None:
    """The CUDA version the driver supports, e.g. ``12.4``; None where NVML cannot say."""
    init()
    value = _optional("CUDA driver version query", pynvml.nvmlSystemGetCudaDriverVersion)
    if not value:
        return None
    major, minor = divmod(int(value), 1000)
    return f"{major}.{minor // 10}"


def has_cgroup_memory_limits() -> bool:
    """Whether per-cgroup GPU memory limits (``nvmlDeviceSetMemoryLimits_v1``) exist here.

    A capability probe only: True when the Python binding has the call and, where NVML loads, the
    driver's library exports it. Nothing is set.
    """
    if not hasattr(pynvml, "nvmlDeviceSetMemoryLimits_v1"):
        return False
    try:
        init()
    except BackendError:
        return False
    lib = getattr(pynvml, "nvmlLib", None)
    if lib is None:
        return False
    return hasattr(lib, "nvmlDeviceSetMemoryLimits_v1")


def _memory(handle: Any) -> tuple[int, int]:
    """(total, used) bytes, from the v2 query where the driver has it (it leaves out reserved memory)."""
    global _memory_v2
    version = getattr(pynvml, "nvmlMemory_v2", None)
    if _memory_v2 is not False and version is not None:
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(handle, version=version)
            _memory_v2 = True
            return int(info.total), int(info.used)
        except pynvml.NVMLError as exc:
            if _memory_v2 or _code(exc) not in _NO_V2:
                raise BackendError(_message("memory query", exc)) from None
            _memory_v2 = False
    info = _call("memory query", pynvml.nvmlDeviceGetMemoryInfo, handle)
    return int(info.total), int(info.used)


def _used(value: Any) -> int | None:
    if value is None:
        return None
    value = int(value)
    return None if value == _VALUE_NOT_AVAILABLE else value


def _running(handle: Any, kind: str) -> list[Any]:
    """One kind of running process on one device; [] where NVML does not support that kind here."""
    names = {
        "compute": ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v2"),
        "graphics": ("nvmlDeviceGetGraphicsRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses_v2"),
        "MPS": ("nvmlDeviceGetMPSComputeRunningProcesses", "nvmlDeviceGetMPSComputeRunningProcesses_v2"),
    }[kind]
    for name in names:
        fn = getattr(pynvml, name, None)
        if fn is None:
            continue
        try:
            return list(fn(handle))
        except pynvml.NVMLLibraryMismatchError:
            continue  # the unversioned call is newer than the driver: try the older version
        except pynvml.NVMLError as exc:
            code = _code(exc)
            if code == pynvml.NVML_ERROR_FUNCTION_NOT_FOUND:
                continue
            if code == _NOT_SUPPORTED:
                return []
            raise BackendError(_message(f"{kind} process query", exc)) from None
    return []


class NvmlBackend:
    """The machine's NVIDIA GPUs, ordered by NVML index."""

    name = "nvml"

    def __init__(self) -> None:
        init()
        count = _call("device count query", pynvml.nvmlDeviceGetCount)
        self._handles = [_call(f"handle query for GPU {i}", pynvml.nvmlDeviceGetHandleByIndex, i)
                         for i in range(count)]
        self._uuids = [_text(_call(f"UUID query for GPU {i}", pynvml.nvmlDeviceGetUUID, h))
                       for i, h in enumerate(self._handles)]
        self._names = [_text(_call(f"name query for GPU {i}", pynvml.nvmlDeviceGetName, h))
                       for i, h in enumerate(self._handles)]
        self._distances: list[list[int]] | None = None

    def device_count(self) -> int:
        return len(self._handles)

    def devices(self) -> list[Device]:
        init()
        out = []
        for i, handle in enumerate(self._handles):
            total, used = _memory(handle)
            rates = _optional(f"utilisation query for GPU {i}", pynvml.nvmlDeviceGetUtilizationRates, handle)
            util = None if rates is None else int(rates.gpu)
            if util is not None and not 0 <= util <= 100:
                util = None
            out.append(Device(index=i, uuid=self._uuids[i], name=self._names[i],
                              memory_total_bytes=total, memory_used_bytes=used, utilization_percent=util))
        return out

    def processes(self, indices: list[int] | None = None) -> list[GpuProcess]:
        init()
        wanted = range(len(self._handles)) if indices is None else indices
        found: dict[tuple[int, int], int | None] = {}
        for i in wanted:
            if not 0 <= i < len(self._handles):
                raise InvalidRequestError(f"no GPU {i}: this machine has {len(self._handles)}")
            for kind in ("compute", "graphics", "MPS"):
                for proc in _running(self._handles[i], kind):
                    key = (i, int(proc.pid))
                    used = _used(getattr(proc, "usedGpuMemory", None))
                    if key in found:
                        old = found[key]
                        used = old if used is None else (used if old is None else max(old, used))
                    found[key] = used
        return [GpuProcess(device_index=i, device_uuid=self._uuids[i], pid=pid, used_bytes=used)
                for (i, pid), used in sorted(found.items())]

    def distances(self) -> list[list[int]]:
        """Topology levels between every pair, NVLink (direct or through NVSwitch) first; cached."""
        if self._distances is None:
            init()
            self._distances = self._topology()
        return [row[:] for row in self._distances]

    def _topology(self) -> list[list[int]]:
        n = len(self._handles)
        matrix = [[LINK_SAME if i == j else LINK_SYSTEM for j in range(n)] for i in range(n)]
        for i in range(n):
            for j in range(i + 1, n):
                level = _optional("topology query", pynvml.nvmlDeviceGetTopologyCommonAncestor,
                                  self._handles[i], self._handles[j])
                link = LINK_SYSTEM if level is None else _LEVELS.get(int(level), LINK_SYSTEM)
                matrix[i][j] = matrix[j][i] = link
        bus_ids: dict[tuple[int, int, int], int] = {}
        for i, handle in enumerate(self._handles):
            pci = _optional("PCI query", pynvml.nvmlDeviceGetPciInfo, handle)
            if pci is not None:
                bus_ids[(int(pci.domain), int(pci.bus), int(pci.device))] = i
        on_switch: set[int] = set()
        for i, handle in enumerate(self._handles):
            for peer in self._nvlink_peers(handle, bus_ids, on_switch, i):
                if peer != i:
                    matrix[i][peer] = matrix[peer][i] = LINK_NVLINK
        for i in on_switch:
            for j in on_switch:
                if i != j:
                    matrix[i][j] = LINK_NVLINK
        return matrix

    @staticmethod
    def _nvlink_peers(handle: Any, bus_ids: dict[tuple[int, int, int], int], on_switch: set[int],
                      index: int) -> list[int]:
        """GPUs at the far end of ``handle``'s active NVLinks; notes NVSwitch links in ``on_switch``."""
        peers = []
        for link in range(int(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18))):
            try:
                if not pynvml.nvmlDeviceGetNvLinkState(handle, link):
                    continue
                remote = pynvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link)
            except pynvml.NVMLError as exc:
                if _code(exc) in (_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND):
                    break  # no NVLink on this device
                continue  # past this device's last link (INVALID_ARGUMENT) or a link NVML cannot read
            key = (int(remote.domain), int(remote.bus), int(remote.device))
            if key in bus_ids:
                peers.append(bus_ids[key])
                continue
            try:
                kind = pynvml.nvmlDeviceGetNvLinkRemoteDeviceType(handle, link)
            except (pynvml.NVMLError, AttributeError):
                continue
            if kind == pynvml.NVML_NVLINK_DEVICE_TYPE_SWITCH:
                on_switch.add(index)
        return peers

    def driver_version(self) -> str | None:
        return driver_version()

    def cuda_driver_version(self) -> str | None:
        return cuda_driver_version()
