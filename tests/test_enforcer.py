"""The service's one enforcement loop against real processes of two OS users.

The processes claim simulated GPU memory for real (:func:`chronos.devices.simulated.allocate`) in a
state directory every user may write (mode 1777, as the default /var/tmp/chronos), so one backend
read sees every user's processes as NVML would. The second user, ``chrenf-other``, runs Debian's
/usr/bin/python3 from a virtual environment under /var/tmp and a world-readable copy of ``chronos``.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from chronos import procs, settings
from chronos.devices.simulated import allocate
from chronos.engine import Engine
from chronos.errors import StateError
from chronos.model import Action, FindingKind, OnUnmanaged
from chronos.service.enforcer import Enforcer, Finding
from tests.os_users import CAN_RUN, WHY_NOT, OsUsers, readable_copy, user_python
from tests.waiting import wait_for

GIB = 1 << 30

# Claims NBYTES on device INDEX, says "ready", sleeps; with TREE it first starts a child that sleeps too
# (and prints its pid), so that a test can see a whole tree ended.
CHILD = textwrap.dedent("""
    import subprocess, sys, time
    from chronos.devices.simulated import allocate
    if len(sys.argv) > 3 and sys.argv[3] == "TREE":
        kid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(kid.pid, flush=True)
    allocate(int(sys.argv[1]), int(sys.argv[2]))
    print("ready", flush=True)
    for _ in range(600):
        time.sleep(0.1)
""")

Spawn = Callable[..., subprocess.Popen[str]]


@pytest.fixture(scope="module")
def other() -> Iterator[dict[str, Any]]:
    """The second OS user, with an interpreter and a copy of chronos it can read."""
    if not CAN_RUN:
        pytest.skip(WHY_NOT)
    users = OsUsers("chrenf")
    try:
        name = users.user("other")
        python = user_python()
        src = readable_copy(Path("/var/tmp") / f"chrenf-src-{os.getpid()}")
        yield {"name": name, "uid": pwd.getpwnam(name).pw_uid, "python": python, "src": src}
        shutil.rmtree(src, ignore_errors=True)
    finally:
        users.remove()


@pytest.fixture
def shared_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A state directory every user may write (root-owned, 1777), so both users' claims are seen."""
    top = Path("/var/tmp") / f"chrenf-{os.getpid()}-{tmp_path.name}"
    state = top / "state"
    state.mkdir(parents=True)
    top.chmod(0o755)
    state.chmod(0o1777)
    monkeypatch.setenv("CHRONOS_STATE_DIR", str(state))
    settings.refresh()
    allocate(0, 0)  # the usage file and its lock, made shared (0666) by root before anyone else
    yield state
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def spawn(other: dict[str, Any] | None, request: pytest.FixtureRequest) -> Iterator[Spawn]:
    """Start CHILD as ``who`` (root or the other user) with ``env`` on top of the test's own."""
    started: list[subprocess.Popen[str]] = []

    def run(who: str, device: int, nbytes: int, env: Mapping[str, str] | None = None, *, tree: bool = False,
            stderr: bool = False) -> subprocess.Popen[str]:
        base = {k: v for k, v in os.environ.items() if k.startswith("CHRONOS_") or k in ("PATH", "PYTHONPATH")}
        full = {**base, **(env or {})}
        argv = [sys.executable, "-c", CHILD, str(device), str(nbytes)] + (["TREE"] if tree else [])
        kwargs: dict[str, Any] = {}
        if who != "root":
            assert other is not None
            info = pwd.getpwnam(other["name"])
            full.update(PYTHONPATH=str(other["src"]), HOME="/tmp", PATH="/usr/bin:/bin",
                        CHRONOS_CONFIG="/nonexistent/config.toml", CHRONOS_USER_CONFIG="/nonexistent/user.toml")
            argv[0] = str(other["python"])
            kwargs = {"user": info.pw_uid, "group": info.pw_gid, "extra_groups": [], "cwd": "/"}
        child = subprocess.Popen(argv, env=full, stdout=subprocess.PIPE, text=True,
                                 stderr=subprocess.PIPE if stderr else None, **kwargs)
        started.append(child)
        return child

    yield run
    for child in started:
        if child.poll() is None:
            child.kill()
        child.wait()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()


def _ready(child: subprocess.Popen[str]) -> list[str]:
    """Lines the child printed up to "ready"."""
    assert child.stdout is not None
    lines = []
    while True:
        line = child.stdout.readline().strip()
        assert line, "the child ended before it claimed its memory"
        if line == "ready":
            return lines
        lines.append(line)


def _engine(**enforce: Any) -> Engine:
    defaults: dict[str, Any] = {"overuse_grace_s": 0.0, "unmanaged_grace_s": 0.0, "kill_wait_s": 5.0}
    return Engine(config=replace(settings.current().config, **{**defaults, **enforce}))


class Loop:
    """An enforcer running in a thread, as the service runs it."""

    def __init__(self, enforcer: Enforcer, interval: float = 0.05) -> None:
        self.enforcer = enforcer
        self.stop = threading.Event()
        self.thread = threading.Thread(target=enforcer.run, args=(self.stop, interval), daemon=True)

    def __enter__(self) -> Enforcer:
        self.thread.start()
        return self.enforcer

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


def _found(enforcer: Enforcer, kind: FindingKind, pid: int) -> list[Finding]:
    return [f for f in enforcer.findings if f.kind == kind and (f.pid == pid or pid in f.pids)]


def _polls_without(enforcer: Enforcer, polls: int, condition: Callable[[], bool]) -> None:
    """``condition`` stays false while the loop makes ``polls`` more passes."""
    target = enforcer.polls + polls + 1
    wait_for(lambda: condition() or enforcer.polls >= target, what=f"{polls} more enforcement passes")
    assert not condition()


@pytest.mark.parametrize("who", ["root", "other"])
def test_an_over_cap_holder_is_terminated_whoever_owns_it(shared_state: Path, spawn: Spawn, who: str,
                                                          other: dict[str, Any]) -> None:
    engine = _engine()
    owner = None if who == "root" else other["name"]
    lease = engine.reserve("1G", "1h", device=0, user=owner, bind=False)
    child = spawn(who, 0, 3 * GIB, lease.env({}))  # CHRONOS_LEASE_ID and CHRONOS_LEDGER tie it to the lease
    _ready(child)
    with Loop(Enforcer(engine)) as enforcer:
        assert child.wait(20) == -signal.SIGTERM
    found = _found(enforcer, FindingKind.OVER_CAP, child.pid)
    assert found and found[0].lease_id == lease.id and found[0].device == 0 and found[0].signal == "SIGTERM"
    assert found[0].uid == (0 if who == "root" else other["uid"])
    assert "3 GiB used, over its 1 GiB cap" in found[0].message
    audit = [e for e in engine.events(lease_id=lease.id) if e.event == "enforced"]
    assert audit and audit[0].detail["kind"] == "over_cap" and child.pid in audit[0].detail["pids"]


def test_a_holder_under_its_cap_is_left_alone(shared_state: Path, spawn: Spawn) -> None:
    engine = _engine()
    lease = engine.reserve("4G", "1h", device=1, bind=False)
    child = spawn("root", 1, GIB, lease.env({}))
    _ready(child)
    with Loop(Enforcer(engine)) as enforcer:
        _polls_without(enforcer, 5, lambda: child.poll() is not None or bool(enforcer.findings))


@pytest.mark.parametrize("who", ["root", "other"])
def test_an_unmanaged_process_is_terminated_whoever_owns_it(shared_state: Path, spawn: Spawn, who: str,
                                                            other: dict[str, Any]) -> None:
    engine = _engine(unmanaged=OnUnmanaged.TERMINATE)
    child = spawn(who, 1, 2 * GIB)
    _ready(child)
    with Loop(Enforcer(engine)) as enforcer:
        assert child.wait(20) == -signal.SIGTERM
    found = _found(enforcer, FindingKind.UNMANAGED, child.pid)
    assert found and found[0].lease_id is None and found[0].device == 1 and found[0].signal == "SIGTERM"
    assert found[0].action == "terminate" and found[0].uid == (0 if who == "root" else other["uid"])


def test_an_unmanaged_process_is_only_reported_by_default(shared_state: Path, spawn: Spawn) -> None:
    engine = _engine()
    assert engine.config.unmanaged == "report"
    child = spawn("root", 0, GIB)
    _ready(child)
    with Loop(Enforcer(engine)) as enforcer:
        wait_for(lambda: _found(enforcer, FindingKind.UNMANAGED, child.pid), what="the report")
        _polls_without(enforcer, 5, lambda: child.poll() is not None)
    found = _found(enforcer, FindingKind.UNMANAGED, child.pid)
    assert len(found) == 1 and found[0].action == "report" and found[0].signal is None
    assert "holds no lease" in found[0].message


def test_an_unmanaged_process_is_warned_on_its_stderr_and_keeps_running(shared_state: Path, spawn: Spawn,
                                                                        other: dict[str, Any]) -> None:
    engine = _engine(unmanaged=OnUnmanaged.WARN)
    child = spawn("other", 0, GIB, stderr=True)
    _ready(child)
    with Loop(Enforcer(engine)) as enforcer:
        wait_for(lambda: _found(enforcer, FindingKind.UNMANAGED, child.pid), what="the warning")
        _polls_without(enforcer, 3, lambda: child.poll() is not None)
    child.kill()
    child.wait()
    assert child.stderr is not None
    told = child.stderr.read()
    assert f"chronos: process {child.pid} of {other['name']} uses GPU 0" in told
    assert "reserve it with `chronos reserve`" in told


def test_the_unmanaged_grace_period_is_respected(shared_state: Path, spawn: Spawn) -> None:
    engine = _engine(unmanaged=OnUnmanaged.TERMINATE, unmanaged_grace_s=3600.0)
    child = spawn("root", 0, GIB)
    _ready(child)
    with Loop(Enforcer(engine)) as enforcer:
        _polls_without(enforcer, 5, lambda: child.poll() is not None or bool(enforcer.findings))


def test_expiry_ends_the_holders_tree(shared_state: Path, spawn: Spawn) -> None:
    engine = _engine(on_expiry=Action.TERMINATE)
    holder = spawn("root", 0, GIB, tree=True)
    kid = int(_ready(holder)[0])
    kid_start = procs.start_time(kid)
    lease = engine.reserve("2G", 1.5, device=0, bind=holder.pid)
    with Loop(Enforcer(engine)) as enforcer:
        assert holder.wait(30) == -signal.SIGTERM
        wait_for(lambda: not procs.is_alive(kid, kid_start), what="the holder's child to end too")
    found = _found(enforcer, FindingKind.PAST_EXPIRY, holder.pid)
    assert found and found[0].lease_id == lease.id and found[0].signal == "SIGTERM"
    assert set(found[0].pids) == {holder.pid, kid}
    assert engine.get(lease.id).state == "expired"


def test_an_extension_moves_the_end_the_enforcer_acts_at(shared_state: Path, spawn: Spawn) -> None:
    engine = _engine(on_expiry=Action.TERMINATE)
    holder = spawn("root", 0, GIB)
    _ready(holder)
    lease = engine.reserve("2G", 1, device=0, bind=holder.pid)
    enforcer = Enforcer(engine)
    assert enforcer.poll() == []  # the lease as it was: ending in a second
    engine.extend(lease.id, "1h")  # extended between two passes...
    wait_for(lambda: time.time() > (lease.expires_at or 0) + 0.1, what="the old end to pass")
    assert enforcer.poll() == []  # ...so the next pass judges by the new end
    assert holder.poll() is None and engine.get(lease.id).state == "active"


def test_a_lease_ended_asking_for_an_action_gets_it_and_a_plain_release_does_not(shared_state: Path,
                                                                                 spawn: Spawn) -> None:
    engine = _engine()
    asked, plain = spawn("root", 0, GIB), spawn("root", 1, GIB)
    _ready(asked)
    _ready(plain)
    first = engine.reserve("2G", "1h", device=0, bind=asked.pid)
    second = engine.reserve("2G", "1h", device=1, bind=plain.pid)
    with Loop(Enforcer(engine)) as enforcer:
        wait_for(lambda: enforcer.polls >= 2, what="the enforcer to see both leases")
        with engine.ledger.transaction():  # what the idle policy's terminate asks of a lease it ends
            engine.ledger.update(first.id, end_action=Action.TERMINATE)
        engine.release(first.id)
        engine.release(second.id)
        assert asked.wait(20) == -signal.SIGTERM
        _polls_without(enforcer, 5, lambda: plain.poll() is not None)
    found = _found(enforcer, FindingKind.PAST_EXPIRY, asked.pid)
    assert found and found[0].lease_id == first.id and "was released asking for terminate" in found[0].message
    assert not [f for f in enforcer.findings if f.lease_id == second.id]


class FlakyLedger(Engine):
    """A real engine whose ledger fails on the calls named, as a locked or broken ledger would."""

    def __init__(self, *args: Any, read_fails: set[int], write_fails: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads, self.read_fails, self.write_fails = 0, read_fails, write_fails

    def active_records(self) -> Any:
        self.reads += 1
        if self.reads in self.read_fails:
            raise StateError(f"ledger {self.ledger.path} is busy or locked: database is locked")
        return super().active_records()

    def record_enforcement(self, lease_id: str, detail: dict[str, Any]) -> None:
        if self.write_fails > 0:
            self.write_fails -= 1
            raise StateError(f"ledger {self.ledger.path} is busy or locked: database is locked")
        super().record_enforcement(lease_id, detail)


def test_a_pass_that_hits_a_ledger_error_still_acts_and_the_loop_goes_on(
        shared_state: Path, spawn: Spawn, caplog: pytest.LogCaptureFixture) -> None:
    config = replace(settings.current().config, overuse_grace_s=0.0, kill_wait_s=5.0)
    engine = FlakyLedger(config=config, read_fails=set(range(2, 40)), write_fails=3)
    lease = engine.reserve("1G", "1h", device=0, bind=False)
    enforcer = Enforcer(engine)
    enforcer.poll()  # the lease is known; every later read fails for a while
    child = spawn("root", 0, 3 * GIB, lease.env({}))
    _ready(child)
    caplog.set_level(logging.INFO, logger="chronos.enforcer")
    with Loop(enforcer):
        assert child.wait(20) == -signal.SIGTERM  # acted on the leases last read
        wait_for(lambda: engine.reads > 40 and enforcer.pending == 0, what="the ledger back and the audit written")
    assert _found(enforcer, FindingKind.OVER_CAP, child.pid)
    assert any("cannot read the ledger" in r.getMessage() for r in caplog.records)
    assert any("cannot write to the audit log" in r.getMessage() and "retried next pass" in r.getMessage()
               for r in caplog.records)
    audit = [e for e in engine.events(lease_id=lease.id) if e.event == "enforced"]
    assert len(audit) == 1 and audit[0].detail["signal"] == "SIGTERM"


def test_a_pass_that_raises_is_logged_and_the_loop_goes_on(shared_state: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    class Exploding(Enforcer):
        def poll(self) -> list[Finding]:
            if self.polls == 1:
                self.polls += 1
                raise RuntimeError("a bug in one pass")
            return super().poll()

    enforcer = Exploding(_engine())
    caplog.set_level(logging.INFO, logger="chronos.enforcer")
    with Loop(enforcer):
        wait_for(lambda: enforcer.polls >= 6, what="passes after the one that raised")
    assert enforcer.errors == 1
    assert any("enforcement pass failed" in r.getMessage() and r.exc_info for r in caplog.records)
