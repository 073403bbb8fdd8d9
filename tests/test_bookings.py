"""Bookings: protected by the planner, claimed by hand, by a matching request or by chronos run, no-shows,
limits, and the list as JSON and a valid iCalendar feed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import icalendar
import pytest

import chronos
from chronos.api import default_engine, reset_default_engine
from chronos.errors import LimitError, UnavailableError
from chronos.model import LeaseState
from chronos.policy import ics
from tests.conftest import run_cli
from tests.os_users import needs_root, os_users
from tests.waiting import wait_for

G = 1 << 30


@pytest.fixture
def one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHRONOS_SIM_GPUS", "1x80G")
    reset_default_engine()


def configure(text: str) -> None:
    Path(os.environ["CHRONOS_CONFIG"]).write_text(text)
    reset_default_engine()


def test_a_booking_is_protected_against_a_long_lease_an_extension_and_the_queue(one_gpu: None) -> None:
    booking = chronos.book("60G", "1h", "+1h", label="demo")
    assert booking.state == LeaseState.BOOKED and booking.devices == (0,) and booking.memory_bytes == 60 * G
    long = run_cli("reserve", "40G", "2h")
    assert long.returncode == 3, long.stderr
    assert f"it would run into booking {booking.id}" in long.stderr and "ask for at most" in long.stderr
    short = chronos.reserve("40G", "30m", bind=False)  # ends before the booking starts: granted
    refused = run_cli("extend", short.id, "1h")
    assert refused.returncode == 3 and f"run into booking {booking.id}" in refused.stderr
    assert chronos.extend(short.id, "20m").state == "active"  # still ends before the booking
    # A request that would overlap may queue: it is planned after the booking, not over it.
    queued = run_cli("reserve", "40G", "2h", "--wait", "1s")
    assert queued.returncode == 3 and "gave up after waiting" in queued.stderr
    advice = chronos.suggest()
    assert not advice.fits_now or advice.duration_s <= booking.starts_at - time.time()
    # A second booking cannot take the same capacity; the message names when it could start.
    clash = run_cli("book", "40G", "1h", "--at", "+90m")
    assert clash.returncode == 3 and "the earliest it could start is" in clash.stderr


def test_claimed_by_hand_then_by_a_matching_request_and_by_chronos_run(one_gpu: None) -> None:
    first = chronos.book("8G", "1h", "now")
    claimed = chronos.claim(first.id, bind=False)
    assert claimed.id == first.id and claimed.state == "active"
    assert claimed.expires_at == pytest.approx(first.starts_at + 3600)
    again = run_cli("claim", first.id)
    assert again.returncode == 3 and "is active" in again.stderr
    second = chronos.book("16G", "30m", "now", label="course")
    lease = chronos.reserve("12G", "10m", bind=False)  # the owner's matching request claims it
    assert lease.id == second.id and lease.memory_bytes == 16 * G and lease.label == "course"
    assert lease.expires_at == pytest.approx(second.starts_at + 1800)
    third = chronos.book("4G", "20m", "now")
    ran = run_cli("run", "--booking", third.id, "--", sys.executable, "-c",
                  "import os; print(os.environ['CHRONOS_LEASE_ID'])")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == third.id
    assert chronos.get_lease(third.id).state == "released"
    granted = [e for e in default_engine().events(lease_id=third.id) if e.event == "granted"]
    assert granted and granted[0].detail["booking"] is True


def test_a_booking_not_yet_started_cannot_be_claimed(one_gpu: None) -> None:
    later = chronos.book("8G", "1h", "+2h")
    result = run_cli("claim", later.id)
    assert result.returncode == 3 and "claim it then" in result.stderr
    plain = chronos.reserve("8G", "10m", bind=False)  # not in the window: an ordinary lease
    assert plain.id != later.id


@needs_root
def test_unclaimed_after_the_grace_it_is_a_no_show(one_gpu: None) -> None:
    configure('[limits]\nbooking_grace = "2s"\n')
    with os_users({"booker": ()}) as users:
        booking = chronos.book("70G", "1h", "now", user=users["booker"])
        blocked = run_cli("reserve", "20G", "10m")
        assert blocked.returncode == 3 and f"booking {booking.id}" in blocked.stderr  # held for its owner
        ended = wait_for(lambda: (b := chronos.get_lease(booking.id)).state != "booked" and b, timeout=15,
                         what="the no-show")
        assert ended.state == LeaseState.NO_SHOW and "no-show" in (ended.end_reason or "")
        assert chronos.reserve("20G", "10m", bind=False).state == "active"  # the capacity is free again
        events = [e.event for e in default_engine().events(lease_id=booking.id)]
        assert events == ["booked", "no-show"]


def test_release_cancels_a_booking(one_gpu: None) -> None:
    booking = chronos.book("70G", "1h", "+1h")
    result = run_cli("release", booking.id)
    assert result.returncode == 0 and f"released lease {booking.id}" in result.stdout
    assert chronos.get_lease(booking.id).state == LeaseState.WITHDRAWN
    assert chronos.reserve("70G", "3h", bind=False).state == "active"


def test_booking_limits_and_their_overrides(one_gpu: None) -> None:
    me = chronos.api.default_engine().policies.limits_of(__import__("chronos.identity").identity.current_user())
    configure(f'[limits]\nmax_booking_lead = "1d"\nmax_bookings_per_user = 2\nmax_booked_hours_per_week = 3\n'
              f'[limits.users.{me.user}]\nmax_bookings_per_user = 3\n')
    with pytest.raises(LimitError, match=r"more than 1d ahead.*limits.max_booking_lead in "):
        chronos.book("1G", "1h", "+2d")
    chronos.book("1G", "1h", "+1h")
    chronos.book("1G", "1h", "+3h")
    with pytest.raises(LimitError, match=r"has booked 2h of GPU time in the week of .* maximum of 3h per week"):
        chronos.book("1G", "2h", "+5h")
    chronos.book("1G", "1h", "+5h")  # the third: allowed by the user's own table
    with pytest.raises(LimitError, match=rf"already has 3 booking\(s\) to come.*limits.users.{me.user}"):
        chronos.book("1G", "10m", "+7h")
    result = run_cli("book", "1G", "1h", "--at", "+2d")
    assert result.returncode == 4 and "Traceback" not in result.stderr
    bad = run_cli("book", "1G", "1h", "--at", "someday")
    assert bad.returncode == 2 and "cannot read time 'someday'" in bad.stderr


def test_bookings_list_json_and_a_valid_icalendar(one_gpu: None) -> None:
    a = chronos.book("8G", "2h", "+1h", label="lab; demo, day\\Two")  # a newline is refused at input
    b = chronos.book("4G", "30m", "+4h")
    chronos.release(b.id)
    table = run_cli("bookings")
    assert table.returncode == 0 and a.id in table.stdout and "booked" in table.stdout
    assert json.loads(run_cli("bookings", "--json").stdout)[0]["starts_at"] == a.starts_at
    assert [x["id"] for x in json.loads(run_cli("bookings", "--all", "--json").stdout)] == [a.id, b.id]
    feed = subprocess.run([sys.executable, "-m", "chronos", "bookings", "--all", "--ics"], capture_output=True,
                          check=True, timeout=60).stdout  # bytes: the CRLFs as written
    assert feed.startswith(b"BEGIN:VCALENDAR\r\n") and feed.endswith(b"END:VCALENDAR\r\n")
    for line in feed.split(b"\r\n"):
        assert len(line) <= 75 and b"\n" not in line
    cal = icalendar.Calendar.from_ical(feed)
    events = [c for c in cal.walk("VEVENT")]
    assert [str(e["STATUS"]) for e in events] == ["CONFIRMED", "CANCELLED"]
    first = events[0]
    assert first.decoded("DTSTART").timestamp() == int(a.starts_at)
    assert first.decoded("DTEND").timestamp() == int(a.starts_at) + 7200
    assert str(first["SUMMARY"]).endswith("(lab; demo, day\\Two)")
    assert "\n" in str(events[1]["DESCRIPTION"])  # the cancelled one's reason, on a line of its own
    assert len({str(e["UID"]) for e in events}) == 2 and all("DTSTAMP" in e for e in events)


def test_folding_never_splits_a_character() -> None:
    line = "SUMMARY:" + "ä€" * 60
    folded = ics.fold(line)
    assert all(len(part.encode()) <= 75 for part in folded.split("\r\n"))
    assert folded.replace("\r\n ", "") == line


def test_the_planner_refuses_a_booking_that_would_delay_the_queue(one_gpu: None) -> None:
    holder = chronos.reserve("80G", "30m", bind=False)
    from chronos import scheduler

    snapshot, _ = default_engine().snapshot()
    request = scheduler.Request(memory=chronos.parse_memory("80G"), duration_s=3600)
    assert scheduler.place_booking(snapshot, request, time.time()).start >= holder.expires_at
    with pytest.raises(UnavailableError, match="the earliest it could start is"):
        chronos.book("80G", "1h", "+10m")


def test_with_many_bookings_to_come_each_write_plans_with_the_bookings_as_they_are_now(one_gpu: None) -> None:
    """Writes keep each booking's planner form between them (while its record is unchanged): a booking
    cancelled or made between two writes is seen by the second."""
    start = time.time() + 86400
    for i in range(200):  # tomorrow on, an hour each: none in the way of the requests below
        chronos.book("10G", "30m", start + i * 3600)
    booking = chronos.book("70G", "1h", "+1h")
    refused = run_cli("reserve", "40G", "2h")
    assert refused.returncode == 3 and f"run into booking {booking.id}" in refused.stderr
    with pytest.raises(UnavailableError, match=f"run into booking {booking.id}"):
        chronos.reserve("40G", "2h", bind=False)
    booking.release()  # cancelled: the same request fits now
    lease = chronos.reserve("40G", "2h", bind=False)
    assert lease.state == "active"
    lease.release()
    another = chronos.book("70G", "1h", "+1h")
    with pytest.raises(UnavailableError, match=f"run into booking {another.id}"):
        chronos.reserve("40G", "2h", bind=False)
    assert len(chronos.bookings()) == 201
