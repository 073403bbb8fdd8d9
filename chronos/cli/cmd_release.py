"""``chronos release`` and ``chronos extend``."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("release", help="end leases now")
    p.add_argument("lease_ids", metavar="ID", nargs="+")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=release)

    e = subparsers.add_parser("extend", help="push a lease's end back")
    e.add_argument("lease_id", metavar="ID", help="the lease, as chronos list shows it")
    e.add_argument("duration", metavar="DURATION", help="how much longer: 30m, 1h, 1h30m or seconds")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=extend)


def release(args: argparse.Namespace) -> int:
    import chronos
    from chronos.cli import render
    from chronos.errors import ChronosError, StateError

    worst = 0
    released = []
    for lease_id in args.lease_ids:
        try:
            before = chronos.get_lease(lease_id).state
            lease = chronos.release(lease_id)
        except StateError as exc:  # a full disk, a held lock: the lease must not look released
            render.error(f"lease {lease_id} is not released (it stays held until a release succeeds): {exc}")
            worst = max(worst, exc.exit_code)
            continue
        except ChronosError as exc:
            render.error(str(exc))
            worst = max(worst, exc.exit_code)
            continue
        released.append(lease)
        if not args.json:
            if before == "booked":
                print(f"released lease {lease.id}: the booking is cancelled")
            elif before.live:
                print(f"released lease {lease.id}")
            else:
                print(f"lease {lease.id} had already ended ({lease.state})")
    if args.json:
        render.dump_json([lease.to_dict() for lease in released])
    return worst


def extend(args: argparse.Namespace) -> int:
    import chronos
    from chronos.cli import render
    from chronos.errors import InvalidRequestError
    from chronos.request import swapped_extend

    swapped = swapped_extend(args.lease_id, args.duration)
    if swapped is not None:
        raise InvalidRequestError(f"{args.lease_id!r} is a duration, not a lease id: the lease comes first, "
                                  f"chronos extend {swapped[0]} {swapped[1]}")
    lease = chronos.extend(args.lease_id, args.duration)
    if args.json:
        render.dump_json(lease.to_dict())
    else:
        print(f"extended {render.lease_summary(lease)}")
    return 0
