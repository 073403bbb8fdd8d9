"""One set of tests for every GPU backend, then the NVML backend's driver behaviours without a GPU.

The contract runs over the simulated backend (its shared usage file) and the NVML backend driven by
:mod:`tests.fake_nvml`, both describing the same machine: two 80 GiB GPUs on one PCIe host bridge,
this process using 8 GiB on GPU 0.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
import subprocess
import sys
import textwrap
import time
import typing
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pynvml
import pytest

from chronos import settings
from chronos.devices import nvml, simulated
from chronos.devices.base import (
    LINK_HOST_BRIDGE,
    LINK_NUMA,
    LINK_NVLINK,
    LINK_PCIE_MULTI,
    LINK_PCIE_SWITCH,
    LINK_SAME,
    LINK_SYSTEM,
    Backend,
    Device,
    GpuProcess,
    ProcessUtilization,
)
from chronos.errors import BackendError, InvalidRequestError
from tests import fake_nvml
from tests.conftest import ROOT
from tests.fake_nvml import NOT_AVAILABLE, SWITCH, FakeGpu, FakeNvml, FakeProcess

GiB = 1 << 30
UUID_RE = re.compile(r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
LINKS = {LINK_NVLINK, LINK_PCIE_SWITCH, LINK_PCIE_MULTI, LINK_HOST_BRIDGE, LINK_NUMA, LINK_SYSTEM}
ME = os.getpid()


def _uuid(i: int) -> str:
    return f"GPU-{uuid.uuid5(uuid.NAMESPACE_URL, f'fake-gpu-{i}')}"


def _gpus(n: int, **kwargs: typing.Any) -> list[FakeGpu]:
    return [FakeGpu(uuid=_uuid(i), **kwargs) for i in range(n)]


# --------------------------------------------------------------------------- the contract


@dataclass
class Machine:
    """A backend over the contract's machine, and how to change what runs on it."""

    backend: Backend
    make: Callable[[], Backend]  # another backend instance over the same machine
    use: Callable[[int, int], None]  # this process now uses that many bytes on that device
    busy: Callable[[int, int], None]  # this process now keeps that device's SMs that many percent busy
    name: str
    driver: str | None


def _sim_backend() -> Backend:
    return simulated.SimulatedBackend.from_settings(settings.current())


def _simulated() -> Machine:
    simulated.allocate(0, 8 * GiB)
    return Machine(backend=_sim_backend(), make=_sim_backend,
                   use=lambda device, nbytes: simulated.allocate(device, nbytes),
                   busy=lambda device, percent: simulated.set_utilization(device, percent),
                   name="simulated", driver=None)


def _nvml() -> Machine:
    fake = FakeNvml(_gpus(2), topology=pynvml.NVML_TOPOLOGY_MULTIPLE)
    fake.gpus[0].processes.append(FakeProcess(ME, 8 * GiB))

    def use(device: int, nbytes: int) -> None:
        procs = fake.gpus[device].processes
        old = next((p.sm for p in procs if p.pid == ME), 0)
        procs[:] = [p for p in procs if p.pid != ME] + [FakeProcess(ME, nbytes, sm=old)]

    def busy(device: int, percent: int) -> None:
        procs = fake.gpus[device].processes
        mine = [p for p in procs if p.pid == ME] or [FakeProcess(ME, 0)]
        procs[:] = [p for p in procs if p.pid != ME] + [FakeProcess(ME, mine[0].used, sm=percent)]

    return Machine(backend=nvml.NvmlBackend(lib=fake), make=lambda: nvml.NvmlBackend(lib=fake), use=use,
                   busy=busy, name="nvml", driver=fake.driver)


@pytest.fixture(params=[_simulated, _nvml], ids=["simulated", "nvml"])
def machine(request: pytest.FixtureRequest) -> Iterator[Machine]:
    yield request.param()


def test_is_a_backend(machine: Machine) -> None:
    assert isinstance(machine.backend, Backend)
    assert machine.backend.name == machine.name


def test_devices_are_ordered_with_stable_uuids_and_totals(machine: Machine) -> None:
    listed = machine.backend.devices()
    assert [d.index for d in listed] == [0, 1]
    assert [d.memory_total_bytes for d in listed] == [80 * GiB, 80 * GiB]
    uuids = [d.uuid for d in listed]
    assert all(UUID_RE.match(u) for u in uuids)
    assert len(set(uuids)) == 2
    assert [d.uuid for d in machine.backend.devices()] == uuids
    assert [d.uuid for d in machine.make().devices()] == uuids
    assert all(d.name for d in listed)


def test_used_memory_reflects_processes(machine: Machine) -> None:
    backend = machine.backend
    uuids = [d.uuid for d in backend.devices()]
    assert [d.memory_used_bytes for d in backend.devices()] == [8 * GiB, 0]
    assert backend.processes() == [GpuProcess(0, uuids[0], ME, 8 * GiB)]
    machine.use(1, 2 * GiB)
    machine.use(0, 3 * GiB)
    assert [d.memory_used_bytes for d in backend.devices()] == [3 * GiB, 2 * GiB]
    assert [d.memory_free_bytes for d in backend.devices()] == [77 * GiB, 78 * GiB]
    assert backend.processes() == [GpuProcess(0, uuids[0], ME, 3 * GiB), GpuProcess(1, uuids[1], ME, 2 * GiB)]


def test_processes_filters_by_index(machine: Machine) -> None:
    backend = machine.backend
    assert [(p.device_index, p.pid) for p in backend.processes([0])] == [(0, ME)]
    assert backend.processes([1]) == []
    assert backend.processes([]) == []
    machine.use(1, GiB)
    assert [(p.device_index, p.used_bytes) for p in backend.processes([1])] == [(1, GiB)]
    assert {(p.device_index, p.pid) for p in backend.processes([1, 0])} == {(0, ME), (1, ME)}


@pytest.mark.parametrize("indices", [[2], [0, 2], [-1], [7]])
def test_processes_of_an_unknown_device_is_bad_input(machine: Machine, indices: list[int]) -> None:
    with pytest.raises(InvalidRequestError) as info:
        machine.backend.processes(indices)
    assert f"GPU {indices[-1]}" in str(info.value)
    assert "\n" not in str(info.value)


def test_distances_are_a_symmetric_matrix_of_links(machine: Machine) -> None:
    m = machine.backend.distances()
    n = len(machine.backend.devices())
    assert len(m) == n and all(len(row) == n for row in m)
    for i in range(n):
        assert m[i][i] == LINK_SAME
        for j in range(n):
            assert m[i][j] == m[j][i]
            assert i == j or m[i][j] in LINKS
    assert m == [[LINK_SAME, LINK_PCIE_MULTI], [LINK_PCIE_MULTI, LINK_SAME]]  # one host bridge
    m[0][1] = LINK_NVLINK
    assert machine.backend.distances()[0][1] == LINK_PCIE_MULTI  # a copy each time


def test_driver_version(machine: Machine) -> None:
    version = machine.backend.driver_version()
    assert version is None or isinstance(version, str)
    assert version == machine.driver


def _busy(records: list[ProcessUtilization]) -> dict[tuple[int, int], int | None]:
    """(device, pid) -> SM percent of the processes that used SM time (0 and absent mean none)."""
    return {(r.device_index, r.pid): r.sm_percent for r in records if r.sm_percent != 0}


def test_utilization_names_the_processes_that_keep_a_device_busy(machine: Machine) -> None:
    backend = machine.backend
    # The first poll may not know yet (NVML keeps no samples from before its first query): then it
    # says "cannot say" (None) for the processes holding memory, never "idle".
    assert _busy(backend.utilization()) in ({}, {(0, ME): None})
    assert _busy(backend.utilization()) == {}  # 8 GiB held on GPU 0, no SM time
    machine.busy(0, 60)
    uuids = [d.uuid for d in backend.devices()]
    found = backend.utilization()
    assert _busy(found) == {(0, ME): 60}
    assert all(r.device_uuid == uuids[r.device_index] for r in found)
    assert _busy(backend.utilization([1])) == {}
    assert _busy(backend.utilization([0])) == {(0, ME): 60}
    machine.busy(0, 0)
    assert _busy(backend.utilization()) == {}
    assert [d.memory_used_bytes for d in backend.devices()] == [8 * GiB, 0]  # SM use leaves memory alone


@pytest.mark.parametrize("indices", [[2], [-1]])
def test_utilization_of_an_unknown_device_is_bad_input(machine: Machine, indices: list[int]) -> None:
    with pytest.raises(InvalidRequestError, match=f"GPU {indices[-1]}"):
        machine.backend.utilization(indices)


def _check_types(obj: object) -> None:
    """Every field of a backend dataclass holds a value of its declared type (bools are not ints)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        allowed = typing.get_args(hints[f.name]) or (hints[f.name],)
        assert isinstance(value, allowed) and not isinstance(value, bool), (f.name, value)


def test_every_value_has_its_declared_type(machine: Machine) -> None:
    machine.use(1, 5 * GiB)
    devices = machine.backend.devices()
    processes = machine.backend.processes()
    assert devices and processes
    for d in devices:
        assert isinstance(d, Device)
        _check_types(d)
        assert d.memory_total_bytes > 0 and d.memory_used_bytes >= 0
        assert d.utilization_percent is None or 0 <= d.utilization_percent <= 100
    for p in processes:
        assert isinstance(p, GpuProcess)
        _check_types(p)
        assert p.device_uuid == devices[p.device_index].uuid
    assert all(isinstance(x, int) and not isinstance(x, bool) for row in machine.backend.distances() for x in row)
    machine.busy(1, 30)
    samples = machine.backend.utilization()
    assert samples
    for u in samples:
        assert isinstance(u, ProcessUtilization)
        _check_types(u)
        assert u.sm_percent is None or 0 <= u.sm_percent <= 100


# --------------------------------------------------------------------------- the fake against pynvml


def _names_nvml_uses() -> set[str]:
    """Every pynvml name chronos/devices/nvml.py touches: as an attribute or as a looked-up string."""
    tree = ast.parse(Path(nvml.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith(("nvml", "NVML")):
            names.add(node.attr)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and re.fullmatch(r"(nvml|NVML)\w+", node.value):
            names.add(node.value)
    return names


def _fake_names() -> set[str]:
    return {name for name in dir(FakeNvml([])) if name.startswith(("nvml", "NVML"))}


def test_the_fake_has_exactly_the_names_nvml_uses_and_pynvml_has_them() -> None:
    used = _names_nvml_uses()
    assert {"NVMLError", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetMPSComputeRunningProcesses_v2"} <= used
    assert _fake_names() == used
    assert {name for name in used if not hasattr(pynvml, name)} == set()


def test_the_fake_constants_and_signatures_are_pynvml_s() -> None:
    fake = FakeNvml([])
    for name in sorted(_fake_names()):
        mine, real = getattr(fake, name), getattr(pynvml, name)
        if isinstance(mine, int):
            assert mine == real, name
        elif name.startswith("nvml") and callable(mine):
            want = [(p.name, p.default) for p in inspect.signature(real).parameters.values()]
            assert [(p.name, p.default) for p in inspect.signature(mine).parameters.values()] == want, name
    assert fake_nvml.UNINITIALIZED == pynvml.NVML_ERROR_UNINITIALIZED
    assert fake_nvml.INVALID_ARGUMENT == pynvml.NVML_ERROR_INVALID_ARGUMENT
    assert fake_nvml.DEVICE_TYPE_GPU == pynvml.NVML_NVLINK_DEVICE_TYPE_GPU
    assert NOT_AVAILABLE == pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value


@pytest.mark.parametrize("code", [1, 2, 3, 4, 9, 12, 13, 15, 999])
def test_the_fake_errors_behave_like_pynvml_s(code: int) -> None:
    mine, real = fake_nvml.NVMLError(code), pynvml.NVMLError(code)
    assert isinstance(real, pynvml.NVMLError) and isinstance(mine, fake_nvml.NVMLError)
    assert mine.value == real.value == code
    assert str(mine) == str(real)


def test_the_fake_refuses_calls_before_init() -> None:
    fake = FakeNvml(_gpus(1))
    with pytest.raises(fake_nvml.NVMLError) as info:
        fake.nvmlDeviceGetCount()
    assert info.value.value == pynvml.NVML_ERROR_UNINITIALIZED


# --------------------------------------------------------------------------- NVML: values not available


def test_process_memory_not_available_is_none() -> None:
    fake = FakeNvml(_gpus(1))
    fake.gpus[0].processes = [FakeProcess(10, None), FakeProcess(11, NOT_AVAILABLE), FakeProcess(12, 2 * GiB)]
    backend = nvml.NvmlBackend(lib=fake)
    assert [(p.pid, p.used_bytes) for p in backend.processes()] == [(10, None), (11, None), (12, 2 * GiB)]
    assert backend.devices()[0].memory_used_bytes == 2 * GiB


def test_utilisation_not_supported_is_none() -> None:
    fake = FakeNvml(_gpus(3))
    fake.gpus[0].utilization = None  # e.g. a MIG instance
    fake.gpus[1].utilization = 37
    fake.gpus[2].utilization = 255  # nonsense from the driver
    assert [d.utilization_percent for d in nvml.NvmlBackend(lib=fake).devices()] == [None, 37, None]


def test_utilisation_call_missing_from_the_driver_is_none() -> None:
    fake = FakeNvml(_gpus(2, utilization=50), errors={"nvmlDeviceGetUtilizationRates": 13})
    assert [d.utilization_percent for d in nvml.NvmlBackend(lib=fake).devices()] == [None, None]


# --------------------------------------------------------------------------- NVML: utilisation samples


def test_utilisation_samples_are_asked_for_from_the_last_one_seen() -> None:
    fake = FakeNvml(_gpus(1))
    fake.gpus[0].processes = [FakeProcess(10, GiB, sm=40), FakeProcess(11, GiB, sm=0)]
    backend = nvml.NvmlBackend(lib=fake)
    before = int(time.time() * 1e6)
    assert _busy(backend.utilization()) == {(0, 10): 40}
    first = fake.utilization_since[0]  # the first poll reads the last few seconds, in microseconds
    assert before - nvml.UTILIZATION_LOOKBACK_S * 1e6 - 1e6 <= first <= before - nvml.UTILIZATION_LOOKBACK_S * 1e6 + 1e6
    backend.utilization()
    assert fake.utilization_since[1] > first  # then from the newest sample seen
    fake.gpus[0].processes[0].sm = 0
    assert backend.utilization() == []  # NOT_FOUND: nobody used the GPU since
    backend.utilization()
    assert fake.utilization_since[3] == fake.utilization_since[2]  # nothing newer was seen


@pytest.mark.parametrize("how", ["not supported", "missing from the binding", "library mismatch"])
def test_utilisation_a_device_cannot_report_is_unknown_not_idle(how: str) -> None:
    if how == "not supported":
        fake = FakeNvml(_gpus(2))
        fake.gpus[0].process_utilization = False
    elif how == "missing from the binding":
        fake = FakeNvml(_gpus(2), missing={"nvmlDeviceGetProcessUtilization"})
    else:
        fake = FakeNvml(_gpus(2), errors={"nvmlDeviceGetProcessUtilization": fake_nvml.NVMLLibraryMismatchError("x")})
    fake.gpus[0].processes = [FakeProcess(10, GiB, sm=0), FakeProcess(12, GiB, sm=70)]
    got = nvml.NvmlBackend(lib=fake).utilization([0])
    assert [(u.pid, u.sm_percent) for u in got] == [(10, None), (12, None)]


# --------------------------------------------------------------------------- NVML: memory query versions


def _reserving(**kwargs: typing.Any) -> FakeNvml:
    """One GPU with 8 GiB in a process and 1 GiB the driver reserves (used in v1, not in v2)."""
    fake = FakeNvml(_gpus(1, reserved=GiB), **kwargs)
    fake.gpus[0].processes.append(FakeProcess(ME, 8 * GiB))
    return fake


def test_memory_comes_from_the_v2_query() -> None:
    assert nvml.NvmlBackend(lib=_reserving()).devices()[0].memory_used_bytes == 8 * GiB


def test_memory_from_v1_where_the_binding_has_no_v2() -> None:
    fake = _reserving(missing={"nvmlMemory_v2"})
    assert nvml.NvmlBackend(lib=fake).devices()[0].memory_used_bytes == 9 * GiB


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
                                  pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH])
def test_memory_falls_back_to_v1_and_remembers(code: int) -> None:
    fake = _reserving(memory_v2_error=code)
    backend = nvml.NvmlBackend(lib=fake)
    assert backend.devices()[0].memory_used_bytes == 9 * GiB
    fake.memory_v2_error = None  # v2 is not asked again once the driver said it lacks it
    assert backend.devices()[0].memory_used_bytes == 9 * GiB
    assert nvml.NvmlBackend(lib=_reserving()).devices()[0].memory_used_bytes == 8 * GiB  # per library


def test_memory_v2_failing_after_it_worked_is_an_error() -> None:
    fake = _reserving()
    backend = nvml.NvmlBackend(lib=fake)
    assert backend.devices()[0].memory_used_bytes == 8 * GiB
    fake.memory_v2_error = pynvml.NVML_ERROR_NOT_SUPPORTED
    with pytest.raises(BackendError, match=r"^NVML memory query failed: Not Supported$"):
        backend.devices()


def test_memory_v2_failing_otherwise_is_an_error_not_a_fallback() -> None:
    backend = nvml.NvmlBackend(lib=_reserving(memory_v2_error=pynvml.NVML_ERROR_GPU_IS_LOST))
    with pytest.raises(BackendError, match=r"^NVML memory query failed: GPU is lost$"):
        backend.devices()


# --------------------------------------------------------------------------- NVML: process queries


def _one_of_each_kind() -> list[FakeGpu]:
    gpus = _gpus(1)
    gpus[0].processes = [FakeProcess(10, GiB, "compute"), FakeProcess(11, 2 * GiB, "graphics"),
                         FakeProcess(12, 3 * GiB, "MPS")]
    return gpus


@pytest.mark.parametrize("how", ["mismatch", "missing", "absent"])
def test_process_calls_fall_back_to_v2(how: str) -> None:
    unversioned = {"nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses",
                   "nvmlDeviceGetMPSComputeRunningProcesses"}
    if how == "absent":  # a binding without the unversioned calls
        fake = FakeNvml(_one_of_each_kind(), missing=unversioned)
    else:  # the unversioned calls are newer than the driver's library
        fake = FakeNvml(_one_of_each_kind(), unversioned_processes=how)
    got = nvml.NvmlBackend(lib=fake).processes()
    assert [(p.pid, p.used_bytes) for p in got] == [(10, GiB), (11, 2 * GiB), (12, 3 * GiB)]
    assert {name + "_v2" for name in unversioned} <= set(fake.calls)


def test_process_calls_missing_everywhere_find_nothing() -> None:
    fake = FakeNvml(_one_of_each_kind(), unversioned_processes="mismatch",
                    errors={"nvmlDeviceGetComputeRunningProcesses_v2": pynvml.NVML_ERROR_FUNCTION_NOT_FOUND},
                    missing={"nvmlDeviceGetGraphicsRunningProcesses_v2"})
    assert [p.pid for p in nvml.NvmlBackend(lib=fake).processes()] == [12]


def test_a_process_kind_not_supported_is_empty() -> None:
    fake = FakeNvml(_one_of_each_kind(), errors={
        "nvmlDeviceGetGraphicsRunningProcesses": pynvml.NVML_ERROR_NOT_SUPPORTED,
        "nvmlDeviceGetMPSComputeRunningProcesses": pynvml.NVML_ERROR_NOT_SUPPORTED,
    })
    assert [p.pid for p in nvml.NvmlBackend(lib=fake).processes()] == [10]
    assert "nvmlDeviceGetGraphicsRunningProcesses_v2" not in fake.calls  # not supported is not a version problem


def test_compute_graphics_and_mps_merge_per_device_and_pid() -> None:
    gpus = _gpus(2)
    gpus[0].processes = [
        FakeProcess(100, 4 * GiB, "compute"), FakeProcess(100, None, "graphics"), FakeProcess(100, 6 * GiB, "MPS"),
        FakeProcess(200, None, "graphics"),
        FakeProcess(300, None, "compute"), FakeProcess(300, 3 * GiB, "graphics"),
        FakeProcess(400, 5 * GiB, "compute"), FakeProcess(400, None, "MPS"),
        FakeProcess(50, 2 * GiB, "MPS"),
    ]
    gpus[1].processes = [FakeProcess(100, GiB, "compute")]
    backend = nvml.NvmlBackend(lib=FakeNvml(gpus))
    got = [(p.device_index, p.device_uuid, p.pid, p.used_bytes) for p in backend.processes()]
    assert got == [(0, _uuid(0), 50, 2 * GiB), (0, _uuid(0), 100, 6 * GiB), (0, _uuid(0), 200, None),
                   (0, _uuid(0), 300, 3 * GiB), (0, _uuid(0), 400, 5 * GiB), (1, _uuid(1), 100, GiB)]
    assert [p.pid for p in backend.processes([1])] == [100]


# --------------------------------------------------------------------------- NVML: topology


@pytest.mark.parametrize(("level", "link"), [
    (pynvml.NVML_TOPOLOGY_INTERNAL, LINK_SAME),
    (pynvml.NVML_TOPOLOGY_SINGLE, LINK_PCIE_SWITCH),
    (pynvml.NVML_TOPOLOGY_MULTIPLE, LINK_PCIE_MULTI),
    (pynvml.NVML_TOPOLOGY_HOSTBRIDGE, LINK_HOST_BRIDGE),
    (pynvml.NVML_TOPOLOGY_NODE, LINK_NUMA),
    (pynvml.NVML_TOPOLOGY_SYSTEM, LINK_SYSTEM),
    (77, LINK_SYSTEM),  # a level newer than this code
])
def test_pcie_levels_map_to_links(level: int, link: int) -> None:
    backend = nvml.NvmlBackend(lib=FakeNvml(_gpus(2), topology=level))
    assert backend.distances() == [[LINK_SAME, link], [link, LINK_SAME]]


def test_topology_not_supported_is_across_the_system() -> None:
    fake = FakeNvml(_gpus(2), errors={"nvmlDeviceGetTopologyCommonAncestor": pynvml.NVML_ERROR_NOT_SUPPORTED})
    assert nvml.NvmlBackend(lib=fake).distances()[0][1] == LINK_SYSTEM


def test_an_nvlink_pair_beside_a_pcie_gpu() -> None:
    gpus = _gpus(3)
    gpus[0].nvlinks = [1, 1, None]  # two links to GPU 1 and one that is down
    gpus[1].nvlinks = [0, 0, None, None]
    fake = FakeNvml(gpus, topology=pynvml.NVML_TOPOLOGY_NODE, links={(0, 1): pynvml.NVML_TOPOLOGY_SYSTEM})
    backend = nvml.NvmlBackend(lib=fake)
    n, u = LINK_NVLINK, LINK_NUMA
    assert backend.distances() == [[LINK_SAME, n, u], [n, LINK_SAME, u], [u, u, LINK_SAME]]
    asked = fake.calls.count("nvmlDeviceGetTopologyCommonAncestor")
    assert backend.distances()[0][1] == n
    assert fake.calls.count("nvmlDeviceGetTopologyCommonAncestor") == asked  # cached


def test_an_nvlink_seen_from_one_end_only_is_still_a_pair() -> None:
    gpus = _gpus(2)
    gpus[1].nvlinks = [0]
    backend = nvml.NvmlBackend(lib=FakeNvml(gpus, topology=pynvml.NVML_TOPOLOGY_SYSTEM))
    assert backend.distances() == [[LINK_SAME, LINK_NVLINK], [LINK_NVLINK, LINK_SAME]]


def test_gpus_on_an_nvswitch_are_all_nvlinked() -> None:
    gpus = _gpus(5)
    for gpu in gpus[:4]:
        gpu.nvlinks = [SWITCH] * 18
    backend = nvml.NvmlBackend(lib=FakeNvml(gpus, topology=pynvml.NVML_TOPOLOGY_SYSTEM))
    m = backend.distances()
    for i in range(5):
        for j in range(5):
            want = LINK_SAME if i == j else LINK_NVLINK if i < 4 and j < 4 else LINK_SYSTEM
            assert m[i][j] == want, (i, j)


# --------------------------------------------------------------------------- NVML: driver and errors


@pytest.mark.parametrize("error", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
                                   OSError("libnvidia-ml.so.1: cannot open shared object file")])
def test_no_driver_is_driver_not_found(error: int | Exception) -> None:
    with pytest.raises(nvml.DriverNotFoundError) as info:
        nvml.NvmlBackend(lib=FakeNvml(_gpus(1), init_error=error))
    message = str(info.value)
    assert message.startswith("no NVIDIA driver found (")
    assert "CHRONOS_BACKEND=simulated" in message
    assert "\n" not in message


def test_another_init_failure_is_a_backend_error_not_a_missing_driver() -> None:
    with pytest.raises(BackendError) as info:
        nvml.NvmlBackend(lib=FakeNvml(_gpus(1), init_error=pynvml.NVML_ERROR_NO_PERMISSION))
    assert not isinstance(info.value, nvml.DriverNotFoundError)
    assert str(info.value) == "NVML initialisation failed: Insufficient Permissions"


def test_nvml_is_initialised_once_and_again_in_a_forked_child() -> None:
    fake = FakeNvml(_gpus(2))
    backend = nvml.NvmlBackend(lib=fake)
    for _ in range(3):
        backend.devices()
        backend.processes()
        backend.distances()
        backend.driver_version()
    assert fake.calls.count("nvmlInit") == 1
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        try:
            backend.devices()
            backend.devices()
            os._exit(fake.calls.count("nvmlInit"))
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 2
    assert fake.calls.count("nvmlInit") == 1


@pytest.mark.parametrize(("call", "query", "action"), [
    ("nvmlDeviceGetCount", "device count query", "__init__"),
    ("nvmlDeviceGetHandleByIndex", "handle query for GPU 0", "__init__"),
    ("nvmlDeviceGetUUID", "UUID query for GPU 0", "__init__"),
    ("nvmlDeviceGetName", "name query for GPU 0", "__init__"),
    ("nvmlDeviceGetMemoryInfo", "memory query", "devices"),
    ("nvmlDeviceGetUtilizationRates", "utilisation query for GPU 0", "devices"),
    ("nvmlDeviceGetComputeRunningProcesses", "compute process query", "processes"),
    ("nvmlDeviceGetGraphicsRunningProcesses", "graphics process query", "processes"),
    ("nvmlDeviceGetMPSComputeRunningProcesses", "MPS process query", "processes"),
    ("nvmlDeviceGetTopologyCommonAncestor", "topology query", "distances"),
    ("nvmlDeviceGetProcessUtilization", "process utilisation query", "utilization"),
    ("nvmlDeviceGetPciInfo", "PCI query", "distances"),
    ("nvmlSystemGetDriverVersion", "driver version query", "driver_version"),
    ("nvmlSystemGetCudaDriverVersion", "CUDA driver version query", "cuda_driver_version"),
])
def test_any_other_nvml_error_is_a_one_line_backend_error(call: str, query: str, action: str) -> None:
    fake = FakeNvml(_gpus(2))
    backend = None if action == "__init__" else nvml.NvmlBackend(lib=fake)
    error = fake_nvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
    error.text = "GPU is lost:\n  Xid 79 on 0000:18:00.0 "
    fake.errors[call] = error
    with pytest.raises(BackendError) as info:
        if backend is None:
            nvml.NvmlBackend(lib=fake)
        else:
            getattr(backend, action)()
    assert str(info.value) == f"NVML {query} failed: GPU is lost: Xid 79 on 0000:18:00.0"
    assert not isinstance(info.value, nvml.DriverNotFoundError)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no NVML traceback behind it


def test_a_library_mismatch_on_a_plain_call_is_a_backend_error() -> None:
    fake = FakeNvml(_gpus(1), errors={"nvmlDeviceGetCount": fake_nvml.NVMLLibraryMismatchError("too new")})
    with pytest.raises(BackendError, match=r"^NVML device count query failed: too new$"):
        nvml.NvmlBackend(lib=fake)


def test_strings_from_an_older_binding_as_bytes() -> None:
    fake = FakeNvml(_gpus(1, name="Tesla V100"), driver=b"470.82.01")  # type: ignore[arg-type]
    fake.gpus[0].uuid = _uuid(0).encode()  # type: ignore[assignment]
    backend = nvml.NvmlBackend(lib=fake)
    assert backend.devices()[0].uuid == _uuid(0)
    assert backend.driver_version() == "470.82.01"


@pytest.mark.parametrize(("value", "want"), [(12040, "12.4"), (11080, "11.8"), (13000, "13.0"), (0, None)])
def test_cuda_driver_version(value: int, want: str | None) -> None:
    assert nvml.NvmlBackend(lib=FakeNvml(_gpus(1), cuda=value)).cuda_driver_version() == want


def test_cuda_driver_version_not_supported_is_none() -> None:
    fake = FakeNvml(_gpus(1), errors={"nvmlSystemGetCudaDriverVersion": pynvml.NVML_ERROR_NOT_SUPPORTED})
    assert nvml.NvmlBackend(lib=fake).cuda_driver_version() is None


# --------------------------------------------------------------------------- the real module over the fake


_PRELUDE = """
import sys
sys.path.insert(0, {root!r})
from tests.fake_nvml import FakeGpu, FakeNvml
sys.modules["pynvml"] = FakeNvml({gpus}, **{kwargs!r})  # in place of the NVIDIA library
"""


def _with_fake_pynvml(code: str, gpus: int, backend: str = "auto",
                      **kwargs: typing.Any) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh Python whose ``import pynvml`` gets a fake with ``gpus`` GPUs."""
    gpu_list = f"[FakeGpu(uuid='GPU-{{:08x}}-0000-4000-8000-000000000000'.format(i)) for i in range({gpus})]"
    prelude = _PRELUDE.format(root=str(ROOT), gpus=gpu_list, kwargs=kwargs)
    env = dict(os.environ, CHRONOS_BACKEND=backend, CHRONOS_SIM_GPUS="2x80G")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(prelude) + textwrap.dedent(code)],
                          env=env, text=True, capture_output=True, timeout=60)


_SELECT = """
from chronos.devices import get_backend
from chronos.errors import BackendError
try:
    backend = get_backend()
except BackendError as exc:
    print("error:", type(exc).__name__, exc)
else:
    print(backend.name, len(backend.devices()), get_backend() is backend)
"""

_FALLBACK = "(set CHRONOS_SIM_GPUS to change them, CHRONOS_BACKEND=simulated to silence this)"


def test_auto_picks_nvml_where_the_driver_has_gpus() -> None:
    out = _with_fake_pynvml(_SELECT, gpus=3)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["nvml", "3", "True"]
    assert out.stderr == ""


@pytest.mark.parametrize(("gpus", "kwargs", "reason"), [
    (2, {"init_error": pynvml.NVML_ERROR_LIBRARY_NOT_FOUND}, "no NVIDIA driver found"),
    (2, {"init_error": pynvml.NVML_ERROR_DRIVER_NOT_LOADED}, "no NVIDIA driver found"),
    (0, {}, "the NVIDIA driver reports no GPU"),
])
def test_auto_falls_back_to_simulated_and_says_why(gpus: int, kwargs: dict[str, typing.Any], reason: str) -> None:
    out = _with_fake_pynvml(_SELECT, gpus=gpus, **kwargs)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["simulated", "2", "True"]
    assert out.stderr.splitlines() == [f"chronos: {reason}; using 2 simulated GPUs {_FALLBACK}"]


def test_auto_does_not_hide_a_broken_driver() -> None:
    out = _with_fake_pynvml(_SELECT, gpus=2, init_error=pynvml.NVML_ERROR_NO_PERMISSION)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "error: BackendError NVML initialisation failed: Insufficient Permissions"
    assert out.stderr == ""


def test_nvml_chosen_without_a_driver_is_an_error() -> None:
    out = _with_fake_pynvml(_SELECT, gpus=2, backend="nvml", init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("error: DriverNotFoundError no NVIDIA driver found (")
    assert out.stderr == ""


_MODULE = """
from chronos.devices import nvml
from chronos.errors import BackendError
try:
    print(nvml.driver_version(), nvml.cuda_driver_version(), end=" ")
except BackendError as exc:
    print(type(exc).__name__, end=" ")
print(nvml.has_cgroup_memory_limits())
"""


@pytest.mark.parametrize(("kwargs", "want"), [
    ({"cgroup_limits": True}, "550.54.15 12.4 True"),
    ({"cgroup_limits": False}, "550.54.15 12.4 False"),
    ({"cgroup_limits": True, "missing": {"nvmlDeviceSetMemoryLimits_v1"}}, "550.54.15 12.4 False"),
    ({"cgroup_limits": True, "init_error": pynvml.NVML_ERROR_LIBRARY_NOT_FOUND}, "DriverNotFoundError False"),
])
def test_module_functions_use_the_real_binding(kwargs: dict[str, typing.Any], want: str) -> None:
    out = _with_fake_pynvml(_MODULE, gpus=1, **kwargs)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == want


def test_the_real_binding_is_initialised_once_per_process() -> None:
    out = _with_fake_pynvml("""
        import pynvml
        from chronos.devices import nvml
        first, second = nvml.NvmlBackend(), nvml.NvmlBackend()
        first.devices(), second.processes(), nvml.driver_version(), nvml.init()
        print(pynvml.calls.count("nvmlInit"))
    """, gpus=2)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


def test_a_first_poll_without_samples_cannot_say_and_a_later_one_means_idle() -> None:
    # On an H200 the first nvmlDeviceGetProcessUtilization after nvmlInit had no sample for a process
    # computing all along: the first empty answer must not read as "idle".
    fake = FakeNvml(_gpus(1), topology=pynvml.NVML_TOPOLOGY_SYSTEM)
    fake.gpus[0].processes.append(FakeProcess(ME, GiB))
    backend = nvml.NvmlBackend(lib=fake)
    assert [(r.pid, r.sm_percent) for r in backend.utilization([0])] == [(ME, None)]
    assert backend.utilization([0]) == []  # still no sample on a later poll: no SM time used
    fake.gpus[0].processes[:] = [FakeProcess(ME, GiB, sm=30)]
    assert [(r.pid, r.sm_percent) for r in backend.utilization([0])] == [(ME, 30)]
