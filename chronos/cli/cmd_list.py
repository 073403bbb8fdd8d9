"""``chronos list`` and ``chronos show``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from chronos.spellings import LeaseState

if TYPE_CHECKING:  # the records and their text load with the command that shows them, not with the parser
    from chronos.lease import Lease
    from chronos.model import LeaseRecord


#: How many leases ``list --all`` shows unless told otherwise.
PAGE = 50
#: The most ``--limit`` may ask for in one page.
MAX_PAGE = 10_000


def _page_size(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE:
        raise argparse.ArgumentTypeError(f"give a whole number from 1 to {MAX_PAGE}, not {text!r}")
    return int(text)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("list", aliases=["ls"], help="active and queued leases (--all: history)")
    p.add_argument("--all", action="store_true", help="every lease, ended ones too, newest first, a page at a time")
    p.add_argument("--limit", type=_page_size, default=PAGE, metavar="N",
                   help=f"with --all: at most N leases (default {PAGE})")
    p.add_argument("--before", metavar="ID", help="with --all: leases older than lease ID (the next page)")
    p.add_argument("--user", metavar="NAME", help="only this user's leases")
    p.add_argument("--json", action="store_true", help="a JSON array of leases")
    p.set_defaults(func=list_leases)

    s = subparsers.add_parser("show", aliases=["get"], help="one lease in detail")
    s.add_argument("lease_id", metavar="ID")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=show)


def _state(lease: Lease | LeaseRecord) -> str:
    from chronos.cli import render
    from chronos.model import LeaseRecord
    from chronos.text import idle_text

    colours = {LeaseState.ACTIVE: "green", LeaseState.QUEUED: "yellow", LeaseState.REVOKED: "red",
               LeaseState.BOOKED: "blue"}
    text = render.color(str(lease.state), colours.get(lease.state, "dim"))
    if lease.state == LeaseState.ACTIVE and lease.idle_since is not None:
        text += ", " + render.color(idle_text(lease.record if not isinstance(lease, LeaseRecord) else lease), "yellow")
    return text


def list_leases(args: argparse.Namespace) -> int:
    import chronos
    from chronos.cli import render
    from chronos.text import LEASE_COLUMNS, lease_rows

    if args.before is not None and not args.all:
        from chronos.errors import InvalidRequestError

        raise InvalidRequestError("--before pages through history: use it with --all")
    found = chronos.leases(all=args.all, user=args.user, limit=args.limit if args.all else None, before=args.before)
    queue = {}
    if any(lease.state == LeaseState.QUEUED for lease in found):
        queue = {entry.lease_id: entry for entry in chronos.queue()}
    if args.json:
        items = []
        for lease in found:
            item = lease.to_dict()
            if lease.id in queue:
                item["queue_position"] = queue[lease.id].position
                item["estimated_start"] = queue[lease.id].estimated_start
            items.append(item)
        render.dump_json(items)
        return 0
    if not found:
        print("no leases" if args.all else "no active leases (see `chronos list --all` for history)")
        return 0
    places = {key: (entry.position, entry.estimated_start) for key, entry in queue.items()}
    rows = lease_rows([lease.record for lease in found], places, lambda record, _text: _state(record))
    render.table(LEASE_COLUMNS, rows)
    if args.all and len(found) == args.limit:
        more = f" --user {args.user}" if args.user else ""
        print(f"(the {len(found)} newest shown; older ones: chronos list --all{more} --before {found[-1].id})")
    return 0


def show(args: argparse.Namespace) -> int:
    import chronos
    from chronos.cli import render
    from chronos.text import idle_text, plain

    lease = chronos.get_lease(args.lease_id)
    if args.json:
        render.dump_json(lease.to_dict())
        return 0
    rows = [
        ("id", lease.id), ("owner", f"{plain(lease.owner)} (uid {lease.uid})"), ("state", _state(lease)),
        ("gpus", ", ".join(f"{i} ({u})" for i, u in zip(lease.devices, lease.device_uuids, strict=True)) or "-"),
        ("memory", f"{render.gib(lease.memory_bytes)} per GPU"), ("priority", lease.priority),
        ("created", render.when(lease.created_at)),
        ("ends", f"{render.when(lease.expires_at)} ({render.left(lease.expires_at)})"),
        ("holder", str(lease.pid) if lease.pid else "none (lives until released or expired)"),
        ("label", plain(lease.label or "-")),
    ]
    if lease.starts_at is not None:
        from chronos.units import format_instant

        window = f"from {format_instant(lease.starts_at)} to {format_instant(lease.starts_at + lease.duration_s)}"
        rows.insert(7, ("booked", window))
    if lease.state == LeaseState.ACTIVE and lease.idle_since is not None:
        rows.append(("idle", idle_text(lease.record)))
    if lease.end_reason:
        rows.append(("ended", f"{render.when(lease.ended_at)}: {plain(lease.end_reason)}"))
    if lease.peak_memory_bytes is not None:
        rows.append(("peak memory", render.gib(lease.peak_memory_bytes)))
    for key, value in rows:
        print(f"{key:>12}  {value}")
    return 0
