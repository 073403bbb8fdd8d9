"""History through the service: every answer holds one bounded page, a client pages through to the whole,
long reads of history hold no one's writes, and one user's many reads take no other user's workers."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import chronos
from chronos.api import default_engine
from chronos.ledger import Ledger
from chronos.service.protocol import MAX_ROWS
from chronos.service.workers import FairWorkers
from tests.service_fixture import Service
from tests.test_service_protocol import _raw

ENDED = 2 * MAX_ROWS + 37


def _fill(db: Path, ended: int) -> None:
    """Ended leases and their audit lines written straight into the ledger, as months of use leave them."""
    now = time.time()
    conn = sqlite3.connect(db)
    with conn:
        first = (conn.execute("SELECT MAX(seq) FROM leases").fetchone()[0] or 0) + 1
        for seq in range(first, first + ended):
            end = now - 86400 + seq
            # Each was booked ahead, in pairs for the same start and in an order of starts unlike the ids'.
            starts = now - 86400 - (seq // 2) * (1 if seq % 4 < 2 else -1)
            conn.execute("INSERT INTO leases (seq, uid, owner, devices, device_uuids, memory_bytes, created_at, "
                         "started_at, expires_at, duration_s, priority, state, ended_at, end_reason, starts_at) "
                         "VALUES (?, 0, 'root', '[0]', '[\"GPU-0\"]', ?, ?, ?, ?, 3600, 'normal', 'released', ?, "
                         "'released', ?)", (seq, 1 << 30, end - 60, end - 60, end + 3540, end, starts))
            conn.execute("INSERT INTO events (at, lease_seq, event, uid, user, pid, detail) VALUES "
                         "(?, ?, 'granted', 0, 'root', 1, ?)", (end - 60, seq, json.dumps({"devices": [0]})))
            conn.execute("INSERT INTO events (at, lease_seq, event, uid, user, pid, detail) VALUES "
                         "(?, ?, 'released', 0, 'root', 1, ?)", (end, seq, json.dumps({"ended_at": end})))
    conn.close()


def _ledger_ids(db: Path, sql: str) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return [str(row[0]) for row in conn.execute(sql)]
    finally:
        conn.close()


def test_history_comes_a_bounded_page_at_a_time_and_the_client_pages_through_it(service: Service) -> None:
    db = service.state_dir / "chronos.db"
    chronos.leases()  # the ledger exists
    _fill(db, ENDED)
    live = chronos.reserve("1G", "1h", bind=False)
    newest_first = _ledger_ids(db, "SELECT seq FROM leases ORDER BY seq DESC")
    assert len(newest_first) == ENDED + 1

    # A raw client asking for everything gets one page: the newest MAX_ROWS, and the next after it.
    for args in ({"all": True}, {"all": True, "limit": 10 * MAX_ROWS}, {"ended_since": 0}):
        code, answer = _raw(service, "leases", args)
        assert code == 0 and [x["id"] for x in answer["result"]] == newest_first[:MAX_ROWS], args  # type: ignore
    code, answer = _raw(service, "leases", {"all": True, "before": newest_first[MAX_ROWS - 1]})
    assert code == 0 and [x["id"] for x in answer["result"]] == newest_first[MAX_ROWS:2 * MAX_ROWS]  # type: ignore
    lines = _ledger_ids(db, "SELECT id FROM events ORDER BY id")
    code, answer = _raw(service, "events")
    assert code == 0 and [x["id"] for x in answer["result"]] == [int(i) for i in lines[:MAX_ROWS]]  # type: ignore
    code, answer = _raw(service, "events", {"after": int(lines[MAX_ROWS - 1]), "limit": 3})
    assert code == 0 and [x["id"] for x in answer["result"]] == [int(i) for i in lines[MAX_ROWS:MAX_ROWS + 3]]  # type: ignore

    # The Python API (through the service's client) pages through to exactly what the ledger holds.
    assert [lease.id for lease in chronos.leases(all=True, limit=None)] == newest_first
    assert [lease.id for lease in chronos.leases(all=True, limit=MAX_ROWS + 5)] == newest_first[:MAX_ROWS + 5]
    assert [lease.id for lease in default_engine().leases(ended_since=0)] == newest_first
    assert [str(e.id) for e in default_engine().events()] == lines
    window = _ledger_ids(db, f"SELECT id FROM events WHERE at >= {time.time() - 3600} ORDER BY id")
    assert [str(e.id) for e in default_engine().events(since=time.time() - 3600)] == window
    booked = _ledger_ids(db, "SELECT seq FROM leases WHERE starts_at IS NOT NULL ORDER BY starts_at, seq")
    assert len(booked) == ENDED
    code, answer = _raw(service, "bookings", {"all": True})
    assert code == 0 and [x["id"] for x in answer["result"]] == booked[:MAX_ROWS]  # type: ignore
    assert [lease.id for lease in chronos.bookings(all=True)] == booked
    report = chronos.report("2d")
    assert report.total.leases == ENDED + 1
    live.release()


def test_a_history_read_apart_neither_waits_for_a_write_nor_misses_its_own(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    _fill(ledger.path, 3)
    ledger.read_history_apart()
    writing, done = threading.Event(), threading.Event()
    seen_inside: list[int] = []

    def writer() -> None:
        with ledger.transaction():
            ledger._conn.execute("INSERT INTO events (at, lease_seq, event, uid, user, pid, detail) VALUES "
                                 "(?, 1, 'noted', 0, 'root', 1, '{}')", (time.time(),))
            seen_inside.append(len(ledger.events()))  # its own uncommitted line, read on its own connection
            writing.set()
            done.wait(30)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert writing.wait(30)
        # Another thread reads the committed log at once, while the write holds the connection's lock.
        reader: list[int] = []
        other = threading.Thread(target=lambda: reader.append(len(ledger.events())))
        other.start()
        other.join(10)
        assert reader == [6] and seen_inside == [7]
    finally:
        done.set()
        thread.join(30)
    assert len(ledger.events()) == 7  # committed: seen apart too
    ledger.close()


def test_one_users_many_jobs_hold_at_most_two_workers_and_another_user_runs_at_once() -> None:
    pool = ThreadPoolExecutor(max_workers=4)
    workers = FairWorkers(pool)
    gate, lock = threading.Event(), threading.Lock()
    running: dict[int, int] = {}
    most: dict[int, int] = {}
    finished: list[int] = []

    def job(uid: int) -> None:
        with lock:
            running[uid] = running.get(uid, 0) + 1
            most[uid] = max(most.get(uid, 0), running[uid])
        if uid == 1000:
            gate.wait(30)
        with lock:
            running[uid] -= 1
            finished.append(uid)

    try:
        for _ in range(6):
            workers.submit(1000, lambda: job(1000))
        assert workers.queued(1000) == 4
        other = threading.Event()
        workers.submit(2000, lambda: (job(2000), other.set()))
        assert other.wait(10), "another user's job waited behind the first user's"
        assert finished == [2000]
        gate.set()
        deadline = time.monotonic() + 30
        while len(finished) < 7 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(finished) == [1000] * 6 + [2000] and most[1000] == 2 and workers.queued(1000) == 0
    finally:
        gate.set()
        pool.shutdown(wait=True)


@pytest.mark.parametrize("args", [{"after": -1}, {"limit": -5}, {"after": "x"}])
def test_bad_pages_are_refused_in_one_line(service: Service, args: dict[str, object]) -> None:
    code, answer = _raw(service, "events", args)
    assert code == 2 and answer["error"]["code"] == "bad_input"  # type: ignore[index]


def test_the_protocol_reference_gives_the_page_and_worker_limits_the_service_keeps() -> None:
    from chronos.service.server import WORKERS
    from chronos.service.workers import PER_USER

    text = " ".join((Path(__file__).parents[1] / "docs" / "protocol.md").read_text().split())
    words = {2: "two", 4: "four"}
    assert f"holds at most **{MAX_ROWS:,}** rows" in text
    assert f"run on {words[WORKERS]} workers" in text and f"hold at most **{words[PER_USER]}** of them" in text
