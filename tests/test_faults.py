"""Faults: a ledger lock held by another process, a full or read-only file system, an emptied ledger.

Each test drives the real thing: another process holding SQLite's write lock, a small tmpfs filled
to the last block, ``chattr +i``, and ``chronos`` commands as subprocesses.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import chronos
from chronos.api import reset_default_engine
from chronos.errors import StateError
from tests.conftest import run_cli
from tests.waiting import wait_for

GIB = 1 << 30
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a file system or set chattr +i")

# Waits for the file named by argv[2], then claims argv[1] bytes of its simulated GPU and sleeps.
ALLOCATE_ON_GO = textwrap.dedent("""
    import os, pathlib, sys, time
    from chronos.devices import get_backend
    from chronos.devices.simulated import allocate
    go = pathlib.Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.02)
    uuid = os.environ["CUDA_VISIBLE_DEVICES"].split(",")[0]
    index = [d.index for d in get_backend().devices() if d.uuid == uuid][0]
    allocate(index, int(sys.argv[1]))
    time.sleep(120)
""")

# Holds the ledger's write lock (BEGIN IMMEDIATE) until a line arrives on stdin.
LOCKER = textwrap.dedent("""
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
    conn.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    sys.stdin.readline()
    conn.execute("ROLLBACK")
""")


@contextmanager
def ledger_locked(db: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holds the ledger's write lock inside the block."""
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(db)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert locker.stdin is not None and locker.stdout is not None
    try:
        assert locker.stdout.readline().strip() == "locked"
        yield locker
    finally:
        if locker.poll() is None:
            locker.stdin.write("\n")
            locker.stdin.flush()
            locker.wait(30)
        locker.stdin.close()
        locker.stdout.close()


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_a_write_waits_out_a_held_lock_for_its_patience_and_no_longer(chronos_env: Path) -> None:
    """A writer tries again while another process holds the write lock: it goes on once the lock is
    freed, and inside ``patience`` it gives up after that wait with the one-line error."""
    engine = chronos.api.default_engine()
    chronos.leases()  # the ledger exists before the other process locks it
    granted: list[chronos.Lease] = []
    with ledger_locked(chronos_env / "chronos.db") as locker:
        started = time.monotonic()
        with engine.patience(0.3), pytest.raises(StateError, match="is locked by another process"):
            chronos.reserve("1G", "1h")
        assert time.monotonic() - started >= 0.3
        writer = threading.Thread(target=lambda: granted.append(chronos.reserve("1G", "1h")))
        writer.start()
        writer.join(0.5)
        assert writer.is_alive() and not granted  # still waiting: the lock is held
        locker.stdin.write("\n")  # type: ignore[union-attr]
        locker.stdin.flush()  # type: ignore[union-attr]
        locker.wait(30)
        writer.join(30)
    assert [lease.refresh().state for lease in granted] == ["active"]
    granted[0].release()


def test_enforcement_goes_on_while_another_process_holds_the_ledger_lock(chronos_env: Path, tmp_path: Path) -> None:
    go, err = tmp_path / "go", tmp_path / "stderr"
    with err.open("w") as stderr:
        run = subprocess.Popen(
            [sys.executable, "-m", "chronos", "run", "1G", "1h", "--grace", "0.3", "--kill-wait", "5", "--",
             sys.executable, "-c", ALLOCATE_ON_GO, str(3 * GIB), str(go)],
            stderr=stderr, stdout=subprocess.DEVNULL,
        )
    try:
        (lease,) = wait_for(lambda: [item for item in chronos.leases() if item.state == "active"],
                            what="the run's lease")
        with ledger_locked(chronos_env / "chronos.db") as locker:
            go.touch()
            # The command is ended over its cap, and the wrapper waits to record its figures, lock and all.
            wait_for(lambda: "recording its usage" in _text(err), timeout=40, what=lambda: _text(err))
            assert run.poll() is None, _text(err)
            assert "ended" not in lease.refresh().state
            locker.stdin.write("\n")  # type: ignore[union-attr]
            locker.stdin.flush()  # type: ignore[union-attr]
            locker.wait(30)
        assert run.wait(60) == 128 + 15, _text(err)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    text = _text(err)
    assert "chronos: ended the command (SIGTERM): GPU " in text and "over the lease's 1 GiB cap" in text
    assert f"chronos: lease {lease.id}: usage recorded" in text
    assert "peak 3 GiB of 1 GiB" in text.strip().splitlines()[-1]
    assert "Traceback" not in text
    ended = lease.refresh()
    assert ended.state == "released" and ended.peak_memory_bytes == 3 * GIB
    notes = [e for e in chronos.api.default_engine().events(lease_id=lease.id) if e.event == "unrecorded"]
    assert len(notes) == 1 and "locked by another process" in notes[0].detail["reason"]


def test_a_watchdog_thread_survives_a_held_lock_and_records_later(chronos_env: Path) -> None:
    from chronos.enforce.watchdog import LedgerTroubleEvent, Watchdog

    lease = chronos.reserve("1G", "1h", bind=True)
    events: list[object] = []
    dog = Watchdog(lease, rate_hz=20, record_s=0.05, refresh_s=0.05, on_event=events.append)
    dog.start()
    try:
        with ledger_locked(chronos_env / "chronos.db"):
            dog.peak_bytes = 5 * GIB  # a figure to record while the lock is held
            wait_for(lambda: any(isinstance(e, LedgerTroubleEvent) and not e.recovered for e in events),
                     what="the watchdog saying the ledger is locked")
            polls = dog.polls
            wait_for(lambda: dog.polls > polls + 5, what="the watchdog polling on under the lock")
        wait_for(lambda: any(isinstance(e, LedgerTroubleEvent) and e.recovered for e in events),
                 what="the watchdog recording again")
        assert not dog.done and dog._thread is not None and dog._thread.is_alive()
        assert lease.refresh().peak_memory_bytes == 5 * GIB
    finally:
        dog.stop()
        lease.release()
    reset_default_engine()


@pytest.fixture
def small_fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 1 MiB tmpfs holding the state directory (as root), unmounted after the test."""
    mount = Path(tempfile.mkdtemp(prefix="faults-mnt-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        monkeypatch.setenv("CHRONOS_STATE_DIR", str(mount / "state"))
        reset_default_engine()
        yield mount
    finally:
        reset_default_engine()
        subprocess.run(["chattr", "-R", "-i", str(mount)], capture_output=True)
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount)], check=True)  # a connection not yet collected
        mount.rmdir()


def _fill(mount: Path) -> Path:
    filler = mount / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@needs_root
def test_a_full_disk_is_said_and_a_release_waits_for_space(small_fs: Path) -> None:
    made = run_cli("reserve", "1G", "1h", "--json")
    assert made.returncode == 0, made.stderr
    lease = json.loads(made.stdout)["id"]
    db = small_fs / "state" / "chronos.db"
    filler = _fill(small_fs)
    full = f"the file system holding ledger {db} is full: free space there, then try again"
    done = run_cli("release", lease)
    assert done.returncode == 1
    assert _one_line(done) == f"chronos: error: lease {lease} is not released (it stays held until a release " \
                              f"succeeds): {full}"
    listed = run_cli("list")
    assert listed.returncode == 1 and _one_line(listed) == f"chronos: error: {full}"
    assert full in _doctor_problems()
    filler.unlink()
    shown = json.loads(run_cli("show", lease, "--json").stdout)
    assert shown["state"] == "active"  # held, as it said, until the release succeeds
    assert run_cli("release", lease).returncode == 0
    assert json.loads(run_cli("show", lease, "--json").stdout)["state"] == "released"


@needs_root
def test_a_read_only_file_system_and_an_immutable_ledger_each_say_so(small_fs: Path) -> None:
    assert run_cli("reserve", "1G", "1h").returncode == 0
    db = small_fs / "state" / "chronos.db"
    subprocess.run(["chattr", "+i", str(db)], check=True)
    done = run_cli("reserve", "1G", "1h")
    assert done.returncode == 1
    assert _one_line(done) == f"chronos: error: cannot write {db}: {db} is immutable (chattr +i); an admin can " \
                              f"run: chattr -i {db}"
    assert f"cannot write {db}: {db} is immutable (chattr +i)" in "\n".join(_doctor_problems())
    subprocess.run(["chattr", "-i", str(db)], check=True)
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    done = run_cli("list")
    assert done.returncode == 1
    assert _one_line(done) == f"chronos: error: cannot use state directory {db.parent}: {db.parent} is on a " \
                              "read-only file system (remount it read-write, or set CHRONOS_STATE_DIR)"
    assert f"{db.parent} is on a read-only file system" in "\n".join(_doctor_problems())
    subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    assert run_cli("list").returncode == 0


@needs_root
def test_a_watchdog_on_a_full_disk_goes_on_says_so_and_records_when_space_returns(small_fs: Path) -> None:
    from chronos.enforce.watchdog import LedgerTroubleEvent, Watchdog

    lease = chronos.reserve("1G", "1h", bind=True)
    events: list[object] = []
    dog = Watchdog(lease, rate_hz=20, record_s=0.05, refresh_s=0.05, on_event=events.append).start()
    try:
        filler = _fill(small_fs)
        dog.peak_bytes = 7 * GIB
        wait_for(lambda: any(isinstance(e, LedgerTroubleEvent) and not e.recovered for e in events),
                 what="the watchdog saying the disk is full")
        (trouble,) = [e for e in events if isinstance(e, LedgerTroubleEvent)]
        assert "is full: free space there" in trouble.message and "enforcement goes on" in trouble.message
        polls = dog.polls
        wait_for(lambda: dog.polls > polls + 5, what="the watchdog polling on with the disk full")
        filler.unlink()
        wait_for(lambda: any(isinstance(e, LedgerTroubleEvent) and e.recovered for e in events),
                 what="the watchdog recording once space returned")
        assert dog._thread is not None and dog._thread.is_alive()
    finally:
        dog.stop()
    assert lease.refresh().peak_memory_bytes == 7 * GIB
    (note,) = [e for e in chronos.api.default_engine().events(lease_id=lease.id) if e.event == "unrecorded"]
    assert "is full" in note.detail["reason"] and note.detail["peak_memory_bytes"] == 7 * GIB
    lease.release()


# Runs the CLI with this process's clock an hour ahead (what a machine or container with a skewed clock does).
SKEWED = textwrap.dedent("""
    import sys, time
    real = time.time
    time.time = lambda: real() + 3600
    from chronos.cli import main
    raise SystemExit(main(sys.argv[1:]))
""")

# Opens the ledger (mapping its -shm), says so, and on a line from stdin tries to write; keeps it open until EOF.
KEEPS_OPEN = textwrap.dedent("""
    import sys
    import chronos
    chronos.leases()
    print("open", flush=True)
    sys.stdin.readline()
    try:
        chronos.reserve("1G", "1h", bind=False)
        print("wrote", flush=True)
    except chronos.StateError as exc:
        print(exc, flush=True)
    sys.stdin.readline()
""")


def _doctor_problems() -> list[str]:
    done = run_cli("doctor", "--json")
    report = json.loads(done.stdout)
    assert done.returncode == (1 if report["problems"] else 0)
    return list(report["problems"])


def test_doctor_reports_a_held_lock_a_skewed_clock_and_removed_wal_files(chronos_env: Path) -> None:
    assert run_cli("reserve", "1G", "1h").returncode == 0
    assert _doctor_problems() == []
    db = chronos_env / "chronos.db"
    with ledger_locked(db):
        (problem,) = _doctor_problems()
        assert problem.startswith(f"ledger {db} is locked by another process")
    skewed = subprocess.run([sys.executable, "-c", SKEWED, "reserve", "1G", "1h", "--json"], capture_output=True,
                            text=True, timeout=60)
    assert skewed.returncode == 0, skewed.stderr
    (problem,) = _doctor_problems()
    # an hour ahead, less the moments between the two processes' readings
    assert re.match(r"2 audit event\(s\) are dated ahead of this machine's clock \(the latest by (59m|1h)",
                    problem), problem
    assert "a process with its clock ahead wrote them" in problem
    keeper = subprocess.Popen([sys.executable, "-c", KEEPS_OPEN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert keeper.stdin is not None and keeper.stdout is not None
    try:
        assert keeper.stdout.readline().strip() == "open"
        for suffix in ("-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        problems = [p for p in _doctor_problems() if "was removed while processes" in p]
        assert problems == [f"{db}{suffix} was removed while processes {keeper.pid} still use it: they and new "
                            "processes no longer see each other's writes; stop those processes (see "
                            "docs/trust-model.md)" for suffix in ("-shm", "-wal")]
        # The process that still has the removed files open refuses to write on into them.
        keeper.stdin.write("\n")
        keeper.stdin.flush()
        assert keeper.stdout.readline().strip() == (
            f"ledger {db}: its -wal or -shm file was removed or replaced while this process had the ledger open, so "
            "its writes would no longer reach other processes; restart this process (see docs/trust-model.md)")
        assert run_cli("reserve", "1G", "1h").returncode == 0  # a new process uses the new files
    finally:
        keeper.stdin.close()
        keeper.wait(30)
        keeper.stdout.close()
