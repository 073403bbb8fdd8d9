"""Watching the ledger from outside during a race: no instant may over-commit a GPU."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from chronos.engine import Engine

ENDED = {"released", "expired", "revoked"}


def _poll(db: Path, total: int, stop: threading.Event, seen: list[str]) -> None:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        while not stop.is_set():
            rows = conn.execute("SELECT devices, memory_bytes FROM leases WHERE state = 'active'").fetchall()
            used: Counter[int] = Counter()
            for devices, memory in rows:
                for index in json.loads(devices):
                    used[index] += memory
            seen.extend(f"GPU {i}: {n} > {total}" for i, n in used.items() if n > total)
            time.sleep(0.005)
    finally:
        conn.close()


@contextmanager
def overcommit_watch(db: Path, total: int) -> Iterator[list[str]]:
    """Poll the ledger read-only from another connection while the block runs; yields the
    over-commits seen (filled in as they happen)."""
    stop, seen = threading.Event(), []  # type: ignore[var-annotated]
    monitor = threading.Thread(target=_poll, args=(db, total, stop, seen))
    monitor.start()
    try:
        yield seen
    finally:
        stop.set()
        monitor.join()


def replay(engine: Engine, total: int) -> tuple[dict[int, int], list[str]]:
    """Walk the audit log in commit order: the highest bytes held per GPU, and any over-commit."""
    held: dict[str, tuple[list[int], int]] = {}
    now: Counter[int] = Counter()
    peak: Counter[int] = Counter()
    over: list[str] = []
    for event in sorted(engine.events(), key=lambda e: e.id):
        if event.event == "granted":
            devices, nbytes = list(event.detail["devices"]), int(event.detail["memory_bytes"])
            assert event.lease_id not in held, f"lease {event.lease_id} granted twice"
            held[event.lease_id] = (devices, nbytes)
            for index in devices:
                now[index] += nbytes
                peak[index] = max(peak[index], now[index])
                if now[index] > total:
                    over.append(f"event {event.id}: GPU {index} at {now[index]}")
        elif event.event in ENDED and event.lease_id in held:
            devices, nbytes = held.pop(event.lease_id)
            for index in devices:
                now[index] -= nbytes
    assert not held, f"leases granted and never ended: {sorted(held)}"
    return dict(peak), over
