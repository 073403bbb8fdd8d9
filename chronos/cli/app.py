"""Argument parsing, dispatch, and the one place where errors become messages and exit codes."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import NoReturn

__all__ = ["COMMAND_MODULES", "EXIT_CODES_HELP", "build_parser", "run"]

#: One module per command group; each exposes ``register(subparsers)``.
COMMAND_MODULES = [
    "chronos.cli.cmd_reserve",
    "chronos.cli.cmd_list",
    "chronos.cli.cmd_release",
    "chronos.cli.cmd_stats",
    "chronos.cli.cmd_run",
    "chronos.cli.cmd_doctor",
    "chronos.cli.cmd_config",
    "chronos.cli.cmd_queue",
    "chronos.cli.cmd_suggest",
    "chronos.cli.cmd_book",
    "chronos.cli.cmd_report",
    "chronos.cli.cmd_admin",
    "chronos.cli.cmd_serve",
]

EXIT_CODES_HELP = """exit codes:
  0  success
  1  anything else (a bug, an unusable state directory, a GPU driver error)
  2  bad input: unknown GPU, unparsable size or duration, a request that could never fit here
  3  cannot be satisfied now: not enough free memory, queue timeout, extension refused,
     or this process is in another pid namespace than the ledger's (use the Chronos service)
  4  not allowed: another user's lease, admin-only options, a policy limit
  5  no such lease
  130, 143, 129  stopped by Ctrl-C, SIGTERM or SIGHUP (a queued request is withdrawn first)
"""


class _Stopped(BaseException):
    """SIGTERM or SIGHUP, raised where the command is, so that it unwinds as on Ctrl-C: a queued request is
    withdrawn and a half-done write rolled back, rather than left for the next command to clear up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop_on_signals() -> Callable[[], None]:
    """Turn SIGTERM and SIGHUP into :class:`_Stopped` while a command runs; returns what puts them back."""
    # the C module (no stubs): ``signal`` builds its enums on import, ~2 ms of every command
    import _signal as signal  # type: ignore[import-not-found]
    import threading

    if threading.current_thread() is not threading.main_thread():  # only the main thread has handlers
        return lambda: None

    def stop(signum: int, _frame: object) -> None:
        raise _Stopped(signum)

    before = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:  # an ignored SIGHUP (nohup) stays ignored
            before[signum] = signal.signal(signum, stop)

    def restore() -> None:
        for signum, handler in before.items():
            signal.signal(signum, handler)

    return restore


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake in one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="chronos",
        description="Time-limited, memory-capped GPU leases on a shared machine.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from chronos.cli import version_line

    parser.add_argument("--version", action="version", version=version_line())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``chronos run 8G 1h --gpu 1 -- cmd --flag``: everything after the first ``--`` is the command.

    argparse alone cannot mix options with a trailing list that has options of its own.
    """
    if "run" in argv and "--" in argv and argv.index("run") < argv.index("--"):
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, None


def run(argv: list[str] | None = None) -> int:
    from chronos.errors import as_chronos_error, with_hint

    parser = build_parser()
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["help"]:  # the original's `chronos help`, and `chronos help COMMAND`
        given = [*given[1:2], "--help"]
    head, command = _split_command(given)
    args = parser.parse_args(head)
    if command is not None:
        if getattr(args, "split_at_dashes", False):
            args.argv = [*(args.argv or []), *command]
        else:
            args = parser.parse_args(given)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    restore = _stop_on_signals()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("chronos: interrupted\n")
        return 130
    except _Stopped as stopped:
        import signal

        sys.stderr.write(f"chronos: stopped by {signal.Signals(stopped.signum).name}\n")
        return 128 + stopped.signum
    except BrokenPipeError:
        from chronos.cli import quiet_stdout

        quiet_stdout()
        return 1
    except Exception as exc:
        known = as_chronos_error(exc)
        if known is None:
            raise
        from chronos.cli import render

        render.error(with_hint(known))
        return known.exit_code
    finally:
        restore()
