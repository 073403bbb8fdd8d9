"""The hardened state directory with three real OS users: two members of the GPU group and one outsider.

CI runs as root: the users ``chrhub-alice`` and ``chrhub-bob`` (members of ``chrhub-gpu``) and
``chrhub-eve`` (not a member) are created for this module and removed after it. They run Chronos
with Debian's ``/usr/bin/python3`` from a virtual environment under /var/tmp (built once, see
tests/os_users.py) and a world-readable copy of this checkout's ``chronos`` package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.os_users import CAN_RUN, WHY_NOT, OsUsers, readable_copy, run_as, user_python

pytestmark = pytest.mark.skipif(not CAN_RUN, reason=WHY_NOT)

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def people() -> Iterator[dict[str, str]]:
    users = OsUsers()
    try:
        gpu = users.group("gpu")
        found = {"group": gpu, "alice": users.user("alice", [gpu]), "bob": users.user("bob", [gpu]),
                 "eve": users.user("eve")}
        yield found
    finally:
        users.remove()


@pytest.fixture(scope="module")
def as_user(people: dict[str, str]) -> Iterator[Run]:
    python = user_python()
    src = readable_copy(Path("/var/tmp") / f"chronos-src-group-{os.getpid()}")

    def run(who: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": str(src), "NO_COLOR": "1",
            **{k: v for k, v in os.environ.items() if k.startswith("CHRONOS_")},
            "CHRONOS_CONFIG": "/nonexistent/chronos/config.toml",
            "CHRONOS_USER_CONFIG": "/nonexistent/chronos/user-config.toml",
        }
        if who == "root":
            return run_cli(*args)
        return run_as(people[who], [str(python), "-m", "chronos", *args], env=env)

    yield run
    shutil.rmtree(src, ignore_errors=True)


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = Path("/var/tmp") / f"chronos-group-{os.getpid()}-{tmp_path.name}" / "state"
    monkeypatch.setenv("CHRONOS_STATE_DIR", str(path))
    yield path
    shutil.rmtree(path.parent, ignore_errors=True)


def _reserve(run: Run, who: str, size: str = "4G") -> str:
    done = run(who, "reserve", size, "1h", "--json")
    assert done.returncode == 0, f"{who}: {done.stderr}"
    lease: dict[str, str] = json.loads(done.stdout)
    return lease["id"]


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize("first", ["alice", "bob", "root"])
def test_every_member_and_root_use_the_directory_whoever_comes_first(
    people: dict[str, str], as_user: Run, state_dir: Path, first: str
) -> None:
    done = run_cli("admin", "init-state-dir", str(state_dir), "--group", people["group"])
    assert done.returncode == 0, done.stderr
    order = [first, *[w for w in ("alice", "bob", "root") if w != first]]
    ids = {who: _reserve(as_user, who) for who in order}
    listed = json.loads(as_user("bob", "list", "--json").stdout)
    assert {item["id"] for item in listed} == set(ids.values())
    # root (an admin) ends a member's lease; the members end their own.
    assert as_user("root", "release", ids["alice"]).returncode == 0
    assert as_user("bob", "release", ids["bob"]).returncode == 0
    assert as_user("root", "release", ids["root"]).returncode == 0
    shown = json.loads(as_user("alice", "show", ids["alice"], "--json").stdout)
    assert shown["state"] == "released"
    assert as_user("root", "doctor").returncode == 0
    assert as_user("alice", "doctor").returncode == 0


def test_no_member_can_remove_or_replace_the_ledger(people: dict[str, str], as_user: Run, state_dir: Path) -> None:
    assert run_cli("admin", "init-state-dir", str(state_dir), "--group", people["group"]).returncode == 0
    lease = _reserve(as_user, "alice")
    db = state_dir / "chronos.db"
    before = db.stat().st_ino
    for argv in (["rm", "-f", str(db)], ["mv", str(db), str(state_dir / "moved.db")],
                 ["sh", "-c", f"echo x > {state_dir}/forged && mv -f {state_dir}/forged {db}"]):
        done = run_as(people["bob"], argv, env={"PATH": "/usr/bin:/bin"})
        assert done.returncode != 0, argv
    assert db.stat().st_ino == before
    assert json.loads(as_user("bob", "show", lease, "--json").stdout)["state"] == "active"
    for file in state_dir.iterdir():
        if file.name.startswith(("chronos.db", "simulated-gpus")):
            info = file.stat()
            assert (info.st_uid, info.st_mode & 0o777) == (0, 0o660), file


def test_someone_outside_the_group_is_told_which_group_to_ask_for(
    people: dict[str, str], as_user: Run, state_dir: Path
) -> None:
    assert run_cli("admin", "init-state-dir", str(state_dir), "--group", people["group"]).returncode == 0
    _reserve(as_user, "alice")
    for args in (("reserve", "1G", "1h"), ("list",)):
        done = as_user("eve", *args)
        assert done.returncode == 4
        line = _one_line(done)
        assert f"is for members of group {people['group']}" in line
        assert f"sudo usermod -aG {people['group']} {people['eve']}" in line
    doctor = as_user("eve", "doctor")
    assert doctor.returncode == 1 and f"members of group {people['group']}" in doctor.stderr


def test_the_old_2770_directory_works_for_everyone_and_doctor_says_what_to_fix(
    people: dict[str, str], as_user: Run, state_dir: Path
) -> None:
    """The guide's earlier setup (setgid, no sticky bit, no files made by root): a member comes first."""
    state_dir.parent.mkdir()
    subprocess.run(["install", "-d", "-o", "root", "-g", people["group"], "-m", "2770", str(state_dir)], check=True)
    first = _reserve(as_user, "alice")
    assert (state_dir / "chronos.db").stat().st_uid != 0  # alice made it
    second = _reserve(as_user, "bob")
    third = _reserve(as_user, "root")
    for who in ("root", "bob"):
        doctor = as_user(who, "doctor")
        assert doctor.returncode == 1, doctor.stdout
        assert "has no sticky bit" in doctor.stderr and "init-state-dir" in doctor.stderr
        assert "remove it" not in doctor.stderr and "delete" not in doctor.stderr
    repaired = run_cli("admin", "init-state-dir", str(state_dir), "--group", people["group"])
    assert repaired.returncode == 0 and "put right" in repaired.stdout, repaired.stdout
    assert as_user("root", "doctor").returncode == 0
    listed = {item["id"] for item in json.loads(as_user("alice", "list", "--json").stdout)}
    assert listed == {first, second, third}


def test_a_foreign_file_gets_advice_that_keeps_the_ledger(
    people: dict[str, str], as_user: Run, state_dir: Path
) -> None:
    """A ledger that is not the group's (made private by its maker) is refused with the admin's fix."""
    assert run_cli("admin", "init-state-dir", str(state_dir), "--group", people["group"]).returncode == 0
    lease = _reserve(as_user, "alice")
    db = state_dir / "chronos.db"
    os.chown(db, pwd_uid(people["alice"]), os.stat(state_dir).st_gid)
    db.chmod(0o600)
    done = as_user("bob", "list")
    assert done.returncode == 1
    line = _one_line(done)
    assert f"init-state-dir {state_dir} --group {people['group']}" in line
    assert "remove" not in line and "delete" not in line
    assert run_cli("admin", "init-state-dir", str(state_dir), "--group", people["group"]).returncode == 0
    assert json.loads(as_user("bob", "show", lease, "--json").stdout)["state"] == "active"


def test_init_state_dir_is_for_root_and_a_real_group(people: dict[str, str], as_user: Run, state_dir: Path) -> None:
    done = as_user("alice", "admin", "init-state-dir", str(state_dir), "--group", people["group"])
    assert done.returncode == 4 and "only root" in _one_line(done)
    done = run_cli("admin", "init-state-dir", str(state_dir), "--group", "chrhub-nosuch")
    assert done.returncode == 2 and "sudo groupadd chrhub-nosuch" in _one_line(done)
    assert not state_dir.exists()


def pwd_uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid


def test_doctor_says_when_the_shared_default_directory_is_not_usable_by_everyone(
    people: dict[str, str], as_user: Run, state_dir: Path
) -> None:
    """The world-shared layout (1777): a ledger only its maker can write locks everyone else out."""
    state_dir.parent.mkdir()
    state_dir.mkdir(mode=0o1777)
    state_dir.chmod(0o1777)
    _reserve(as_user, "alice")
    assert as_user("root", "doctor").returncode == 0
    db = state_dir / "chronos.db"
    db.chmod(0o644)
    doctor = as_user("root", "doctor")
    assert doctor.returncode == 1
    assert f"{db} is not readable and writable by every user" in doctor.stderr
    assert f"ask {people['alice']} (uid {pwd_uid(people['alice'])}) to run chmod 666 {db}" in doctor.stderr
