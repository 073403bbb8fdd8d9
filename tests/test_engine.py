"""The engine and the public API on simulated GPUs, with a real SQLite ledger."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import chronos
from chronos.devices import simulated
from chronos.engine import Engine
from chronos.errors import InvalidRequestError, LeaseNotFoundError, UnavailableError
from chronos.ledger import SCHEMA_VERSION
from tests.waiting import wait_for

GIB = 1 << 30


def test_reserve_defaults_to_least_loaded_device_bound_to_caller() -> None:
    first = chronos.reserve("8G", "2h")
    second = chronos.reserve("8G", "2h")
    assert {first.devices, second.devices} == {(0,), (1,)}
    assert first.pid == os.getpid()
    assert first.memory_bytes == 8 * GIB
    assert first.expires_at is not None and first.expires_at - first.created_at == pytest.approx(7200)
    assert 7190 < first.remaining <= 7200
    assert first.state == "active"
    assert len(first.device_uuids) == 1 and first.device_uuids[0].startswith("GPU-")


def test_default_duration_is_one_hour() -> None:
    lease = chronos.reserve("1G")
    assert lease.duration_s == 3600


def test_admission_never_overcommits_and_says_what_is_free() -> None:
    chronos.reserve("70G", device=0)
    chronos.reserve("70G", device=1)
    with pytest.raises(UnavailableError) as info:
        chronos.reserve("20G")
    message = str(info.value)
    assert "GPU 0: 10 GiB" in message and "GPU 1: 10 GiB" in message
    assert chronos.reserve("10G").devices in ((0,), (1,))


def test_request_that_can_never_fit_is_bad_input() -> None:
    with pytest.raises(InvalidRequestError, match="never fit"):
        chronos.reserve("81G")
    with pytest.raises(InvalidRequestError, match="3 GPUs"):
        chronos.reserve("1G", gpus=3)
    with pytest.raises(InvalidRequestError, match="unknown GPU 7"):
        chronos.reserve("1G", device=7)


def test_gang_is_all_or_nothing() -> None:
    chronos.reserve("60G", device=1)
    with pytest.raises(UnavailableError):
        chronos.reserve("30G", device=[0, 1])
    assert [lease.devices for lease in chronos.leases()] == [(1,)]
    lease = chronos.reserve("20G", gpus=2)
    assert lease.devices == (0, 1)
    assert len(lease.device_uuids) == 2


def test_fraction_resolves_against_device() -> None:
    lease = chronos.reserve("50%", device=0)
    assert lease.memory_bytes == 40 * GIB
    assert chronos.reserve(0.5, device=0).memory_bytes == 40 * GIB
    with pytest.raises(UnavailableError):
        chronos.reserve("1%", device=0)


def test_unmanaged_process_memory_counts_against_admission() -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        simulated.allocate(0, 50 * GIB, pid=holder.pid)
        simulated.allocate(1, 50 * GIB, pid=holder.pid)
        status = {d.index: d for d in chronos.devices()}
        assert status[0].unmanaged_bytes == 50 * GIB
        assert status[0].memory_available_bytes == 30 * GIB
        with pytest.raises(UnavailableError):
            chronos.reserve("40G")
        holder.kill()
        holder.wait()
        assert chronos.reserve("40G").memory_bytes == 40 * GIB
    finally:
        holder.kill()
        holder.wait()


def test_holder_memory_within_its_lease_is_not_counted_twice() -> None:
    lease = chronos.reserve("40G", device=0)
    simulated.allocate(0, 30 * GIB)  # this process is the holder
    try:
        status = {d.index: d for d in chronos.devices()}
        assert status[0].memory_reserved_bytes == 40 * GIB
        assert status[0].unmanaged_bytes == 0
        assert status[0].memory_available_bytes == 40 * GIB
        simulated.allocate(0, 50 * GIB)  # 10 GiB over its lease: that part is unmanaged
        status = {d.index: d for d in chronos.devices()}
        assert status[0].unmanaged_bytes == 10 * GIB
    finally:
        simulated.free(0)
        lease.release()


def test_release_extend_and_context_manager() -> None:
    with chronos.reserve("4G", "10m") as lease:
        end = lease.expires_at
        assert end is not None
        lease.extend("30m")
        assert lease.expires_at == pytest.approx(end + 1800)
        assert chronos.get_lease(lease.id).expires_at == pytest.approx(end + 1800)
    assert lease.state == "released"
    assert chronos.get_lease(lease.id).state == "released"
    assert chronos.leases() == []
    # Releasing twice changes nothing.
    assert chronos.release(lease.id).state == "released"
    with pytest.raises(UnavailableError, match="ended"):
        chronos.extend(lease.id, "1h")


def test_expired_lease_is_reclaimed_by_next_operation() -> None:
    lease = chronos.reserve("70G", "1s", device=0)
    with pytest.raises(UnavailableError):
        chronos.reserve("70G", device=0)
    assert lease.expires_at is not None
    end = lease.expires_at
    wait_for(lambda: time.time() > end, timeout=5, what="the lease's end time")
    again = chronos.reserve("70G", device=0)
    assert chronos.get_lease(lease.id).state == "expired"
    assert again.state == "active"
    assert lease.state == "active"  # the local copy is stale until refreshed
    assert lease.refresh().state == "expired"
    assert lease.remaining == 0


def test_lease_of_dead_holder_is_revoked() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import chronos, sys, time; l = chronos.reserve('70G', device=0); print(l.id, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    assert child.stdout is not None
    lease_id = child.stdout.readline().strip()
    assert chronos.get_lease(lease_id).state == "active"
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    lease = chronos.get_lease(lease_id)
    assert lease.state == "revoked"
    assert "exited" in (lease.end_reason or "")


def test_unbound_lease_outlives_its_creator_and_bind_attaches_a_holder() -> None:
    lease = chronos.reserve("1G", bind=False)
    assert lease.pid is None
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lease.bind(sleeper.pid)
        assert lease.pid == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()
    assert chronos.get_lease(lease.id).state == "revoked"
    with pytest.raises(InvalidRequestError, match="no running process"):
        chronos.reserve("1G", bind=2**22 + 12345)


def test_ids_are_short_and_never_reused() -> None:
    ids = []
    for _ in range(5):
        lease = chronos.reserve("1G")
        ids.append(lease.id)
        lease.release()
    assert ids == sorted(set(ids), key=int)
    assert all(len(i) <= 3 for i in ids)
    assert chronos.get_lease(f"L{ids[0]}").id == ids[0]
    with pytest.raises(LeaseNotFoundError):
        chronos.get_lease("999")
    with pytest.raises(LeaseNotFoundError):
        chronos.get_lease("abc")


def test_audit_log_records_every_event(chronos_env: Path) -> None:
    engine = Engine()
    lease = engine.reserve("2G", "1h")
    engine.extend(lease.id, "10m")
    engine.release(lease.id)
    kinds = [e.event for e in engine.events(lease_id=lease.id)]
    assert kinds == ["granted", "extended", "released"]
    event = engine.events(lease_id=lease.id)[0]
    assert event.user and event.uid == os.getuid() and event.pid == os.getpid()
    assert engine.ledger.schema_version == SCHEMA_VERSION
    assert engine.ledger.integrity_check() == "ok"


def test_wait_is_granted_when_capacity_frees() -> None:
    blocker = chronos.reserve("70G", "2s", device=0)
    start = time.time()
    lease = chronos.reserve("70G", device=0, wait=10)
    assert lease.state == "active"
    assert time.time() - start >= 1.0
    assert chronos.get_lease(blocker.id).state == "expired"
    with pytest.raises(UnavailableError, match="gave up"):
        chronos.reserve("70G", device=0, wait=0.5)
    assert chronos.leases(all=True)[0].state == "withdrawn"


def test_partitioner_compatibility() -> None:
    partitioner = chronos.Partitioner()
    assert chronos.is_stub_mode() is True
    with partitioner.create(device=0, memory=0.5, duration=3600) as partition:
        assert partition.device_index == 0
        assert partition.memory_fraction == pytest.approx(0.5)
        assert partition.duration_seconds == 3600
        assert isinstance(partition.time_remaining, int) and 3590 < partition.time_remaining <= 3600
        assert partitioner.get_available(0) == pytest.approx(50.0)
        listed = partitioner.list()
        assert [p.partition_id for p in listed] == [partition.partition_id]
        assert listed[0].active and listed[0].username and listed[0].process_id == os.getpid()
        assert listed[0].time_remaining_seconds > 3500
    assert partitioner.get_available(0) == pytest.approx(100.0)
    other = partitioner.create(device=1, memory=0.25, duration=60)
    assert partitioner.release(other.partition_id) is True
    for memory, duration in [(0, 60), (1.5, 60), (-0.1, 60), (0.5, 0), (0.5, -5)]:
        with pytest.raises(chronos.ChronosError):
            partitioner.create(device=0, memory=memory, duration=duration)
