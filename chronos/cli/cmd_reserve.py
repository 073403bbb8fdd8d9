"""``chronos reserve`` and the original ``chronos create``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from chronos.cli import options

if TYPE_CHECKING:
    from chronos.engine import WaitUpdate
    from chronos.lease import Lease


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "reserve", help="reserve GPU memory for a time",
        description="Reserve MEMORY per GPU (8G, 512M, 8GiB, 50%, or a bare number as a fraction of each GPU: 0.5 "
        "is half, 1 all of it) for DURATION (2h, 90m, 1h30m, 45s, 1d, seconds; default 1h). The lease lives "
        "until released or expired unless --pid binds it to a process.",
    )
    p.add_argument("memory", metavar="MEMORY")
    p.add_argument("duration", metavar="DURATION", nargs="?")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpu", metavar="I[,I...]", help="these GPUs, all at once or none")
    where.add_argument("--any", action="store_true",
                       help="the least-loaded GPU that fits: the default, spelled out (not with --gpu)")
    p.add_argument("--gpus", type=int, metavar="N", help="any N GPUs at once")
    p.add_argument("--prefer", metavar="I[,I...]", help="prefer these GPUs when they fit")
    options.add_priority(p)
    options.add_wait(p)
    p.add_argument("--label", help="a note shown in chronos list")
    p.add_argument("--user", metavar="NAME", help="reserve for another user (admins only)")
    p.add_argument("--pid", type=int, help="bind the lease to this process: it ends when the process exits")
    p.add_argument("--json", action="store_true", help="print the lease as JSON")
    p.set_defaults(func=reserve)

    c = subparsers.add_parser(
        "create", help="the original syntax: chronos create DEVICE FRACTION SECONDS",
        description="Reserve FRACTION (0-1] of GPU DEVICE for SECONDS, as the original Chronos did.",
    )
    c.add_argument("device", metavar="DEVICE")
    c.add_argument("fraction", metavar="FRACTION")
    c.add_argument("seconds", metavar="SECONDS")
    c.add_argument("--user", metavar="NAME", help="create for another user (admins only)")
    c.add_argument("--pid", type=int, help="bind the lease to this process")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=create)


def _granted(lease: Lease, as_json: bool, verb: str) -> int:
    from chronos.cli import render

    if as_json:
        render.dump_json(lease.to_dict())
    else:
        print(f"{verb} {render.lease_summary(lease)}")
        print(f"release it with: chronos release {lease.id}")
    return 0


def reserve(args: argparse.Namespace) -> int:
    import chronos

    on_wait = _progress_printer() if args.wait else None
    lease = chronos.reserve(
        args.memory, args.duration, device=args.gpu, gpus=args.gpus, prefer=args.prefer, label=args.label,
        user=args.user, bind=args.pid if args.pid is not None else False, wait=args.wait, on_wait=on_wait,
        priority=args.priority,
    )
    if on_wait is not None and sys.stderr.isatty():
        sys.stderr.write("\n")
    return _granted(lease, args.json, "granted")


def _progress_printer() -> Callable[[WaitUpdate], None]:
    from chronos.cli import render

    state = {"last": ""}

    def show(update: WaitUpdate) -> None:
        est = (
            f", estimated start {render.when(update.estimated_start)}" if update.estimated_start else ""
        )
        pos = f"position {update.position}" if update.position else "waiting"
        text = f"queued as lease {update.lease_id}: {pos}{est}"
        if text == state["last"]:
            return
        state["last"] = text
        if sys.stderr.isatty():
            sys.stderr.write("\r\033[K" + text)
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    return show


def create(args: argparse.Namespace) -> int:
    import chronos
    from chronos.errors import InvalidRequestError

    try:
        device = int(args.device)
    except ValueError:
        raise InvalidRequestError(f"DEVICE must be a GPU index such as 0, got {args.device!r}") from None
    try:
        fraction = float(args.fraction)
    except ValueError:
        raise InvalidRequestError(f"FRACTION must be a number in (0, 1], got {args.fraction!r}") from None
    if not 0 < fraction <= 1:
        raise InvalidRequestError(f"FRACTION must be in (0, 1], got {args.fraction}")
    seconds = chronos.parse_duration(args.seconds)
    lease = chronos.reserve(
        fraction, seconds, device=device, user=args.user, bind=args.pid if args.pid is not None else False
    )
    if args.json:
        return _granted(lease, True, "")
    # The original's two lines, which scripts read (`grep partition_ | awk '{print $3}'` is the id).
    from chronos import api, identity
    from chronos.request import partition_id

    name = next((d.name for d in api.gpus() if d.index == device), "GPU")
    ident = partition_id(lease.id)
    print(f"Created partition {ident} on device {device} ({name}) with {lease.memory_bytes >> 20} MB "
          f"for {round(lease.duration_s)} seconds")
    print(f"Assigned to user: {lease.owner} (Created by: {identity.current_user().name}, PID: {lease.pid or 0})")
    return 0
