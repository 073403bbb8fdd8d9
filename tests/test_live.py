"""The open leases a write keeps between writes (chronos/live.py) stay equal to the ledger's rows, while other
processes write, leases expire, queued waiters die and this process writes itself; and cached sums never let
a device be over-committed."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from chronos import scheduler
from chronos.engine import Engine
from chronos.errors import UnavailableError
from chronos.model import LeaseState
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "race_worker.py"
ACTIVE, QUEUED = LeaseState.ACTIVE, LeaseState.QUEUED


def _check_view(engine: Engine) -> int:
    """Inside one write (nobody else writes meanwhile): the kept view against the rows read now."""
    with engine.ledger.transaction():
        now = time.time()
        view = engine._synced()
        truth = engine.ledger.in_states(ACTIVE, QUEUED)
        live, _ = view.open_leases()
        assert live == truth
        active = [r for r in truth if r.state == ACTIVE]
        assert sorted(h.lease_id for h in view.holdings()) == sorted(r.id for r in active)
        held: dict[int, int] = {}
        for r in active:
            for index in r.devices:
                held[index] = held.get(index, 0) + r.memory_bytes
        assert dict(view.held()) == {i: n for i, n in held.items() if n}
        assert [r.id for r in view.queued()] == [r.id for r in truth if r.state == QUEUED]
        assert [r.id for r in view.holders()] == [r.id for r in active if r.pid is not None]
        assert [r.id for r in view.waiters()] == [r.id for r in truth if r.pid is not None and r.state == QUEUED]
        assert sorted(r.id for r in view.expired(now)) == \
            sorted(r.id for r in active if r.expires_at is not None and r.expires_at <= now)
        devices, procs = engine._poll_devices()
        snap = engine._snapshot(now, devices, procs, live)
        assert snap.held is not None  # the kept sums were used ...
        assert scheduler._free_now(snap) == scheduler._free_now(replace(snap, held=None))  # ... and are right
        return len(truth)


def test_the_kept_view_equals_the_ledger_while_others_write(tmp_path: Path, chronos_env: Path) -> None:
    engine = Engine()
    engine.leases()
    other = Engine(settings=engine.settings.with_state_dir(chronos_env))  # a second connection, same process
    assert other.ledger is not engine.ledger
    workers = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / f"w{i}.txt"), "60", str(i)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
               for i in range(2)]
    waiter = subprocess.Popen([sys.executable, "-m", "chronos", "reserve", "80G", "10m", "--wait", "5m"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rng = random.Random(7)
    mine: list[str] = []
    try:
        step = 0
        killed = False
        while (step < 150 or not killed or any(w.poll() is None for w in workers)) and step < 3000:  # all along
            step += 1
            actor = engine if rng.random() < 0.7 else other
            choice = rng.random()
            try:
                if choice < 0.45 or not mine:
                    duration = "1s" if rng.random() < 0.2 else "10m"
                    mine.append(actor.reserve(rng.choice(["1G", "5G", "12%"]), duration, bind=False,
                                              device=rng.choice([0, 1, None])).id)
                elif choice < 0.8:
                    actor.release(mine.pop(rng.randrange(len(mine))))
                else:
                    actor.extend(rng.choice(mine), "1m")
            except UnavailableError:
                pass
            if not killed and any(r.pid == waiter.pid for r in engine.ledger.in_states(ACTIVE, QUEUED)):
                waiter.kill()  # a waiter (or holder) that dies: its row leaves through the holders' check
                waiter.wait()
                killed = True
            _check_view(engine)
            _check_view(other)
    finally:
        for proc in (waiter, *workers):
            if proc.poll() is None and proc is waiter:
                proc.kill()
            try:
                proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    for worker in workers:
        assert worker.returncode == 0
    engine.leases()  # a read reclaims what is due: the killed waiter's request or lease
    assert any(r.pid == waiter.pid for r in engine.leases(all=True)), "the waiter never reached the ledger"
    assert all(r.pid != waiter.pid for r in engine.ledger.in_states(ACTIVE, QUEUED))
    assert _check_view(engine) == _check_view(other)


def test_kept_sums_never_overcommit_between_two_connections(chronos_env: Path) -> None:
    first = Engine()
    second = Engine(settings=first.settings.with_state_dir(chronos_env))
    granted = []
    for turn in range(12):  # device 0 holds exactly ten 8 GiB leases
        engine = first if turn % 3 else second  # runs of writes on one connection, then the other's
        try:
            granted.append(engine.reserve("8G", "10m", device=0, bind=False))
        except UnavailableError:
            pass
    assert len(granted) == 10
    first.release(granted[0].id)  # the other connection's kept sums must see the room it frees
    second.reserve("8G", "10m", device=0, bind=False)
    for engine in (first, second):
        with pytest.raises(UnavailableError):
            engine.reserve("8G", "10m", device=0, bind=False)
        _check_view(engine)


def test_a_lease_past_its_end_is_reclaimed_from_the_kept_view(chronos_env: Path) -> None:
    engine = Engine()
    for _ in range(50):  # enough open leases that the view, not a scan, finds the one due
        engine.reserve("100M", "10m", device=1, bind=False)
    short = engine.reserve("70G", "1s", device=0, bind=False)
    engine.extend(short.id, "1s")  # its end moves: the kept end-time entry is replaced
    end = engine.get(short.id).expires_at
    assert end is not None
    with pytest.raises(UnavailableError):
        engine.reserve("70G", "10m", device=0, bind=False)
    wait_for(lambda: time.time() > end, timeout=10, what="the short lease's end")
    engine.reserve("70G", "10m", device=0, bind=False)
    assert engine.get(short.id).state == "expired"
    _check_view(engine)
