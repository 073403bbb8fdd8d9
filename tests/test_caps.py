"""Cooperative caps (lease_env, apply_caps) and the MPS limit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import chronos
from chronos.api import default_engine
from chronos.enforce import caps, mps
from chronos.enforce.caps import apply_caps, framework_budget, lease_env, merge_alloc_conf
from chronos.model import LeaseRecord

GIB = 1 << 30
MIB = 1 << 20


def _lease(memory: int = 2 * GIB, uuids: tuple[str, ...] = ("GPU-aaaa", "GPU-bbbb")) -> LeaseRecord:
    return LeaseRecord(
        id="42",
        owner="me",
        uid=os.getuid(),
        devices=tuple(range(len(uuids))),
        device_uuids=uuids,
        memory_bytes=memory,
        created_at=0.0,
        expires_at=None,
        duration_s=60.0,
    )


def _totals() -> dict[str, int]:
    return {d.uuid: d.memory_total_bytes for d in default_engine().backend.devices()}


def _fake_dist(root: Path, name: str, version: str) -> None:
    """An installed distribution as importlib.metadata sees one (a dist-info with METADATA)."""
    info = root / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_framework_budget_leaves_room_for_the_context(monkeypatch: pytest.MonkeyPatch) -> None:
    assert framework_budget(8 * GIB) == 8 * GIB - 768 * MIB
    assert framework_budget(GIB) == GIB // 2
    assert framework_budget(8 * GIB, 100 * MIB) == 8 * GIB - 100 * MIB
    monkeypatch.setenv("CHRONOS_CONTEXT_RESERVE", str(100 * MIB))  # through the settings, to every lease
    lease = chronos.reserve("8G", "10m", bind=False)
    assert lease.env({})["CUPY_GPU_MEMORY_LIMIT"] == str(8 * GIB - 100 * MIB)


def test_env_names_devices_by_uuid_and_caps_each_framework() -> None:
    totals = {"GPU-aaaa": 80 * GIB, "GPU-bbbb": 40 * GIB}
    env = lease_env(_lease(), base={"PATH": "/bin"}, totals=totals)
    assert env["PATH"] == "/bin"
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa,GPU-bbbb"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["CHRONOS_LEASE_ID"] == "42"
    budget = 2 * GIB - 768 * MIB
    # one fraction for all devices: the smallest, so no device's share exceeds the lease
    assert float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) == pytest.approx(budget / (80 * GIB), abs=1e-6)
    assert float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) * 80 * GIB <= budget
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert env["CUPY_GPU_MEMORY_LIMIT"] == str(budget)


def test_user_settings_are_merged_not_clobbered() -> None:
    totals = {"GPU-aaaa": 80 * GIB}
    base = {
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.001",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "true",
        "CUPY_GPU_MEMORY_LIMIT": "50%",
        "CUDA_VISIBLE_DEVICES": "0,1",
    }
    env = lease_env(_lease(uuids=("GPU-aaaa",)), base=base, totals=totals)
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.001"  # the user's smaller limit wins
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"  # preallocating the capped fraction is fine
    assert env["CUPY_GPU_MEMORY_LIMIT"] == str(2 * GIB - 768 * MIB)  # 50% of 80G is larger: ours wins
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa"  # the lease decides the devices
    smaller = lease_env(_lease(uuids=("GPU-aaaa",)), base={"CUPY_GPU_MEMORY_LIMIT": "1000"}, totals=totals)
    assert smaller["CUPY_GPU_MEMORY_LIMIT"] == "1000"


def test_merge_alloc_conf_keeps_other_keys_and_smaller_fraction() -> None:
    assert merge_alloc_conf(None, 0.25) == "per_process_memory_fraction:0.25"
    merged = merge_alloc_conf("expandable_segments:True,per_process_memory_fraction:0.5", 0.25)
    assert merged == "expandable_segments:True,per_process_memory_fraction:0.25"
    assert merge_alloc_conf("per_process_memory_fraction:0.1, max_split_size_mb:128", 0.25) == (
        "max_split_size_mb:128,per_process_memory_fraction:0.1"
    )


def test_torch_fraction_only_for_releases_that_read_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    totals = {"GPU-aaaa": 80 * GIB}
    new, old = tmp_path / "new", tmp_path / "old"
    _fake_dist(new, "torch", "2.11.0+cu130")
    _fake_dist(old, "torch", "2.5.1")
    monkeypatch.syspath_prepend(str(new))
    assert caps.torch_env_fraction_supported()
    env = lease_env(
        _lease(uuids=("GPU-aaaa",)),
        base={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
        totals=totals,
    )
    fraction = (2 * GIB - 768 * MIB) / (80 * GIB)
    assert (
        env["PYTORCH_CUDA_ALLOC_CONF"] == f"expandable_segments:True,per_process_memory_fraction:{fraction:g}"
    )
    renamed = lease_env(
        _lease(uuids=("GPU-aaaa",)), base={"PYTORCH_ALLOC_CONF": "backend:native"}, totals=totals
    )
    assert renamed["PYTORCH_ALLOC_CONF"].endswith(f"per_process_memory_fraction:{fraction:g}")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in renamed
    monkeypatch.syspath_prepend(str(old))
    assert not caps.torch_env_fraction_supported()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in lease_env(_lease(uuids=("GPU-aaaa",)), base={}, totals=totals)


def test_lease_env_from_a_real_lease_uses_backend_totals() -> None:
    lease = chronos.reserve("8G", "10m", device=1, bind=False)
    env = lease.env(base={})
    assert env["CUDA_VISIBLE_DEVICES"] == lease.device_uuids[0]
    assert float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) == pytest.approx(
        (8 * GIB - 768 * MIB) / (80 * GIB), abs=1e-6
    )


def test_apply_caps_without_frameworks_sets_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in (
        "XLA_PYTHON_CLIENT_MEM_FRACTION",
        "XLA_PYTHON_CLIENT_PREALLOCATE",
        "CUPY_GPU_MEMORY_LIMIT",
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
        "CHRONOS_LEASE_ID",
        "TF_FORCE_GPU_ALLOW_GROWTH",
    ):
        monkeypatch.delenv(key, raising=False)
    lease = chronos.reserve("8G", "10m", bind=False)
    done = apply_caps(lease.record, _totals(), modules={})
    assert os.environ["CHRONOS_LEASE_ID"] == lease.id
    assert os.environ["CUDA_VISIBLE_DEVICES"] == lease.device_uuids[0]
    assert os.environ["CUPY_GPU_MEMORY_LIMIT"] == str(8 * GIB - 768 * MIB)
    assert any(line.startswith("jax: XLA_PYTHON_CLIENT_MEM_FRACTION=") for line in done)
    assert any(line.startswith("cupy: CUPY_GPU_MEMORY_LIMIT=") for line in done)


def test_apply_caps_reports_an_imported_jax_as_not_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUPY_GPU_MEMORY_LIMIT", raising=False)
    lease = chronos.reserve("8G", "10m", bind=False)
    done = apply_caps(lease.record, _totals(), modules={"jax": object()})
    assert "jax: already imported; its memory fraction is read only at start, not capped" in done
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # a started framework keeps its devices
    assert not any(line.startswith("jax: XLA_") for line in done)


# --------------------------------------------------------------------------- MPS


def test_mps_limit_by_index_as_the_child_sees_it() -> None:
    assert mps.merge_limit(None, 2, 2 * GIB) == "0=2048M,1=2048M"
    assert mps.merge_limit("0=1G,1=8G", 2, 2 * GIB) == "0=1024M,1=2048M"
    assert mps.merge_limit("0=1073741824,1=junk", 2, 2 * GIB) == "0=1024M,1=2048M"


def test_mps_detected_from_the_control_pipe(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "control")
    status = mps.mps_status({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}, scan_processes=False)
    assert status.active and status.control_pipe and status.pipe_dir == str(tmp_path)
    env = mps.mps_env({"A": "1"}, 1, 2 * GIB, status=status)
    assert env == {"A": "1", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=2048M"}
    # with the process scan, a pipe and no daemon is a stale pipe, not MPS
    stale = mps.mps_status({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)})
    assert not stale.active and stale.notes


def test_no_mps_no_limit(tmp_path: Path) -> None:
    status = mps.mps_status({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)})
    assert not status.active and not status.control_pipe
    assert mps.mps_env({"A": "1"}, 1, GIB, status=status) == {"A": "1"}


def test_cgroup_probe_is_unknown_on_simulated_gpus() -> None:
    assert mps.cgroup_limits_supported(default_engine().backend) is None
