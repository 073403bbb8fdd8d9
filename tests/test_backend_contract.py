"""One set of tests for every GPU backend.

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
import typing
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pynvml
import pytest

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
)
from chronos.errors import InvalidRequestError
from tests import fake_nvml
from tests.fake_nvml import NOT_AVAILABLE, FakeGpu, FakeNvml, FakeProcess

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
    name: str
    driver: str | None


def _simulated() -> Machine:
    simulated.allocate(0, 8 * GiB)
    return Machine(backend=simulated.SimulatedBackend(), make=simulated.SimulatedBackend,
                   use=lambda device, nbytes: simulated.allocate(device, nbytes),
                   name="simulated", driver=None)


def _nvml() -> Machine:
    fake = FakeNvml(_gpus(2), topology=pynvml.NVML_TOPOLOGY_MULTIPLE)
    fake.gpus[0].processes.append(FakeProcess(ME, 8 * GiB))

    def use(device: int, nbytes: int) -> None:
        procs = fake.gpus[device].processes
        procs[:] = [p for p in procs if p.pid != ME] + [FakeProcess(ME, nbytes)]

    return Machine(backend=nvml.NvmlBackend(lib=fake), make=lambda: nvml.NvmlBackend(lib=fake), use=use,
                   name="nvml", driver=fake.driver)


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
