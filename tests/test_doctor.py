"""``chronos doctor``: what it reports on simulated GPUs, and problems it finds."""

from __future__ import annotations

import json
import os
from pathlib import Path

from chronos.api import default_engine
from chronos.doctor import diagnose, framework_versions
from tests.conftest import run_cli


def test_doctor_json_on_simulated_gpus(chronos_env: Path) -> None:
    result = run_cli("doctor", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["backend"] == "simulated" and report["simulated"] is True
    assert [d["index"] for d in report["devices"]] == [0, 1]
    assert all(d["memory_total_bytes"] == 80 << 30 for d in report["devices"])
    assert report["state_dir"]["path"] == str(chronos_env)
    assert set(report["frameworks"]) >= {"torch", "jax", "cupy"}
    assert report["mps"]["active"] is False
    assert report["cgroup_memory_limits"] is None
    assert report["enforcement"]["watchdog"] == "simulated GPUs only"
    assert report["problems"] == []


def test_doctor_text() -> None:
    result = run_cli("doctor")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("backend:") and "simulated" in lines[0]
    assert sum(line.startswith("GPU ") for line in lines) == 2
    assert any(line.strip().startswith("watchdog:") for line in lines)


def test_doctor_flags_an_unsafe_state_directory(chronos_env: Path) -> None:
    os.chmod(chronos_env, 0o777)  # world-writable, no sticky bit
    report = diagnose(default_engine())
    assert report.state_dir["mode"] == "0777"
    assert any("sticky bit" in p for p in report.problems)
    result = run_cli("doctor")
    assert result.returncode == 1 and "sticky bit" in result.stderr
    os.chmod(chronos_env, 0o700)


def test_framework_versions_come_from_metadata(tmp_path: Path) -> None:
    info = tmp_path / "cupy_cuda13x-14.2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cupy-cuda13x\nVersion: 14.2.0\n")
    (info / "top_level.txt").write_text("cupy\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        found = framework_versions()
    finally:
        sys.path.remove(str(tmp_path))
    assert found["cupy"] == "14.2.0 (cupy-cuda13x)"
    assert "cupy" not in sys.modules  # found without importing it


def test_doctor_says_when_device_gating_cannot_hold(tmp_path: Path) -> None:
    devices = tmp_path / "dev"
    devices.mkdir()
    (devices / "nvidia0").write_bytes(b"")
    (devices / "nvidia0").chmod(0o666)  # as NVIDIA's driver makes it by default
    (devices / "nvidia1").write_bytes(b"")
    (devices / "nvidia1").chmod(0o660)
    config = tmp_path / "chronos.toml"
    config.write_text(f'[enforce]\ngate_devices = true\ndevice_dir = "{devices}"\n')
    result = run_cli("doctor", "--json", env={"CHRONOS_CONFIG": str(config)})
    report = json.loads(result.stdout)
    assert result.returncode == 1
    assert report["enforcement"]["device gating"] == "on, but cannot hold (see the problems)"
    assert [p for p in report["problems"] if "gating" in p] == [
        f"device gating: {devices / 'nvidia0'} is open to every user (mode o+rw), so gating cannot keep anyone "
        "off it; make it 0660 (NVreg_DeviceFileMode=0660 or a udev rule, or [enforce] device_mode)"]
    (devices / "nvidia0").chmod(0o660)
    result = run_cli("doctor", "--json", env={"CHRONOS_CONFIG": str(config)})
    report = json.loads(result.stdout)
    assert result.returncode == 0, result.stderr
    assert report["enforcement"]["device gating"] == f"on, in {devices}" and report["problems"] == []
