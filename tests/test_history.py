"""Bounded history: retention pruned in small batches, ``list --all`` a page at a time, advice and figures
reading only the window they need."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

import chronos
from chronos import stats
from chronos.api import default_engine
from chronos.ledger import DB_NAME
from chronos.policy import retention
from tests.conftest import run_cli

DAY = 86400.0


def _backdate(state: Path, ids: list[str], days: float) -> None:
    """Make leases (and their audit lines) look as if they ended ``days`` ago."""
    at = time.time() - days * DAY
    conn = sqlite3.connect(state / DB_NAME)
    with conn:
        for lease_id in ids:
            conn.execute("UPDATE leases SET created_at = ?, started_at = ?, ended_at = ? WHERE seq = ?",
                         (at, at, at, int(lease_id)))
    conn.close()


def _ended(n: int, size: str = "1G") -> list[str]:
    out = []
    for _ in range(n):
        lease = chronos.reserve(size, "10m")
        lease.release()
        out.append(lease.id)
    return out


def _counts(state: Path) -> tuple[int, int]:
    conn = sqlite3.connect(state / DB_NAME)
    try:
        return (conn.execute("SELECT COUNT(*) FROM leases").fetchone()[0],
                conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    finally:
        conn.close()


def test_retention_forgets_old_ended_leases_in_batches_and_keeps_live_and_recent_ones(chronos_env: Path) -> None:
    old = _ended(retention.BATCH + 30)
    recent = _ended(3)
    live = chronos.reserve("2G", "1h", bind=False)
    _backdate(chronos_env, old, 200)
    ledger = default_engine().ledger
    before = time.time() - 180 * DAY
    assert ledger.prune(before, retention.BATCH) == retention.BATCH  # one batch, one short write
    assert ledger.prune(before, retention.BATCH) == 30
    assert ledger.prune(before, retention.BATCH) == 0
    kept = {lease.id for lease in chronos.leases(all=True, limit=1000)}
    assert kept == {*recent, live.id}
    # The audit lines of forgotten leases went with them (their own `at` is recent, so only
    # lines older than the cut-off go: here none), and every kept lease still has its own.
    events = {e.lease_id for e in default_engine().events()}
    assert set(recent) | {live.id} <= events


def test_the_newest_lease_is_never_pruned_so_no_id_is_given_twice(chronos_env: Path) -> None:
    ids = _ended(3)
    _backdate(chronos_env, ids, 400)
    assert default_engine().ledger.prune(time.time(), 100) == 2
    fresh = chronos.reserve("1G", "10m")
    assert int(fresh.id) == int(ids[-1]) + 1


def test_the_audit_log_stays_append_only_for_leases_on_file(chronos_env: Path) -> None:
    lease = chronos.reserve("1G", "10m")
    lease.release()
    conn = sqlite3.connect(chronos_env / DB_NAME)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM events WHERE lease_seq = ?", (int(lease.id),))
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE events SET user = 'someone else'")
    finally:
        conn.close()


def test_old_audit_lines_of_forgotten_leases_are_pruned(chronos_env: Path) -> None:
    ids = _ended(5)
    _backdate(chronos_env, ids, 300)
    conn = sqlite3.connect(chronos_env / DB_NAME)
    with conn:  # audit lines written 300 days ago, as a long-lived ledger holds them
        conn.execute("CREATE TEMP TABLE old AS SELECT * FROM events")
        conn.execute("INSERT INTO events (at, lease_seq, event, uid, user, pid, detail) "
                     "SELECT at - 300 * 86400, lease_seq, event, uid, user, pid, detail FROM old")
    conn.close()
    leases_before, events_before = _counts(chronos_env)
    assert default_engine().ledger.prune(time.time() - 180 * DAY, 100) == 4  # not the newest
    leases_after, events_after = _counts(chronos_env)
    assert leases_after == leases_before - 4
    # Each forgotten lease had a grant and a release line back then; the newest lease keeps its own.
    assert events_after == events_before - 8


def test_operations_prune_by_themselves_unless_history_is_kept_for_ever(chronos_env: Path) -> None:
    ids = _ended(4)
    _backdate(chronos_env, ids, 365)
    (chronos_env / "no-config.toml").write_text('[history]\nkeep = "none"\n')
    assert run_cli("list").returncode == 0
    assert _counts(chronos_env)[0] == 4
    (chronos_env / "no-config.toml").write_text('[history]\nkeep = "30d"\n')
    assert run_cli("list").returncode == 0
    assert _counts(chronos_env)[0] == 1  # the newest stays
    (chronos_env / "no-config.toml").write_text('[history]\nkeep = "soon"\n')
    out = run_cli("list")
    assert out.returncode == 2 and "history.keep" in out.stderr and "Traceback" not in out.stderr


def test_list_all_pages_through_history_with_a_default_limit(chronos_env: Path) -> None:
    ids = _ended(57)
    out = run_cli("list", "--all")
    assert out.returncode == 0, out.stderr
    rows = [line.split()[0] for line in out.stdout.splitlines()[1:] if line.split()[0].isdigit()]
    assert rows == [str(i) for i in sorted(map(int, ids), reverse=True)[:50]]
    assert f"--before {rows[-1]}" in out.stdout
    seen, before = [], None
    while True:
        args = ["list", "--all", "--limit", "20", "--json"] + (["--before", before] if before else [])
        import json

        page = json.loads(run_cli(*args).stdout)
        if not page:
            break
        seen += [item["id"] for item in page]
        before = page[-1]["id"]
    assert seen == [str(i) for i in sorted(map(int, ids), reverse=True)]  # each lease once, newest first
    for bad in (["--limit", "0"], ["--limit", "many"], ["--limit", "99999999"]):
        out = run_cli("list", "--all", *bad)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    out = run_cli("list", "--before", "3")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1


def test_advice_and_figures_read_only_their_window(chronos_env: Path) -> None:
    # Old leases that asked for much more than the recent ones: advice must follow the newest 20.
    old = _ended(5, "40G")
    _backdate(chronos_env, old, 10)
    _ended(stats.HISTORY)
    advice = chronos.suggest()
    assert advice.based_on == stats.HISTORY and advice.memory_bytes == 1 << 30
    # The week's figures count only leases held in the week.
    figures = stats.detailed(default_engine())
    week = {u.user: u.leases_week for u in figures.users}
    assert sum(week.values()) == stats.HISTORY
