"""Parsing and formatting of sizes and durations.

Sizes use binary units as Docker reads them: ``8G`` == ``8GiB`` == 8 * 2**30 bytes.
A fraction of a device is written ``50%`` or ``0.5``.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from chronos.errors import InvalidRequestError

__all__ = [
    "MemorySpec",
    "duration_text",
    "format_bytes",
    "format_clock",
    "format_duration",
    "parse_duration",
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
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*%\s*$")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms])", re.IGNORECASE)
_DURATION_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


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
    """Parse ``8G``, ``512M``, ``8GiB``, ``50%`` or ``0.5``; an int is bytes, a float in (0, 1] a fraction."""
    if isinstance(value, MemorySpec):
        return value
    if isinstance(value, bool):
        raise InvalidRequestError(f"invalid memory {value!r}: give a size such as 8G or a fraction such as 50%")
    if isinstance(value, int):
        if value <= 0:
            raise InvalidRequestError(f"memory must be positive, got {value}")
        return MemorySpec(nbytes=value)
    if isinstance(value, float):
        return _fraction(value, str(value))
    text = str(value).strip()
    match = _PERCENT_RE.match(text)
    if match:
        return _fraction(float(match.group(1)) / 100.0, text)
    if re.fullmatch(r"\d*\.\d+|\d+\.\d*|0|1", text) and float(text) <= 1.0:
        return _fraction(float(text), text)
    match = _SIZE_RE.match(text)
    if not match:
        raise InvalidRequestError(
            f"cannot read memory {text!r}: use a size such as 8G, 512M, 8GiB, or a fraction such as 50% or 0.5"
        )
    number, unit = match.groups()
    if not unit:
        raise InvalidRequestError(f"memory {text!r} has no unit: write {text}G for GiB or {text}M for MiB")
    nbytes = int(float(number) * _UNITS[unit.lower()])
    if nbytes <= 0:
        raise InvalidRequestError(f"memory must be positive, got {text!r}")
    return MemorySpec(nbytes=nbytes)


def parse_size(value: str | int) -> int:
    """An absolute size in bytes (``40G``, ``512M``); a fraction of a GPU is refused."""
    spec = parse_memory(value)
    if spec.nbytes is None:
        raise InvalidRequestError(f"{value!r} is a fraction of a GPU; give an absolute size such as 40G")
    return spec.nbytes


def _fraction(value: float, text: str) -> MemorySpec:
    if not math.isfinite(value) or value <= 0 or value > 1:
        raise InvalidRequestError(f"memory fraction {text!r} must be above 0 and at most 1 (100%)")
    return MemorySpec(fraction=value)


def parse_duration(value: str | int | float) -> float:
    """Parse ``2h``, ``90m``, ``1h30m``, ``45s``, ``1d`` or plain seconds into seconds (> 0)."""
    if isinstance(value, bool):
        raise InvalidRequestError(f"invalid duration {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        else:
            parts = _DURATION_PART_RE.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise InvalidRequestError(
                    f"cannot read duration {value!r}: use 2h, 90m, 1h30m, 45s, 1d or seconds"
                )
            seconds = sum(float(n) * _DURATION_SECONDS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidRequestError(f"duration must be positive, got {value!r}")
    return seconds


def format_bytes(nbytes: int | float) -> str:
    """``8589934592`` -> ``8 GiB``; GiB above 1 GiB, MiB below."""
    if nbytes >= 1 << 30 or nbytes == 0:
        return f"{nbytes / (1 << 30):.4g} GiB" if nbytes else "0 GiB"
    if nbytes >= 1 << 20:
        return f"{nbytes / (1 << 20):.4g} MiB"
    return f"{nbytes / (1 << 10):.4g} KiB"


def format_duration(seconds: float) -> str:
    """``4320`` -> ``1h 12m``; seconds shown only under ten minutes."""
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
    then = time.localtime(epoch)
    today = time.localtime(now if now is not None else time.time())
    clock = "%H:%M:%S" if seconds else "%H:%M"
    return time.strftime(clock if then[:3] == today[:3] else f"%b %d {clock}", then)
