"""``chronos stats`` and the original ``chronos available``."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("stats", help="GPUs: memory total, used, reserved by leases, available")
    p.add_argument("--json", action="store_true", help="a JSON array of devices")
    p.add_argument("--detailed", action="store_true",
                   help="also memory reserved vs really used, queue per GPU, and your GPU-hours (day, week)")
    p.add_argument("--all", action="store_true", help="--detailed, with GPU-hours for every user")
    p.set_defaults(func=stats)

    a = subparsers.add_parser("available", help="percent of a GPU's memory still available, e.g. 75.00")
    a.add_argument("device", metavar="DEVICE")
    a.set_defaults(func=available)


def stats(args: argparse.Namespace) -> int:
    from chronos import api
    from chronos.cli import render

    if args.detailed or args.all:
        return detailed(args)
    devices = api.gpus()
    if args.json:
        render.dump_json([d.to_dict() for d in devices])
        return 0
    rows = []
    for d in devices:
        util = f"{d.utilization_percent}%" if d.utilization_percent is not None else "n/a"
        rows.append([
            str(d.index), d.name, render.gib(d.memory_total_bytes), render.gib(d.memory_used_bytes),
            render.gib(d.memory_reserved_bytes), render.gib(d.unmanaged_bytes),
            render.color(render.gib(d.memory_available_bytes), "green" if d.memory_available_bytes else "red"),
            str(d.active_leases), util,
        ])
    render.table(["GPU", "NAME", "TOTAL", "USED", "RESERVED", "UNMANAGED", "AVAILABLE", "LEASES", "UTIL"], rows)
    idle = [lease for lease in api.leases() if lease.state == "active" and lease.idle_since is not None]
    if idle:
        from chronos.text import idle_text

        print("\nidle leases (no GPU time used):")
        render.table(["ID", "OWNER", "GPU", "MEMORY", "IDLE"],
                     [[lease.id, lease.owner, ",".join(map(str, lease.devices)), render.gib(lease.memory_bytes),
                       idle_text(lease.record)] for lease in idle])
    strays = [u for d in devices for u in d.unmanaged_processes]
    if strays:
        print("\nunmanaged GPU processes (memory no lease accounts for):")
        render.table(
            ["PID", "GPU", "MEMORY", "WHY"],
            [[str(u.process.pid), str(u.process.device_index), render.gib(u.process.used_bytes),
              u.reason + (f" (lease {u.lease_id})" if u.lease_id else "")] for u in strays],
        )
    return 0


def detailed(args: argparse.Namespace) -> int:
    """Per-GPU reserved vs used memory and queue, and GPU-hours per user (chronos.stats)."""
    from chronos import api
    from chronos.cli import render
    from chronos.identity import current_user

    found = api.detailed_stats(user=None if args.all else current_user().name)
    if args.json:
        render.dump_json(found.to_dict())
        return 0
    rows = []
    for d in found.devices:
        util = f"{d.utilization_percent}%" if d.utilization_percent is not None else "n/a"
        share = f"{d.reserved_used_percent:.0f}%" if d.reserved_used_percent is not None else "-"
        rows.append([
            str(d.index), d.name, render.gib(d.memory_total_bytes), render.gib(d.memory_reserved_bytes),
            render.gib(d.memory_used_in_leases_bytes), share, render.gib(d.peak_in_leases_bytes),
            render.gib(d.unmanaged_bytes), render.gib(d.memory_available_bytes), util, str(d.active_leases),
            str(d.queued), d.uuid,
        ])
    render.table(["GPU", "NAME", "TOTAL", "RESERVED", "USED IN LEASES", "OF RESERVED", "PEAKS", "UNMANAGED",
                  "AVAILABLE", "UTIL", "LEASES", "QUEUED", "UUID"], rows)
    print(f"\nqueue: {found.queue_length} request(s) waiting")
    print(f"\nGPU-hours held ({'every user' if args.all else 'you'}; a 2-GPU lease for 1h counts 2):")
    from chronos.text import USAGE_COLUMNS, usage_rows

    users = usage_rows(found.users)
    if users:
        render.table(USAGE_COLUMNS, users)
    else:
        print("no leases in the last week")
    return 0


def available(args: argparse.Namespace) -> int:
    from chronos import api
    from chronos.errors import InvalidRequestError

    try:
        index = int(args.device)
    except ValueError:
        raise InvalidRequestError(f"DEVICE must be a GPU index such as 0, got {args.device!r}") from None
    devices = api.gpus()
    for d in devices:
        if d.index == index:
            print(f"{100.0 * d.memory_available_bytes / d.memory_total_bytes:.2f}")
            return 0
    known = ", ".join(str(d.index) for d in devices)
    raise InvalidRequestError(f"unknown GPU {index}: this machine has GPUs {known}")
