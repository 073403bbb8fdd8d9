"""The queue with real waiting processes: grant order, waiters killed while waiting, `chronos queue`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import chronos
from chronos.api import default_engine
from tests.conftest import ROOT, run_cli
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

WAITER = """
import sys, time, chronos
name, memory, priority, log = sys.argv[1:5]
lease = chronos.reserve(memory, "2m", priority=priority, wait=120)
with open(log, "a") as f:
    f.write(f"{name} {lease.id} {time.time()}\\n")
time.sleep(0.3)
lease.release()
"""


def queued() -> list[dict[str, object]]:
    result = run_cli("queue", "--json")
    assert result.returncode == 0, result.stderr
    data: list[dict[str, object]] = json.loads(result.stdout)
    return data


def start_waiter(name: str, memory: str, priority: str, log: Path) -> subprocess.Popen[str]:
    before = len(default_engine().leases())
    proc = subprocess.Popen([sys.executable, "-c", WAITER, name, memory, priority, str(log)], text=True,
                            cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Start them one at a time so that their arrival order is known.
    wait_for(lambda: len(default_engine().leases()) > before or proc.poll() is not None, timeout=30,
             what=f"waiter {name} to queue")
    assert proc.poll() is None, proc.communicate()
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    """Kill a waiter as a crash would (SIGKILL: no chance to withdraw) and reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@pytest.fixture
def one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHRONOS_SIM_GPUS", "1x80G")


def test_waiters_are_granted_by_class_then_arrival_and_killed_ones_never(one_gpu: None, tmp_path: Path) -> None:
    log = tmp_path / "granted.log"
    blocker = chronos.reserve("70G", "10m", bind=False)
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        run_order(blocker, procs, log)
    finally:
        for proc in procs.values():
            stop(proc)


def run_order(blocker: chronos.Lease, procs: dict[str, subprocess.Popen[str]], log: Path) -> None:
    for name, priority in [("a", "normal"), ("b", "normal"), ("c", "high"), ("d", "low"), ("e", "normal"),
                           ("f", "high")]:
        procs[name] = start_waiter(name, "60G", priority, log)
    entries = queued()
    assert [e["priority"] for e in entries] == ["high", "high", "normal", "normal", "normal", "low"]
    assert [e["position"] for e in entries] == [1, 2, 3, 4, 5, 6]
    # Two waiters die while waiting: their requests leave the queue and are never granted.
    stop(procs["b"])
    stop(procs["f"])
    wait_for(lambda: len(queued()) == 4, timeout=30, interval=0.1, what="the dead waiters to leave the queue")
    states = {lease.id: lease.state for lease in chronos.leases(all=True)}
    assert sorted(states.values()).count("withdrawn") == 2
    blocker.release()
    for name in "acde":
        _, err = procs[name].communicate(timeout=60)
        assert procs[name].returncode == 0, err
    granted = [line.split()[0] for line in log.read_text().splitlines()]
    assert granted == ["c", "a", "e", "d"]
    # The audit log agrees: one grant each, in that order, none for the dead waiters.
    grants = [e.lease_id for e in default_engine().events() if e.event == "granted"]
    by_name = {line.split()[0]: line.split()[1] for line in log.read_text().splitlines()}
    assert grants == [blocker.id] + [by_name[n] for n in "caed"]


def test_queue_shows_positions_owners_and_estimated_starts(one_gpu: None, tmp_path: Path) -> None:
    log = tmp_path / "granted.log"
    blocker = chronos.reserve("70G", "10m", bind=False)
    procs = [start_waiter("a", "60G", "normal", log), start_waiter("b", "30G", "low", log),
             start_waiter("c", "50G", "normal", log)]
    try:
        entries = queued()
        assert [e["position"] for e in entries] == [1, 2, 3]
        assert [e["memory"] for e in entries] == ["60 GiB", "50 GiB", "30 GiB"]
        assert {e["owner"] for e in entries} == {blocker.owner}
        assert all(e["wanted"] == "any GPU" and e["devices_wanted"] is None for e in entries)
        assert blocker.expires_at is not None
        # The head starts when the blocker ends; each next one after the one before (2 minutes each).
        starts = [float(str(e["estimated_start"])) for e in entries]
        assert starts[0] == pytest.approx(blocker.expires_at, abs=1)
        assert starts[1] == pytest.approx(blocker.expires_at + 120, abs=1)
        # The low one fits beside the second (50 + 30 GiB), so it is planned to start with it.
        assert starts[2] == pytest.approx(blocker.expires_at + 120, abs=1)
        table = run_cli("queue")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split()[:5] == ["POS", "ID", "OWNER", "PRIORITY", "MEMORY"]
        assert [line.split()[3] for line in lines[1:]] == ["normal", "normal", "low"]
        assert "(in 10m)" in lines[1] or "(in 9m" in lines[1]
    finally:
        for proc in procs:
            stop(proc)
        blocker.release()


def test_cli_waiter_is_granted_when_memory_frees_and_prints_its_position(one_gpu: None) -> None:
    blocker = chronos.reserve("70G", "10m", bind=False)
    proc = subprocess.Popen([sys.executable, "-m", "chronos", "reserve", "75G", "5m", "--wait", "60", "--json"],
                            cwd=ROOT, env=dict(os.environ), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(queued()) == 1, timeout=30, interval=0.1, what="the CLI waiter to queue")
        # A later, short request backfills: it ends before the waiter could start.
        quick = chronos.reserve("8G", "1m", bind=False)
        assert quick.state == "active"
        quick.release()
        # A later long one would delay the waiter (75 + 8 GiB > 80): refused now.
        with pytest.raises(chronos.UnavailableError, match="would delay"):
            chronos.reserve("8G", "1h", bind=False)
        blocker.release()
        out, err = proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert proc.returncode == 0, err
    lease = json.loads(out)
    assert lease["state"] == "active" and lease["memory_bytes"] == 75 << 30
    assert "position 1" in err and "estimated start" in err
    chronos.release(lease["id"])
    assert queued() == []


def test_queue_when_empty() -> None:
    result = run_cli("queue")
    assert result.returncode == 0 and result.stdout.strip() == "no queued requests"
    assert run_cli("queue", "--json").stdout.strip() == "[]"


@pytest.mark.usefixtures("both_modes")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_waiting_command_stopped_by_a_signal_withdraws_its_request_itself(signum: int) -> None:
    """`kill`, a closed terminal or a stopping service manager: the request leaves the queue at once, by
    the waiting process's own hand (not later, when someone notices the process gone)."""
    chronos.reserve("80G", "1h", gpus=2, bind=False)
    waiter = subprocess.Popen([sys.executable, "-m", "chronos", "reserve", "8G", "1h", "--wait", "forever"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    request = wait_for(lambda: next((x for x in chronos.leases() if x.state == "queued"), None), timeout=30,
                       what="the request in the queue")
    waiter.send_signal(signum)
    _out, err = waiter.communicate(timeout=30)
    name = signal.Signals(signum).name
    assert (waiter.returncode, err.splitlines()[-1]) == (128 + signum, f"chronos: stopped by {name}"), err
    assert "Traceback" not in err, err
    ended = chronos.get_lease(request.id)
    assert ended.state == "withdrawn" and ended.end_reason == "withdrawn by the waiting process", ended


def test_a_waiting_command_under_nohup_keeps_waiting_through_a_hangup() -> None:
    chronos.reserve("80G", "1h", gpus=2, bind=False)
    ignore_hup = "import signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); from chronos.cli.app import run; " \
                 "sys.exit(run(['reserve', '8G', '1h', '--wait', 'forever']))"
    waiter = subprocess.Popen([sys.executable, "-c", ignore_hup], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        request = wait_for(lambda: next((x for x in chronos.leases() if x.state == "queued"), None), timeout=30,
                           what="the request in the queue")
        waiter.send_signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):
            waiter.wait(timeout=1.5)
        assert chronos.get_lease(request.id).state == "queued"
    finally:
        waiter.kill()
        waiter.communicate()


def test_a_waiter_that_just_died_holds_nobody_back(one_gpu: None) -> None:
    """A queued request's waiter is trusted alive for a second between looks; a request refused because it
    would delay that request is decided again with the waiter looked at afresh, so it is not refused for a
    process that is gone."""
    chronos.reserve("40G", "10m", bind=False)
    waiter = subprocess.Popen([sys.executable, "-m", "chronos", "reserve", "60G", "1h", "--wait", "forever"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    queued_request = wait_for(lambda: next((x for x in chronos.leases() if x.state == "queued"), None), timeout=30,
                              what="the waiter's request in the queue")
    with pytest.raises(chronos.UnavailableError, match="would delay"):
        chronos.reserve("30G", "1h", bind=False)  # fits now, but would hold the 60G request back
    waiter.kill()
    waiter.wait()
    granted = chronos.reserve("30G", "1h", bind=False)  # at once: not a second later
    assert granted.state == "active"
    assert chronos.get_lease(queued_request.id).state == "withdrawn"
