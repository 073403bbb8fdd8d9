"""Real OS users and groups for tests that run as root, removed afterwards.

CI runs as root; elsewhere the tests that need them are skipped. Policy tests name theirs under the
prefix ``chrpol`` (:func:`os_users`); the state-directory and JupyterHub tests under ``chrhub``
(:class:`OsUsers`). /root is private, so a process run as another user needs an interpreter and files
it can read: Debian's ``/usr/bin/python3`` with a virtual environment outside /root
(:func:`system_venv`), and a copy of this checkout's packages in a world-readable directory
(:func:`readable_copy`).
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import ROOT

PREFIX = "chrpol"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create OS users and groups")


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@contextmanager
def os_users(users: dict[str, tuple[str, ...]]) -> Iterator[dict[str, str]]:
    """Create ``{name: (group, ...)}`` (every name and group gets the prefix); yields short name -> full name."""
    names = {short: f"{PREFIX}-{short}" for short in users}
    groups = sorted({f"{PREFIX}-{g}" for gs in users.values() for g in gs})
    try:
        for group in groups:
            try:
                grp.getgrnam(group)
            except KeyError:
                _run("groupadd", group)
        for short, full in names.items():
            try:
                pwd.getpwnam(full)
                _run("userdel", full)
            except KeyError:
                pass
            extra = ",".join(f"{PREFIX}-{g}" for g in users[short])
            _run("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", *(["-G", extra] if extra else []),
                 full)
        yield names
    finally:
        for full in names.values():
            subprocess.run(["userdel", full], capture_output=True)
        for group in groups:
            subprocess.run(["groupdel", group], capture_output=True)


HUB_PREFIX = "chrhub"
SYSTEM_PYTHON = Path("/usr/bin/python3")
CAN_RUN = os.geteuid() == 0 and SYSTEM_PYTHON.exists() and shutil.which("useradd") is not None
WHY_NOT = "needs root, useradd and Debian's /usr/bin/python3 to act as other OS users"


class OsUsers:
    """Creates ``chrhub-*`` users and groups (or another ``prefix``'s) and removes every one it made."""

    def __init__(self, prefix: str = HUB_PREFIX) -> None:
        self.prefix = prefix
        self.users: list[str] = []
        self.groups: list[str] = []

    def group(self, name: str) -> str:
        full = f"{self.prefix}-{name}"
        subprocess.run(["groupadd", "-f", full], check=True)
        self.groups.append(full)
        return full

    def user(self, name: str, groups: Sequence[str] = (), *, home: bool = False) -> str:
        full = f"{self.prefix}-{name}"
        try:
            pwd.getpwnam(full)
        except KeyError:
            args = ["useradd", "--shell", "/bin/sh", "--create-home" if home else "--no-create-home"]
            if groups:
                args += ["--groups", ",".join(groups)]
            subprocess.run([*args, full], check=True)
        else:
            if groups:
                subprocess.run(["usermod", "-aG", ",".join(groups), full], check=True)
        self.users.append(full)
        return full

    def remove(self) -> None:
        for name in self.users:
            subprocess.run(["userdel", "--force", "--remove", name], check=False, capture_output=True)
        for name in self.groups:
            subprocess.run(["groupdel", name], check=False, capture_output=True)
        self.users.clear()
        self.groups.clear()


#: The virtual environment other OS users run Chronos with (its dependencies only; the code comes from a
#: readable copy on PYTHONPATH): one path and one package list, so no test rebuilds another's.
USER_VENV = Path("/var/tmp/chronos-test-venv")
USER_VENV_PACKAGES = ("psutil", "nvidia-ml-py")


def user_python() -> Path:
    """Debian's Python in :data:`USER_VENV`, with Chronos's dependencies, runnable by every user."""
    return system_venv(USER_VENV, USER_VENV_PACKAGES, " ".join(USER_VENV_PACKAGES))


def system_venv(path: Path, packages: Sequence[str], marker: str) -> Path:
    """A virtual environment of Debian's Python at ``path`` with ``packages``; rebuilt when ``marker`` changes.

    Built once and kept (``path`` is outside /root so every user can run it); the pip cache makes a
    rebuild cheap. A lock beside it keeps test runs in parallel from building it over each other.
    """
    python = path / "bin" / "python"
    stamp = path / ".chronos-test-venv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp.exists() and stamp.read_text() == marker and python.exists()):
            shutil.rmtree(path, ignore_errors=True)
            subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", str(path)], check=True, timeout=300)
            if packages:
                subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages],
                               check=True, timeout=600)
            stamp.write_text(marker)
    for directory in [path, *path.parents]:
        if directory == Path("/"):
            break
        directory.chmod(directory.stat().st_mode | 0o755)
    return python


def readable_copy(target: Path, packages: Sequence[str] = ("chronos",)) -> Path:
    """This checkout's ``packages`` copied to ``target`` (world-readable), for PYTHONPATH."""
    shutil.rmtree(target, ignore_errors=True)
    for package in packages:
        shutil.copytree(ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__"))
    for root, _dirs, files in os.walk(target):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    return target


def run_as(user: str, argv: Sequence[str], *, env: Mapping[str, str], cwd: str = "/",
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``argv`` as ``user`` with that user's groups from /etc/group (as a login would give them)."""
    info = pwd.getpwnam(user)
    groups = [g.gr_gid for g in grp.getgrall() if user in g.gr_mem]
    return subprocess.run(list(argv), capture_output=True, text=True, env=dict(env), cwd=cwd, user=info.pw_uid,
                          group=info.pw_gid, extra_groups=groups, timeout=timeout)
