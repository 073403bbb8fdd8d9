"""One user's share of the service: writes bounded in rate, so that no user can fill the disk holding the
ledger with refused requests (releases, root and the admin group are never held back), and waiting
requests bounded in number, so that one user's leave room for everyone else's; and a request the service
has no thread or process for, under a real task limit, refused in one line."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import chronos
from chronos.errors import UnavailableError
from chronos.service.handlers import RATED_OPS, WRITE_OPS
from chronos.service.rates import BURST, PER_SECOND, WriteRates
from chronos.service.server import MAX_WAITERS, MAX_WAITERS_PER_USER
from tests.os_users import CAN_RUN, WHY_NOT, OsUsers, readable_copy, run_as, user_python
from tests.service_fixture import Service, running_service
from tests.test_service_protocol import _connect, _line


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_user_may_write_a_burst_then_at_the_rate_and_users_are_counted_apart() -> None:
    clock = Clock()
    rates = WriteRates(per_second=10, burst=5, clock=clock)
    for _ in range(5):
        rates.take(1000)
    with pytest.raises(UnavailableError, match=r"^too many writes: one user may make 5 at once and 10 a second "
                                               r"after that; try again in 0\.10 s$"):
        rates.take(1000)
    rates.take(1001)  # another user's bucket is full
    clock.now += 0.25  # two and a half writes' worth
    rates.take(1000)
    rates.take(1000)
    with pytest.raises(UnavailableError, match=r"try again in 0\.05 s"):
        rates.take(1000)
    clock.now += 3600  # a quiet hour fills the bucket to the burst, no further
    for _ in range(5):
        rates.take(1000)
    with pytest.raises(UnavailableError):
        rates.take(1000)


def test_whether_a_user_is_exempt_is_asked_only_past_the_limit() -> None:
    clock = Clock()
    rates = WriteRates(per_second=10, burst=3, clock=clock)
    asked: list[int] = []

    def admin() -> bool:
        asked.append(1)
        return True

    for _ in range(3):
        rates.take(1000, exempt=admin)
    assert asked == []  # within the limit: no lookup of the groups
    for _ in range(4):
        rates.take(1000, exempt=admin)  # past it, an admin goes on
    assert len(asked) == 4
    with pytest.raises(UnavailableError):
        rates.take(1000, exempt=lambda: False)


def test_full_buckets_are_forgotten_once_many_users_have_written() -> None:
    clock = Clock()
    rates = WriteRates(per_second=10, burst=5, clock=clock)
    for uid in range(1100):
        rates.take(uid)
        clock.now += 0.001
    clock.now += 10
    rates.take(5000)
    for _ in range(4):
        rates.take(5000)
    assert len(rates._buckets) < 1100  # the users who filled up again are gone from memory
    with pytest.raises(UnavailableError):
        rates.take(5000)


#: The user's flood: ``n`` reservations on one connection as fast as answers come; each answer's error
#: message (or "ok"), and how long it all took.
FLOOD = """
import json, socket, sys, time
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
answers = sock.makefile("rb")
start = time.monotonic()
said = []
for i in range(int(sys.argv[2])):
    request = {"v": 1, "id": i, "op": "reserve", "args": {"request": {"memory": "1G"}}}
    sock.sendall(json.dumps(request).encode() + b"\\n")
    answer = json.loads(answers.readline())
    said.append("ok" if answer["ok"] else answer["error"]["message"])
print(json.dumps({"said": said, "seconds": time.monotonic() - start}))
"""


@pytest.fixture(scope="module")
def people() -> Iterator[dict[str, str]]:
    users = OsUsers()
    try:
        admins = users.group("rateadm")
        yield {"admins": admins, "mallory": users.user("ratemal"), "boss": users.user("rateboss", [admins])}
    finally:
        users.remove()


@pytest.fixture
def full_machine(people: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
                 monkeypatch: pytest.MonkeyPatch, chronos_env: Path) -> Iterator[Service]:
    """A service whose two GPUs root holds whole: every other reservation is refused, and audited."""
    base = Path("/var/tmp") / f"chronos-rates-{os.getpid()}"
    config = base / "etc" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'admin_group = "{people["admins"]}"\n')
    for directory in (base, config.parent):
        directory.chmod(0o755)
    try:
        with running_service(base / "service", env={"CHRONOS_CONFIG": str(config)}) as service:
            monkeypatch.setenv("CHRONOS_SERVER", str(service.socket))
            chronos.api.reset_default_engine()
            chronos.reserve("80G", "1h", gpus=2, bind=False)
            yield service
            chronos.api.reset_default_engine()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def src() -> Iterator[Path]:
    """This checkout's Chronos, copied once where the test users may read it."""
    copy = readable_copy(Path("/var/tmp") / f"chronos-src-rates-{os.getpid()}")
    yield copy
    shutil.rmtree(copy, ignore_errors=True)


def _python_as(who: str, src: Path, *argv: str, env: dict[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The users' Python run as ``who`` with ``argv`` and ``src`` on its path; it must exit 0."""
    out = run_as(who, [str(user_python()), *argv], timeout=timeout,
                 env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": str(src), **(env or {})})
    assert out.returncode == 0, out.stderr
    return out


def _flood(service: Service, who: str, n: int, src: Path) -> tuple[list[str], float]:
    out = _python_as(who, src, "-I", "-c", FLOOD, str(service.socket), str(n))
    found = json.loads(out.stdout)
    return found["said"], found["seconds"]


def _refused_lines(service: Service, user: str) -> int:
    conn = sqlite3.connect(service.state_dir / "chronos.db")
    try:
        return int(conn.execute("SELECT COUNT(*) FROM events WHERE event = 'refused' AND user = ?",
                                (user,)).fetchone()[0])
    finally:
        conn.close()


needs_users = pytest.mark.skipif(not CAN_RUN, reason=WHY_NOT)


@needs_users
def test_a_user_flooding_refused_requests_writes_at_most_the_burst_and_the_rate(
        people: dict[str, str], full_machine: Service, src: Path) -> None:
    n = BURST + 150
    said, seconds = _flood(full_machine, people["mallory"], n, src)
    limited = [s for s in said if s.startswith("too many writes")]
    refused = [s for s in said if not s.startswith("too many writes")]
    assert all("ok" != s for s in said)  # the machine is full: the engine refuses each one it sees
    assert said[:BURST] == refused[:BURST]  # the burst reaches the engine whole
    assert len(refused) <= BURST + PER_SECOND * seconds + 1
    assert len(limited) >= n - (BURST + PER_SECOND * seconds + 1) > 0
    assert limited[0].startswith(f"too many writes: one user may make {BURST} at once and {PER_SECOND:g} a second "
                                 "after that; try again in ")
    # each request the engine refused is one audit line; those held back wrote nothing
    assert _refused_lines(full_machine, people["mallory"]) == len(refused)
    assert f"uid {pwd.getpwnam(people['mallory']).pw_uid} writes faster than" in full_machine.logs()


@needs_users
def test_root_and_the_admin_group_are_not_held_back(people: dict[str, str], full_machine: Service,
                                                     src: Path) -> None:
    for who in ("root", people["boss"]):
        said, _seconds = _flood(full_machine, who, BURST + 50, src)
        assert not [s for s in said if s.startswith("too many writes")], who


@needs_users
def test_a_user_past_the_rate_can_still_release_their_lease(people: dict[str, str], full_machine: Service,
                                                            src: Path) -> None:
    chronos.leases()[0].release()  # room for the user's own lease, and the user's flood is refused by the engine
    code = ("import chronos, sys\n"
            "lease = chronos.reserve('1G', '1h', bind=False)\n"
            f"for _ in range({BURST + 20}):\n"
            "    try:\n"
            "        chronos.reserve('80G', '1h', gpus=2, bind=False)\n"
            "    except chronos.ChronosError as exc:\n"
            "        last = str(exc)\n"
            "assert last.startswith('too many writes'), last\n"
            "try:\n"  # a usage record may carry a note into the audit log: it counts too
            "    chronos.api.default_engine().record_usage(lease.id, 1, 1.0, note='x' * 500)\n"
            "    print('recorded')\n"
            "except chronos.ChronosError as exc:\n"
            "    print(str(exc).split(':')[0])\n"
            "lease.release()\n"
            "print(lease.active)\n")
    out = _python_as(people["mallory"], src, "-c", code, timeout=120, env={
        "NO_COLOR": "1", "CHRONOS_SERVER": str(full_machine.socket), "CHRONOS_BACKEND": "simulated",
        "CHRONOS_STATE_DIR": "/root/never-opened", "CHRONOS_CONFIG": "/nonexistent/config.toml",
        "CHRONOS_USER_CONFIG": "/nonexistent/user.toml"})
    assert out.stdout.split() == ["too", "many", "writes", "False"]


def test_the_docs_give_the_limits_the_service_keeps() -> None:
    docs = Path(__file__).parents[1] / "docs"
    protocol = " ".join((docs / "protocol.md").read_text().split())
    assert f"may come **{BURST}** at once and **{PER_SECOND:g}** a second after that" in protocol
    assert f"`too many writes: one user may make {BURST} at once and {PER_SECOND:g} a second after that;" in protocol
    listed = protocol.split("One user's writes (", 1)[1].split(")", 1)[0]
    assert set(listed.replace("`", "").replace("not ", "").replace(";", ",").split(", ")) == RATED_OPS | WRITE_OPS
    assert [f"not `{op}`" for op in WRITE_OPS - RATED_OPS] == [listed.split("; ")[1]]
    trust = " ".join((docs / "trust-model.md").read_text().split())
    assert f"may come {BURST} at once and {PER_SECOND:g} a second after that" in trust
    assert f"at most **{MAX_WAITERS_PER_USER}** of one user's wait at once, and **{MAX_WAITERS}** in all" in protocol
    assert f"(at most {MAX_WAITERS_PER_USER} a user): end some" in protocol
    assert f"waiting reservations ({MAX_WAITERS_PER_USER} a user, {MAX_WAITERS} in all)" in trust


WAIT = {"v": 1, "id": 1, "op": "reserve", "args": {"request": {"memory": "1G", "duration": "1h", "wait": "10m"},
                                                   "bind": False}}

#: Another user's waiting request: its first line.
WAIT_ONCE = f"""
import json, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
sock.sendall(json.dumps({WAIT!r}).encode() + b"\\n")
print(sock.makefile("rb").readline().decode())
"""


@needs_users
def test_one_users_waiting_requests_are_bounded_and_leave_room_for_others(people: dict[str, str],
                                                                          full_machine: Service, src: Path) -> None:
    socks = []
    try:
        for _ in range(MAX_WAITERS_PER_USER):
            sock = _connect(full_machine)
            socks.append(sock)
            sock.sendall(json.dumps(WAIT).encode() + b"\n")
            assert "wait" in _line(sock)  # queued, and told so
        sock = _connect(full_machine)
        socks.append(sock)
        sock.sendall(json.dumps(WAIT).encode() + b"\n")
        answer = _line(sock)
        message = (f"too many of your queued requests waiting (at most {MAX_WAITERS_PER_USER} a user): end some, "
                   "or try again later")
        assert answer["ok"] is False
        assert answer["error"] == {"code": "unavailable", "exit": 3, "message": message}
        out = _python_as(people["mallory"], src, "-I", "-c", WAIT_ONCE, str(full_machine.socket))
        assert "wait" in json.loads(out.stdout), out.stdout  # another user still queues
    finally:
        for sock in socks:
            sock.close()


#: Jobs on threads of their own under a limit on the user's processes, until one cannot start.
NO_THREADS = """
import json, resource, threading
from chronos.service.workers import Threads
threads, release, started = Threads(100, 100, "jobs"), threading.Event(), []
resource.setrlimit(resource.RLIMIT_NPROC, (4, 4))  # this process and three threads
while True:
    refusal = threads.start(1000, release.wait, "job")
    if refusal is not None:
        break
    started.append(1)
release.set()
for thread in threading.enumerate():
    if thread is not threading.main_thread():
        thread.join()
print(json.dumps({"refusal": refusal, "started": len(started), "held": threads._held}))
"""

#: A report with no process to be had for its child.
NO_PROCESS = """
import resource
from chronos.engine import Engine
from chronos.errors import UnavailableError
from chronos.service.reports import ReportChildren
reports = ReportChildren(Engine(state_dir="/tmp/never-made").settings)
resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))  # this process alone
try:
    reports.build(since=0)
except UnavailableError as exc:
    print(exc)
"""


@needs_users
def test_a_waiting_request_with_no_thread_to_be_had_is_refused_and_holds_nothing(people: dict[str, str],
                                                                                 src: Path) -> None:
    out = _python_as(people["mallory"], src, "-c", NO_THREADS)
    found = json.loads(out.stdout)
    assert found["refusal"] == "the service cannot start a thread for more jobs now: try again later"
    assert 1 <= found["started"] <= 3 and found["held"] == {}


@needs_users
def test_a_report_with_no_process_to_be_had_is_refused_in_one_line(people: dict[str, str], src: Path) -> None:
    out = _python_as(people["mallory"], src, "-c", NO_PROCESS)
    assert out.stdout.strip() == ("the service cannot start a process for the report now (Resource temporarily "
                                  "unavailable): try again later")
