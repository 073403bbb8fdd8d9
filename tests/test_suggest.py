"""Suggestions and detailed figures: pure functions over plain data, then the CLI over a real ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import chronos
from chronos import scheduler as S
from chronos import stats
from chronos.api import default_engine, reset_default_engine
from chronos.model import LeaseRecord as Lease
from chronos.units import duration_text, size_text
from tests.conftest import run_cli

G = 1 << 30
NOW = 1_800_000_000.0


def lease(i: int, *, owner: str = "ann", gib: float = 8, state: str = "released", started: float | None = None,
          held: float | None = 3600, duration: float = 7200, peak_gib: float | None = None,
          devices: tuple[int, ...] = (0,)) -> Lease:
    started_at = started if started is not None else NOW - 10 * 86400 + i * 3600
    ended = started_at + held if held is not None and state not in ("active", "queued") else None
    return Lease(
        id=str(i), owner=owner, uid=1000, devices=devices, device_uuids=tuple(f"GPU-{d}" for d in devices),
        memory_bytes=int(gib * G), created_at=started_at, expires_at=started_at + duration, duration_s=duration,
        state=state, started_at=started_at if state != "queued" else None, ended_at=ended,
        peak_memory_bytes=int(peak_gib * G) if peak_gib is not None else None,
    )


def machine(active: tuple[S.Holding, ...] = (), n: int = 2) -> S.Snapshot:
    return S.Snapshot(now=NOW, devices=tuple(S.DeviceState(i, f"GPU-{i}", 80 * G) for i in range(n)), active=active)


# -- suggest_from ---------------------------------------------------------------------------------------
def test_no_history_gives_the_defaults_and_a_gpu_that_fits() -> None:
    advice = stats.suggest_from(machine((S.Holding("x", (0,), 40 * G, NOW + 600),)), [], default_duration_s=5400)
    assert advice.memory_bytes == 8 * G and advice.duration_s == 5400
    assert advice.device == 1 and advice.fits_now and advice.estimated_start == NOW
    assert advice.command == "chronos reserve 8G 1h30m --prefer 1"
    assert advice.based_on == 0 and any("no leases of yours" in r for r in advice.reasons)


def test_memory_from_recorded_peaks_with_headroom_and_time_from_real_use() -> None:
    history = [lease(i, gib=40, peak_gib=p, held=h) for i, (p, h) in
               enumerate([(9.5, 1800), (10, 2400), (11, 3000), (10.5, 2700), (9, 1200)])]
    advice = stats.suggest_from(machine(), history)
    # 90th percentile of the peaks is 10.8 GiB; +20% is 12.96 -> 13 GiB.
    assert advice.memory_bytes == 13 * G
    # 75th percentile of time held is 2700 s; +25% is 3375 s -> up to the quarter hour: 1h.
    assert advice.duration_s == 3600
    assert advice.command == "chronos reserve 13G 1h --prefer 0"
    assert advice.based_on == 5
    assert any("90th percentile" in r for r in advice.reasons)


def test_without_peaks_the_usual_request_is_suggested() -> None:
    history = [lease(i, gib=g) for i, g in enumerate([4, 6, 6, 24])]
    advice = stats.suggest_from(machine(), history)
    assert advice.memory_bytes == 6 * G
    assert any("no peak memory recorded" in r for r in advice.reasons)


def test_leases_that_ran_to_their_end_ask_for_more_time() -> None:
    history = [lease(i, state="expired", held=3600, duration=3600) for i in range(3)] + [lease(9, held=600)]
    advice = stats.suggest_from(machine(), history)
    assert advice.duration_s == 5400  # 1.5 x the longest (1h)
    assert any("ran to their end" in r for r in advice.reasons)


def test_limits_cap_the_suggestion() -> None:
    history = [lease(i, gib=70, peak_gib=70, held=20 * 3600, duration=24 * 3600) for i in range(3)]
    advice = stats.suggest_from(machine(), history, max_duration_s=4 * 3600, max_memory_bytes=40 * G)
    assert advice.memory_bytes == 40 * G and advice.duration_s == 4 * 3600
    assert advice.command == "chronos reserve 40G 4h --prefer 0"


def test_when_nothing_fits_the_first_gpu_to_free_is_suggested_with_wait() -> None:
    busy = (S.Holding("a", (0,), 78 * G, NOW + 7200), S.Holding("b", (1,), 78 * G, NOW + 1800))
    advice = stats.suggest_from(machine(busy), [])
    assert not advice.fits_now and advice.device == 1 and advice.estimated_start == NOW + 1800
    assert advice.command == "chronos reserve 8G 1h --prefer 1 --wait"


def test_argument_forms_read_back_by_the_parsers() -> None:
    for nbytes in (G, 13 * G, 768 << 20):
        assert chronos.parse_memory(size_text(nbytes)).nbytes == nbytes
    for seconds in (900, 3600, 5400, 9000):
        assert chronos.parse_duration(duration_text(seconds)) == seconds


# -- GPU-hours and device detail ---------------------------------------------------------------------------
def test_gpu_hours_count_devices_and_clip_to_the_window() -> None:
    leases = [
        lease(1, owner="ann", started=NOW - 3 * 3600, held=3600, devices=(0, 1)),  # 2 GPU-hours in the day
        lease(2, owner="ann", started=NOW - 2 * 86400, held=3600),  # only in the week
        lease(3, owner="bob", started=NOW - 86400 - 1800, held=3600),  # half inside the day
        lease(4, owner="bob", state="active", started=NOW - 1800, held=None),  # still running: 0.5
        lease(5, owner="cat", state="queued", held=None),  # never started
    ]
    day = stats.gpu_hours(leases, NOW, stats.DAY)
    week = stats.gpu_hours(leases, NOW, stats.WEEK)
    assert day == pytest.approx({"ann": 2.0, "bob": 1.0})
    assert week == pytest.approx({"ann": 3.0, "bob": 1.5})


def test_detailed_from_joins_devices_queue_and_users() -> None:
    status = [
        chronos.DeviceStatus(0, "GPU-0", "sim", 80 * G, 30 * G, 40 * G, 36 * G, 2, 55, 4 * G),
        chronos.DeviceStatus(1, "GPU-1", "sim", 80 * G, 0, 0, 80 * G, 0, 0, 0),
    ]
    queue = (S.Request(memory=S.MemorySpec(nbytes=60 * G), duration_s=600, devices=(0,), seq=1, lease_id="9"),)
    snap = S.Snapshot(now=NOW, devices=(S.DeviceState(0, "GPU-0", 80 * G, 4 * G), S.DeviceState(1, "GPU-1", 80 * G)),
                      active=(S.Holding("1", (0,), 30 * G, NOW + 600), S.Holding("2", (0,), 10 * G, NOW + 900)),
                      queue=queue)
    leases = [lease(1, gib=30, state="active", started=NOW - 600, held=None, peak_gib=20),
              lease(2, owner="bob", gib=10, state="active", started=NOW - 300, held=None, peak_gib=5)]
    found = stats.detailed_from(status, snap, leases, NOW)
    gpu0, gpu1 = found.devices
    assert gpu0.memory_used_in_leases_bytes == 26 * G and gpu0.reserved_used_percent == pytest.approx(65)
    assert gpu0.peak_in_leases_bytes == 25 * G and gpu0.queued == 1 and gpu1.queued == 0
    assert gpu1.reserved_used_percent is None
    assert found.queue_length == 1
    users = {u.user: u for u in found.users}
    assert users["ann"].active == 1 and users["ann"].peak_to_cap_percent == pytest.approx(66.7, abs=0.1)
    assert json.loads(json.dumps(found.to_dict()))["devices"][0]["queued"] == 1


# -- through the real engine and CLI -----------------------------------------------------------------------
def test_suggest_learns_from_real_history(chronos_env: Path) -> None:
    engine = default_engine()
    for peak in (5, 6, 7):
        held = chronos.reserve("16G", "2h", bind=False)
        engine.record_usage(held.id, peak * G, 60.0)
        held.release()
    advice = chronos.suggest()
    assert advice.memory_bytes == 9 * G  # 90th percentile 6.8 GiB, +20% -> 8.16 -> 9 GiB
    assert advice.duration_s == 900  # held for moments: the shortest suggestion, 15 minutes
    assert advice.fits_now and advice.device is not None
    result = run_cli("suggest", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["command"] == advice.command and data["memory_bytes"] == 9 * G
    text = run_cli("suggest")
    assert text.returncode == 0 and text.stdout.splitlines()[0] == advice.command
    # The suggested command works as printed.
    granted = run_cli(*advice.command.split()[1:], "--json")
    assert granted.returncode == 0, granted.stderr
    assert json.loads(granted.stdout)["memory_bytes"] == 9 * G


def test_suggest_respects_the_configured_limits(chronos_env: Path) -> None:
    Path(chronos_env / "no-config.toml").write_text('[limits]\nmax_memory_per_lease = "4G"\nmax_duration = "10m"\n')
    reset_default_engine()
    advice = chronos.suggest()
    assert advice.memory_bytes == 4 * G and advice.duration_s == 600
    assert "chronos reserve 4G 10m" in advice.command


def test_stats_detailed_and_all(chronos_env: Path) -> None:
    lease = chronos.reserve("20G", "1h", bind=False, device=1)
    result = run_cli("stats", "--detailed")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["GPU", "NAME", "TOTAL", "RESERVED"]
    assert "queue: 0 request(s) waiting" in result.stdout and lease.owner in result.stdout
    data = json.loads(run_cli("stats", "--all", "--json").stdout)
    assert data["devices"][1]["memory_reserved_bytes"] == 20 * G
    assert [u["user"] for u in data["users"]] == [lease.owner]
    assert data["users"][0]["active"] == 1
    lease.release()
