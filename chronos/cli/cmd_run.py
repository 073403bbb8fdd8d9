"""``chronos run MEMORY DURATION [options] -- COMMAND ARGS...``: run a command inside a lease."""

from __future__ import annotations

import argparse
from typing import Any

from chronos.cli import options

_POLICIES = ("warn", "interrupt", "terminate", "kill")


def _split_at_dashes(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` treat everything after the first ``--`` as the command, options included.

    argparse alone cannot mix options with a trailing positional list (``2G 1h --gpu 1 -- cmd``).
    """
    base = type(parser)

    class _RunParser(base):  # type: ignore[valid-type,misc]
        def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
            items = list(args) if args is not None else []
            if "--" not in items:
                return super().parse_known_args(items, namespace)
            cut = items.index("--")
            parsed, extras = super().parse_known_args(items[:cut], namespace)
            parsed.argv = list(getattr(parsed, "argv", None) or []) + items[cut + 1:]
            return parsed, extras

    parser.__class__ = _RunParser


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run", help="run a command inside a lease",
        description="Reserve MEMORY per GPU for DURATION, run COMMAND inside the lease (its frameworks "
        "capped, the watchdog enforcing memory and time), and release the lease when COMMAND exits. "
        "Exits with COMMAND's status (128+N when signal N ended it); 2 for bad input, 3 when the lease "
        "cannot be had now.",
    )
    p.add_argument("memory", metavar="MEMORY", help="per GPU: 8G, 512M, 8GiB, 50%%, 0.5")
    p.add_argument("duration", metavar="DURATION", help="2h, 90m, 1h30m, 45s, 1d or seconds")
    p.add_argument("argv", metavar="COMMAND", nargs="*", help="the command and its arguments, after --")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpu", metavar="I[,I...]", help="these GPUs, all at once or none")
    where.add_argument("--gpus", type=int, metavar="N", help="any N GPUs at once")
    p.add_argument("--priority", choices=("high", "normal", "low"), default=None,
                   help="queue priority (default: the configured default, normally normal)")
    options.add_wait(p)
    p.add_argument("--on-expiry", choices=_POLICIES, default=None,
                   help="what to do when the lease ends (default: the configured one, terminate)")
    p.add_argument("--on-overuse", choices=_POLICIES, default="terminate",
                   help="what to do when COMMAND uses more than MEMORY past the grace period "
                   "(default terminate)")
    p.add_argument("--grace", type=float, default=None, metavar="SECONDS",
                   help="how long usage may stay over the cap before --on-overuse applies (default 2)")
    p.add_argument("--kill-wait", type=float, default=None, metavar="SECONDS",
                   help="seconds between SIGTERM and SIGKILL (default 30)")
    p.add_argument("--label", help="a note shown in chronos list (default: the command's name)")
    p.set_defaults(func=run_command)
    _split_at_dashes(p)


def run_command(args: argparse.Namespace) -> int:
    from chronos.errors import InvalidRequestError

    argv = list(args.argv or [])
    if not argv:
        from chronos.run import NO_COMMAND

        raise InvalidRequestError(NO_COMMAND)
    wait = options.wait_value(args.wait)
    from chronos.enforce.watchdog import DEFAULT_GRACE_S, DEFAULT_KILL_WAIT_S
    from chronos.run import run

    result = run(
        argv, args.memory, args.duration, gpus=args.gpus, device=args.gpu, priority=args.priority, wait=wait,
        on_expiry=args.on_expiry, on_overuse=args.on_overuse,
        grace=DEFAULT_GRACE_S if args.grace is None else args.grace,
        kill_wait=DEFAULT_KILL_WAIT_S if args.kill_wait is None else args.kill_wait,
        label=args.label,
    )
    return result.exit_code
