"""Plain text for people, shared by every front end: aligned tables and time left.

The CLI adds colour on top; the magics print these as they are. Cells may carry ANSI colour codes,
which do not count towards a column's width.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from chronos.model import LeaseRecord, LeaseState
from chronos.units import format_bytes, format_clock, format_duration

__all__ = ["LEASE_COLUMNS", "USAGE_COLUMNS", "idle_text", "lease_rows", "left", "plain", "table", "usage_rows",
           "visible_len"]

#: The columns of a list of leases, in ``chronos list`` and ``%chronos list`` alike.
LEASE_COLUMNS = ("ID", "OWNER", "GPU", "MEMORY", "STATE", "LEFT", "ENDS", "PID", "LABEL")
#: The columns of GPU-hours per user, in ``chronos stats --detailed`` and ``%chronos stats`` alike.
USAGE_COLUMNS = ("USER", "LAST DAY", "LAST WEEK", "IDLE WEEK", "LEASES DAY/WEEK", "ACTIVE", "QUEUED", "PEAK/CAP")


class Usage(Protocol):
    """One user's figures (``chronos.stats.UserUsage``), read only."""

    @property
    def user(self) -> str: ...
    @property
    def gpu_hours_day(self) -> float: ...
    @property
    def gpu_hours_week(self) -> float: ...
    @property
    def idle_gpu_hours_week(self) -> float: ...
    @property
    def leases_day(self) -> int: ...
    @property
    def leases_week(self) -> int: ...
    @property
    def active(self) -> int: ...
    @property
    def queued(self) -> int: ...
    @property
    def peak_to_cap_percent(self) -> float | None: ...


_ANSI = re.compile(r"\033\[[0-9;]*m")
#: Colour codes this package writes (render.color): the only escape sequences a table lets through.
_OWN_COLOUR = re.compile(r"\033\[(?:[0-9]|3[0-7])m")
_UNPRINTABLE = ("Cc", "Cf", "Zl", "Zp", "Cs")


def plain(value: object) -> str:
    """``value`` as one line of harmless text: control characters, newlines and bidi marks written as
    escapes (``\\x1b``, ``\\n``, ``\\u202e``), so text a user chose (a label, a name) can never move the
    cursor, forge a row or recolour another user's terminal."""
    text = str(value)
    if text.isprintable():
        return text
    out = []
    for char in text:
        if unicodedata.category(char) in _UNPRINTABLE:
            code = ord(char)
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char) or
                       (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"))
        else:
            out.append(char)
    return "".join(out)


def _cell(text: str) -> str:
    """A table cell with every escape but this package's own colour codes made :func:`plain`."""
    pieces = _OWN_COLOUR.split(text)
    codes = _OWN_COLOUR.findall(text)
    out = [plain(pieces[0])]
    for code, piece in zip(codes, pieces[1:], strict=True):
        out.extend((code, plain(piece)))
    return "".join(out)


def visible_len(text: str) -> int:
    """Length on screen: colour codes take no room."""
    return len(_ANSI.sub("", text))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]],
          header_style: Callable[[str], str] | None = None) -> str:
    """An aligned table, two spaces between columns, no trailing blanks; every cell made :func:`plain`
    (this package's colour codes apart)."""
    rows = [[_cell(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], visible_len(cell))

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c + " " * (w - visible_len(c)) for c, w in zip(cells, widths, strict=True)).rstrip()

    head = line(headers)
    lines = [header_style(head) if header_style else head]
    lines.extend(line(row) for row in rows)
    return "\n".join(lines)


def left(epoch: float | None, now: float | None = None) -> str:
    """``1h 12m left`` or ``expired``; ``-`` with no end."""
    if epoch is None:
        return "-"
    seconds = epoch - (time.time() if now is None else now)
    return f"{format_duration(seconds)} left" if seconds > 0 else "expired"


def idle_text(lease: LeaseRecord) -> str:
    """``idle since 14:02``, and what the idle policy will do when it has warned."""
    text = f"idle since {format_clock(lease.idle_since)}"
    notice = lease.idle_warning
    if notice is not None and notice.action_at is not None:
        verb = "released" if notice.action == "release" else "terminated"
        text += f" ({verb} at {format_clock(notice.action_at)})"
    return text


def lease_rows(leases: Sequence[LeaseRecord], queue: Mapping[str, tuple[int, float | None]] | None = None,
               state_style: Callable[[LeaseRecord, str], str] | None = None,
               now: float | None = None) -> list[list[str]]:
    """The rows under :data:`LEASE_COLUMNS`: ``queue`` maps a queued lease's id to its position and
    estimated start; ``state_style`` may colour the state cell. Names and labels are made :func:`plain`."""
    rows = []
    for lease in leases:
        gpus = ",".join(str(i) for i in lease.devices) or "any"
        if lease.state == LeaseState.ACTIVE:
            timing, ends = left(lease.expires_at, now), format_clock(lease.expires_at, now=now)
        elif lease.state == LeaseState.QUEUED:
            place, start = (queue or {}).get(lease.id, (None, None))
            timing = f"#{place} in queue" if place else "waiting"
            ends = f"starts ~{format_clock(start, now=now)}" if start else "-"
        elif lease.state == LeaseState.BOOKED:
            timing, ends = f"starts {format_clock(lease.starts_at, now=now)}", format_clock(lease.ends_at, now=now)
        else:
            timing, ends = "-", format_clock(lease.ended_at, now=now)
        state = str(lease.state)
        if lease.state == LeaseState.ACTIVE and lease.idle_since is not None:
            state += ", " + idle_text(lease)
        memory = format_bytes(lease.memory_bytes) if lease.memory_bytes else "-"
        rows.append([lease.id, plain(lease.owner), gpus, memory,
                     state_style(lease, state) if state_style else state, timing, ends,
                     str(lease.pid) if lease.pid else "-", plain(lease.label or "")])
    return rows


def usage_rows(users: Sequence[Usage]) -> list[list[str]]:
    """The rows under :data:`USAGE_COLUMNS`."""
    return [[plain(u.user), f"{u.gpu_hours_day:.2f}", f"{u.gpu_hours_week:.2f}", f"{u.idle_gpu_hours_week:.2f}",
             f"{u.leases_day}/{u.leases_week}", str(u.active), str(u.queued),
             f"{u.peak_to_cap_percent:.0f}%" if u.peak_to_cap_percent is not None else "-"] for u in users]
