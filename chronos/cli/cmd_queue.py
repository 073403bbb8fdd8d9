"""``chronos queue``: queued requests in grant order, with their estimated start."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "queue",
        help="queued requests: position, priority, owner, memory, GPUs wanted, estimated start",
        description="Queued requests in the order they will be granted (high, normal, low; within a class, with "
                    "[scheduling] fair_share, the owner with less recent use first; then first come first served), "
                    "each with why it stands there. The estimated start assumes every active lease runs to its end; "
                    "earlier releases make it sooner.",
    )
    p.add_argument("--json", action="store_true", help="a JSON array of queued requests")
    p.set_defaults(func=show)


def show(args: argparse.Namespace) -> int:
    import time

    import chronos
    from chronos.cli import render
    from chronos.text import plain
    from chronos.units import format_duration

    entries = chronos.queue()
    if args.json:
        render.dump_json([e.to_dict() for e in entries])
        return 0
    if not entries:
        print("no queued requests")
        return 0
    now = time.time()
    rows = []
    for e in entries:
        if e.estimated_start is None:
            start = "unknown"
        elif e.estimated_start <= now + 1:
            start = render.color("now", "green")
        else:
            start = f"{render.when(e.estimated_start)} (in {format_duration(e.estimated_start - now)})"
        rows.append([
            str(e.position), e.lease_id, e.owner, e.priority,
            e.memory + (" each" if e.gpus > 1 else ""), e.wanted, format_duration(e.duration_s),
            format_duration(max(0.0, now - e.queued_at)), start, plain(e.label or ""), e.why,
        ])
    render.table(["POS", "ID", "OWNER", "PRIORITY", "MEMORY", "WANTS", "FOR", "WAITING", "EST. START", "LABEL",
                  "WHY HERE"], rows)
    return 0
