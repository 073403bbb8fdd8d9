"""Bookings as an iCalendar feed (RFC 5545): one VEVENT per booking, for a lab calendar. Pure.

Lines end in CRLF and are folded at 75 octets (a continuation starts with a space); TEXT values
escape backslash, semicolon, comma and newline; every VEVENT has UID, DTSTAMP, DTSTART and DTEND in
UTC. A cancelled booking or a no-show is ``STATUS:CANCELLED``, a booking to come or claimed one
``CONFIRMED``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable
from typing import Any

from chronos.model import LeaseState
from chronos.text import plain
from chronos.units import format_bytes, format_duration

__all__ = ["calendar", "escape", "fold"]


def escape(text: str) -> str:
    """A TEXT value as RFC 5545 section 3.3.11 writes it."""
    return (text.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,")
            .replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\n"))


def fold(line: str) -> str:
    """One content line folded at 75 octets, never inside a UTF-8 character (section 3.1)."""
    data = line.encode("utf-8")
    parts: list[bytes] = []
    limit = 75
    while len(data) > limit:
        cut = limit
        while cut > 0 and (data[cut] & 0xC0) == 0x80:  # a continuation byte: cut before the character
            cut -= 1
        parts.append(data[:cut])
        data = data[cut:]
        limit = 74  # the leading space counts
    parts.append(data)
    return "\r\n ".join(p.decode("utf-8") for p in parts)


#: The last instant a DATE-TIME can write (an end stored before durations were bounded may lie past it).
_LAST = "99991231T235959Z"


def _utc(epoch: float) -> str:
    try:
        return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(epoch)) if epoch < 253402300800 else _LAST
    except (OverflowError, OSError, ValueError):
        return _LAST


def calendar(bookings: Iterable[Any], *, now: float, host: str | None = None) -> str:
    """The VCALENDAR for ``bookings`` (lease records or handles that were booked ahead)."""
    domain = host or socket.gethostname() or "localhost"
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//Chronos//GPU bookings//EN", "CALSCALE:GREGORIAN",
             "METHOD:PUBLISH", f"X-WR-CALNAME:{escape('GPU bookings on ' + domain)}"]
    for b in bookings:
        if b.starts_at is None:
            continue
        gpus = ",".join(str(i) for i in b.devices)
        summary = f"{plain(b.owner)}: {format_bytes(b.memory_bytes)} on GPU {gpus}" + (
            f" ({plain(b.label)})" if b.label else "")
        cancelled = b.state in (LeaseState.WITHDRAWN, LeaseState.NO_SHOW)
        description = (f"Chronos booking {b.id} for {b.owner}: {format_bytes(b.memory_bytes)} per GPU on GPU "
                       f"{gpus} for {format_duration(b.duration_s)}; state {b.state}."
                       + (f"\n{plain(b.end_reason)}" if b.end_reason else ""))
        lines += [
            "BEGIN:VEVENT",
            f"UID:chronos-booking-{b.id}-{int(b.created_at)}@{domain}",
            f"DTSTAMP:{_utc(now)}",
            f"CREATED:{_utc(b.created_at)}",
            f"DTSTART:{_utc(b.starts_at)}",
            f"DTEND:{_utc(b.starts_at + b.duration_s)}",
            f"SUMMARY:{escape(summary)}",
            f"DESCRIPTION:{escape(description)}",
            f"STATUS:{'CANCELLED' if cancelled else 'CONFIRMED'}",
            "TRANSP:OPAQUE",
            "END:VEVENT",
        ]
    lines.append("END:VCALENDAR")
    return "".join(fold(line) + "\r\n" for line in lines)
