"""The ledger file and its directory: safety checks, schema version, the append-only audit log."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import chronos
from chronos.config import Config
from chronos.errors import StateError
from chronos.ledger import BUSY_TIMEOUT_MS, DB_NAME, QUEUE_LOCK_WAIT_S, SCHEMA_VERSION, Ledger, patience, queue_patience
from chronos.ledger_faults import patience_ms
from chronos.state import state_dir
from tests.conftest import run_cli


def test_wal_mode_and_schema_version(chronos_env: Path) -> None:
    chronos.reserve("1G")
    conn = sqlite3.connect(chronos_env / DB_NAME)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_audit_log_is_append_only(chronos_env: Path) -> None:
    chronos.reserve("1G").release()
    conn = sqlite3.connect(chronos_env / DB_NAME)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE events SET user = 'someone else'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM events")
    finally:
        conn.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Ledger(tmp_path).close()
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StateError, match="upgrade Chronos"):
        Ledger(tmp_path)


def test_an_emptied_ledger_is_refused_not_started_afresh(chronos_env: Path) -> None:
    assert run_cli("reserve", "1G", "1h").returncode == 0
    (chronos_env / DB_NAME).write_bytes(b"")  # truncated under its leases
    out = run_cli("list")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"chronos: error: ledger {chronos_env / DB_NAME} is empty (0 bytes): it was truncated or made by hand, and "
        "Chronos will not start it afresh over leases it may have held; restore it from a backup, or remove it if "
        "no lease matters (see docs/trust-model.md)"]
    assert (chronos_env / DB_NAME).stat().st_size == 0


def test_a_new_ledger_is_never_seen_half_made(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    assert ledger.schema_version == SCHEMA_VERSION
    ledger.close()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(DB_NAME)) == []


def test_corrupt_file_is_a_clear_error(chronos_env: Path) -> None:
    (chronos_env / DB_NAME).write_bytes(b"this is not a database" * 100)
    out = run_cli("list")
    assert out.returncode == 1
    assert "unusable" in out.stderr and "Traceback" not in out.stderr


def test_symlinked_state_file_is_refused(chronos_env: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.db"
    target.touch()
    (chronos_env / DB_NAME).symlink_to(target)
    out = run_cli("list")
    assert out.returncode == 1
    assert "symlink" in out.stderr and "Traceback" not in out.stderr


def test_symlinked_state_dir_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(StateError, match="symlink"):
        state_dir(Config(state_dir=link, state_dir_explicit=True))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown a file to another owner")
def test_foreign_owned_state_file_is_refused(chronos_env: Path) -> None:
    db = chronos_env / DB_NAME
    db.touch()
    os.chown(db, 4242, 4242)
    out = run_cli("list")
    assert out.returncode == 1
    assert "owned by uid 4242" in out.stderr


def test_default_directory_is_created_shared(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    state_dir(Config(state_dir=shared, state_dir_explicit=False))
    assert shared.stat().st_mode & 0o7777 == 0o1777
    private = tmp_path / "private"
    state_dir(Config(state_dir=private, state_dir_explicit=True))
    assert private.stat().st_mode & 0o777 == 0o700
    ledger = Ledger(private)
    assert (private / DB_NAME).stat().st_mode & 0o777 == 0o600
    ledger.close()


def test_processes_that_find_no_ledger_at_once_agree_on_one(tmp_path: Path) -> None:
    """Twelve processes start on a directory with no ledger: one ledger is linked into place, none is refused."""
    import subprocess
    import sys

    state = tmp_path / "fresh"
    env = {**os.environ, "CHRONOS_STATE_DIR": str(state)}
    go = tmp_path / "go"
    code = ("import pathlib, sys, time\n"
            "while not pathlib.Path(sys.argv[1]).exists(): time.sleep(0.001)\n"
            "from chronos.cli import main\n"
            "raise SystemExit(main(['reserve', '1G', '1h']))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(go)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(12)]
    go.touch()
    results = [(p.wait(120), p.communicate()) for p in procs]
    assert all(code == 0 for code, _ in results), [err for _, (_, err) in results]
    engine = chronos.Engine(state_dir=state)
    assert sorted(int(lease.id) for lease in engine.leases()) == list(range(1, 13))
    engine.close()
    assert [p.name for p in state.iterdir() if p.name.startswith(".")] == []


#: A writer whose BEGIN waits for the lock when SIGUSR1 arrives; its handler raises, as the CLI's does for
#: SIGTERM, the moment BEGIN returns. Then it writes again. It waits for a line before it begins (the lock
#: is taken then) and another before it exits.
_STOPPED_IN_BEGIN = """
import signal, sys
from chronos.ledger import Ledger
ledger = Ledger(sys.argv[1])
with ledger.transaction():  # open, before the blocker takes the lock
    pass
seen = []
class Stop(BaseException):
    pass
def stop(signum, frame):
    seen.append(ledger._conn.in_transaction)
    raise Stop
signal.signal(signal.SIGUSR1, stop)
print("open", flush=True)
sys.stdin.readline()  # the lock is taken now
try:
    with ledger.transaction():
        print("the body ran", flush=True)
except Stop:
    pass
print("stopped with its transaction begun" if seen == [True] else f"stopped elsewhere: {seen}", flush=True)
try:
    with ledger.transaction():
        pass
    print("the next write went through", flush=True)
except Exception as exc:
    print(f"the next write failed: {exc}", flush=True)
sys.stdin.readline()
"""


def test_a_stop_raised_as_begin_returns_leaves_no_transaction_open(tmp_path: Path) -> None:
    """A signal that arrives while a write waits for the lock is raised when BEGIN returns: that transaction is
    rolled back like any other, so the process's next write (a waiting command withdrawing its request as it
    stops) goes through, and the lock is free for everyone else."""
    Ledger(tmp_path).close()
    blocker = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    with subprocess.Popen([sys.executable, "-c", _STOPPED_IN_BEGIN, str(tmp_path)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as writer:
        assert writer.stdout is not None and writer.stdin is not None
        try:
            assert writer.stdout.readline() == "open\n"
            blocker.execute("BEGIN IMMEDIATE")
            writer.stdin.write("\n")
            writer.stdin.flush()
            time.sleep(0.5)  # its BEGIN is waiting for the blocker's lock
            writer.send_signal(signal.SIGUSR1)
            time.sleep(0.2)
            blocker.execute("ROLLBACK")
            assert writer.stdout.readline() == "stopped with its transaction begun\n"
            assert writer.stdout.readline() == "the next write went through\n"
            blocker.execute("BEGIN IMMEDIATE")  # while the writer still runs: it holds no lock
            blocker.execute("ROLLBACK")
            writer.stdin.write("\n")
            writer.stdin.flush()
            assert writer.wait(timeout=30) == 0
        finally:
            if writer.poll() is None:
                writer.kill()
            blocker.close()


def test_a_transaction_left_open_on_the_connection_is_rolled_back_by_the_next_write(tmp_path: Path) -> None:
    """However a stop left this connection inside a transaction, the next write starts afresh: what the open one
    did is not committed with it, and the write itself goes through."""
    ledger = Ledger(tmp_path)
    try:
        with ledger.transaction():
            pass
        ledger._conn.execute("BEGIN IMMEDIATE")  # as a stop at the wrong moment would leave it
        ledger._conn.execute("INSERT INTO host (key, value) VALUES ('left-open', 'x')")
        with ledger.transaction():
            ledger._conn.execute("INSERT INTO host (key, value) VALUES ('next', 'y')")
        other = sqlite3.connect(tmp_path / DB_NAME)
        try:
            keys = {row[0] for row in other.execute("SELECT key FROM host")}
        finally:
            other.close()
        assert "next" in keys and "left-open" not in keys
    finally:
        ledger.close()


@pytest.mark.parametrize(("wait_s", "expected_s"), [(5.0, BUSY_TIMEOUT_MS / 1000), (-3.0, BUSY_TIMEOUT_MS / 1000),
                                                    (120.0, 120.0), (float("inf"), QUEUE_LOCK_WAIT_S)])
def test_a_request_that_may_wait_in_the_queue_waits_as_long_for_the_lock(wait_s: float, expected_s: float) -> None:
    """A waiting request's writes wait for the lock as long as it may still wait (within a bound), never less than
    the ledger's own wait; a shorter patience already set (the watchdog's) stands."""
    assert patience_ms() is None
    with queue_patience(wait_s):
        assert patience_ms() == int(expected_s * 1000)
    assert patience_ms() is None
    with patience(2.0), queue_patience(wait_s):
        assert patience_ms() == 2000
