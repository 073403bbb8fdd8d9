"""The ledger file and its directory: safety checks, schema version, the append-only audit log."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

import chronos
from chronos.config import Config
from chronos.errors import StateError
from chronos.ledger import DB_NAME, SCHEMA_VERSION, Ledger
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
