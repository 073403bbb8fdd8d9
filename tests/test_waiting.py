"""Queued requests wait on a doorbell while one leader plans: every waiter granted in queue order, none
left waiting when the leader leaves, dies or stops (see chronos/waiting.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import chronos
from chronos.ledger import DB_NAME
from tests.conftest import ROOT
from tests.waiting import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHRONOS_SIM_GPUS", "1x80G")


def _waiter(memory: str = "50G") -> subprocess.Popen[str]:
    """``chronos reserve 50G 5m --wait 2m`` as a user types it; started once the one before it is queued."""
    before = len(chronos.leases())
    proc = subprocess.Popen([sys.executable, "-m", "chronos", "reserve", memory, "5m", "--wait", "2m", "--json"],
                            cwd=ROOT, env=dict(os.environ), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: len(chronos.leases()) > before or proc.poll() is not None, timeout=30, what="the waiter to queue")
    assert proc.poll() is None, proc.communicate()
    return proc


def _queued_ids() -> list[str]:
    return [lease.id for lease in chronos.leases() if lease.state == "queued"]


def _leader(state: Path) -> int | None:
    """The pid holding the queue leader's lock, from /proc/locks."""
    try:
        inode = os.stat(state / f"{DB_NAME}.lock").st_ino
    except FileNotFoundError:
        return None
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "FLOCK" in fields and fields[-3].endswith(f":{inode}"):
            return int(fields[-4])
    return None


def _grant_in_turn(ids: list[str], procs: list[subprocess.Popen[str]]) -> None:
    """Each waiter, in queue order, is granted once the one before it is released; its process says so."""
    for lease_id, proc in zip(ids, procs, strict=True):
        wait_for(lambda: [x.id for x in chronos.leases() if x.state == "active" and x.memory_bytes == 50 << 30],
                 timeout=30, what=f"lease {lease_id} to be granted")
        active = [x.id for x in chronos.leases() if x.state == "active" and x.memory_bytes == 50 << 30]
        assert active == [lease_id], f"granted {active}, but {lease_id} was next in the queue"
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and json.loads(out)["id"] == lease_id, err
        chronos.release(lease_id)


def _stop_all(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.communicate()


def test_every_waiter_is_granted_in_queue_order_as_leaders_come_and_go(one_gpu: None, chronos_env: Path) -> None:
    blocker = chronos.reserve("80G", "10m", bind=False)
    procs = [_waiter() for _ in range(8)]
    try:
        ids = _queued_ids()
        assert len(ids) == 8
        first = procs[0].pid
        wait_for(lambda: _leader(chronos_env) == first, what="the first waiter to lead")
        blocker.release()
        # Each granted waiter exits, the leader among them: the lead passes on and no wake-up is lost.
        _grant_in_turn(ids, procs)
        assert _queued_ids() == []
    finally:
        _stop_all(procs)


def test_a_killed_leader_is_replaced_and_its_request_withdrawn(one_gpu: None, chronos_env: Path) -> None:
    blocker = chronos.reserve("80G", "10m", bind=False)
    procs = [_waiter() for _ in range(3)]
    try:
        ids = _queued_ids()
        wait_for(lambda: _leader(chronos_env) == procs[0].pid, what="the first waiter to lead")
        procs[0].kill()  # no chance to hand over or withdraw
        procs[0].communicate()
        wait_for(lambda: _leader(chronos_env) in (procs[1].pid, procs[2].pid), timeout=30, what="a new leader")
        wait_for(lambda: _queued_ids() == ids[1:], timeout=30, what="the dead waiter's request to leave the queue")
        blocker.release()
        _grant_in_turn(ids[1:], procs[1:])
        assert chronos.get_lease(ids[0]).state == "withdrawn"
    finally:
        _stop_all(procs)


def test_a_stopped_leader_does_not_hold_up_the_queue(one_gpu: None, chronos_env: Path) -> None:
    blocker = chronos.reserve("80G", "10m", bind=False)
    procs = [_waiter("50G"), _waiter("20G")]
    try:
        ids = _queued_ids()
        wait_for(lambda: _leader(chronos_env) == procs[0].pid, what="the first waiter to lead")
        procs[0].send_signal(signal.SIGSTOP)  # Ctrl-Z in the leader's terminal: it holds the lead, silent
        blocker.release()  # both now fit (50 + 20 GiB)
        # The other waiter sees the leader's heartbeat go stale and decides for itself.
        out, err = procs[1].communicate(timeout=60)
        assert procs[1].returncode == 0 and json.loads(out)["id"] == ids[1], err
        assert chronos.get_lease(ids[0]).state == "queued"  # a stopped waiter's request waits for it
        procs[0].send_signal(signal.SIGCONT)
        out, err = procs[0].communicate(timeout=60)
        assert procs[0].returncode == 0 and json.loads(out)["id"] == ids[0], err
    finally:
        _stop_all(procs)


def _waiting(*args: str) -> subprocess.Popen[str]:
    """``chronos reserve ARGS --wait 2m --json``, started once it is queued."""
    before = len(chronos.leases())
    proc = subprocess.Popen([sys.executable, "-m", "chronos", "reserve", *args, "--wait", "2m", "--json"],
                            cwd=ROOT, env=dict(os.environ), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: len(chronos.leases()) > before or proc.poll() is not None, timeout=30, what="the waiter to queue")
    assert proc.poll() is None, proc.communicate()
    return proc


def test_unrelated_writes_between_plans_lose_no_wake_up(one_gpu: None, chronos_env: Path) -> None:
    """Leases granted and released while the leader plans (free memory dips and comes back) leave the queue
    as planned; the next real change still wakes the head at once."""
    blocker = chronos.reserve("70G", "10m", bind=False)
    procs = [_waiter(), _waiter()]
    try:
        ids = _queued_ids()
        wait_for(lambda: _leader(chronos_env) in (procs[0].pid, procs[1].pid), what="a waiter to lead")
        for _ in range(200):  # 5 GiB for a minute ends before the head's slot: granted, delays nobody
            chronos.reserve("5G", "1m", bind=False).release()
        assert _queued_ids() == ids
        blocker.release()
        _grant_in_turn(ids, procs)
    finally:
        _stop_all(procs)


def test_a_change_that_frees_nothing_still_lets_a_backfill_start(chronos_env: Path) -> None:
    """Two GPUs. A low-priority gang waits for GPU 0's lease to end; a low-priority request on GPU 1 fits
    now but would run into the gang's slot, so it waits. GPU 0's lease is then swapped for a longer one
    while the waiters are stopped: free memory is as the leader last planned, but the gang's slot moved
    past the second request's end, so it can start, and the leader (planning within a second of a change
    that frees nothing) rings it well before its half-minute re-plan."""
    first = chronos.reserve("80G", "10m", device=0, bind=False)
    gang = _waiting("50G", "1h", "--gpus", "2", "--priority", "low")
    backfill = _waiting("50G", "30m", "--gpu", "1", "--priority", "low")
    procs = [gang, backfill]
    try:
        gang_id, backfill_id = _queued_ids()
        wait_for(lambda: _leader(chronos_env) in (gang.pid, backfill.pid), what="a waiter to lead")
        for proc in procs:
            proc.send_signal(signal.SIGSTOP)
        first.release()
        chronos.reserve("80G", "2h", device=0, bind=False)  # normal priority: it may delay low ones
        for proc in procs:
            proc.send_signal(signal.SIGCONT)
        wait_for(lambda: chronos.get_lease(backfill_id).state == "active", timeout=10,
                 what="the backfill to be granted")
        assert chronos.get_lease(gang_id).state == "queued"
    finally:
        _stop_all(procs)
