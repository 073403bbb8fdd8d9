"""GPU backends: simulated GPUs shared by real processes, backend selection, and NVML on a real GPU."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import chronos
from chronos.devices import GpuProcess, get_backend, is_simulated, simulated
from chronos.devices.base import (
    LINK_HOST_BRIDGE,
    LINK_NUMA,
    LINK_NVLINK,
    LINK_PCIE_MULTI,
    LINK_PCIE_SWITCH,
    LINK_SAME,
    LINK_SYSTEM,
    Backend,
)
from chronos.errors import BackendError, InvalidRequestError
from tests.waiting import wait_for


def _driver_loads() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


HAS_DRIVER = _driver_loads()

GiB = 1 << 30
UUID_RE = re.compile(r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _python(code: str, env: dict[str, str] | None = None, **kwargs: object) -> subprocess.Popen[str]:
    """Start a real Python process running ``code`` with the test's environment."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], env=full_env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs,  # type: ignore[call-overload]
    )


def _run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, text=True,
                          capture_output=True, timeout=60)


def _usage(backend: Backend) -> dict[tuple[int, int], int | None]:
    return {(p.device_index, p.pid): p.used_bytes for p in backend.processes()}


# --------------------------------------------------------------------------- CHRONOS_SIM_GPUS


@pytest.mark.parametrize(("value", "sizes"), [
    ("80G,40G", [80 * GiB, 40 * GiB]),
    ("4x80G", [80 * GiB] * 4),
    (" 2 X 16GiB , 512M ", [16 * GiB, 16 * GiB, 512 << 20]),
    ("1x24G,2x48G", [24 * GiB, 48 * GiB, 48 * GiB]),
    ("", [80 * GiB, 80 * GiB]),
    (None, [80 * GiB, 80 * GiB]),
])
def test_sim_gpus_parsing(value: str | None, sizes: list[int]) -> None:
    assert simulated.parse_sim_gpus(value) == sizes


@pytest.mark.parametrize(
    "value", ["abc", "80", "0x80G", "50%", "0.5", "80G,,40G", "-1G", "4x", "x80G", "1000x1G"])
def test_sim_gpus_bad_values_name_the_variable(value: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        simulated.parse_sim_gpus(value)
    message = str(info.value)
    assert "CHRONOS_SIM_GPUS" in message
    assert "80G,40G" in message
    assert "\n" not in message


def test_bad_sim_gpus_fails_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHRONOS_SIM_GPUS", "eighty gigs")
    with pytest.raises(InvalidRequestError, match="CHRONOS_SIM_GPUS"):
        get_backend()


def test_simulated_devices_have_stable_real_format_uuids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHRONOS_SIM_GPUS", "80G,40G,80G")
    listed = get_backend().devices()
    assert [d.index for d in listed] == [0, 1, 2]
    assert [d.memory_total_bytes for d in listed] == [80 * GiB, 40 * GiB, 80 * GiB]
    assert [d.name for d in listed] == ["Chronos Simulated GPU (80 GiB)", "Chronos Simulated GPU (40 GiB)",
                                        "Chronos Simulated GPU (80 GiB)"]
    uuids = [d.uuid for d in listed]
    assert all(UUID_RE.match(u) for u in uuids)
    assert len(set(uuids)) == 3
    assert [d.memory_used_bytes for d in listed] == [0, 0, 0]
    assert [d.utilization_percent for d in listed] == [0, 0, 0]
    # Another process computes the same identities.
    out = _run("from chronos.devices import get_backend; print(*[d.uuid for d in get_backend().devices()])")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == uuids


# --------------------------------------------------------------------------- usage shared by processes


def test_allocate_sets_rather_than_adds_and_free_drops() -> None:
    backend = get_backend()
    me = os.getpid()
    simulated.allocate(0, 8 * GiB)
    simulated.allocate(0, 2 * GiB)
    simulated.allocate(1, "512M")
    assert _usage(backend) == {(0, me): 2 * GiB, (1, me): 512 << 20}
    assert [d.memory_used_bytes for d in backend.devices()] == [2 * GiB, 512 << 20]
    simulated.free(0)
    assert _usage(backend) == {(1, me): 512 << 20}
    assert backend.processes([0]) == []
    simulated.allocate(1, 0)
    assert _usage(backend) == {}


def test_allocate_rejects_unknown_device_and_bad_sizes() -> None:
    with pytest.raises(InvalidRequestError, match="no simulated GPU 2"):
        simulated.allocate(2, GiB)
    with pytest.raises(InvalidRequestError):
        simulated.allocate(-1, GiB)
    with pytest.raises(InvalidRequestError):
        simulated.allocate(0, -5)
    with pytest.raises(InvalidRequestError):
        simulated.allocate(0, "50%")
    with pytest.raises(InvalidRequestError):
        simulated.allocate(0, GiB, utilization=101)
    assert get_backend().processes() == []


def test_allocate_past_the_total_is_visible() -> None:
    backend = get_backend()
    simulated.allocate(0, 100 * GiB)
    dev = backend.devices()[0]
    assert dev.memory_used_bytes == 100 * GiB > dev.memory_total_bytes
    assert dev.memory_free_bytes == 0


def test_usage_is_visible_from_another_process() -> None:
    simulated.allocate(1, 3 * GiB)
    out = _run("""
        from chronos.devices import get_backend
        backend = get_backend()
        print(backend.devices()[1].memory_used_bytes, *[(p.device_index, p.pid) for p in backend.processes()])
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().split(maxsplit=1) == [str(3 * GiB), f"(1, {os.getpid()})"]


def test_usage_of_a_live_process_then_killed_disappears(chronos_env: Path) -> None:
    child = _python("""
        import sys
        from chronos.devices import simulated
        simulated.allocate(0, 6 << 30, utilization=40)
        print("ready", flush=True)
        sys.stdin.read()
    """)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        backend = get_backend()
        assert _usage(backend) == {(0, child.pid): 6 * GiB}
        assert backend.devices()[0].utilization_percent == 40
        simulated.allocate(1, GiB)  # a write while the child lives keeps its claim
        assert _usage(backend) == {(0, child.pid): 6 * GiB, (1, os.getpid()): GiB}
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
    assert _usage(backend) == {(1, os.getpid()): GiB}
    assert backend.devices()[0].memory_used_bytes == 0
    assert backend.devices()[0].utilization_percent == 0
    raw = json.loads((chronos_env / simulated.STATE_FILE).read_text())
    assert str(child.pid) in raw["usage"]["0"]  # still on file: reads filter, writes prune
    simulated.free(1)
    raw = json.loads((chronos_env / simulated.STATE_FILE).read_text())
    assert raw["usage"] == {}


def test_a_reused_pid_is_not_taken_for_the_claimant(chronos_env: Path) -> None:
    """A claim recorded for this pid at another start time belongs to a process that is gone."""
    simulated.allocate(0, GiB)
    path = chronos_env / simulated.STATE_FILE
    raw = json.loads(path.read_text())
    entry = raw["usage"]["0"][str(os.getpid())]
    entry["started"] -= 3600
    path.write_text(json.dumps(raw))
    assert get_backend().processes() == []
    with pytest.raises(InvalidRequestError, match="no running process"):
        simulated.allocate(0, GiB, pid=_dead_pid())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_allocate_for_another_pid_and_free_it() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        simulated.allocate(1, 5 * GiB, pid=child.pid)
        assert _usage(get_backend()) == {(1, child.pid): 5 * GiB}
        simulated.free(1, pid=child.pid)
        assert _usage(get_backend()) == {}
    finally:
        child.kill()
        child.wait()


def test_concurrent_allocates_from_many_processes_lose_nothing() -> None:
    workers = 6
    rounds = 25
    code = f"""
        import os, sys
        from chronos.devices import simulated
        pid = os.getpid()
        for i in range({rounds}):
            simulated.allocate(i % 2, (pid % 1000 + 1) * (1 << 20) + i)
        print("done", flush=True)
        sys.stdin.read()
    """
    children = [_python(code) for _ in range(workers)]
    try:
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline().strip()
            assert line == "done", child.stderr.read() if child.stderr else ""
        got = _usage(get_backend())
        want = {}
        for child in children:
            base = (child.pid % 1000 + 1) * (1 << 20)
            want[((rounds - 2) % 2, child.pid)] = base + rounds - 2
            want[((rounds - 1) % 2, child.pid)] = base + rounds - 1
        assert got == want
    finally:
        for child in children:
            child.kill()
            child.communicate(timeout=30)


@pytest.mark.parametrize(("dir_mode", "file_mode"), [(0o700, 0o600), (0o1777, 0o666), (0o2770, 0o660)])
def test_state_files_take_the_directory_sharing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                dir_mode: int, file_mode: int) -> None:
    state = tmp_path / "shared"
    state.mkdir()
    os.chmod(state, dir_mode)
    monkeypatch.setenv("CHRONOS_STATE_DIR", str(state))
    simulated.allocate(0, GiB)
    assert stat.S_IMODE(os.stat(state / simulated.STATE_FILE).st_mode) == file_mode
    assert stat.S_IMODE(os.stat(state / simulated.LOCK_FILE).st_mode) == file_mode


def test_missing_explicit_state_dir_is_created_private(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "new" / "state"
    monkeypatch.setenv("CHRONOS_STATE_DIR", str(state))
    simulated.allocate(1, GiB)
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert get_backend().devices()[1].memory_used_bytes == GiB


_AS_NOBODY = """
    import hashlib, os, sys  # hashlib before dropping root: the interpreter's files are in /root
    import chronos.config, chronos.state
    from chronos.devices import simulated
    os.setgid(65534)
    os.setuid(65534)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user")
def test_second_user_updates_a_sticky_shared_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a sticky directory another user's file cannot be replaced; it is rewritten in place instead."""
    top = Path(tempfile.mkdtemp(prefix="chronos-test-"))
    try:
        os.chmod(top, 0o755)
        state = top / "shared"
        state.mkdir()
        os.chmod(state, 0o1777)
        monkeypatch.setenv("CHRONOS_STATE_DIR", str(state))
        # The per-test config paths sit in root's private temp directory, which nobody cannot read.
        monkeypatch.setenv("CHRONOS_CONFIG", "/nonexistent/config.toml")
        monkeypatch.setenv("CHRONOS_USER_CONFIG", "/nonexistent/user.toml")
        simulated.allocate(0, GiB)  # the file is now root's
        child = _python(textwrap.dedent(_AS_NOBODY) + textwrap.dedent("""
            simulated.allocate(1, 2 << 30)
            print("ready", flush=True)
            sys.stdin.read()
        """))
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready", child.stderr.read() if child.stderr else ""
            assert os.stat(state / simulated.STATE_FILE).st_uid == 0  # rewritten in place, not replaced
            assert _usage(get_backend()) == {(0, os.getpid()): GiB, (1, child.pid): 2 * GiB}
            simulated.allocate(0, 3 * GiB)  # and the first user's next write keeps the second's claim
            assert _usage(get_backend()) == {(0, os.getpid()): 3 * GiB, (1, child.pid): 2 * GiB}
        finally:
            child.kill()
            child.communicate(timeout=30)
        assert _usage(get_backend()) == {(0, os.getpid()): 3 * GiB}
    finally:
        shutil.rmtree(top)


# --------------------------------------------------------------------------- topology


def test_default_topology_is_one_pcie_host_bridge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHRONOS_SIM_GPUS", "3x40G")
    monkeypatch.delenv("CHRONOS_SIM_TOPOLOGY", raising=False)
    m = LINK_PCIE_MULTI
    assert get_backend().distances() == [[LINK_SAME, m, m], [m, LINK_SAME, m], [m, m, LINK_SAME]]


def test_nvlink_pairs_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHRONOS_SIM_GPUS", "4x80G")
    monkeypatch.setenv("CHRONOS_SIM_TOPOLOGY", "0-1,2-3")
    n, s = LINK_NVLINK, LINK_SYSTEM
    assert get_backend().distances() == [
        [LINK_SAME, n, s, s],
        [n, LINK_SAME, s, s],
        [s, s, LINK_SAME, n],
        [s, s, n, LINK_SAME],
    ]


def test_topology_kinds_and_overlaps_take_the_closest_link() -> None:
    m = simulated.parse_topology(" nvlink:0-1-2 , pcie:2-3, pcie:0-1 ", 5)
    assert m[0][1] == m[1][2] == m[0][2] == LINK_NVLINK
    assert m[2][3] == m[3][2] == LINK_PCIE_SWITCH
    assert m[0][3] == m[4][0] == LINK_SYSTEM
    assert all(m[i][i] == LINK_SAME for i in range(5))
    assert all(m[i][j] == m[j][i] for i in range(5) for j in range(5))


@pytest.mark.parametrize("value", ["0-4", "0", "1-1", "a-b", "infiniband:0-1", "0-1,", "0--1"])
def test_bad_topology_names_the_variable(value: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        simulated.parse_topology(value, 4)
    assert "CHRONOS_SIM_TOPOLOGY" in str(info.value)
    assert "0-1,2-3" in str(info.value)


# --------------------------------------------------------------------------- selection


def test_backend_is_cached_and_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    first = get_backend()
    assert first is get_backend()
    assert isinstance(first, Backend)
    assert is_simulated()
    assert first.driver_version() is None
    monkeypatch.setenv("CHRONOS_SIM_GPUS", "3x40G")
    second = get_backend()
    assert second is not first
    assert [d.memory_total_bytes for d in second.devices()] == [40 * GiB] * 3


def test_one_settings_snapshot_reaches_the_engine_and_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default engine, its backend and get_backend() follow the same variables, topology included."""
    from chronos.api import default_engine
    from chronos.devices.base import LINK_NVLINK

    monkeypatch.setenv("CHRONOS_SIM_GPUS", "4x40G")
    engine = default_engine()
    assert engine.backend is get_backend()
    assert engine.backend.distances()[0][1] != LINK_NVLINK
    monkeypatch.setenv("CHRONOS_SIM_TOPOLOGY", "0-1,2-3")
    assert default_engine() is not engine
    assert default_engine().backend is get_backend()
    assert default_engine().backend.distances()[0][1] == LINK_NVLINK
    lease = chronos.reserve("10G", gpus=2)
    assert lease.devices in ((0, 1), (2, 3))  # the new topology decides the pair


@pytest.mark.parametrize("value", ["cuda", "NVML2", "sim"])
def test_unknown_backend_is_bad_input(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CHRONOS_BACKEND", value)
    with pytest.raises(InvalidRequestError, match="auto, nvml or simulated"):
        get_backend()


def test_importing_devices_does_not_load_nvml() -> None:
    out = _run("""
        import sys
        from chronos.devices import get_backend
        assert "pynvml" not in sys.modules
        get_backend().devices()
        print("pynvml" in sys.modules)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    assert out.stderr == ""


@pytest.mark.skipif(HAS_DRIVER, reason="needs a machine with no NVIDIA driver")
def test_auto_falls_back_to_simulated_and_says_so_once() -> None:
    out = _run("""
        import os
        from chronos.devices import get_backend, is_simulated
        a = get_backend()
        os.environ["CHRONOS_SIM_GPUS"] = "3x24G"
        b = get_backend()
        print(a.name, len(a.devices()), b.name, len(b.devices()), is_simulated())
    """, env={"CHRONOS_BACKEND": "auto", "CHRONOS_SIM_GPUS": "2x80G"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["simulated", "2", "simulated", "3", "True"]
    assert out.stderr.splitlines() == [
        "chronos: no NVIDIA driver found; using 2 simulated GPUs "
        "(set CHRONOS_SIM_GPUS to change them, CHRONOS_BACKEND=simulated to silence this)"
    ]


@pytest.mark.skipif(HAS_DRIVER, reason="needs a machine with no NVIDIA driver")
def test_auto_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _run("from chronos.devices import get_backend; print(get_backend().name)",
               env={"CHRONOS_BACKEND": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "simulated"
    assert "no NVIDIA driver found" in out.stderr


@pytest.mark.skipif(HAS_DRIVER, reason="needs a machine with no NVIDIA driver")
def test_nvml_without_a_driver_is_a_one_line_backend_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHRONOS_BACKEND", "nvml")
    with pytest.raises(BackendError) as info:
        get_backend()
    message = str(info.value)
    assert "\n" not in message
    assert "no NVIDIA driver found" in message
    assert "CHRONOS_BACKEND=simulated" in message
    from chronos.devices import nvml

    assert nvml.has_cgroup_memory_limits() is False
    with pytest.raises(BackendError):
        nvml.driver_version()


def test_without_the_nvml_package() -> None:
    code = """
        import sys
        sys.modules["pynvml"] = None  # as if nvidia-ml-py were not installed
        from chronos.devices import get_backend
        from chronos.errors import BackendError
        try:
            get_backend()
        except BackendError as exc:
            print("error:", exc)
        else:
            print("backend:", get_backend().name)
    """
    out = _run(code, env={"CHRONOS_BACKEND": "nvml"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "error: the nvidia-ml-py package is missing: pip install nvidia-ml-py"
    out = _run(code, env={"CHRONOS_BACKEND": "auto"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "backend: simulated"
    assert out.stderr.startswith("chronos: nvidia-ml-py is not installed; using 2 simulated GPUs")


def test_processes_of_an_unknown_device_is_bad_input() -> None:
    with pytest.raises(InvalidRequestError, match="no simulated GPU 5"):
        get_backend().processes([0, 5])


# --------------------------------------------------------------------------- real GPUs


def _smi(query: str) -> list[list[str]]:
    out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=60, check=True)
    return [[field.strip() for field in line.split(",")] for line in out.stdout.strip().splitlines()]


@pytest.mark.gpu
def test_nvml_devices_match_nvidia_smi() -> None:
    backend = get_backend()
    assert backend.name == "nvml"
    assert not is_simulated()
    listed = backend.devices()
    rows = _smi("index,uuid,memory.total")
    assert [(d.index, d.uuid) for d in listed] == [(int(r[0]), r[1]) for r in rows]
    for d, r in zip(listed, rows, strict=True):
        # nvidia-smi reports MiB, rounded down.
        assert d.memory_total_bytes >> 20 == int(r[2])
        assert 0 <= d.memory_used_bytes <= d.memory_total_bytes
        assert d.utilization_percent is None or 0 <= d.utilization_percent <= 100
        assert d.name
    assert backend.driver_version() == _smi("driver_version")[0][0]


@pytest.mark.gpu
def test_nvml_distances_and_extras() -> None:
    from chronos.devices import nvml

    backend = get_backend()
    n = len(backend.devices())
    m = backend.distances()
    assert len(m) == n and all(len(row) == n for row in m)
    valid = {LINK_NVLINK, LINK_PCIE_SWITCH, LINK_PCIE_MULTI, LINK_HOST_BRIDGE, LINK_NUMA, LINK_SYSTEM}
    for i in range(n):
        assert m[i][i] == LINK_SAME
        for j in range(n):
            assert m[i][j] == m[j][i]
            if i != j:
                assert m[i][j] in valid
    cuda = nvml.cuda_driver_version()
    assert cuda is None or re.fullmatch(r"\d+\.\d+", cuda)
    assert isinstance(nvml.has_cgroup_memory_limits(), bool)


_CUDA_ALLOC = """
    import ctypes, sys
    cuda = ctypes.CDLL("libcuda.so.1")
    def check(rc):
        assert rc == 0, rc
    check(cuda.cuInit(0))
    dev = ctypes.c_int()
    check(cuda.cuDeviceGet(ctypes.byref(dev), 0))
    ctx = ctypes.c_void_p()
    check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))
    check(cuda.cuCtxSetCurrent(ctx))
    ptr = ctypes.c_uint64()
    check(cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(1 << 30)))
    print("ready", flush=True)
    sys.stdin.read()
"""


@pytest.mark.gpu
def test_nvml_sees_a_real_process_using_gpu_memory() -> None:
    backend = get_backend()
    child = _python(_CUDA_ALLOC, env={"CUDA_VISIBLE_DEVICES": backend.devices()[0].uuid})
    try:
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        assert line == "ready", child.stderr.read() if child.stderr else ""
        mine: list[GpuProcess] = wait_for(lambda: [p for p in backend.processes([0]) if p.pid == child.pid],
                                          timeout=20, interval=0.2,
                                          what=lambda: f"NVML to list the child: {backend.processes()}")
        assert len(mine) == 1, backend.processes()
        assert mine[0].device_uuid == backend.devices()[0].uuid
        assert mine[0].used_bytes is None or mine[0].used_bytes >= 1 << 30
    finally:
        child.kill()
        child.communicate(timeout=30)
