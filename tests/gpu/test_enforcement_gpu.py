"""Enforcement on a real NVIDIA GPU (run on the lent H200; skipped where there is no GPU).

Each test drives real processes through ``chronos run`` or the watchdog, against NVML. Where
``CHRONOS_GPU_RECORD`` names a file, the figures seen are appended to it as JSON lines for
docs/gpu-validation.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import chronos
from chronos.devices import get_backend
from chronos.enforce import mps
from tests.waiting import wait_for

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
CUDA_ALLOC = str(ROOT / "bench" / "gpu_cuda_alloc.py")
GIB = 1 << 30
MIB = 1 << 20


def record(test: str, **data: Any) -> None:
    path = os.environ.get("CHRONOS_GPU_RECORD")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"test": test, **data}) + "\n")


def smi(*fields: str) -> list[list[str]]:
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [[cell.strip() for cell in line.split(",")] for line in out.strip().splitlines()]


def device_used(index: int = 0) -> int:
    return next(d.memory_used_bytes for d in get_backend().devices() if d.index == index)


def wait_for_baseline(baseline: int, slack: int = 256 * MIB, timeout: float = 20) -> tuple[int, float]:
    """The device's memory once it is back within ``slack`` of ``baseline``, and how long that took."""
    started = time.monotonic()

    def settled() -> tuple[int] | None:  # a tuple: 0 bytes used is an answer too
        used = device_used()
        return (used,) if used <= baseline + slack else None

    (used,) = wait_for(settled, timeout=timeout, interval=0.05,
                       what=lambda: f"GPU memory back to {baseline // MIB} MiB, now {device_used() // MIB} MiB")
    return used, time.monotonic() - started


def chronos_run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chronos", "run", *args], capture_output=True, text=True, timeout=timeout
    )


def test_nvml_devices_match_nvidia_smi() -> None:
    devices = get_backend().devices()
    rows = smi("index", "uuid", "name", "memory.total", "memory.used")
    assert len(devices) == len(rows)
    for d, (index, uuid, name, total_mib, used_mib) in zip(devices, rows, strict=True):
        assert d.index == int(index) and d.uuid == uuid and d.name == name
        assert abs(d.memory_total_bytes // MIB - int(total_mib)) <= 1
        # NVML's v2 query leaves reserved memory out of "used"; nvidia-smi may count it
        assert abs(d.memory_used_bytes // MIB - int(used_mib)) <= 1024
        record(
            "nvml_vs_smi",
            index=d.index,
            uuid=d.uuid,
            name=d.name,
            nvml_total_mib=d.memory_total_bytes // MIB,
            smi_total_mib=int(total_mib),
            nvml_used_mib=d.memory_used_bytes // MIB,
            smi_used_mib=int(used_mib),
        )
    record("topology", distances=get_backend().distances(), driver=get_backend().driver_version())


def test_stats_matches_nvidia_smi() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "chronos", "stats", "--json"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    stats = json.loads(out)
    rows = smi("index", "uuid", "memory.total", "memory.used")
    assert [(s["index"], s["uuid"]) for s in stats] == [(int(r[0]), r[1]) for r in rows]
    for s, r in zip(stats, rows, strict=True):
        assert abs(s["memory_total_bytes"] // MIB - int(r[2])) <= 1
        assert abs(s["memory_used_bytes"] // MIB - int(r[3])) <= 1024
    record("stats_vs_smi", stats=stats, smi=rows)


def test_torch_child_gets_oom_past_its_cap_and_succeeds_under_it() -> None:
    pytest.importorskip("torch")
    from chronos.enforce.caps import torch_env_fraction_supported

    assert torch_env_fraction_supported(), "this PyTorch does not read per_process_memory_fraction"
    code = textwrap.dedent("""
        import json, os, time, torch
        out = {"alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
        big_or_none = None
        try:
            big_or_none = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
            out["4g"] = "allocated"
        except torch.cuda.OutOfMemoryError as exc:
            out["4g"] = "OutOfMemoryError"
        small = torch.ones(1 << 30, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        out["1g"] = small.numel() if bool((small[-1] == 1).item()) else 0
        del big_or_none
        chunks = []
        try:
            while True:  # fill the budget: NVML must still show the process under its 2 GiB lease
                chunks.append(torch.empty(64 << 20, dtype=torch.uint8, device="cuda"))
        except torch.cuda.OutOfMemoryError:
            pass
        torch.cuda.synchronize()
        out["reserved_full"] = torch.cuda.memory_reserved()
        import pynvml
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByUUID(os.environ["CUDA_VISIBLE_DEVICES"])
        out["nvml_process_bytes"] = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)
                                     if p.pid == os.getpid()]
        print(json.dumps(out), flush=True)
        time.sleep(3)  # longer than the watchdog's grace: a process over its cap would be ended now
    """)
    result = chronos_run("2G", "5m", "--", sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    record("torch_cap", child=seen, stderr=result.stderr.strip().splitlines())
    assert seen["4g"] == "OutOfMemoryError"
    assert seen["1g"] == 1 << 30
    assert seen["nvml_process_bytes"] and max(seen["nvml_process_bytes"]) < 2 * GIB
    assert "ended the command" not in result.stderr  # the user got an error, not a kill


@pytest.mark.parametrize("how", ["cuda-driver-api", "torch-without-fraction"])
def test_escaping_the_cooperative_cap_is_killed_and_memory_returns(how: str) -> None:
    baseline = device_used()
    if how == "cuda-driver-api":
        command = [sys.executable, CUDA_ALLOC, "1024", "1024", "1024", "1024", "--hold", "120"]
    else:
        pytest.importorskip("torch")
        code = (
            "import os, time\n"
            "for k in ('PYTORCH_CUDA_ALLOC_CONF', 'PYTORCH_ALLOC_CONF'): os.environ.pop(k, None)\n"
            "import torch\n"
            "x = torch.ones(4 << 30, dtype=torch.uint8, device='cuda'); torch.cuda.synchronize()\n"
            "print('allocated', flush=True); time.sleep(120)\n"
        )
        command = [sys.executable, "-c", code]
    started = time.monotonic()
    result = chronos_run("2G", "10m", "--grace", "1", "--kill-wait", "5", "--", *command)
    elapsed = time.monotonic() - started
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "ended the command (SIGTERM)" in result.stderr and "over the lease's 2 GiB cap" in result.stderr
    used, settle_s = wait_for_baseline(baseline)
    record(
        "escape_killed",
        how=how,
        baseline_mib=baseline // MIB,
        after_mib=used // MIB,
        settle_s=round(settle_s, 3),
        wall_s=round(elapsed, 2),
        stderr=result.stderr.strip().splitlines(),
    )
    assert used <= baseline + 256 * MIB


def test_expiry_ends_a_running_gpu_job() -> None:
    pytest.importorskip("torch")
    baseline = device_used()
    code = (
        "import torch\n"
        "a = torch.randn(4096, 4096, device='cuda', dtype=torch.bfloat16)\n"
        "print('running', flush=True)\n"
        "while True:\n"
        "    a = (a @ a).clamp_(-1, 1)\n"
        "    torch.cuda.synchronize()\n"
    )
    result = chronos_run("4G", "8s", "--kill-wait", "5", "--", sys.executable, "-c", code)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "expired" in result.stderr
    used, settle_s = wait_for_baseline(baseline)
    record(
        "expiry_gpu_job",
        stderr=result.stderr.strip().splitlines(),
        after_mib=used // MIB,
        baseline_mib=baseline // MIB,
        settle_s=round(settle_s, 3),
    )
    assert used <= baseline + 256 * MIB
    (lease,) = chronos.leases(all=True)
    assert lease.state == "expired" and (lease.gpu_seconds or 0) > 0 and (lease.peak_memory_bytes or 0) > 0


def _mps_control() -> str | None:
    for candidate in (
        "nvidia-cuda-mps-control",
        "/usr/local/nvidia/bin/nvidia-cuda-mps-control",
        "/usr/bin/nvidia-cuda-mps-control",
    ):
        found = shutil.which(candidate)
        if found:
            return found
    return None


@pytest.mark.timeout(180)
def test_mps_driver_refuses_allocation_past_the_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    control = _mps_control()
    if control is None:
        pytest.skip("nvidia-cuda-mps-control not found")
    pipe, logs = tmp_path / "pipe", tmp_path / "log"
    pipe.mkdir()
    logs.mkdir()
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(pipe))
    monkeypatch.setenv("CUDA_MPS_LOG_DIRECTORY", str(logs))
    started = subprocess.run([control, "-d"], capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr

    def active() -> mps.MpsStatus | None:
        status = mps.mps_status()
        return status if status.active else None

    try:
        status = wait_for(active, timeout=10, interval=0.1,
                          what=lambda: f"the MPS daemon to start: {mps.mps_status()}, {sorted(os.listdir(pipe))}")
        listing = {p.name: oct(p.lstat().st_mode) for p in pipe.iterdir()}
        record("mps_start", status=str(status), pipe_dir=listing)
        result = chronos_run(
            "2G",
            "5m",
            "--on-overuse",
            "warn",
            "--",
            sys.executable,
            CUDA_ALLOC,
            "4096",
            "1024",
            "--hold",
            "2",
            timeout=120,
        )
        lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        allocs = {item["mib"]: item["rc"] for item in lines if "mib" in item}
        server_log = (logs / "server.log").read_text() if (logs / "server.log").exists() else ""
        record(
            "mps",
            allocs=allocs,
            returncode=result.returncode,
            stderr=result.stderr.strip().splitlines(),
            status=str(status),
            server_log_tail=server_log[-2000:],
        )
        assert result.returncode == 0, result.stderr
        assert allocs.get(4096) == 2  # CUDA_ERROR_OUT_OF_MEMORY from the driver
        assert allocs.get(1024) == 0
    finally:
        subprocess.run([control], input="quit\n", text=True, capture_output=True, timeout=30)
        with contextlib.suppress(AssertionError):  # best effort: the test's own outcome stands either way
            wait_for(lambda: not mps.mps_status().control_pids, timeout=15, interval=0.2, what="MPS to quit")
