from __future__ import annotations

import pytest

from chronos.errors import InvalidRequestError
from chronos.units import MemorySpec, format_bytes, format_duration, parse_duration, parse_memory

GIB = 1 << 30


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [("8G", 8 * GIB), ("8GiB", 8 * GIB), ("8gb", 8 * GIB), ("512M", 512 << 20), ("1.5G", int(1.5 * GIB)),
     ("2T", 2 << 40), ("64k", 64 << 10), (" 4 G ", 4 * GIB), (1234, 1234)],
)
def test_sizes_are_binary(text: str | int, nbytes: int) -> None:
    assert parse_memory(text) == MemorySpec(nbytes=nbytes)


@pytest.mark.parametrize(("text", "fraction"), [("50%", 0.5), ("0.5", 0.5), ("100%", 1.0), ("1", 1.0), (0.25, 0.25),
                                                 (".75", 0.75)])
def test_fractions(text: str | float, fraction: float) -> None:
    spec = parse_memory(text)
    assert spec.fraction == pytest.approx(fraction)
    assert spec.resolve(80 * GIB) == int(fraction * 80 * GIB)


@pytest.mark.parametrize("bad", ["", "8X", "G", "-8G", "0G", "0", "150%", "1.5", "0%", "8", -1, 0, 1.5, True, "nan"])
def test_bad_memory_is_invalid_request(bad: object) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_memory(bad)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("2h", 7200), ("90m", 5400), ("1h30m", 5400), ("45s", 45), ("1d", 86400), ("3600", 3600), (600, 600),
     ("1H", 3600), ("1d2h", 93600), ("0.5h", 1800)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "0", "-5", "2x", "h", "1h-30m", "1h 30", 0, -1, "abc", True])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(InvalidRequestError):
        parse_duration(bad)  # type: ignore[arg-type]


def test_formatting() -> None:
    assert format_bytes(8 * GIB) == "8 GiB"
    assert format_bytes(512 << 20) == "512 MiB"
    assert format_duration(4320) == "1h 12m"
    assert format_duration(59) == "59s"
    assert format_duration(90) == "1m 30s"
    assert format_duration(86400 + 7200) == "1d 2h"
    assert str(parse_memory("50%")) == "50%"
