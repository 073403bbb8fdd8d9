"""Users who do not cooperate, as real OS users: configuration never grants power, a holder is one's own process.

CI runs as root: ``chrhub-fltann`` and ``chrhub-fltbob`` (plain users) and the group ``chrhub-fltadm``
are created for this module and removed after it. They run Chronos with Debian's ``/usr/bin/python3``
from the shared test virtual environment (tests/os_users.py) and a world-readable copy of this checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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
        admins = users.group("fltadm")
        yield {"admins": admins, "ann": users.user("fltann"), "bob": users.user("fltbob")}
    finally:
        users.remove()


@pytest.fixture(scope="module")
def place() -> Iterator[Path]:
    """A directory under /var/tmp that root owns: the system file, and a shared (1777) state directory."""
    base = Path("/var/tmp") / f"chronos-flt-{os.getpid()}"
    (base / "etc").mkdir(parents=True, mode=0o755)
    base.chmod(0o755)
    (base / "state").mkdir(mode=0o700)
    (base / "state").chmod(0o1777)
    (base / "homes").mkdir(mode=0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def as_user(people: dict[str, str], place: Path) -> Iterator[Run]:
    python = user_python()
    src = readable_copy(place / "src")
    system = place / "etc" / "config.toml"
    system.write_text(f'admin_group = "{people["admins"]}"\n\n[limits]\nmax_memory_per_lease = "8G"\n')
    system.chmod(0o644)

    def run(who: str, *args: str, env: dict[str, str] | None = None, code: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        home = place / "homes" / who
        base = {
            "PATH": "/usr/bin:/bin", "HOME": str(home), "PYTHONPATH": str(src), "NO_COLOR": "1",
            "CHRONOS_BACKEND": "simulated", "CHRONOS_SIM_GPUS": "2x80G", "CHRONOS_STATE_DIR": str(place / "state"),
            "CHRONOS_CONFIG": str(system), "CHRONOS_USER_CONFIG": str(home / "user.toml"),
            **(env or {}),
        }
        what = ["-c", code] if code is not None else ["-m", "chronos", *args]
        if who == "root":
            return subprocess.run([sys.executable, *what], capture_output=True, text=True,
                                  env={**os.environ, **base}, timeout=60)
        return run_as(people[who], [str(python), *what], env=base)

    for who in ("ann", "bob"):
        home = place / "homes" / who
        home.mkdir()
        shutil.chown(home, people[who], people[who])
    assert run("root", "list").returncode == 0  # root makes the shared ledger (0666), as in the default directory
    yield run


def _line(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def _own_file(people: dict[str, str], place: Path, who: str, text: str) -> Path:
    """A configuration file the user wrote themself, in their own directory."""
    path = place / "homes" / who / "mine.toml"
    done = run_as(people[who], ["sh", "-c", f"cat > {path}"], env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    subprocess.run(["sh", "-c", f"cat > {path}"], input=text, text=True, check=True)
    shutil.chown(path, people[who], people[who])
    return path


def test_a_users_own_config_file_grants_nothing(people: dict[str, str], place: Path, as_user: Run) -> None:
    # The administrator's file applies: 8G at most per lease.
    refused = as_user("ann", "reserve", "20G", "1h")
    assert refused.returncode == 4 and "8 GiB" in refused.stderr, refused.stderr
    bob = as_user("bob", "reserve", "4G", "1h", "--json")
    assert bob.returncode == 0, bob.stderr
    bob_id = json.loads(bob.stdout)["id"]
    # Ann names her own file, which makes her group an admin group and lifts the limit.
    mine = _own_file(people, place, "ann", f'admin_group = "{people["ann"]}"\n')
    for path in (str(mine), "/dev/null", str(place / "homes" / "ann" / "missing.toml")):
        for argv in (("reserve", "20G", "1h"), ("release", bob_id), ("list",)):
            done = as_user("ann", *argv, env={"CHRONOS_CONFIG": path})
            assert done.returncode == 2, (path, argv, done.stderr)
            assert _line(done).startswith(f"chronos: error: CHRONOS_CONFIG={os.path.realpath(path)} is not used: ")
            assert "must be a file only root can change" in done.stderr
    assert json.loads(as_user("bob", "show", bob_id, "--json").stdout)["state"] == "active"
    # What a user may set for themself, the user file, still works; root may name any file.
    (place / "homes" / "ann" / "user.toml").write_text('[defaults]\nduration = "2h"\n')
    shown = as_user("ann", "config", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["settings"]["defaults.duration"]["value"] == 7200
    assert as_user("root", "list", env={"CHRONOS_CONFIG": str(mine)}).returncode == 0
    assert as_user("bob", "release", bob_id).returncode == 0


def test_a_lease_binds_only_to_ones_own_process(people: dict[str, str], place: Path, as_user: Run) -> None:
    python = "/usr/bin/python3"
    victim = subprocess.Popen([python, "-c", "import time; time.sleep(120)"], user=people["bob"],
                              group=people["bob"], env={"PATH": "/usr/bin:/bin"})
    try:
        done = as_user("ann", "reserve", "1G", "1h", "--pid", str(victim.pid))
        assert done.returncode == 4
        assert _line(done) == (f"chronos: error: process {victim.pid} is not yours; a lease may be bound only to "
                               "your own processes (an admin may bind to anyone's)")
        mine = as_user("ann", "reserve", "1G", "1h", "--json")
        lease = json.loads(mine.stdout)["id"]
        rebind = f"import chronos; chronos.get_lease({lease!r}).bind({victim.pid}); print('bound')"
        refused = as_user("ann", code=rebind)
        assert refused.returncode != 0 and "NotAllowedError: process" in refused.stderr, refused.stderr
        api = as_user("ann", code=f"import chronos; chronos.reserve('1G', '1h', bind={victim.pid})")
        assert "is not yours" in api.stderr, api.stderr
        # Bob binds to his own process; an admin (root) may bind to anyone's.
        assert as_user("bob", "reserve", "1G", "1h", "--pid", str(victim.pid)).returncode == 0
        assert as_user("root", code=rebind).stdout.strip() == "bound"
        assert json.loads(as_user("ann", "show", lease, "--json").stdout)["pid"] == victim.pid
    finally:
        victim.kill()
        victim.wait()
    listed = json.loads(run_cli("list", "--json", env={"CHRONOS_STATE_DIR": str(place / "state")}).stdout)
    assert all(item["state"] != "active" or item["pid"] != victim.pid for item in listed)
