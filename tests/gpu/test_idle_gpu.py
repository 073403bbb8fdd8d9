"""Idle leases on a real NVIDIA GPU: NVML's per-process SM samples, and a lease released when its
PyTorch process stops computing (run on the lent H200; skipped where there is no GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import chronos
from chronos.api import default_engine, reset_default_engine
from chronos.devices import nvml
from tests.waiting import wait_for

pytestmark = pytest.mark.gpu

# Computes until a line arrives on stdin, then holds its memory without using the GPU.
BUSY_THEN_IDLE = textwrap.dedent("""
    import sys, threading, time
    import torch
    x = torch.randn(4096, 4096, device="cuda")
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    print("ready", flush=True)
    while not stop.is_set():
        x = (x @ x).clamp_(-1, 1)
        torch.cuda.synchronize()
    print("idle", flush=True)
    time.sleep(600)
""")


def record(test: str, **data: Any) -> None:
    path = os.environ.get("CHRONOS_GPU_RECORD")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"test": test, **data}) + "\n")


def _torch() -> None:
    if subprocess.run([sys.executable, "-c", "import torch; assert torch.cuda.is_available()"],
                      capture_output=True).returncode != 0:
        pytest.skip("needs PyTorch with CUDA")


def _start(env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", BUSY_THEN_IDLE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.communicate(timeout=30)


def test_nvml_reports_a_computing_process_then_nothing_once_it_stops() -> None:
    _torch()
    proc = _start()
    try:
        backend = nvml.NvmlBackend()
        busy = wait_for(lambda: next((u for u in backend.utilization([0]) if u.pid == proc.pid and u.sm_percent), None),
                        timeout=30, what="NVML to sample the computing process")
        assert busy.sm_percent is not None and 0 < busy.sm_percent <= 100
        assert proc.stdin is not None
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        assert proc.stdout is not None and proc.stdout.readline().strip() == "idle"
        first = time.monotonic()
        wait_for(lambda: not any(u.pid == proc.pid and u.sm_percent for u in backend.utilization([0])),
                 timeout=30, what="NVML to stop sampling it")
        quiet_after = time.monotonic() - first
        held = [p for p in backend.processes([0]) if p.pid == proc.pid]
        assert held and (held[0].used_bytes or 0) > 0  # still holding its memory: idle, not gone
        record("nvml_utilization", busy_sm_percent=busy.sm_percent, quiet_after_s=round(quiet_after, 2),
               held_bytes=held[0].used_bytes)
    finally:
        _stop(proc)


def test_a_lease_whose_pytorch_process_stops_computing_is_warned_then_released(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _torch()
    config = tmp_path / "config.toml"
    config.write_text('[limits]\nidle_after = "6s"\nidle_warning = "3s"\non_idle = "release"\n')
    monkeypatch.setenv("CHRONOS_CONFIG", str(config))
    reset_default_engine()
    lease = chronos.reserve("4G", "10m", bind=False)
    proc = _start(lease.env(dict(os.environ)))
    try:
        engine = default_engine()
        policies = engine.policies
        # Samples taken while the child was still importing PyTorch saw a lease with no process: idle,
        # rightly. The first sample that starts after "ready" sees it compute and must end that spell.
        after_ready = policies.samples + 2
        # A read (get_lease) is what takes samples: ask it first, then count them.
        wait_for(lambda: chronos.get_lease(lease.id).idle_since is None and policies.samples >= after_ready,
                 timeout=30, what=lambda: f"a sample that sees the lease's process {proc.pid} computing "
                 f"(samples {policies.samples}, engine {default_engine() is engine}, last {policies.last_sample}, "
                 f"NVML now {default_engine().backend.utilization([0])})")
        target = policies.samples + 8

        def sampled_busy() -> bool:
            assert chronos.get_lease(lease.id).idle_since is None, "a computing lease was taken for idle"
            return policies.samples >= target

        wait_for(sampled_busy, timeout=60, what="eight utilisation samples of the computing lease")
        assert proc.stdin is not None
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        stopped = time.time()
        idle = wait_for(lambda: chronos.get_lease(lease.id).idle_since, timeout=30, what="the lease to be idle")
        ended = wait_for(lambda: (x := chronos.get_lease(lease.id)).state != "active" and x, timeout=60,
                         what="the idle lease to be released")
        assert ended.state == "released" and (ended.end_reason or "").startswith("idle since")
        record("idle_release_nvml", idle_after_stop_s=round(idle - stopped, 2),
               released_after_stop_s=round((ended.ended_at or 0) - stopped, 2))
    finally:
        _stop(proc)
