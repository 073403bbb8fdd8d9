"""``chronos report`` (usage over the audit log) and ``chronos metrics`` (Prometheus text)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from chronos.spellings import REPORT_GROUPS


def register(subparsers: Any) -> None:
    r = subparsers.add_parser(
        "report", help="usage over the audit log: GPU-hours reserved, used, idle; leases, waits, refusals, no-shows",
        description="Usage of the leases granted since --since (a duration back such as 30d, or a time such as "
                    "2026-12-01), per user, group, label or GPU, from the audit log.",
    )
    r.add_argument("--since", default="30d", metavar="WHEN", help="30d (default), 12h, or a date or time")
    r.add_argument("--by", choices=REPORT_GROUPS, default="user", help="what each row is (default user)")
    fmt = r.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="comma-separated values, a header first")
    fmt.add_argument("--json", action="store_true", help="a JSON object")
    r.set_defaults(func=report)

    m = subparsers.add_parser(
        "metrics", help="the machine's figures in the Prometheus text format",
        description="Print the Prometheus text exposition (GPUs, users, the queue, refusals). With --write, "
                    "write [metrics] textfile (or PATH) atomically instead, as node_exporter's textfile "
                    "collector wants it.",
    )
    m.add_argument("--write", nargs="?", const="", default=None, metavar="PATH",
                   help="write the textfile (default: [metrics] textfile) instead of printing")
    m.set_defaults(func=metrics)


def report(args: argparse.Namespace) -> int:
    import chronos
    from chronos.cli import render
    from chronos.text import plain
    from chronos.units import format_duration, format_instant

    found = chronos.report(args.since, by=args.by)
    if args.json:
        render.dump_json(found.to_dict())
        return 0
    if args.csv:
        sys.stdout.write(found.to_csv())
        return 0
    print(f"leases granted from {format_instant(found.since)} to {format_instant(found.until)}, by {found.by}")
    rows = []
    for row in [*found.rows, found.total]:
        mean = format_duration(row.wait_s / row.waits) if row.waits and row.wait_s else "-"
        rows.append([plain(row.key), str(row.leases), f"{row.gpu_hours_reserved:.2f}",
                     "-" if row.gpu_hours_used is None else f"{row.gpu_hours_used:.2f}",
                     f"{row.idle_gpu_hours:.2f}", "-" if row.peak_percent is None else f"{row.peak_percent:.0f}%",
                     f"{row.gib_hours_reserved:.1f}", str(row.waits), mean, str(row.refusals), str(row.no_shows)])
    render.table([found.by.upper(), "LEASES", "GPU-H RESERVED", "GPU-H USED", "GPU-H IDLE", "PEAK/SIZE",
                  "GIB-H", "WAITS", "MEAN WAIT", "REFUSED", "NO-SHOWS"], rows)
    return 0


def metrics(args: argparse.Namespace) -> int:
    import chronos
    from chronos import settings
    from chronos.errors import InvalidRequestError
    from chronos.policy.metrics import write_textfile

    text = chronos.metrics()
    if args.write is None:
        sys.stdout.write(text)
        return 0
    path = args.write or settings.current().config.metrics_textfile
    if not path:
        raise InvalidRequestError("no textfile to write: give one (chronos metrics --write PATH) or set "
                                  "[metrics] textfile in the system config")
    try:
        write_textfile(path, text)
    except OSError as exc:
        raise InvalidRequestError(f"cannot write {path}: {exc.strerror}") from None
    print(f"wrote {path}")
    return 0
