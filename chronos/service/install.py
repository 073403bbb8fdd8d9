"""``chronos admin install-service``: the systemd unit that ships in the package, written where systemd reads it.

The unit (``chronos/service/units/chronos.service``) runs ``chronos serve`` as root in the foreground,
with ``Restart=on-failure``; systemd makes ``/run/chronos`` for the socket and ``/var/lib/chronos`` for
the ledger. Only ``ExecStart``'s interpreter is filled in here: the Python this Chronos is installed
in, so a virtual environment's Chronos is the one that runs.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from chronos.errors import InvalidRequestError, NotAllowedError

__all__ = ["DEFAULT_UNIT_DIR", "UNITS", "Installed", "install_service", "serve_argv", "unit_text"]

DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
UNITS = ("chronos.service",)
_PLACEHOLDER = "@PYTHON@"
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._+/-]+$")


@dataclass(frozen=True)
class Installed:
    """What :func:`install_service` wrote, and the commands that start the service."""

    paths: tuple[Path, ...]
    replaced: tuple[Path, ...]
    commands: tuple[str, ...]


def unit_text(name: str = "chronos.service", python: str | None = None) -> str:
    """The unit file ``name`` with ExecStart's interpreter filled in (default: this Python)."""
    interpreter = python or sys.executable
    if not _SAFE_PATH.match(interpreter):
        raise InvalidRequestError(f"the interpreter path {interpreter!r} must be absolute, with no spaces or "
                                  "quotes; give --python /path/to/python3")
    text = (resources.files("chronos.service") / "units" / name).read_text(encoding="utf-8")
    return text.replace(_PLACEHOLDER, interpreter)


def serve_argv(text: str) -> list[str]:
    """The command line a unit's ExecStart runs, split as systemd splits it."""
    lines = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    if len(lines) != 1:
        raise InvalidRequestError("a Chronos unit has exactly one ExecStart line")
    return shlex.split(lines[0].removeprefix("ExecStart="))


def install_service(directory: str | Path = DEFAULT_UNIT_DIR, python: str | None = None) -> Installed:
    """Write the units into ``directory`` (0644, replaced atomically); returns what to run next."""
    target = Path(directory)
    if not target.is_dir():
        raise InvalidRequestError(f"{target} is not a directory; is systemd installed here? (give --dir DIR)")
    written, replaced = [], []
    for name in UNITS:
        text = unit_text(name, python)
        path = target / name
        if path.exists():
            if path.read_text(encoding="utf-8", errors="replace") == text:
                written.append(path)
                continue
            replaced.append(path)
        try:
            fd, temp = tempfile.mkstemp(prefix=f".{name}.", dir=target)
        except PermissionError:
            raise NotAllowedError(f"cannot write into {target}: run it as root (sudo chronos admin "
                                  "install-service)") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.chmod(temp, 0o644)
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        written.append(path)
    commands = ("systemctl daemon-reload", "systemctl enable --now chronos.service", "systemctl status chronos.service")
    return Installed(tuple(written), tuple(replaced), commands)
