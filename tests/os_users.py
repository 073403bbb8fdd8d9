"""Real OS users and groups for policy tests, named under the prefix ``chrpol`` and removed afterwards.

CI runs as root; elsewhere the tests that need them are skipped.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

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
