"""``chronos book``, ``chronos bookings`` and ``chronos claim``: capacity booked ahead, and claimed."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chronos.lease import Lease


def register(subparsers: Any) -> None:
    b = subparsers.add_parser(
        "book", help="book GPU memory ahead for a time window",
        description="Book MEMORY per GPU for DURATION from --at TIME (\"tomorrow 09:00\", \"2026-12-24 14:00\", "
                    "\"mon 9am\", \"+2h\"; local time). The planner keeps it free: leases, extensions and queued "
                    "requests that would run into it wait or are refused. Claim it in its window with chronos claim "
                    "ID (or any matching request of yours); unclaimed after the grace period it is a no-show.",
    )
    b.add_argument("memory", metavar="MEMORY")
    b.add_argument("duration", metavar="DURATION")
    b.add_argument("--at", required=True, metavar="TIME", help="when the booking starts")
    where = b.add_mutually_exclusive_group()
    where.add_argument("--gpu", metavar="I[,I...]", help="these GPUs")
    where.add_argument("--gpus", type=int, metavar="N", help="any N GPUs at once")
    b.add_argument("--label", help="what it is for (shown in chronos bookings and the calendar)")
    b.add_argument("--user", metavar="NAME", help="book for another user (admins only)")
    b.add_argument("--json", action="store_true", help="print the booking as JSON")
    b.set_defaults(func=book)

    s = subparsers.add_parser("bookings", help="bookings to come (--all: every one), as a table, JSON or iCalendar")
    s.add_argument("--all", action="store_true", help="every booking, claimed, cancelled and no-shows too")
    s.add_argument("--user", metavar="NAME", help="only this user's bookings")
    fmt = s.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="a JSON array")
    fmt.add_argument("--ics", action="store_true", help="an iCalendar (.ics) feed for a lab calendar")
    s.set_defaults(func=list_bookings)

    c = subparsers.add_parser("claim", help="claim a booking in its window: it becomes your lease")
    c.add_argument("booking_id", metavar="ID")
    c.add_argument("--pid", type=int, help="bind the lease to this process: it ends when the process exits")
    c.add_argument("--json", action="store_true", help="print the lease as JSON")
    c.set_defaults(func=claim)


def _summary(lease: Lease) -> str:
    from chronos.cli import render
    from chronos.units import format_bytes, format_duration, format_instant

    gpus = ",".join(str(i) for i in lease.devices)
    start = format_instant(lease.starts_at) if lease.starts_at is not None else "-"
    return (f"booking {render.color(lease.id, 'bold')}: {format_bytes(lease.memory_bytes)} on GPU {gpus} for "
            f"{format_duration(lease.duration_s)} from {start}")


def book(args: argparse.Namespace) -> int:
    import chronos
    from chronos.cli import render

    lease = chronos.book(args.memory, args.duration, args.at, device=args.gpu, gpus=args.gpus, label=args.label,
                         user=args.user)
    if args.json:
        render.dump_json(lease.to_dict())
        return 0
    print(f"booked {_summary(lease)}")
    print(f"claim it then with: chronos claim {lease.id}    cancel it with: chronos release {lease.id}")
    return 0


def list_bookings(args: argparse.Namespace) -> int:
    import chronos
    from chronos.cli import render
    from chronos.policy.ics import calendar
    from chronos.text import plain
    from chronos.units import format_duration, format_instant

    found = chronos.bookings(all=args.all, user=args.user)
    if args.json:
        render.dump_json([lease.to_dict() for lease in found])
        return 0
    if args.ics:
        sys.stdout.flush()
        sys.stdout.buffer.write(calendar(found, now=time.time()).encode("utf-8"))  # CRLF line ends, untranslated
        sys.stdout.buffer.flush()
        return 0
    if not found:
        print("no bookings" if args.all else "no bookings to come (see chronos bookings --all)")
        return 0
    rows = []
    for lease in found:
        start = format_instant(lease.starts_at) if lease.starts_at is not None else "-"
        rows.append([lease.id, lease.owner, ",".join(map(str, lease.devices)), render.gib(lease.memory_bytes),
                     start, format_duration(lease.duration_s), str(lease.state), plain(lease.label or "")])
    render.table(["ID", "OWNER", "GPU", "MEMORY", "STARTS", "FOR", "STATE", "LABEL"], rows)
    return 0


def claim(args: argparse.Namespace) -> int:
    import chronos
    from chronos.cli import render

    lease = chronos.claim(args.booking_id, bind=args.pid if args.pid is not None else False)
    if args.json:
        render.dump_json(lease.to_dict())
    else:
        print(f"claimed {render.lease_summary(lease)}")
        print(f"release it with: chronos release {lease.id}")
    return 0
