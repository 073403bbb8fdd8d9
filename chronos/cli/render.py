"""Human output: tables, colours (only on a terminal, NO_COLOR respected), sizes and times."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from chronos import text
from chronos.lease import Lease
from chronos.units import format_bytes, format_clock, format_duration

__all__ = ["color", "dump_json", "error", "gib", "lease_summary", "left", "table", "warn", "when"]

_CODES = {"red": "31", "green": "32", "yellow": "33", "blue": "34", "dim": "2", "bold": "1"}


def _use_color(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return hasattr(stream, "isatty") and stream.isatty() and os.environ.get("TERM") != "dumb"


def color(value: str, name: str, stream: TextIO | None = None) -> str:
    if not _use_color(stream or sys.stdout):
        return value
    return f"\033[{_CODES[name]}m{value}\033[0m"


def error(message: str) -> None:
    """One line on stderr, whatever the message holds (a name or label a user typed is escaped)."""
    sys.stderr.write(f"{color('chronos: error:', 'red', sys.stderr)} {text.plain(message)}\n")


def warn(message: str) -> None:
    sys.stderr.write(f"{color('chronos:', 'yellow', sys.stderr)} {text.plain(message)}\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], stream: TextIO | None = None) -> None:
    """A plain aligned table (:func:`chronos.text.table`) with a bold header on a terminal."""
    stream = stream or sys.stdout
    stream.write(text.table(headers, rows, lambda head: color(head, "bold", stream)) + "\n")


def when(epoch: float | None) -> str:
    """Clock time: ``14:32`` today, ``Nov 29 14:32`` otherwise."""
    return format_clock(epoch)


left = text.left


def gib(nbytes: int | None) -> str:
    return "-" if nbytes is None else format_bytes(nbytes)


def dump_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def lease_summary(lease: Lease) -> str:
    """One sentence about a granted lease, naming its id."""
    gpus = ",".join(str(i) for i in lease.devices)
    plural = "s" if len(lease.devices) > 1 else ""
    each = " each" if len(lease.devices) > 1 else ""
    span = (lease.expires_at - lease.started_at) if lease.expires_at and lease.started_at else lease.duration_s
    return (
        f"lease {color(lease.id, 'bold')}: {format_bytes(lease.memory_bytes)}{each} on GPU{plural} {gpus} "
        f"for {format_duration(span)}, until {when(lease.expires_at)} ({left(lease.expires_at)})"
    )
