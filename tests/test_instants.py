"""Times of day and dates as people write them (``tomorrow 09:00``, ``+2h``), in several time zones."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronos.errors import InvalidRequestError
from chronos.units import format_instant, local_epoch, parse_instant

ZONES = ["UTC", "Europe/Berlin", "America/Sao_Paulo", "Australia/Lord_Howe", "Asia/Kolkata", "America/New_York"]
#: The zone fixture is the same for every example of a test, as it should be.
PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
#: 2001-01-01 .. 2099-12-31, whole minutes.
MINUTES = st.integers(978307200 // 60, 4102444740 // 60).map(lambda m: float(m * 60))


@pytest.fixture(params=ZONES)
def zone(request: pytest.FixtureRequest) -> Iterator[str]:
    saved = os.environ.get("TZ")
    os.environ["TZ"] = request.param
    time.tzset()
    yield request.param
    if saved is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = saved
    time.tzset()


@PROPS
@given(epoch=MINUTES)
def test_what_is_printed_reads_back_as_the_same_instant(zone: str, epoch: float) -> None:
    printed = format_instant(epoch)
    assert parse_instant(printed) == epoch, printed
    assert "(UTC+" in printed or "(UTC-" in printed  # the offset is always shown


@PROPS
@given(now=MINUTES, minutes=st.integers(1, 60 * 24 * 30))
def test_a_relative_time_is_that_long_from_now(zone: str, now: float, minutes: int) -> None:
    assert parse_instant(f"+{minutes}m", now=now) == now + minutes * 60
    assert parse_instant(f"in {minutes}m", now=now) == now + minutes * 60


def _wall(epoch: float) -> tuple[int, ...]:
    return tuple(time.localtime(epoch)[:6])


@PROPS
@given(now=MINUTES, hour=st.integers(0, 23), minute=st.integers(0, 59))
def test_tomorrow_is_the_next_calendar_day_at_that_clock_time(zone: str, now: float, hour: int, minute: int) -> None:
    try:
        got = parse_instant(f"tomorrow {hour:02d}:{minute:02d}", now=now)
    except InvalidRequestError as exc:  # a time the clocks skip or repeat that day: said so, in one line
        assert "clocks go" in str(exc) and "\n" not in str(exc)
        return
    today = time.localtime(now)
    noon = local_epoch(today.tm_year, today.tm_mon, today.tm_mday, 12)
    tomorrow = time.localtime(noon + 86400)
    assert _wall(got) == (tomorrow.tm_year, tomorrow.tm_mon, tomorrow.tm_mday, hour, minute, 0)


@PROPS
@given(now=MINUTES, hour=st.integers(0, 23), minute=st.integers(0, 59))
def test_a_bare_clock_time_is_the_next_time_the_clock_shows_it(zone: str, now: float, hour: int,
                                                                minute: int) -> None:
    try:
        got = parse_instant(f"{hour}:{minute:02d}", now=now)
    except InvalidRequestError as exc:
        assert "clocks go" in str(exc)
        return
    assert now <= got < now + 86400 + 3600
    assert _wall(got)[3:5] == (hour, minute)


@PROPS
@given(now=MINUTES, day=st.integers(0, 6))
def test_a_weekday_is_the_next_one_today_included(zone: str, now: float, day: int) -> None:
    name = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"][day]
    for spelling in (name, name[:3]):
        try:
            got = parse_instant(f"{spelling} 12:00", now=now)
        except InvalidRequestError:
            continue
        assert time.localtime(got).tm_wday == day
        assert now - 86400 <= got < now + 8 * 86400


@PROPS
@given(text=st.text(max_size=40))
def test_anything_else_is_one_line_of_bad_input(text: str) -> None:
    try:
        parse_instant(text, now=1.8e9)
    except InvalidRequestError as exc:
        assert "\n" not in str(exc)


@pytest.mark.parametrize(("text", "want"), [
    ("2026-12-24 14:00", "Thu 2026-12-24 14:00 CET (UTC+01:00)"),
    ("2026-12-24T14:00", "Thu 2026-12-24 14:00 CET (UTC+01:00)"),
    ("2026-12-24 14:00Z", "Thu 2026-12-24 15:00 CET (UTC+01:00)"),
    ("2026-12-24 14:00 UTC", "Thu 2026-12-24 15:00 CET (UTC+01:00)"),
    ("2026-07-01 9pm", "Wed 2026-07-01 21:00 CEST (UTC+02:00)"),
    ("2026-10-25 02:30 +01:00", "Sun 2026-10-25 02:30 CET (UTC+01:00)"),
    ("Thu 2026-12-24 14:00 CET (UTC+01:00)", "Thu 2026-12-24 14:00 CET (UTC+01:00)"),
    ("2026-12-24", "Thu 2026-12-24 00:00 CET (UTC+01:00)"),
])
def test_dates_in_berlin(text: str, want: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        assert format_instant(parse_instant(text)) == want
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize(("text", "message"), [
    ("2026-03-29 02:30", "does not exist here (the clocks go forward)"),
    ("2026-10-25 02:30", 'happens twice here (the clocks go back); add the UTC offset, e.g. "2026-10-25 02:30 +01:00"'),
    ("2026-02-30 10:00", "no such date"),
    ("25:00", "hours run 0-23"),
    ("13pm", "is not a time of day"),
    ("someday 10:00", "unknown day 'someday'"),
    ("Fri 2026-12-24 10:00", "is not a Fri"),
    ("2026-12-24 10:00 PST", "the zone PST is not this machine's"),
    ("+soon", "after + give a duration"),
    ("next week", "cannot read time 'next week'"),
])
def test_mistakes_say_what_is_wrong(text: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        with pytest.raises(InvalidRequestError) as info:
            parse_instant(text)
        assert message in str(info.value) and "\n" not in str(info.value)
    finally:
        monkeypatch.undo()
        time.tzset()
