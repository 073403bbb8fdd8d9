"""A stand-in for ``pynvml`` so that the NVML backend runs without a GPU.

:class:`FakeNvml` offers the pynvml names :mod:`chronos.devices.nvml` uses, with pynvml's
signatures, constants and error classes' behaviour (``NVMLError(code)`` carrying ``.value``), over a
list of :class:`FakeGpu`. It is written from NVML's documented API; ``test_backend_contract``
checks its names, constants and signatures against the installed pynvml so that it cannot drift.

Driver behaviours are switches on the instance, and may be flipped between calls:

* ``init_error``: what ``nvmlInit`` raises, an NVML code (``NVML_ERROR_LIBRARY_NOT_FOUND`` for
  a machine without the driver) or an exception.
* ``memory_v2_error``: the code the v2 memory query fails with (the v1 query still works).
* ``unversioned_processes``: ``"mismatch"`` makes the unversioned process calls raise
  ``NVMLLibraryMismatchError`` (a binding newer than the driver), ``"missing"`` makes them fail
  with ``NVML_ERROR_FUNCTION_NOT_FOUND``; the ``_v2`` calls keep working.
* ``errors``: function name -> the NVML code (or the exception) that call fails with.
* ``missing``: names the binding does not have at all (an older pynvml).
* ``cgroup_limits``: whether the driver's library exports ``nvmlDeviceSetMemoryLimits_v1``.

Per-process utilisation follows NVML: ``nvmlDeviceGetProcessUtilization(handle, timeStamp)`` gives
one sample, stamped with the CPU time in microseconds, for each process whose ``sm`` is above 0 and
NOT_FOUND when there is none newer than ``timeStamp``; each timestamp asked for is recorded in
``utilization_since``. A GPU whose ``process_utilization`` is False answers NOT_SUPPORTED.

Every call to an ``nvml*`` function is recorded in ``calls``. Calls before ``nvmlInit`` fail with
``NVML_ERROR_UNINITIALIZED``, as they do in NVML.
"""

from __future__ import annotations

import functools
import time
import types
from dataclasses import dataclass, field
from typing import Any

NOT_AVAILABLE = (1 << 64) - 1  # NVML_VALUE_NOT_AVAILABLE, as an unsigned long long
SWITCH = "switch"  # an NVLink whose far end is an NVSwitch
GiB = 1 << 30

# Codes the fake raises although nvml.py never names them (checked against pynvml too).
UNINITIALIZED = 1
INVALID_ARGUMENT = 2
DEVICE_TYPE_GPU = 0  # NVML_NVLINK_DEVICE_TYPE_GPU

_TEXT = {
    1: "Uninitialized",
    2: "Invalid Argument",
    3: "Not Supported",
    6: "Not Found",
    4: "Insufficient Permissions",
    9: "Driver Not Loaded",
    12: "NVML Shared Library Not Found",
    13: "Function Not Found",
    15: "GPU is lost",
    25: "Argument version mismatch",
    999: "Unknown Error",
}


class NVMLError(Exception):
    """An NVML return code other than success; ``str()`` is NVML's text for it."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value
        self.text = _TEXT.get(value, f"NVML Error with code {value}")

    def __str__(self) -> str:
        return self.text


class NVMLLibraryMismatchError(Exception):
    """What pynvml raises when an unversioned call is newer than the driver's library."""


@dataclass
class FakeProcess:
    """A process on a GPU; ``used`` None or NOT_AVAILABLE is memory the driver does not report."""

    pid: int
    used: int | None
    kind: str = "compute"  # "compute", "graphics" or "MPS"
    sm: int = 0  # the share of SM time it keeps busy (0-100)


@dataclass
class FakeGpu:
    """One GPU. ``used`` None: the sum of its processes' known memory.

    ``reserved`` is memory the driver keeps for itself: the v1 memory query counts it as used, the
    v2 query does not. ``utilization`` None: the GPU does not support the query. ``nvlinks`` None:
    no NVLink; else one entry per link: a GPU index, :data:`SWITCH`, or None for a link that is down.
    """

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    total: int = 80 * GiB
    used: int | None = None
    reserved: int = 0
    utilization: int | None = 0
    processes: list[FakeProcess] = field(default_factory=list)
    pci: tuple[int, int, int] | None = None  # (domain, bus, device); None: bus 0x10 * (index + 1)
    nvlinks: list[int | str | None] | None = None
    process_utilization: bool = True  # False: per-process samples are not supported (e.g. a MIG instance)


@dataclass(frozen=True)
class _Handle:
    """NVML's device handles are opaque; so is this one."""

    index: int


class FakeNvml:
    """The pynvml names chronos.devices.nvml uses, over fake GPUs and switchable driver behaviours."""

    NVMLError = NVMLError
    NVMLLibraryMismatchError = NVMLLibraryMismatchError

    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NOT_FOUND = 6
    NVML_ERROR_DRIVER_NOT_LOADED = 9
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    NVML_ERROR_FUNCTION_NOT_FOUND = 13
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25

    NVML_TOPOLOGY_INTERNAL = 0
    NVML_TOPOLOGY_SINGLE = 10
    NVML_TOPOLOGY_MULTIPLE = 20
    NVML_TOPOLOGY_HOSTBRIDGE = 30
    NVML_TOPOLOGY_NODE = 40
    NVML_TOPOLOGY_SYSTEM = 50

    NVML_NVLINK_MAX_LINKS = 36
    NVML_NVLINK_DEVICE_TYPE_SWITCH = 2

    nvmlMemory_v2 = 0x02000028

    def __init__(self, gpus: list[FakeGpu], *, driver: str = "550.54.15", cuda: int = 12040,
                 topology: int = 20, links: dict[tuple[int, int], int] | None = None,
                 init_error: int | Exception | None = None, memory_v2_error: int | None = None,
                 unversioned_processes: str = "ok", errors: dict[str, int | Exception] | None = None,
                 missing: set[str] | None = None, cgroup_limits: bool = False) -> None:
        """``topology`` is the common-ancestor level of every pair, ``links`` overrides it per pair."""
        self.gpus = gpus
        self.driver = driver
        self.cuda = cuda
        self.topology = topology
        self.links = dict(links or {})
        self.init_error = init_error
        self.memory_v2_error = memory_v2_error
        self.unversioned_processes = unversioned_processes
        self.errors = dict(errors or {})
        self.missing = set(missing or ())
        self.cgroup_limits = cgroup_limits
        self.calls: list[str] = []
        self.utilization_since: list[int] = []
        self.initialised = False

    def __getattribute__(self, name: str) -> Any:
        """Hide ``missing`` names; record each NVML call and fail it as ``errors`` says."""
        if not name.startswith(("nvml", "NVML")):
            return object.__getattribute__(self, name)
        if name in object.__getattribute__(self, "missing"):
            raise AttributeError(f"module 'pynvml' has no attribute {name!r}")
        value = object.__getattribute__(self, name)
        if not (name.startswith("nvml") and callable(value)):
            return value
        calls: list[str] = object.__getattribute__(self, "calls")
        errors: dict[str, int | Exception] = object.__getattribute__(self, "errors")

        @functools.wraps(value)  # keeps the signature for the checks against pynvml
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            if name != "nvmlInit" and not object.__getattribute__(self, "initialised"):
                raise NVMLError(UNINITIALIZED)
            error = errors.get(name)
            if isinstance(error, Exception):
                raise error
            if error is not None:
                raise NVMLError(error)
            return value(*args, **kwargs)

        return call

    # ------------------------------------------------------------------ system

    def nvmlInit(self) -> None:
        if isinstance(self.init_error, Exception):
            raise self.init_error
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialised = True

    @property
    def nvmlLib(self) -> Any:
        """The loaded driver library (a CDLL in pynvml), None before ``nvmlInit``."""
        if not self.initialised:
            return None
        return types.SimpleNamespace(nvmlDeviceSetMemoryLimits_v1=object()) if self.cgroup_limits \
            else types.SimpleNamespace()

    def nvmlDeviceSetMemoryLimits_v1(self, device: Any, limits: Any) -> None:
        raise NVMLError(self.NVML_ERROR_NOT_SUPPORTED)  # only probed for, never called

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.cuda

    # ------------------------------------------------------------------ devices

    def _gpu(self, handle: Any) -> FakeGpu:
        if not isinstance(handle, _Handle) or not 0 <= handle.index < len(self.gpus):
            raise NVMLError(INVALID_ARGUMENT)
        return self.gpus[handle.index]

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        if not 0 <= index < len(self.gpus):
            raise NVMLError(INVALID_ARGUMENT)
        return _Handle(index)

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return self._gpu(handle).uuid

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return self._gpu(handle).name

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> types.SimpleNamespace:
        gpu = self._gpu(handle)
        used = gpu.used
        if used is None:
            used = sum(p.used for p in gpu.processes if p.used is not None and p.used != NOT_AVAILABLE)
        if not version:
            used += gpu.reserved
            return types.SimpleNamespace(total=gpu.total, free=max(0, gpu.total - used), used=used)
        if version != self.nvmlMemory_v2:
            raise NVMLError(self.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        if self.memory_v2_error is not None:
            raise NVMLError(self.memory_v2_error)
        return types.SimpleNamespace(version=version, total=gpu.total, reserved=gpu.reserved,
                                     free=max(0, gpu.total - gpu.reserved - used), used=used)

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> types.SimpleNamespace:
        gpu = self._gpu(handle)
        if gpu.utilization is None:
            raise NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        return types.SimpleNamespace(gpu=gpu.utilization, memory=0)

    def nvmlDeviceGetPciInfo(self, handle: Any) -> types.SimpleNamespace:
        domain, bus, device = self._pci(self._gpu(handle), handle.index)
        return types.SimpleNamespace(domain=domain, bus=bus, device=device,
                                     busId=f"{domain:08X}:{bus:02X}:{device:02X}.0")

    def _pci(self, gpu: FakeGpu, index: int) -> tuple[int, int, int]:
        return gpu.pci if gpu.pci is not None else (0, 0x10 * (index + 1), 0)

    # ------------------------------------------------------------------ processes

    def _processes(self, handle: Any, kind: str, unversioned: bool) -> list[types.SimpleNamespace]:
        gpu = self._gpu(handle)
        if unversioned and self.unversioned_processes == "mismatch":
            raise NVMLLibraryMismatchError("Unversioned function called and the pyNVML version does not "
                                           "match the NVML lib version")
        if unversioned and self.unversioned_processes == "missing":
            raise NVMLError(self.NVML_ERROR_FUNCTION_NOT_FOUND)
        return [types.SimpleNamespace(pid=p.pid, usedGpuMemory=p.used, gpuInstanceId=NOT_AVAILABLE,
                                      computeInstanceId=NOT_AVAILABLE)
                for p in gpu.processes if p.kind == kind]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[types.SimpleNamespace]:
        return self._processes(handle, "compute", unversioned=True)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: Any) -> list[types.SimpleNamespace]:
        return self._processes(handle, "compute", unversioned=False)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Any) -> list[types.SimpleNamespace]:
        return self._processes(handle, "graphics", unversioned=True)

    def nvmlDeviceGetGraphicsRunningProcesses_v2(self, handle: Any) -> list[types.SimpleNamespace]:
        return self._processes(handle, "graphics", unversioned=False)

    def nvmlDeviceGetMPSComputeRunningProcesses(self, handle: Any) -> list[types.SimpleNamespace]:
        return self._processes(handle, "MPS", unversioned=True)

    def nvmlDeviceGetMPSComputeRunningProcesses_v2(self, handle: Any) -> list[types.SimpleNamespace]:
        return self._processes(handle, "MPS", unversioned=False)

    def nvmlDeviceGetProcessUtilization(self, handle: Any, timeStamp: int) -> list[types.SimpleNamespace]:
        gpu = self._gpu(handle)
        self.utilization_since.append(timeStamp)
        if not gpu.process_utilization:
            raise NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        stamp = max(int(time.time() * 1e6), timeStamp + 1)
        samples = [types.SimpleNamespace(pid=p.pid, timeStamp=stamp, smUtil=p.sm, memUtil=0, encUtil=0, decUtil=0)
                   for p in gpu.processes if p.sm > 0]
        if not samples:
            raise NVMLError(self.NVML_ERROR_NOT_FOUND)
        return samples

    # ------------------------------------------------------------------ topology

    def nvmlDeviceGetTopologyCommonAncestor(self, device1: Any, device2: Any) -> int:
        a, b = self._gpu(device1), self._gpu(device2)
        if a is b:
            return self.NVML_TOPOLOGY_INTERNAL
        pair = (min(device1.index, device2.index), max(device1.index, device2.index))
        return self.links.get(pair, self.topology)

    def _link(self, handle: Any, link: int) -> int | str | None:
        gpu = self._gpu(handle)
        if gpu.nvlinks is None:
            raise NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= link < len(gpu.nvlinks):
            raise NVMLError(INVALID_ARGUMENT)  # past this device's last link
        return gpu.nvlinks[link]

    def nvmlDeviceGetNvLinkState(self, device: Any, link: int) -> int:
        return 0 if self._link(device, link) is None else 1

    def nvmlDeviceGetNvLinkRemotePciInfo(self, device: Any, link: int) -> types.SimpleNamespace:
        far = self._link(device, link)
        if far is None:
            raise NVMLError(INVALID_ARGUMENT)
        if far == SWITCH:
            domain, bus, dev = 0, 0xE0 + link, 0  # an NVSwitch's own PCI address: no GPU there
        else:
            assert isinstance(far, int)
            domain, bus, dev = self._pci(self.gpus[far], far)
        return types.SimpleNamespace(domain=domain, bus=bus, device=dev)

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, handle: Any, link: int) -> int:
        far = self._link(handle, link)
        return self.NVML_NVLINK_DEVICE_TYPE_SWITCH if far == SWITCH else DEVICE_TYPE_GPU
