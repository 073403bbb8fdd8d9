"""``chronos run MEMORY DURATION [options] -- COMMAND ARGS...``: run a command inside a lease."""

from __future__ import annotations

import argparse
from typing import Any

from chronos.cli import options
from chronos.spellings import Action


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run", help="run a command inside a lease",
        description="Reserve MEMORY per GPU for DURATION, run COMMAND inside the lease (its frameworks "
        "capped, the watchdog enforcing memory and time), and release the lease when COMMAND exits. "
        "Exits with COMMAND's status (128+N when signal N ended it); 2 for bad input, 3 when the lease "
        "cannot be had now.",
    )
    p.add_argument("memory", metavar="MEMORY", nargs="?", help="per GPU: 8G, 512M, 8GiB, 50%%, 0.5 "
                   "(not with --booking)")
    p.add_argument("duration", metavar="DURATION", nargs="?", help="2h, 90m, 1h30m, 45s, 1d or seconds")
    p.add_argument("--booking", metavar="ID", help="run inside this booking of yours, claimed now, instead of a new "
                   "lease: chronos run --booking 12 -- COMMAND")
    p.add_argument("argv", metavar="COMMAND", nargs="*", help="the command and its arguments, after --")
    p.set_defaults(split_at_dashes=True)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpu", metavar="I[,I...]", help="these GPUs, all at once or none")
    where.add_argument("--gpus", type=int, metavar="N", help="any N GPUs at once")
    options.add_priority(p)
    options.add_wait(p)
    p.add_argument("--on-expiry", choices=Action.choices(), default=None,
                   help="what to do when the lease ends (default: the configured one, terminate)")
    p.add_argument("--on-overuse", choices=Action.choices(), default="terminate",
                   help="what to do when COMMAND uses more than MEMORY past the grace period "
                   "(default terminate)")
    p.add_argument("--grace", type=float, default=None, metavar="SECONDS",
                   help="how long usage may stay over the cap before --on-overuse applies (default 2)")
    p.add_argument("--kill-wait", type=float, default=None, metavar="SECONDS",
                   help="seconds between SIGTERM and SIGKILL (default 30)")
    p.add_argument("--label", help="a note shown in chronos list (default: the command's name)")
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from chronos.errors import InvalidRequestError

    argv = list(args.argv or [])
    if not argv:
        from chronos.run import NO_COMMAND

        raise InvalidRequestError(NO_COMMAND)
    from chronos.enforce.watchdog import DEFAULT_GRACE_S, DEFAULT_KILL_WAIT_S
    from chronos.run import run

    if args.booking is None and (args.memory is None or args.duration is None):
        raise InvalidRequestError("say how much memory and for how long (chronos run 8G 2h -- COMMAND), "
                                  "or which booking to run in (chronos run --booking ID -- COMMAND)")
    if args.booking is not None and (args.memory is not None or args.gpus or args.gpu):
        raise InvalidRequestError("a booking already says how much and where: chronos run --booking ID -- COMMAND")
    result = run(
        argv, args.memory or "", args.duration, gpus=args.gpus, device=args.gpu, priority=args.priority,
        wait=args.wait, booking=args.booking,
        on_expiry=args.on_expiry, on_overuse=args.on_overuse,
        grace=DEFAULT_GRACE_S if args.grace is None else args.grace,
        kill_wait=DEFAULT_KILL_WAIT_S if args.kill_wait is None else args.kill_wait,
        label=args.label,
    )
    return result.exit_code
