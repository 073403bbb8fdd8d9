"""Holder identity: start ticks and the boot id, never the wall clock; pid namespaces never judge each other."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import chronos
from chronos import procs
from chronos.ledger import DB_NAME, MIGRATIONS, SCHEMA_VERSION, Ledger
from tests.conftest import run_cli

needs_unshare = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                   reason="needs root and unshare(1) for namespaces")


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield child
    child.kill()
    child.wait()


def _stat_ticks(pid: int) -> int:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return int(data[data.rfind(b")") + 2:].split()[19])


def test_a_process_is_known_by_its_start_tick(sleeper: subprocess.Popen[bytes]) -> None:
    assert procs.start_time(sleeper.pid) == _stat_ticks(sleeper.pid)
    assert procs.start_ticks(b"42 (a) b) c) S " + b"0 " * 18 + b"12345 6 7") == 12345
    assert procs.start_ticks(b"42 (zombie) Z " + b"0 " * 18 + b"12345") is None
    lease = chronos.reserve("1G", "1h", bind=sleeper.pid)
    assert lease.pid_start == _stat_ticks(sleeper.pid)


def test_this_process_is_known_without_reading_proc_and_by_the_same_start() -> None:
    """The writer itself, as the holder of the lease it releases, is known alive from its own start read once;
    another start under its pid is still another process, and a forked child is read afresh."""
    me = procs.caller()
    assert procs.is_alive(os.getpid(), me[1]) and procs.is_alive(os.getpid(), None)
    assert not procs.is_alive(os.getpid(), me[1] + 100)
    assert procs.start_time(os.getpid()) == me[1]
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child's own pid, its own start: not the parent's cached one
        os.close(read)
        ok = procs.is_alive(os.getpid(), procs.start_time(os.getpid())) and not procs.is_alive(os.getpid(), me[1] - 1e6)
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.waitpid(child, 0)
    os.close(read)
    assert answer == b"1"


def test_a_lease_stays_held_when_the_boot_time_reading_moves(
    sleeper: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    lease = chronos.reserve("1G", "1h", bind=sleeper.pid)
    # What a clock step does to the boot time the kernel reports (/proc/stat's btime, psutil.boot_time).
    stepped = procs.legacy_boot_time() + 7
    monkeypatch.setattr(procs, "_boot_time", stepped, raising=False)
    monkeypatch.setattr(psutil, "boot_time", lambda: stepped)
    assert procs.is_alive(sleeper.pid, lease.pid_start)
    assert [item.id for item in chronos.leases()] == [lease.id]
    assert lease.refresh().state == "active"


@needs_unshare
def test_a_time_namespace_sees_the_same_holders(sleeper: subprocess.Popen[bytes]) -> None:
    """Inside ``unshare --time`` the boot time reads an hour earlier and start ticks an hour later."""
    lease = chronos.reserve("1G", "1h", bind=sleeper.pid)
    code = f"from chronos import procs; print(procs.legacy_boot_time(), procs.start_time({sleeper.pid}))"
    inside = subprocess.run(["unshare", "--time", "--boottime", "3600", sys.executable, "-c", code],
                            capture_output=True, text=True, timeout=60)
    assert inside.returncode == 0, inside.stderr
    boot, start = inside.stdout.split()
    assert float(boot) == procs.legacy_boot_time() - 3600  # the reading really moved there
    assert float(start) == lease.pid_start
    listed = subprocess.run(["unshare", "--time", "--boottime", "3600", sys.executable, "-m", "chronos", "list",
                             "--json"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert [(item["id"], item["state"]) for item in json.loads(listed.stdout)] == [(lease.id, "active")]
    assert lease.refresh().state == "active"


def test_starts_stored_as_clock_times_are_migrated_to_ticks(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    """A ledger of schema 5 stored boot time + start tick: opened now, its live holder is still held."""
    conn = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    for migration in MIGRATIONS[:5]:
        for statement in migration:
            assert isinstance(statement, str)
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 5")
    old_start = procs.legacy_boot_time() + _stat_ticks(sleeper.pid) / os.sysconf("SC_CLK_TCK")
    conn.execute(
        "INSERT INTO leases (uid, owner, devices, device_uuids, memory_bytes, created_at, started_at, expires_at, "
        "duration_s, priority, state, pid, pid_start) VALUES (?, 'me', '[0]', '[\"GPU-sim-0\"]', 1073741824, "
        "strftime('%s','now'), strftime('%s','now'), strftime('%s','now') + 3600, 3600, 'normal', 'active', ?, ?)",
        (os.getuid(), sleeper.pid, old_start))
    conn.close()
    ledger = Ledger(tmp_path)
    assert ledger.schema_version == SCHEMA_VERSION
    (record,) = ledger.live()
    assert record.pid_start == _stat_ticks(sleeper.pid)
    assert ledger.host_facts()["boot_id"] == procs.boot_id()
    ledger.close()
    engine = chronos.Engine(state_dir=tmp_path)
    assert [item.state for item in engine.leases()] == ["active"]
    engine.close()


def test_holders_from_an_earlier_boot_are_let_go(chronos_env: Path, sleeper: subprocess.Popen[bytes]) -> None:
    lease = chronos.reserve("1G", "1h", bind=sleeper.pid)
    chronos.api.reset_default_engine()
    conn = sqlite3.connect(chronos_env / DB_NAME)
    with conn:
        conn.execute("UPDATE host SET value = 'an-earlier-boot' WHERE key = 'boot_id'")
    conn.close()
    ended = chronos.get_lease(lease.id)
    assert ended.state == "revoked" and ended.end_reason == f"holder process {sleeper.pid} exited"


@needs_unshare
def test_another_pid_namespace_is_refused_and_judges_nobody(chronos_env: Path, sleeper: subprocess.Popen[bytes]
                                                             ) -> None:
    lease = chronos.reserve("1G", "1h", bind=sleeper.pid)
    events = len(chronos.api.default_engine().events())
    host_ns = os.readlink("/proc/self/ns/pid")
    for argv in (("list",), ("reserve", "1G", "1h"), ("release", lease.id), ("stats",)):
        done = subprocess.run(["unshare", "--fork", "--pid", "--mount-proc", sys.executable, "-m", "chronos", *argv],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 3, (argv, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert lines[0].startswith("chronos: error: this process is in a different pid namespace (pid:[")
        assert f"from the ledger's ({host_ns}), so it cannot tell which lease holders are alive; use the Chronos " \
               "service (chronos serve)" in lines[0]
    assert lease.refresh().state == "active"
    assert len(chronos.api.default_engine().events()) == events  # nothing was written from the other namespace
    assert run_cli("list").returncode == 0
