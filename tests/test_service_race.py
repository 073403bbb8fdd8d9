"""Sixteen clients racing through the service while some are killed at random: the audit log replayed
never over-commits a GPU, no lease is lost or doubled, and every killed holder's lease ends within a second."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from tests.conftest import ROOT
from tests.service_fixture import Service
from tests.waiting import wait_for

WORKER = ROOT / "tests" / "service_race_worker.py"
CLIENTS = 16
GIB = 1 << 30
TOTAL = 80 * GIB
ENDS = {"released", "expired", "revoked", "withdrawn"}


def _rows(db: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def test_sixteen_clients_with_random_kills_never_overcommit_nor_lose_a_lease(service: Service,
                                                                             tmp_path: Path) -> None:
    rng = random.Random(11)
    outs = [tmp_path / f"worker-{i}.txt" for i in range(CLIENTS)]
    victims = rng.sample(range(CLIENTS), 6)
    stop = tmp_path / "stop"  # a victim holds a lease until it is killed (or this file appears)
    workers = [subprocess.Popen([sys.executable, str(WORKER), str(out), "60", str(i)]
                                + ([str(stop)] if i in victims else []),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i, out in enumerate(outs)]
    killed: dict[int, float] = {}
    db = service.state_dir / "chronos.db"
    for index in victims:  # killed at random points of their run, once they hold something
        wait_for(lambda i=index: workers[i].poll() is not None or "granted" in outs[i].read_text()
                 if outs[i].exists() else False, timeout=60)
        time.sleep(rng.random() * 0.2)
        assert workers[index].poll() is None, workers[index].communicate()[1]  # a victim waits to be killed
        workers[index].send_signal(signal.SIGKILL)
        killed[workers[index].pid] = time.time()
    stop.touch()
    for worker in workers:
        _out, err = worker.communicate(timeout=300)
        assert worker.returncode in (0, -signal.SIGKILL), err

    # every dead holder's lease ended, within a second of the kill, without anyone asking
    pids = ",".join(str(w.pid) for w in workers)
    wait_for(lambda: not _rows(db, f"SELECT seq FROM leases WHERE state = 'active' AND pid IN ({pids})"),
             timeout=10, what="every dead holder's lease to end")
    checked = 0
    for pid, at in killed.items():
        for ended_at, reason in _rows(db, "SELECT ended_at, end_reason FROM leases WHERE pid = ? "
                                          "AND state = 'revoked'", (pid,)):
            assert isinstance(ended_at, float) and ended_at - at < 1.0, (pid, ended_at, at, reason)
            checked += 1
    assert checked >= len(killed) == len(victims), f"{checked} leases revoked for {len(killed)} killed holders"

    # replay the audit log: no instant over-commits a GPU; each lease granted once and ended at most once
    used: Counter[int] = Counter()
    grants: Counter[str] = Counter()
    ends: Counter[str] = Counter()
    sizes: dict[str, tuple[list[int], int]] = {}
    for lease_seq, event, detail in _rows(db, "SELECT lease_seq, event, detail FROM events ORDER BY id"):
        key, info = str(lease_seq), json.loads(str(detail))
        if event == "granted":
            grants[key] += 1
            sizes[key] = (info["devices"], info["memory_bytes"])
            for index in info["devices"]:
                used[index] += info["memory_bytes"]
                assert used[index] <= TOTAL, f"GPU {index} over-committed at lease {key}: {used[index] / GIB} GiB"
        elif event in ENDS and key in sizes:
            ends[key] += 1
            devices, memory = sizes[key]
            for index in devices:
                used[index] -= memory
    assert grants and max(grants.values()) == 1 and max(ends.values(), default=1) == 1

    # nothing lost: every lease a client was told of is in the ledger, with its grant in the log
    told = {line.split()[1] for out in outs if out.exists() for line in out.read_text().splitlines()
            if line.startswith("granted")}
    stored = {str(seq) for (seq,) in _rows(db, "SELECT seq FROM leases")}
    assert told and told <= stored and told <= set(grants)
    released = {line.split()[1] for out in outs if out.exists() for line in out.read_text().splitlines()
                if line.startswith("released")}
    states = dict(_rows(db, "SELECT seq, state FROM leases"))
    assert all(states[int(x)] == "released" for x in released)
    assert not [seq for seq, state in states.items() if state == "active"]  # every worker is gone: all ended
