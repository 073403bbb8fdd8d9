"""``chronos suggest``: how much to ask for, for how long, where, and the command to do it."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "suggest",
        help="advice for your next request, from the GPUs now and your past leases",
        description="Suggest memory (your recorded peaks plus headroom), duration (how long you really held "
                    "past leases), a GPU (where it fits now, or would start first) and the exact command.",
    )
    p.add_argument("--user", metavar="NAME", help="advise for another user's history")
    p.add_argument("--json", action="store_true", help="a JSON object")
    p.set_defaults(func=show)


def show(args: argparse.Namespace) -> int:
    import chronos
    from chronos.cli import render
    from chronos.units import format_bytes, format_duration

    advice = chronos.suggest(args.user)
    if args.json:
        render.dump_json(advice.to_dict())
        return 0
    print(render.color(advice.command, "bold"))
    where = f"GPU {advice.device}" if advice.device is not None else "no GPU yet"
    when = "now" if advice.fits_now else (render.when(advice.estimated_start) if advice.estimated_start else "unknown")
    print(f"  {format_bytes(advice.memory_bytes)} for {format_duration(advice.duration_s)} on {where}, "
          f"starting {when}")
    for reason in advice.reasons:
        print(f"  - {reason}")
    return 0
