"""Parsing and formatting of sizes and durations.

Sizes use binary units as Docker reads them: ``8G`` == ``8GiB`` == 8 * 2**30 bytes.
A fraction of a device is written ``50%`` or ``0.5``.
"""

from __future__ import annotations

import calendar
import math
import re
import time
from dataclasses import dataclass

from chronos.errors import InvalidRequestError

__all__ = [
    "DURATION_CEILING_S",
    "LONGEST_DURATION_S",
    "SHORTEST_LEASE_S",
    "SIZE_CEILING",
    "MemorySpec",
    "check_duration",
    "duration_text",
    "format_bytes",
    "format_clock",
    "format_duration",
    "format_instant",
    "parse_duration",
    "parse_instant",
    "parse_memory",
    "parse_size",
    "size_text",
]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
}
# ASCII only: a fullwidth or other script's digit is never read as a number of bytes or seconds.
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE | re.ASCII)
_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*%\s*$", re.ASCII)
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms])", re.IGNORECASE | re.ASCII)
_DURATION_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}

#: The longest duration anything reads, whatever the configuration says (about 100 years): every end
#: time stays a date the clock can show, and stored values stay far inside SQLite's and time_t's range.
DURATION_CEILING_S = 100 * 365 * 86400.0
#: The default of the configuration's ``longest_duration``: the longest lease, extension or booking.
LONGEST_DURATION_S = 366 * 86400.0
#: The shortest lease: anything shorter would end before its owner could see it.
SHORTEST_LEASE_S = 1.0
#: The largest size anything reads (1 PiB, far past any GPU): the machine's own GPUs bound a request
#: further, with the largest one named in the message.
SIZE_CEILING = 1 << 50
#: Longer text is never a size or a duration: it is cut in messages, so a mistake stays one short line.
_MAX_TEXT = 40


def _shown(value: object) -> str:
    """``value`` as a message quotes it: repr, control characters escaped, at most about 40 characters."""
    text = repr(value)
    return text if len(text) <= _MAX_TEXT + 2 else text[:_MAX_TEXT] + "...'"


@dataclass(frozen=True)
class MemorySpec:
    """A memory request: either an absolute size or a fraction of each chosen device."""

    nbytes: int | None = None
    fraction: float | None = None

    def resolve(self, total_bytes: int) -> int:
        """Bytes this spec asks for on a device of ``total_bytes``."""
        if self.nbytes is not None:
            return self.nbytes
        assert self.fraction is not None
        return int(self.fraction * total_bytes)

    def __str__(self) -> str:
        if self.nbytes is not None:
            return format_bytes(self.nbytes)
        assert self.fraction is not None
        return f"{self.fraction * 100:g}%"


def parse_memory(value: str | int | float | MemorySpec) -> MemorySpec:
    """Parse ``8G``, ``512M``, ``8GiB``, ``50%`` or ``0.5``; an int is bytes, a float in (0, 1] a fraction.

    A bare number in text is always a fraction of each GPU (``0.5`` half of it, ``1`` all of it), as the
    original Chronos read it; a bare number above 1 is refused with both readings a person may have meant.
    """
    if isinstance(value, MemorySpec):
        return value
    if isinstance(value, bool):
        raise InvalidRequestError(f"invalid memory {value!r}: give a size such as 8G or a fraction such as 50%")
    if isinstance(value, int):
        if value <= 0:
            raise InvalidRequestError(f"memory must be more than 0 bytes, got {value}")
        return MemorySpec(nbytes=_bounded_size(value, str(value)))
    if isinstance(value, float):
        return _fraction(value, str(value))
    if not isinstance(value, str):
        raise InvalidRequestError(f"invalid memory {_shown(value)}: give a size such as 8G or a fraction such as 50%")
    text = value.strip()
    match = _PERCENT_RE.match(text)
    if match:
        return _fraction(float(match.group(1)) / 100.0, text)
    if re.fullmatch(r"\d*\.\d+|\d+\.?\d*", text, re.ASCII):
        if float(text) <= 1.0:
            return _fraction(float(text), text)
        if float(text) * _UNITS["g"] > SIZE_CEILING:
            _bounded_size(SIZE_CEILING + 1, text)
        count = f"; for {text} whole GPUs write 1 --gpus {text}" if text.isdigit() else ""
        raise InvalidRequestError(
            f"memory {text!r} is a bare number, which is a fraction of each GPU (0.5 is half, 1 all of it): "
            f"for {text} GiB write {text}G{count}"
        )
    match = _SIZE_RE.match(text)
    if not match:
        raise InvalidRequestError(
            f"cannot read memory {_shown(text)}: use a size such as 8G, 512M, 8GiB, or a fraction such as 50% or 0.5"
        )
    number, unit = match.groups()
    if not unit and not text.lower().endswith("b"):
        raise InvalidRequestError(f"memory {text!r} has no unit: write {number}G for GiB or {number}M for MiB")
    amount = float(number) * _UNITS[unit.lower()]
    if not amount <= SIZE_CEILING:
        _bounded_size(SIZE_CEILING + 1, text)
    if int(amount) <= 0:
        raise InvalidRequestError(f"memory {_shown(text)} is 0 bytes: give a size such as 512M or 8G")
    return MemorySpec(nbytes=_bounded_size(int(amount), text))


def _bounded_size(nbytes: int, text: str) -> int:
    """``nbytes`` if it is at most :data:`SIZE_CEILING`, else the refusal."""
    if nbytes > SIZE_CEILING:
        raise InvalidRequestError(f"memory {_shown(text)} is far larger than any GPU: Chronos reads sizes up to "
                                  f"{SIZE_CEILING >> 40}T; give the memory per GPU, such as 40G")
    return nbytes


def parse_size(value: str | int) -> int:
    """An absolute size in bytes (``40G``, ``512M``); a fraction of a GPU is refused."""
    spec = parse_memory(value)
    if spec.nbytes is None:
        raise InvalidRequestError(f"{value!r} is a fraction of a GPU; give an absolute size such as 40G")
    return spec.nbytes


def _fraction(value: float, text: str) -> MemorySpec:
    if not math.isfinite(value) or value <= 0 or value > 1:
        raise InvalidRequestError(f"memory fraction {_shown(text)} must be above 0 and at most 1 (100%)")
    return MemorySpec(fraction=value)


def parse_duration(value: str | int | float, *, shortest: float = 0.0, longest: float = DURATION_CEILING_S,
                   what: str = "duration") -> float:
    """Parse ``2h``, ``90m``, ``1h30m``, ``45s``, ``1d`` or plain seconds into seconds (> 0).

    A value must be finite, above 0 and at least ``shortest``, and at most ``longest`` (the
    configuration's ``longest_duration`` where a lease's length is read); ``what`` names it in messages.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InvalidRequestError(f"invalid {what} {_shown(value)}: use 2h, 90m, 1h30m, 45s, 1d or seconds")
    if isinstance(value, (int, float)):
        seconds = float(value) if not abs(value) > 1e300 else math.inf if value > 0 else -math.inf
    else:
        text = value.strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(?:\.\d+)?", text, re.ASCII):
            seconds = float(text)
        else:
            parts = _DURATION_PART_RE.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise InvalidRequestError(
                    f"cannot read {what} {_shown(value)}: use 2h, 90m, 1h30m, 45s, 1d or seconds"
                )
            seconds = sum(float(n) * _DURATION_SECONDS[u] for n, u in parts)
    if math.isnan(seconds):
        raise InvalidRequestError(f"cannot read {what} {_shown(value)}: use 2h, 90m, 1h30m, 45s, 1d or seconds")
    if seconds <= 0:
        raise InvalidRequestError(f"{what} must be more than 0, got {_shown(value)}")
    return check_duration(seconds, shortest=shortest, longest=longest, what=what, text=value)


def check_duration(seconds: float, *, shortest: float = 0.0, longest: float = DURATION_CEILING_S,
                   what: str = "duration", text: object = None) -> float:
    """``seconds`` if it lies within [``shortest``, ``longest``], else the one-line refusal saying the bound."""
    shown = _shown(text) if text is not None else duration_text(seconds) if math.isfinite(seconds) else "infinite"
    if not seconds <= longest:
        raise InvalidRequestError(f"{what} {shown} is too long: at most {duration_text(longest)} here")
    if seconds < shortest:
        if what != "duration":
            raise InvalidRequestError(f"{what} {shown} is too short: at least {duration_text(shortest)}")
        raise InvalidRequestError(f"{what} {shown} is too short: a lease lasts at least {duration_text(shortest)}, "
                                  "or it would end before it could be used")
    return seconds


def format_bytes(nbytes: int | float) -> str:
    """``8589934592`` -> ``8 GiB``; GiB above 1 GiB, MiB below."""
    if nbytes >= 1 << 30 or nbytes == 0:
        return f"{nbytes / (1 << 30):.4g} GiB" if nbytes else "0 GiB"
    if nbytes >= 1 << 20:
        return f"{nbytes / (1 << 20):.4g} MiB"
    return f"{nbytes / (1 << 10):.4g} KiB"


def format_duration(seconds: float) -> str:
    """``4320`` -> ``1h 12m``; seconds shown only under ten minutes (``-`` for no number)."""
    if not math.isfinite(seconds):
        return "forever" if seconds > 0 else "-"
    seconds = max(0, round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes:02d}m" if minutes else f"{hours}h"
    if minutes >= 10:
        return f"{minutes}m"
    if minutes:
        return f"{minutes}m {secs:02d}s" if secs else f"{minutes}m"
    return f"{secs}s"


def size_text(nbytes: int) -> str:
    """A size as ``chronos reserve`` reads it: ``12G``, or whole MiB rounded up (``768M``)."""
    if nbytes % (1 << 30) == 0:
        return f"{nbytes >> 30}G"
    return f"{math.ceil(nbytes / (1 << 20))}M"


def duration_text(seconds: float) -> str:
    """The shortest exact spelling ``parse_duration`` reads back: ``2h``, ``1h30m``, ``90s``."""
    if not math.isfinite(seconds):
        return "forever"
    if seconds != int(seconds):
        return f"{seconds:g}s"
    rest = int(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def format_clock(epoch: float | None, *, seconds: bool = False, now: float | None = None) -> str:
    """A wall-clock time in the local zone: ``14:32`` today, ``Nov 29 14:32`` another day; ``-`` for None."""
    if epoch is None or not math.isfinite(epoch):
        return "-"
    then = _localtime(epoch)
    if then is None:
        return _FAR_FUTURE if epoch > 0 else "-"
    today = time.localtime(now if now is not None else time.time())
    clock = "%H:%M:%S" if seconds else "%H:%M"
    return time.strftime(clock if then[:3] == today[:3] else f"%b %d {clock}", then)


#: What a time past the clock's range (a ledger written before durations were bounded) shows as.
_FAR_FUTURE = "far future"


def _localtime(epoch: float) -> time.struct_time | None:
    """``time.localtime``, or None past what this platform's clock can show (year 10000 and later)."""
    if not -1e12 < epoch < 253402300800:  # 9999-12-31 UTC, or some negative year strftime cannot write
        return None
    try:
        return time.localtime(epoch)
    except (OverflowError, OSError, ValueError):
        return None


# -- instants: a time of day or a date, in the local zone -------------------------------------------------
_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_CLOCK = r"(?P<hour>\d{1,2})(?::(?P<minute>\d{2})(?::(?P<second>\d{2}))?)?\s*(?P<half>am|pm)?"
_DAY_CLOCK_RE = re.compile(rf"^(?:(?P<day>today|tomorrow|[a-z]+)\s+)?{_CLOCK}$")
_DATE_RE = re.compile(
    r"^(?:(?P<weekday>[a-z]{3})\w*\s+)?(?P<year>\d{4})-(?P<month>\d{2})-(?P<mday>\d{2})"
    rf"(?:(?:\s+|t){_CLOCK})?"
    r"(?:\s*(?P<zone>z|utc|[a-z]{2,6}|[+-]\d{2}(?:\d{2})?))?"
    r"(?:\s*\(?\s*(?:utc)?(?P<offset>[+-]\d{2}:?\d{2})\)?)?$"
)
_INSTANT_HINT = 'use e.g. "tomorrow 09:00", "2026-12-24 14:00", "14:30", "mon 9am" or "+2h"'


def _bad_instant(value: object, why: str = "", *, hint: bool = True) -> InvalidRequestError:
    tail = f"; {_INSTANT_HINT}" if hint else ""
    return InvalidRequestError(f"cannot read time {value!r}{': ' + why if why else ''}{tail}")


def _hms(match: re.Match[str], value: object) -> tuple[int, int, int]:
    if match.group("hour") is None:
        return 0, 0, 0
    hour, minute, second = int(match.group("hour")), int(match.group("minute") or 0), int(match.group("second") or 0)
    half = match.group("half")
    if half:
        if not 1 <= hour <= 12:
            raise _bad_instant(value, f"{hour}{half} is not a time of day")
        hour = hour % 12 + (12 if half == "pm" else 0)
    if hour > 23 or minute > 59 or second > 59:
        raise _bad_instant(value, "hours run 0-23, minutes and seconds 0-59")
    return hour, minute, second


def local_epoch(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0,
                *, what: object = None) -> float:
    """The one instant the local wall-clock time names; an error for a time that does not exist (clocks
    go forward) or happens twice (clocks go back), which an explicit UTC offset settles."""
    wanted = (year, month, day, hour, minute, second)
    found = set()
    for dst in (0, 1):
        try:
            epoch = time.mktime((year, month, day, hour, minute, second, 0, 0, dst))
        except (OverflowError, ValueError):
            continue
        if time.localtime(epoch)[:6] == wanted:
            found.add(epoch)
    text = f"{year:04d}-{month:02d}-{day:02d} {hour:02d}:{minute:02d}"
    if not found:
        try:
            calendar.timegm((year, month, day, hour, minute, second))
            time.strptime(f"{year:04d}-{month:02d}-{day:02d}", "%Y-%m-%d")
        except (OverflowError, ValueError):
            raise _bad_instant(what or text, "no such date") from None
        raise _bad_instant(what or text, f"{text} does not exist here (the clocks go forward); pick a later time",
                           hint=False)
    if len(found) > 1:
        offsets = sorted(_offset_text(t) for t in found)
        raise _bad_instant(what or text, f"{text} happens twice here (the clocks go back); add the UTC offset, "
                                         f"e.g. \"{text} {offsets[0]}\" or \"{text} {offsets[1]}\"", hint=False)
    return found.pop()


def _offset_text(epoch: float) -> str:
    offset = time.localtime(epoch).tm_gmtoff
    sign = "+" if offset >= 0 else "-"
    hours, rest = divmod(abs(offset), 3600)
    return f"{sign}{hours:02d}:{rest // 60:02d}"


def _next_day(year: int, month: int, day: int, days: int = 1) -> tuple[int, int, int]:
    moved = time.gmtime(calendar.timegm((year, month, day, 12, 0, 0)) + days * 86400)
    return moved.tm_year, moved.tm_mon, moved.tm_mday


def parse_instant(value: str | int | float, *, now: float | None = None) -> float:
    """A point in time as epoch seconds, read in the local time zone.

    ``now``, ``+2h`` or ``in 90m`` (from now); ``14:30``, ``9am`` (the next time the clock shows it);
    ``today 14:30``, ``tomorrow 09:00``, ``mon 09:00`` (the next Monday, today included);
    ``2026-12-24 14:00`` or ``2026-12-24T14:00``, optionally with ``Z``, ``UTC`` or an offset such as
    ``+01:00``; a date alone is its midnight. What :func:`format_instant` prints reads back as the same
    instant. A number is epoch seconds.
    """
    if isinstance(value, bool):
        raise _bad_instant(value)
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise _bad_instant(value)
        return float(value)
    text = " ".join(str(value).strip().lower().split())
    current = time.time() if now is None else now
    if text == "now":
        return current
    if text.startswith(("+", "in ")):
        rest = text[1:] if text.startswith("+") else text[3:]
        try:
            return current + parse_duration(rest.strip())
        except InvalidRequestError:
            raise _bad_instant(value, "after + give a duration such as 2h or 90m") from None
    if len(text) > 64:
        raise _bad_instant(text[:64] + "...", "too long")
    match = _DAY_CLOCK_RE.match(text)
    if match and match.group("hour") is not None:
        hour, minute, second = _hms(match, value)
        today = time.localtime(current)
        day = match.group("day")
        ymd = (today.tm_year, today.tm_mon, today.tm_mday)
        if day == "tomorrow":
            ymd = _next_day(*ymd)
        elif day not in (None, "today"):
            if day[:3] not in _WEEKDAYS or not ("monday tuesday wednesday thursday friday saturday sunday"
                                                 .split()[_WEEKDAYS.index(day[:3])].startswith(day)):
                raise _bad_instant(value, f"unknown day {day!r}")
            ymd = _next_day(*ymd, (_WEEKDAYS.index(day[:3]) - today.tm_wday) % 7)
        epoch = local_epoch(*ymd, hour, minute, second, what=value)
        if day is None and epoch < current:  # a bare clock time already past today: the next one
            epoch = local_epoch(*_next_day(*ymd), hour, minute, second, what=value)
        return epoch
    match = _DATE_RE.match(text)
    if not match:
        raise _bad_instant(value)
    year, month, mday = int(match.group("year")), int(match.group("month")), int(match.group("mday"))
    hour, minute, second = _hms(match, value)
    offset, zone = match.group("offset"), match.group("zone")
    if zone in ("z", "utc") and offset is None:
        offset = "+00:00"
    elif zone is not None and zone[0] in "+-" and offset is None:  # a numeric zone is its own offset
        offset, zone = (zone + "00")[:5], None
    if offset is not None:
        digits = offset.replace(":", "")
        minutes = int(digits[1:3]) * 60 + int(digits[3:5])
        if int(digits[3:5]) > 59 or minutes > 14 * 60:
            raise _bad_instant(value, f"{offset} is not a UTC offset")
        try:
            base = calendar.timegm((year, month, mday, hour, minute, second))
            time.strptime(f"{year:04d}-{month:02d}-{mday:02d}", "%Y-%m-%d")
        except (OverflowError, ValueError):
            raise _bad_instant(value, "no such date") from None
        epoch = float(base - (1 if digits[0] == "+" else -1) * minutes * 60)
    else:
        epoch = local_epoch(year, month, mday, hour, minute, second, what=value)
    if zone not in (None, "z", "utc") and zone != time.strftime("%Z", time.localtime(epoch)).lower() \
            and not (offset is not None and zone[0] in "+-"):
        raise _bad_instant(value, f"the zone {zone.upper()} is not this machine's; give a UTC offset such as +01:00")
    weekday = match.group("weekday")
    if weekday is not None and weekday != _WEEKDAYS[time.localtime(epoch).tm_wday]:
        raise _bad_instant(value, f"{year:04d}-{month:02d}-{mday:02d} is not a {weekday.capitalize()}")
    return epoch


def format_instant(epoch: float, *, seconds: bool = False) -> str:
    """A point in time with nothing left to guess: ``Thu 2026-12-24 14:00 CET (UTC+01:00)``, local zone.

    :func:`parse_instant` reads it back as the same instant.
    """
    if not math.isfinite(epoch):
        return "-"
    then = _localtime(epoch)
    if then is None:
        return _FAR_FUTURE if epoch > 0 else "-"
    clock = "%H:%M:%S" if seconds else "%H:%M"
    return time.strftime(f"%a %Y-%m-%d {clock} %Z", then) + f" (UTC{_offset_text(epoch)})"
