"""Fair share: decayed use per owner, and a real queue reordered so that an occasional user goes first."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import chronos
from chronos.api import reset_default_engine
from chronos.model import LeaseRecord, LeaseState
from chronos.policy import fairshare
from tests.conftest import run_cli
from tests.os_users import needs_root, os_users
from tests.waiting import wait_for

G = 1 << 30
DAY = 86400.0


def held(owner: str, gib: int, gpus: int, start: float, end: float | None, state: LeaseState) -> LeaseRecord:
    return LeaseRecord(id=str(int(start)), owner=owner, uid=1, devices=tuple(range(gpus)), device_uuids=(),
                       memory_bytes=gib * G, created_at=start, started_at=start, ended_at=end,
                       expires_at=start + 10 * DAY if state == LeaseState.ACTIVE else end,
                       duration_s=10 * DAY, state=state)


def test_use_is_gib_hours_each_moment_weighted_by_its_age() -> None:
    now, half = 100 * DAY, 7 * DAY
    recent = held("ann", 8, 2, now - 3600, now, LeaseState.RELEASED)  # 8 GiB x 2 GPUs x 1h, just now
    old = held("bob", 16, 1, now - half - 3600, now - half, LeaseState.RELEASED)  # 16 GiB for 1h a half-life ago
    running = held("cy", 4, 1, now - 7200, None, LeaseState.ACTIVE)
    use = fairshare.usage([recent, old, running], now, half)
    rate = math.log(2) / half

    def by_hand(gib: float, start: float, end: float) -> float:
        return gib * (math.exp(-rate * (now - end)) - math.exp(-rate * (now - start))) / rate / 3600

    assert use["ann"] == pytest.approx(by_hand(16, now - 3600, now))
    assert use["ann"] == pytest.approx(16, rel=5e-3)  # a little decay within the hour
    assert use["bob"] == pytest.approx(8, rel=5e-3)  # 16 GiB·h, counted half
    assert use["cy"] == pytest.approx(by_hand(4, now - 7200, now))


def test_why_each_request_is_where_it_is() -> None:
    half = 7 * DAY
    light = fairshare.Standing("bob", "normal", 2.0, 1.0)
    heavy = fairshare.Standing("alice", "normal", 312.0, 0.5)
    assert fairshare.explain(light, None, half).startswith("first: normal priority")
    text = fairshare.explain(heavy, light, half)
    assert text == "after bob, who used less (2.0 GiB·h); alice used 312.0 GiB·h recently (half-life 7d)"
    assert fairshare.explain(light, fairshare.Standing("x", "high", 0.0, 0.0), None) == \
        "after a high priority request"


def _waiter(user: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "chronos", "reserve", "--user", user, "60G", "10m", "--wait",
                             "60", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@needs_root
def test_fair_share_puts_an_occasional_user_before_a_heavy_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHRONOS_SIM_GPUS", "1x80G")
    Path(os.environ["CHRONOS_CONFIG"]).write_text('[scheduling]\nfair_share = true\nfair_share_half_life = "7d"\n')
    reset_default_engine()
    with os_users({"heavy": (), "light": ()}) as users:
        past = chronos.reserve("70G", "1h", user=users["heavy"], bind=False)
        time.sleep(0.2)  # some use to remember: 70 GiB for a fifth of a second
        past.release()
        blocker = chronos.reserve("80G", "1h", bind=False)
        heavy = _waiter(users["heavy"])
        wait_for(lambda: len(chronos.queue()) == 1, what="the heavy user's request in the queue")
        light = _waiter(users["light"])
        try:
            order = wait_for(lambda: q if len(q := chronos.queue()) == 2 else None, what="both in the queue")
            assert [e.owner for e in order] == [users["light"], users["heavy"]]  # the later, lighter one first
            assert order[0].owner_use_gib_hours == 0 and order[1].owner_use_gib_hours > 0
            shown = run_cli("queue")
            assert shown.returncode == 0 and "WHY HERE" in shown.stdout
            assert f"after {users['light']}, who used less" in shown.stdout
            assert f"{users['heavy']} used" in shown.stdout and "half-life 7d" in shown.stdout
            blocker.release()
            _out, err = light.communicate(timeout=60)
            assert light.returncode == 0, err
            assert heavy.poll() is None  # still waiting: 60 GiB + 60 GiB do not fit on 80
            assert [e.owner for e in chronos.queue()] == [users["heavy"]]
        finally:
            for proc in (heavy, light):
                if proc.poll() is None:
                    proc.terminate()
                proc.communicate(timeout=30)
            for lease in chronos.leases():
                lease.release()
