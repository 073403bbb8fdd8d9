"""The ``chronos`` command: a thin front end over the library."""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from chronos.cli.app import run

    return run(argv)
