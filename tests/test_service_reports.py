"""Reports through the service are built in a child process of their own: at a low CPU priority, under a
CPU limit, equal to the report embedded mode builds, and ended when the service stops or the child dies."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import chronos
from chronos.engine import Engine
from chronos.errors import EXIT_NOT_ALLOWED, ChronosError, InvalidRequestError, LimitError, UnavailableError
from chronos.policy.report import Report
from chronos.service.reports import CPU_LIMIT_S, NICE, ReportChildren
from tests.service_fixture import Service
from tests.test_service_protocol import _connect
from tests.waiting import wait_for

#: Enough history that a report takes a few seconds of CPU here, so that it can be watched while it runs.
LEASES = 100_000


def _fill(db: Path, leases: int) -> None:
    """Ended leases on two GPUs for three users, and their audit lines, written straight into the ledger."""
    now = time.time()
    rows, lines = [], []
    for seq in range(1, leases + 1):
        end = now - 86400 - (leases - seq) * 30
        uid, owner = seq % 3, ("root", "ada", "bo")[seq % 3]
        rows.append((seq, uid, owner, f"[{seq % 2}]", '["GPU-0"]', (1 + seq % 4) << 30, end - 600, end - 600,
                     end + 3000, 3600.0, "normal", "released", end, "released"))
        lines.append((end - 600, seq, "granted", uid, owner, json.dumps({"devices": [seq % 2]})))
        lines.append((end, seq, "released", uid, owner, json.dumps({"ended_at": end})))
    conn = sqlite3.connect(db)
    with conn:
        conn.executemany("INSERT INTO leases (seq, uid, owner, devices, device_uuids, memory_bytes, created_at, "
                         "started_at, expires_at, duration_s, priority, state, ended_at, end_reason) VALUES "
                         "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.executemany("INSERT INTO events (at, lease_seq, event, uid, user, pid, detail) VALUES "
                         "(?, ?, ?, ?, ?, 1, ?)", lines)
    conn.close()


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ledger of :data:`LEASES` ended leases, made once; each test copies it."""
    state = tmp_path_factory.mktemp("history")
    Engine(state_dir=state).ledger.close()  # the schema
    _fill(state / "chronos.db", LEASES)
    return state / "chronos.db"


@pytest.fixture
def filled(history: Path, chronos_env: Path) -> Path:
    """This test's state directory holding a copy of the long history."""
    shutil.copy(history, chronos_env / "chronos.db")
    return chronos_env


def _children(parent: int) -> list[int]:
    """The report children of process ``parent`` now."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == parent and b"chronos.service.reports" in cmdline:
            found.append(int(entry.name))
    return found


def _nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[16])


def _cpu_limit(pid: int) -> list[str]:
    line = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines() if x.startswith("Max cpu time"))
    return line.split()[3:5]


def _in_thread(build: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """``build()`` on a thread of its own; what it returned or raised lands in the list."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(build())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _without_until(report: Report) -> dict[str, object]:
    data = report.to_dict()
    del data["until"]
    return data


def test_a_report_through_the_service_is_built_by_a_child_at_low_priority_and_equals_embedded(
        history: Path, service: Service) -> None:
    pid = _long_history(service, history)
    thread, outcome = _in_thread(lambda: chronos.report(since=0, by="gpu"))
    child = wait_for(lambda: _children(pid), timeout=30, what="the report's child process")[0]
    # the child lowers its priority, then sets its CPU limit, as soon as it has read its arguments
    wait_for(lambda: _cpu_limit(child) == [str(CPU_LIMIT_S), str(CPU_LIMIT_S + 5)], what="the child's CPU limit")
    assert _nice(child) == _nice(pid) + NICE
    thread.join(timeout=120)
    assert len(outcome) == 1 and isinstance(outcome[0], Report), outcome
    served = outcome[0]
    assert served.total.leases == LEASES and [row.key for row in served.rows] == ["0", "1"]
    service.stop()
    embedded = Engine(state_dir=service.state_dir).report(since=0, by="gpu")
    assert _without_until(served) == _without_until(embedded)
    assert not _children(pid)


def _long_history(service: Service, history: Path) -> int:
    """The service restarted on a copy of the long history; its pid."""
    chronos.leases()  # the service's ledger exists
    service.stop()
    shutil.copy(history, service.state_dir / "chronos.db")
    for suffix in ("-wal", "-shm"):
        (service.state_dir / f"chronos.db{suffix}").unlink(missing_ok=True)
    service.start()
    assert service.process is not None
    return service.process.pid


def test_clients_gone_mid_report_or_before_their_turn_cost_no_more_cpu(history: Path, service: Service) -> None:
    pid = _long_history(service, history)
    # Three reports of one user: two run (a user's share of the workers), the third waits its turn.
    socks = [_connect(service) for _ in range(3)]
    for sock in socks:
        sock.sendall(json.dumps({"v": 1, "id": 1, "op": "report", "args": {"since": 0}}).encode() + b"\n")
    running = wait_for(lambda: len(_children(pid)) == 2 and _children(pid), timeout=30, what="two report children")
    for sock in socks:
        sock.close()
    # The two running are ended within a look or two at their clients, and the third is never started.
    wait_for(lambda: not any(Path(f"/proc/{child}").exists() for child in running), timeout=5,
             what="the gone clients' report children to end")
    seen = set()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        seen.update(_children(pid))
        time.sleep(0.01)
    assert not seen, "a report was built for a client that had gone before its turn"
    lease = chronos.reserve("1G", "1m", bind=False)  # and the service serves on
    assert lease.active
    lease.release()
    assert not lease.active


def test_a_report_past_its_cpu_limit_is_stopped_and_says_why(filled: Path) -> None:
    reports = ReportChildren(Engine(state_dir=filled).settings, cpu_limit_s=1)
    started = time.monotonic()
    with pytest.raises(LimitError, match=r"more than 1 s of CPU and was stopped: ask for a shorter window") as info:
        reports.build(since=0)
    assert info.value.rule == "report_cpu_s" and info.value.exit_code == EXIT_NOT_ALLOWED
    assert time.monotonic() - started < 60
    assert not _children(os.getpid())


def test_errors_in_the_child_reach_the_caller_as_themselves(filled: Path) -> None:
    reports = ReportChildren(Engine(state_dir=filled).settings)
    with pytest.raises(InvalidRequestError, match="cannot report by 'nonsense': use one of user, group, label, gpu"):
        reports.build(since=0, by="nonsense")
    # and a report of a shorter window is that window's
    since = time.time() - 2 * 86400
    assert _without_until(reports.build(since=since)) == _without_until(Engine(state_dir=filled).report(since=since))


def _started(reports: ReportChildren) -> tuple[threading.Thread, list[object], int]:
    """A report being built on a thread, what it gives, and its child process once that runs."""
    thread, outcome = _in_thread(lambda: reports.build(since=0))
    return thread, outcome, wait_for(lambda: _children(os.getpid()), timeout=30, what="the report's child")[0]


def test_closing_ends_the_reports_being_built_and_refuses_new_ones(filled: Path) -> None:
    reports = ReportChildren(Engine(state_dir=filled).settings)
    thread, outcome, _child = _started(reports)
    reports.close()
    thread.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], UnavailableError), outcome
    assert str(outcome[0]) == "the service is stopping: ask again once it is back"
    assert not _children(os.getpid())
    with pytest.raises(UnavailableError, match="the service is stopping: ask again once it is back"):
        reports.build(since=0)


def test_a_child_killed_from_outside_fails_its_report_with_one_line(filled: Path) -> None:
    reports = ReportChildren(Engine(state_dir=filled).settings)
    thread, outcome, child = _started(reports)
    os.kill(child, signal.SIGKILL)  # as the OOM killer would
    thread.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], ChronosError), outcome
    assert str(outcome[0]) == ("the service failed to build the report (its process was ended by SIGKILL): try "
                               "again, or see the service's log")
    # the next report is built as usual
    assert reports.build(since=0, by="user").total.leases == LEASES


def test_the_protocol_reference_gives_the_priority_and_cpu_limit_the_reports_have() -> None:
    text = " ".join((Path(__file__).parents[1] / "docs" / "protocol.md").read_text().split())
    assert f"at a CPU priority **{NICE}** lower (`nice`)" in text
    assert f"at most **{CPU_LIMIT_S}** seconds of CPU" in text
    assert f"`the report needed more than {CPU_LIMIT_S} s of CPU and was stopped: ask for a shorter window" in text
