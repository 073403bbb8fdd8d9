"""Permissions by OS identity, with a real second user (CI runs as root; skipped elsewhere)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from tests.os_users import user_python

OTHER = "chronos-other"
SYSTEM_PYTHON = Path("/usr/bin/python3")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second OS user"),
    pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="needs /usr/bin/python3 for the second user"),
]


def _ensure_user() -> None:
    try:
        pwd.getpwnam(OTHER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER], check=True)


def _ensure_venv() -> Path:
    """A virtual environment the second user can read, with Chronos's dependencies."""
    return user_python()


@pytest.fixture(scope="module")
def as_other(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., subprocess.CompletedProcess[str]]:
    _ensure_user()
    python = _ensure_venv()
    src = Path("/var/tmp") / f"chronos-src-{os.getpid()}"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(ROOT / "chronos", src / "chronos", ignore=shutil.ignore_patterns("__pycache__"))
    os.chmod(src, 0o755)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": str(src), "NO_COLOR": "1",
            **{k: v for k, v in os.environ.items() if k.startswith("CHRONOS_")},
            # The test's config paths sit in root's private directory; an unreadable config is an error.
            "CHRONOS_CONFIG": "/nonexistent/chronos/config.toml",
            "CHRONOS_USER_CONFIG": "/nonexistent/chronos/user-config.toml",
        }
        return subprocess.run(
            [str(python), "-m", "chronos", *args], capture_output=True, text=True, env=env, cwd="/",
            user=OTHER, group=pwd.getpwnam(OTHER).pw_gid, extra_groups=[], timeout=60,
        )

    yield run  # type: ignore[misc]
    shutil.rmtree(src, ignore_errors=True)


@pytest.fixture
def shared_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state directory both users can use, as an admin would make it (sticky, world-writable)."""
    shared = Path("/var/tmp") / f"chronos-shared-{os.getpid()}-{tmp_path.name}"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    monkeypatch.setenv("CHRONOS_STATE_DIR", str(shared))
    yield shared  # type: ignore[misc]
    shutil.rmtree(shared, ignore_errors=True)


def test_users_cannot_touch_each_others_leases_but_root_can(
    shared_state: Path, as_other: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    mine = json.loads(run_cli("reserve", "8G", "1h", "--json").stdout)
    assert mine["owner"] == "root"

    theirs = as_other("reserve", "4G", "1h", "--json")
    assert theirs.returncode == 0, theirs.stderr
    lease = json.loads(theirs.stdout)
    assert lease["owner"] == OTHER and lease["uid"] == pwd.getpwnam(OTHER).pw_uid

    seen = json.loads(as_other("list", "--json").stdout)
    assert {item["id"] for item in seen} == {mine["id"], lease["id"]}

    for args in (("release", mine["id"]), ("extend", mine["id"], "1h")):
        out = as_other(*args)
        assert out.returncode == 4, out.stderr
        assert "belongs to root" in out.stderr and "Traceback" not in out.stderr
    assert json.loads(run_cli("show", mine["id"], "--json").stdout)["state"] == "active"

    out = as_other("reserve", "1G", "--user", "root")
    assert out.returncode == 4 and "only an admin" in out.stderr

    assert run_cli("extend", lease["id"], "30m").returncode == 0
    assert run_cli("release", lease["id"]).returncode == 0
    assert json.loads(run_cli("show", lease["id"], "--json").stdout)["state"] == "released"


def test_root_reserves_for_another_user_who_may_release_it(
    shared_state: Path, as_other: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    lease = json.loads(run_cli("reserve", "2G", "--user", OTHER, "--json").stdout)
    assert lease["owner"] == OTHER
    out = as_other("release", lease["id"])
    assert out.returncode == 0, out.stderr
    db = shared_state / "chronos.db"
    assert db.stat().st_mode & 0o666 == 0o666


def test_private_state_dir_of_another_user_is_refused(
    tmp_path: Path, as_other: Callable[..., subprocess.CompletedProcess[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    private = Path("/var/tmp") / f"chronos-private-{os.getpid()}"
    private.mkdir(mode=0o700, exist_ok=True)
    try:
        monkeypatch.setenv("CHRONOS_STATE_DIR", str(private))
        run_cli("reserve", "1G")
        out = as_other("list")
        assert out.returncode == 1
        assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1
    finally:
        shutil.rmtree(private, ignore_errors=True)



