"""The ``chronos`` command: a thin front end over the library."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

__all__ = ["exit_code_of", "main", "quiet_stdout", "version_line"]


def version_line() -> str:
    """What ``chronos --version`` prints."""
    from chronos import __version__

    return f"chronos {__version__}"


def quiet_stdout() -> None:
    """After a write to a closed pipe (``chronos list | head -1``): what is still buffered goes nowhere, so that
    Python's own flush at exit does not print "Exception ignored" and exit 120."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no descriptor behind sys.stdout (a test's capture): nothing is flushed at exit
        pass


def main(argv: list[str] | None = None) -> int:
    return exit_code_of(lambda: _dispatch(sys.argv[1:] if argv is None else argv))


def exit_code_of(command: Callable[[], int]) -> int:
    """``command``'s exit code, its output flushed here: a reader that went away (``chronos list | head -0``)
    is exit 1, "anything else", not a traceback or Python's "Exception ignored" at exit. Every command line
    entry point of the project runs through this."""
    try:
        try:
            return command()
        finally:  # argparse's --help and usage errors leave by SystemExit: theirs is flushed here too
            if sys.stdout is not None:
                sys.stdout.flush()
    except BrokenPipeError:
        quiet_stdout()
        return 1


def _dispatch(argv: list[str]) -> int:
    if list(argv) == ["--version"]:  # asked by scripts and health checks: answered without building the parser
        print(version_line())
        return 0
    from chronos.cli.app import run

    return run(argv)
