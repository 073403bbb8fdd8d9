"""The ``chronos`` command: a thin front end over the library."""

from __future__ import annotations

import sys

__all__ = ["main", "version_line"]


def version_line() -> str:
    """What ``chronos --version`` prints."""
    from chronos import __version__

    return f"chronos {__version__}"


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if list(given) == ["--version"]:  # asked by scripts and health checks: answered without building the parser
        print(version_line())
        return 0
    from chronos.cli.app import run

    return run(argv)
