"""Plain text for people, shared by every front end: aligned tables and time left.

The CLI adds colour on top; the magics print these as they are. Cells may carry ANSI colour codes,
which do not count towards a column's width.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence

from chronos.units import format_duration

__all__ = ["left", "table", "visible_len"]

_ANSI = re.compile(r"\033\[[0-9;]*m")


def visible_len(text: str) -> int:
    """Length on screen: colour codes take no room."""
    return len(_ANSI.sub("", text))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]],
          header_style: Callable[[str], str] | None = None) -> str:
    """An aligned table, two spaces between columns, no trailing blanks."""
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
