"""Real GPUs through NVML (the ``nvidia-ml-py`` package, imported as ``pynvml``).

This is the only module that imports pynvml. Everything NVML-specific goes through one
:class:`_Nvml` per library, so that a stand-in library can drive the same code in tests without a
GPU. The real library is initialised lazily, once per process (again in a forked child), under a
lock. Every NVML failure leaves this module as a :class:`~chronos.errors.BackendError` with a
one-line message; values NVML marks as not available (utilisation on some GPUs and MIG instances,
per-process memory under some drivers) become None.

Process ids are those NVML reports: the host's pid namespace. Inside a container with its own pid
namespace they do not match the container's pids.
"""

from __future__ import annotations

import os
import threading
import time
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
    ProcessUtilization,
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

_VALUE_NOT_AVAILABLE = (1 << 64) - 1  # NVML_VALUE_NOT_AVAILABLE as an unsigned long long
_PROCESS_CALLS = {
    "compute": ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v2"),
    "graphics": ("nvmlDeviceGetGraphicsRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses_v2"),
    "MPS": ("nvmlDeviceGetMPSComputeRunningProcesses", "nvmlDeviceGetMPSComputeRunningProcesses_v2"),
}


#: On a backend's first utilisation poll of a device, samples this far back are read.
UTILIZATION_LOOKBACK_S = 10.0


class DriverNotFoundError(BackendError):
    """NVML could not load: no NVIDIA driver (or its library) on this machine."""


def _code(exc: BaseException) -> int | None:
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


def _message(what: str, exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"NVML {what} failed: {text}"


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _used(value: Any) -> int | None:
    if value is None:
        return None
    value = int(value)
    return None if value == _VALUE_NOT_AVAILABLE else value


def _no_driver(detail: str) -> DriverNotFoundError:
    return DriverNotFoundError(f"no NVIDIA driver found ({detail}); "
                               "set CHRONOS_BACKEND=simulated to use simulated GPUs")


class _Nvml:
    """One NVML library (pynvml, or a stand-in in tests) and what this process learned about it."""

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        self._lock = threading.Lock()
        self._init_pid: int | None = None
        self._memory_v2: bool | None = None  # whether the v2 memory query works here; None: not tried
        self._not_supported = lib.NVML_ERROR_NOT_SUPPORTED
        self._unsupported = {lib.NVML_ERROR_NOT_SUPPORTED, lib.NVML_ERROR_FUNCTION_NOT_FOUND}
        self._no_v2 = self._unsupported | {getattr(lib, "NVML_ERROR_ARGUMENT_VERSION_MISMATCH", 25)}
        self._levels = {
            lib.NVML_TOPOLOGY_INTERNAL: LINK_SAME,
            lib.NVML_TOPOLOGY_SINGLE: LINK_PCIE_SWITCH,
            lib.NVML_TOPOLOGY_MULTIPLE: LINK_PCIE_MULTI,
            lib.NVML_TOPOLOGY_HOSTBRIDGE: LINK_HOST_BRIDGE,
            lib.NVML_TOPOLOGY_NODE: LINK_NUMA,
            lib.NVML_TOPOLOGY_SYSTEM: LINK_SYSTEM,
        }

    def init(self) -> None:
        """Initialise NVML once for this process (thread-safe; again after a fork)."""
        pid = os.getpid()
        if self._init_pid == pid:
            return
        with self._lock:
            if self._init_pid == pid:
                return
            lib = self.lib
            try:
                lib.nvmlInit()
            except lib.NVMLError as exc:
                if _code(exc) in (lib.NVML_ERROR_LIBRARY_NOT_FOUND, lib.NVML_ERROR_DRIVER_NOT_LOADED):
                    raise _no_driver("NVML could not load libnvidia-ml.so.1") from None
                raise BackendError(_message("initialisation", exc)) from None
            except OSError as exc:
                raise _no_driver(str(exc)) from None
            self._init_pid = pid

    def call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run one NVML call; its failure becomes a one-line BackendError."""
        try:
            return fn(*args)
        except (self.lib.NVMLError, self.lib.NVMLLibraryMismatchError) as exc:
            raise BackendError(_message(what, exc)) from None

    def optional(self, what: str, fn: Callable[..., T], *args: Any) -> T | None:
        """Like :meth:`call`, but None where NVML says the query is not supported here."""
        try:
            return fn(*args)
        except self.lib.NVMLError as exc:
            if _code(exc) in self._unsupported:
                return None
            raise BackendError(_message(what, exc)) from None
        except self.lib.NVMLLibraryMismatchError:
            return None

    def driver_version(self) -> str:
        self.init()
        return _text(self.call("driver version query", self.lib.nvmlSystemGetDriverVersion))

    def cuda_driver_version(self) -> str | None:
        self.init()
        value = self.optional("CUDA driver version query", self.lib.nvmlSystemGetCudaDriverVersion)
        if not value:
            return None
        major, minor = divmod(int(value), 1000)
        return f"{major}.{minor // 10}"

    def has_cgroup_memory_limits(self) -> bool:
        if not hasattr(self.lib, "nvmlDeviceSetMemoryLimits_v1"):
            return False
        try:
            self.init()
        except BackendError:
            return False
        loaded = getattr(self.lib, "nvmlLib", None)  # the driver's library, once NVML has loaded it
        return loaded is not None and hasattr(loaded, "nvmlDeviceSetMemoryLimits_v1")

    def memory(self, handle: Any) -> tuple[int, int]:
        """(total, used) bytes, from the v2 query where the driver has it (it leaves out reserved memory)."""
        lib = self.lib
        version = getattr(lib, "nvmlMemory_v2", None)
        if self._memory_v2 is not False and version is not None:
            try:
                info = lib.nvmlDeviceGetMemoryInfo(handle, version=version)
                self._memory_v2 = True
                return int(info.total), int(info.used)
            except lib.NVMLError as exc:
                if self._memory_v2 or _code(exc) not in self._no_v2:
                    raise BackendError(_message("memory query", exc)) from None
                self._memory_v2 = False
        info = self.call("memory query", lib.nvmlDeviceGetMemoryInfo, handle)
        return int(info.total), int(info.used)

    def running(self, handle: Any, kind: str) -> list[Any]:
        """One kind of running process on one device; [] where NVML does not support that kind here."""
        lib = self.lib
        for name in _PROCESS_CALLS[kind]:
            fn = getattr(lib, name, None)
            if fn is None:
                continue
            try:
                return list(fn(handle))
            except lib.NVMLLibraryMismatchError:
                continue  # the unversioned call is newer than the driver: try the older version
            except lib.NVMLError as exc:
                code = _code(exc)
                if code == lib.NVML_ERROR_FUNCTION_NOT_FOUND:
                    continue
                if code == self._not_supported:
                    return []
                raise BackendError(_message(f"{kind} process query", exc)) from None
        return []

    def process_samples(self, handle: Any, since_us: int) -> list[Any] | None:
        """NVML's per-process utilisation samples newer than ``since_us`` (CPU time in microseconds, as
        NVML wants it); [] when none is newer (NOT_FOUND: no process used the device); None where this
        device or driver cannot say."""
        lib = self.lib
        fn = getattr(lib, "nvmlDeviceGetProcessUtilization", None)
        if fn is None:
            return None
        try:
            return list(fn(handle, since_us))
        except lib.NVMLLibraryMismatchError:
            return None
        except lib.NVMLError as exc:
            code = _code(exc)
            if code in (lib.NVML_ERROR_NOT_FOUND, 0):  # 0: pynvml's "no samples" on a first call that found none
                return []
            if code in self._unsupported:
                return None
            raise BackendError(_message("process utilisation query", exc)) from None

    def level(self, a: Any, b: Any) -> int:
        """The ``LINK_*`` distance NVML's topology gives two devices (PCIe and CPUs only)."""
        level = self.optional("topology query", self.lib.nvmlDeviceGetTopologyCommonAncestor, a, b)
        return LINK_SYSTEM if level is None else self._levels.get(int(level), LINK_SYSTEM)

    def nvlink_peers(self, handle: Any, bus_ids: dict[tuple[int, int, int], int],
                     on_switch: set[int], index: int) -> list[int]:
        """GPUs at the far end of ``handle``'s active NVLinks; notes NVSwitch links in ``on_switch``."""
        lib = self.lib
        peers = []
        for link in range(int(getattr(lib, "NVML_NVLINK_MAX_LINKS", 18))):
            try:
                if not lib.nvmlDeviceGetNvLinkState(handle, link):
                    continue
                remote = lib.nvmlDeviceGetNvLinkRemotePciInfo(handle, link)
            except lib.NVMLError as exc:
                if _code(exc) in self._unsupported:
                    break  # no NVLink on this device
                continue  # past this device's last link (INVALID_ARGUMENT) or a link NVML cannot read
            key = (int(remote.domain), int(remote.bus), int(remote.device))
            if key in bus_ids:
                peers.append(bus_ids[key])
                continue
            try:
                kind = lib.nvmlDeviceGetNvLinkRemoteDeviceType(handle, link)
            except (lib.NVMLError, AttributeError):
                continue
            if kind == lib.NVML_NVLINK_DEVICE_TYPE_SWITCH:
                on_switch.add(index)
        return peers


_REAL = _Nvml(pynvml)


def init() -> None:
    """Initialise NVML once for this process (thread-safe; again after a fork)."""
    _REAL.init()


def driver_version() -> str:
    """The NVIDIA driver's version, e.g. ``550.54.15``."""
    return _REAL.driver_version()


def cuda_driver_version() -> str | None:
    """The CUDA version the driver supports, e.g. ``12.4``; None where NVML cannot say."""
    return _REAL.cuda_driver_version()


def has_cgroup_memory_limits() -> bool:
    """Whether per-cgroup GPU memory limits (``nvmlDeviceSetMemoryLimits_v1``) exist here.

    A capability probe only: True when the Python binding has the call and, where NVML loads, the
    driver's library exports it. Nothing is set.
    """
    return _REAL.has_cgroup_memory_limits()


class NvmlBackend:
    """The machine's NVIDIA GPUs, ordered by NVML index."""

    name = "nvml"

    def __init__(self, lib: Any = None) -> None:
        """``lib`` is the NVML binding to use: None for pynvml; tests pass a stand-in without a GPU."""
        nv = self._nv = _REAL if lib is None else _Nvml(lib)
        nv.init()
        count = nv.call("device count query", nv.lib.nvmlDeviceGetCount)
        self._handles = [nv.call(f"handle query for GPU {i}", nv.lib.nvmlDeviceGetHandleByIndex, i)
                         for i in range(count)]
        self._uuids = [_text(nv.call(f"UUID query for GPU {i}", nv.lib.nvmlDeviceGetUUID, h))
                       for i, h in enumerate(self._handles)]
        self._names = [_text(nv.call(f"name query for GPU {i}", nv.lib.nvmlDeviceGetName, h))
                       for i, h in enumerate(self._handles)]
        self._distances: list[list[int]] | None = None
        self._seen_us: dict[int, int] = {}  # per device: the newest utilisation sample read so far

    def device_count(self) -> int:
        return len(self._handles)

    def devices(self) -> list[Device]:
        nv = self._nv
        nv.init()
        out = []
        for i, handle in enumerate(self._handles):
            total, used = nv.memory(handle)
            rates = nv.optional(f"utilisation query for GPU {i}", nv.lib.nvmlDeviceGetUtilizationRates, handle)
            util = None if rates is None else int(rates.gpu)
            if util is not None and not 0 <= util <= 100:
                util = None
            out.append(Device(index=i, uuid=self._uuids[i], name=self._names[i],
                              memory_total_bytes=total, memory_used_bytes=used, utilization_percent=util))
        return out

    def processes(self, indices: list[int] | None = None) -> list[GpuProcess]:
        self._nv.init()
        wanted = range(len(self._handles)) if indices is None else indices
        found: dict[tuple[int, int], int | None] = {}
        for i in wanted:
            if not 0 <= i < len(self._handles):
                raise InvalidRequestError(f"no GPU {i}: this machine has {len(self._handles)}")
            for kind in _PROCESS_CALLS:
                for proc in self._nv.running(self._handles[i], kind):
                    key = (i, int(proc.pid))
                    used = _used(getattr(proc, "usedGpuMemory", None))
                    if key in found:
                        old = found[key]
                        used = old if used is None else (used if old is None else max(old, used))
                    found[key] = used
        return [GpuProcess(device_index=i, device_uuid=self._uuids[i], pid=pid, used_bytes=used)
                for (i, pid), used in sorted(found.items())]

    def utilization(self, indices: list[int] | None = None) -> list[ProcessUtilization]:
        """Each process's highest SM sample since this backend's previous poll of the device (the last
        :data:`UTILIZATION_LOOKBACK_S` seconds at first); where NVML cannot sample a device (or, on the
        first poll, has no sample yet), its processes with ``sm_percent`` None."""
        self._nv.init()
        wanted = range(len(self._handles)) if indices is None else indices
        out: list[ProcessUtilization] = []
        for i in wanted:
            if not 0 <= i < len(self._handles):
                raise InvalidRequestError(f"no GPU {i}: this machine has {len(self._handles)}")
            first = i not in self._seen_us
            since = self._seen_us.get(i) or int((time.time() - UTILIZATION_LOOKBACK_S) * 1e6)
            samples = self._nv.process_samples(self._handles[i], since)
            # Right after nvmlInit the driver has no samples yet, even for a process computing all along
            # (seen on an H200): a first empty answer is "cannot say", never "idle".
            if samples is not None and first and not samples:
                self._seen_us[i] = since  # the next poll asks again from here and is believed
                samples = None
            if samples is None:
                out.extend(ProcessUtilization(i, self._uuids[i], p.pid, None) for p in self.processes([i]))
                continue
            best: dict[int, int | None] = {}
            newest = since
            for sample in samples:
                pid, sm = int(sample.pid), int(sample.smUtil)
                newest = max(newest, int(sample.timeStamp))
                old = best.get(pid, 0)
                best[pid] = None if old is None or not 0 <= sm <= 100 else max(old, sm)
            self._seen_us[i] = newest
            out.extend(ProcessUtilization(i, self._uuids[i], pid, sm) for pid, sm in sorted(best.items()))
        return out

    def distances(self) -> list[list[int]]:
        """Topology levels between every pair, NVLink (direct or through NVSwitch) first; cached."""
        if self._distances is None:
            self._nv.init()
            self._distances = self._topology()
        return [row[:] for row in self._distances]

    def _topology(self) -> list[list[int]]:
        nv = self._nv
        n = len(self._handles)
        matrix = [[LINK_SAME if i == j else LINK_SYSTEM for j in range(n)] for i in range(n)]
        for i in range(n):
            for j in range(i + 1, n):
                matrix[i][j] = matrix[j][i] = nv.level(self._handles[i], self._handles[j])
        bus_ids: dict[tuple[int, int, int], int] = {}
        for i, handle in enumerate(self._handles):
            pci = nv.optional("PCI query", nv.lib.nvmlDeviceGetPciInfo, handle)
            if pci is not None:
                bus_ids[(int(pci.domain), int(pci.bus), int(pci.device))] = i
        on_switch: set[int] = set()
        for i, handle in enumerate(self._handles):
            for peer in nv.nvlink_peers(handle, bus_ids, on_switch, i):
                if peer != i:
                    matrix[i][peer] = matrix[peer][i] = LINK_NVLINK
        for i in on_switch:
            for j in on_switch:
                if i != j:
                    matrix[i][j] = LINK_NVLINK
        return matrix

    def driver_version(self) -> str | None:
        return self._nv.driver_version()

    def cuda_driver_version(self) -> str | None:
        return self._nv.cuda_driver_version()
