"""The machine status and forecasts the Jupyter front ends show: the same figures as the CLI, nothing written."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

import chronos
from chronos.api import default_engine, reset_default_engine
from chronos.devices import simulated
from chronos.enforce.watchdog import DEFAULT_WARN_AT
from chronos.identity import current_user
from chronos.request import parse_request
from chronos.status import forecast, machine_status, used_total
from tests.conftest import run_cli

G = 1 << 30


@pytest.fixture(autouse=True)
def two_small_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHRONOS_SIM_GPUS", "2x16G")
    reset_default_engine()


def test_a_request_that_fits_now_says_where() -> None:
    chronos.reserve("10G", "1h", device=0, bind=False)
    answer = chronos.forecast("8G", "1h")
    assert answer.fits_now and answer.devices == (1,) and answer.position == 0 and answer.error is None


def test_a_request_that_does_not_fit_starts_when_the_lease_in_its_way_ends() -> None:
    first = chronos.reserve("10G", "1h", device=0, bind=False)
    chronos.reserve("12G", "30m", device=1, bind=False)
    answer = chronos.forecast("8G", "2h")
    assert not answer.fits_now and answer.position == 1 and answer.devices == ()
    # GPU 1's lease ends first (30 minutes), so that is where and when it starts.
    second = next(lease for lease in chronos.leases() if lease.id != first.id)
    assert second.expires_at is not None and answer.estimated_start == pytest.approx(second.expires_at, abs=1)
    assert answer.reason.startswith("not enough free memory for 8 GiB")


def test_the_forecast_stands_behind_the_queue() -> None:
    chronos.reserve("16G", "1h", device=0, bind=False)
    chronos.reserve("16G", "1h", device=1, bind=False)
    engine = default_engine()
    ledger_before = [lease.id for lease in chronos.leases(all=True)]
    answer = forecast(engine, parse_request("4G", "10m"))
    assert answer.position == 1 and answer.estimated_start is not None
    # Nothing was written: no lease, no queued request, no event.
    assert [lease.id for lease in chronos.leases(all=True)] == ledger_before
    assert [event.event for event in engine.events()] == ["granted", "granted"]


def test_refusals_become_errors_with_the_cli_exit_code(chronos_env: Path) -> None:
    never = chronos.forecast("40G", "1h")
    assert never.error == "40 GiB can never fit on any GPU here: the largest has 16 GiB in all"
    assert never.exit_code == 2 and not never.fits_now
    Path(os.environ["CHRONOS_CONFIG"]).write_text("[limits]\nmax_memory_per_lease = \"4G\"\n")
    reset_default_engine()
    limited = chronos.forecast("8G", "1h")
    assert limited.exit_code == 4 and limited.error is not None and "maximum of 4 GiB per lease" in limited.error
    # The same refusal, word for word, as `chronos reserve`.
    out = run_cli("reserve", "8G", "1h")
    assert out.returncode == 4 and limited.error in out.stderr


def test_bad_input_is_refused_where_it_enters() -> None:
    with pytest.raises(chronos.InvalidRequestError):
        chronos.forecast("eight", "1h")


def test_machine_status_matches_the_cli_and_holds_only_my_leases() -> None:
    mine = chronos.reserve("6G", "1h", device=0, label="mine")
    theirs = chronos.reserve("4G", "1h", device=0, user="nobody", bind=False)
    simulated.allocate(0, "2G")  # this process holds `mine`: its use counts in the lease
    simulated.allocate(1, "1G", pid=1)  # memory no lease accounts for
    status = machine_status(default_engine())
    assert status.user == current_user().name
    stats = {d["index"]: d for d in json.loads(run_cli("stats", "--json").stdout)}
    for gpu in status.gpus:
        cli = stats[gpu.index]
        assert (gpu.total_bytes, gpu.reserved_bytes, gpu.free_bytes) == (
            cli["memory_total_bytes"], cli["memory_reserved_bytes"], cli["memory_available_bytes"])
    gpu0, gpu1 = status.gpus
    assert gpu0.reserved_bytes == 10 * G and gpu0.used_bytes == 2 * G and gpu0.free_bytes == 6 * G
    assert gpu1.unmanaged_bytes == 1 * G and gpu1.free_bytes == 15 * G
    [lease] = status.leases
    assert lease.lease.id == mine.id and lease.used_bytes == 2 * G and lease.cap_bytes == 6 * G
    assert lease.warn_at == DEFAULT_WARN_AT
    assert theirs.id not in {item.lease.id for item in status.leases}
    data = json.loads(json.dumps(status.to_dict()))
    assert data["leases"][0]["label"] == "mine" and data["leases"][0]["used_bytes"] == 2 * G
    assert data["gpus"][1]["unmanaged_bytes"] == G


def test_a_queued_lease_carries_its_position_and_estimated_start() -> None:
    blocker = chronos.reserve("16G", "20m", device=0, bind=False)
    chronos.reserve("16G", "1h", device=1, bind=False)
    engine = default_engine()
    request = parse_request("8G", "10m", wait="forever")
    waiting = []

    def waiter() -> None:
        try:
            waiting.append(engine.submit(request, bind=False))
        except chronos.ChronosError:
            pass

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not any(lease.state == "queued" for lease in chronos.leases()) and time.monotonic() < deadline:
            time.sleep(0.05)
        status = machine_status(engine)
        [queued] = [item for item in status.leases if item.lease.state == "queued"]
        assert queued.position == 1 and queued.used_bytes is None
        assert blocker.expires_at is not None
        assert queued.estimated_start == pytest.approx(blocker.expires_at, abs=1)
        assert [entry.lease_id for entry in status.queue] == [queued.lease.id]
    finally:
        blocker.release()
        thread.join(10)
    assert waiting and waiting[0].state == "active"


def test_recently_ended_leases_are_reported_and_old_ones_are_not() -> None:
    lease = chronos.reserve("1G", "1h", bind=False)
    lease.release()
    engine = default_engine()
    [ended] = machine_status(engine).ended
    assert ended.lease.id == lease.id and ended.lease.state == "released"
    assert machine_status(engine, ended_within=0.0).ended == []


def test_used_total_sums_what_the_driver_shows() -> None:
    assert used_total({0: 2, 1: 3}) == 5
    assert used_total({0: None, 1: 3}) == 3
    assert used_total({0: None}) is None
    assert used_total({}) == 0


@pytest.mark.parametrize("lease_id", ["9" * 30, "\u0661\u0662"])
def test_a_lease_id_no_ledger_can_hold_is_no_such_lease(lease_id: str) -> None:
    out = run_cli("show", lease_id)
    assert out.returncode == 5 and out.stderr.count("\n") == 1 and "no lease" in out.stderr
