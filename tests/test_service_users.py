"""The service as a trust boundary, with real OS users (runuser-style, as CI runs as root).

A user cannot write or replace the ledger, end or extend another's lease, reserve as another user,
bind to another user's process, or make themself an admin through anything they control; root and
members of the admin group can.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import chronos
from tests.os_users import CAN_RUN, WHY_NOT, OsUsers, readable_copy, run_as, user_python
from tests.service_fixture import Service, running_service

pytestmark = pytest.mark.skipif(not CAN_RUN, reason=WHY_NOT)

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def people() -> Iterator[dict[str, str]]:
    users = OsUsers()
    try:
        admins = users.group("svcadm")
        yield {"admins": admins, "alice": users.user("svcalice"), "eve": users.user("svceve"),
               "boss": users.user("svcboss", [admins])}
    finally:
        users.remove()


@pytest.fixture(scope="module")
def shared_service(people: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    base = Path("/var/tmp") / f"chronos-svc-users-{os.getpid()}"
    config = base / "etc" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'admin_group = "{people["admins"]}"\n')
    base.chmod(0o755)
    config.parent.chmod(0o755)
    sim = base / "sim"  # the simulated GPUs' usage file, where every user may read it
    sim.mkdir(mode=0o755)
    env = {"CHRONOS_CONFIG": str(config), "CHRONOS_STATE_DIR": str(sim)}
    with running_service(base / "service", env=env) as service:
        yield service
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def as_user(people: dict[str, str], shared_service: Service) -> Iterator[Run]:
    python = user_python()
    src = readable_copy(Path("/var/tmp") / f"chronos-src-svc-{os.getpid()}")

    def run(who: str, *argv: str, env: dict[str, str] | None = None,
            code: str | None = None) -> subprocess.CompletedProcess[str]:
        full = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": str(src), "NO_COLOR": "1",
                "CHRONOS_BACKEND": "simulated", "CHRONOS_SIM_GPUS": "2x80G",
                "CHRONOS_SERVER": str(shared_service.socket),
                # the client's own state directory is one it cannot even reach: it must never be opened
                "CHRONOS_STATE_DIR": "/root/never-opened", "CHRONOS_CONFIG": "/nonexistent/config.toml",
                "CHRONOS_USER_CONFIG": "/nonexistent/user.toml", **(env or {})}
        args = [str(python), "-c", code, *argv] if code is not None else [str(python), "-m", "chronos", *argv]
        return run_as(people[who], args, env=full)

    yield run
    shutil.rmtree(src, ignore_errors=True)


@pytest.fixture(autouse=True)
def through_the_service(shared_service: Service, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process (root) asks the same service."""
    monkeypatch.setenv("CHRONOS_SERVER", str(shared_service.socket))
    chronos.api.reset_default_engine()
    yield
    chronos.api.reset_default_engine()


def _lease(run: Run, who: str, *extra: str) -> str:
    done = run(who, "reserve", "4G", "1h", "--json", *extra)
    assert done.returncode == 0, f"{who}: {done.stderr}"
    import json

    lease_id: str = json.loads(done.stdout)["id"]
    return lease_id


def _refused(done: subprocess.CompletedProcess[str], code: int = 4) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_a_user_cannot_write_replace_or_split_the_ledger(as_user: Run, shared_service: Service) -> None:
    ledger = shared_service.state_dir / "chronos.db"
    assert ledger.exists()
    attack = (
        "import os, sqlite3, sys\n"
        "path = sys.argv[1]\n"
        "for attempt in (lambda: open(path, 'r+b'), lambda: os.rename(path, path + '.x'), lambda: os.unlink(path),\n"
        "                lambda: os.unlink(path + '-wal'), lambda: open(path + '.new', 'w'),\n"
        "                lambda: sqlite3.connect(path).execute('DROP TRIGGER events_no_delete')):\n"
        "    try:\n"
        "        attempt()\n"
        "    except (PermissionError, sqlite3.OperationalError) as exc:\n"
        "        print('refused', type(exc).__name__)\n"
        "    else:\n"
        "        print('DONE')\n"
    )
    done = as_user("eve", str(ledger), code=attack)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n").count("DONE") == 0 and done.stdout.count("refused") == 6, done.stdout


def test_a_user_cannot_end_extend_or_take_anothers_lease(as_user: Run) -> None:
    lease = _lease(as_user, "alice")
    assert "belongs to" in _refused(as_user("eve", "release", lease))
    assert "belongs to" in _refused(as_user("eve", "extend", lease, "1h"))
    assert "only an admin may reserve for another user" in _refused(as_user("eve", "reserve", "1G", "--user",
                                                                            "chrhub-svcalice"))
    assert chronos.get_lease(lease).state == "active"


def test_a_user_cannot_bind_a_lease_to_another_users_process(as_user: Run, people: dict[str, str]) -> None:
    info = __import__("pwd").getpwnam(people["alice"])
    sleeper = subprocess.Popen(["sleep", "300"], user=info.pw_uid, group=info.pw_gid)
    try:
        assert "is not yours" in _refused(as_user("eve", "reserve", "1G", "--pid", str(sleeper.pid)))
        bound = _lease(as_user, "alice", "--pid", str(sleeper.pid))
        assert chronos.get_lease(bound).pid == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()


def test_no_variable_or_file_a_user_controls_makes_them_an_admin(as_user: Run, shared_service: Service) -> None:
    lease = _lease(as_user, "alice")
    forged = Path("/var/tmp") / f"chronos-svc-forged-{os.getpid()}.toml"
    forged.write_text('admin_group = "root"\n[limits]\nmax_duration = "none"\n')
    forged.chmod(0o644)
    try:
        for env in ({"CHRONOS_CONFIG": str(forged)}, {"CHRONOS_USER_CONFIG": str(forged)},
                    {"CHRONOS_ADMIN_GROUP": "root", "USER": "root", "LOGNAME": "root", "SUDO_UID": "0"}):
            done = as_user("eve", "release", lease, env=env)
            assert done.returncode in (2, 4), (env, done.stderr)
        raw = ("import json, socket, sys\n"
               "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
               "s.sendall(json.dumps({'v': 1, 'id': 1, 'op': 'release', 'uid': 0, 'user': 'root',\n"
               "                      'args': {'lease_id': sys.argv[2], 'uid': 0}}).encode() + b'\\n')\n"
               "print(s.makefile().readline())\n")
        done = as_user("eve", str(shared_service.socket), lease, code=raw)
        assert done.returncode == 0 and '"not_allowed"' in done.stdout, (done.stdout, done.stderr)
    finally:
        forged.unlink()
    assert chronos.get_lease(lease).state == "active"


def test_root_and_the_admin_group_may_act_for_others(as_user: Run) -> None:
    lease = _lease(as_user, "alice")
    assert as_user("boss", "extend", lease, "30m").returncode == 0
    assert as_user("boss", "release", lease).returncode == 0
    for_alice = _lease(as_user, "boss", "--user", "chrhub-svcalice")
    assert chronos.get_lease(for_alice).owner == "chrhub-svcalice"
    assert chronos.release(for_alice).state == "released"  # root
