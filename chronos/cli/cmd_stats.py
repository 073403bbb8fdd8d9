"""``chronos stats`` and the original ``chronos available``."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("stats", help="GPUs: memory total, used, reserved by leases, available")
    p.add_argument("--json", action="store_true", help="a JSON array of devices")
    p.set_defaults(func=stats)

    a = subparsers.add_parser("available", help="percent of a GPU's memory still available, e.g. 75.00")
    a.add_argument("device", metavar="DEVICE")
    a.set_defaults(func=available)


def stats(args: argparse.Namespace) -> int:
    from chronos import api
    from chronos.cli import render

    devices = api.devices()
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
    return 0


def available(args: argparse.Namespace) -> int:
    from chronos import api
    from chronos.errors import InvalidRequestError

    try:
        index = int(args.device)
    except ValueError:
        raise InvalidRequestError(f"DEVICE must be a GPU index such as 0, got {args.device!r}") from None
    for d in api.devices():
        if d.index == index:
            print(f"{100.0 * d.memory_available_bytes / d.memory_total_bytes:.2f}")
            return 0
    known = ", ".join(str(d.index) for d in api.devices())
    raise InvalidRequestError(f"unknown GPU {index}: this machine has GPUs {known}")
