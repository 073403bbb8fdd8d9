"""Idle leases: the pure rule, then real processes on simulated GPUs warned, released and terminated."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import ClassVar

import chronos
from chronos.api import default_engine, reset_default_engine
from chronos.devices.base import ProcessUtilization
from chronos.model import IdleNotice, LeaseRecord, LeaseState, OnIdle
from chronos.policy import idle
from tests.conftest import run_cli
from tests.waiting import wait_for

G = 1 << 30


def configure(text: str) -> None:
    Path(os.environ["CHRONOS_CONFIG"]).write_text(text)
    reset_default_engine()


def lease(lease_id: str = "1", *, idle_since: float | None = None, warning: IdleNotice | None = None,
          expires_at: float = 10_000.0) -> LeaseRecord:
    return LeaseRecord(id=lease_id, owner="ann", uid=1000, devices=(0,), device_uuids=("GPU-0",), memory_bytes=G,
                       created_at=0.0, started_at=0.0, expires_at=expires_at, duration_s=expires_at,
                       idle_since=idle_since, idle_warning=warning)


def sample(at: float, *records: LeaseRecord, busy: tuple[str, ...] = ()) -> idle.Sample:
    return idle.Sample(at, {r.id: r.expires_at for r in records}, frozenset(busy))


RULE = (idle.IdleRule(600.0, OnIdle.RELEASE, 120.0),)


# -- the pure rule -----------------------------------------------------------------------------------------
def test_a_spell_begins_at_the_first_idle_sample_then_warns_then_acts() -> None:
    first = lease()
    assert [(d.kind, d.idle_since) for d in idle.evaluate([first], sample(100.0, first), {"1": RULE})] == \
        [("idle", 100.0)]
    spell = lease(idle_since=100.0)
    assert idle.evaluate([spell], sample(579.0, spell), {"1": RULE}) == []  # 479 s idle: before the warning
    warned = idle.evaluate([spell], sample(580.0, spell), {"1": RULE})
    assert [d.kind for d in warned] == ["warn"]
    notice = warned[0].notice
    assert notice == IdleNotice(580.0, OnIdle.RELEASE, 700.0)  # idle since + 600 s
    assert "will be released at" in warned[0].message and "chronos extend 1 30m" in warned[0].message
    after = lease(idle_since=100.0, warning=notice)
    assert idle.evaluate([after], sample(699.0, after), {"1": RULE}) == []
    assert [d.kind for d in idle.evaluate([after], sample(700.0, after), {"1": RULE})] == ["release"]


def test_a_late_warning_still_gives_its_full_lead() -> None:
    # Nobody sampled between 100 s and 2000 s: the warning comes first, the action its lead later.
    spell = lease(idle_since=100.0)
    warned = idle.evaluate([spell], sample(2000.0, spell), {"1": RULE})
    assert [d.kind for d in warned] == ["warn"] and warned[0].notice is not None
    assert warned[0].notice.action_at == 2120.0


def test_gpu_use_or_an_extension_ends_the_spell_and_unknown_use_is_never_idle() -> None:
    spell = lease(idle_since=100.0)
    assert [d.kind for d in idle.evaluate([spell], sample(900.0, spell, busy=("1",)), {"1": RULE})] == ["active"]
    stale = idle.Sample(900.0, {"1": 5_000.0}, frozenset())  # the sample saw the lease before its extension
    assert idle.evaluate([spell], stale, {"1": RULE}) == []

    class Judge:
        leases: ClassVar[list[LeaseRecord]] = [spell]

        def lease_of(self, pid: int) -> str | None:
            return "1" if pid == 42 else None

    def judged(sm: int | None, device: int = 0) -> frozenset[str]:
        return idle.attribute([ProcessUtilization(device, "GPU-0", 42, sm)], [spell], Judge(), 1.0).busy

    assert judged(30) == {"1"} and judged(None) == {"1"}  # a driver that cannot say counts as in use
    assert judged(0) == set() and judged(30, device=1) == set()  # no SM time, or not on the lease's GPU


def test_rules_add_up_a_kernelspec_can_tighten_never_lift() -> None:
    system = idle.IdleRule(1800.0, OnIdle.RELEASE, 300.0)
    assert idle.plan([system]) == (1500.0, 1800.0, OnIdle.RELEASE, 300.0)
    assert idle.plan([system, idle.IdleRule(600.0, OnIdle.WARN)]) == (600.0, 1800.0, OnIdle.RELEASE, 300.0)
    assert idle.plan([system, idle.IdleRule(900.0, OnIdle.TERMINATE, 300.0)])[1:3] == (900.0, OnIdle.TERMINATE)
    assert idle.plan([system, idle.IdleRule(86400.0, OnIdle.WARN)])[1] == 1800.0  # looser: the system's holds
    assert idle.plan([idle.IdleRule(60.0, OnIdle.WARN)]) == (60.0, None, None, 0.0)


# -- real processes ------------------------------------------------------------------------------------------
HOLD = textwrap.dedent("""
    import os, sys, time
    from chronos.devices import get_backend
    from chronos.devices.simulated import allocate, set_utilization
    uuid = os.environ["CUDA_VISIBLE_DEVICES"].split(",")[0]
    index = [d.index for d in get_backend().devices() if d.uuid == uuid][0]
    allocate(index, 1 << 30)
    if len(sys.argv) > 1:
        set_utilization(index, int(sys.argv[1]))
    print("ready", flush=True)
    time.sleep(120)
""")


class Run:
    """``chronos run 1G 1h -- python HOLD`` in the background, its stderr collected line by line."""

    def __init__(self, *args: str, label: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "chronos", "run", "1G", "1h", "--label", label, "--",
                                      sys.executable, "-c", HOLD, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.err: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"
        self.lease = wait_for(lambda: next((x for x in chronos.leases() if x.label == label), None),
                              what=f"the lease of {label}")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(timeout=30)
        self._reader.join(timeout=30)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return code


def test_an_idle_lease_is_warned_on_its_holders_stderr_then_released(chronos_env: Path) -> None:
    configure('[limits]\nidle_after = "8s"\nidle_warning = "4s"\non_idle = "release"\n')
    busy_run, idle_run = Run("60", label="busy"), Run(label="idle")
    try:
        since = wait_for(lambda: chronos.get_lease(idle_run.lease.id).idle_since, what="the lease to be idle")
        listed = run_cli("list")
        assert "idle since" in listed.stdout and listed.returncode == 0
        shown = run_cli("show", idle_run.lease.id).stdout
        assert "idle since" in shown
        wait_for(lambda: any("has used no GPU time since" in line for line in idle_run.err),
                 what="the warning on the holder's stderr")
        ended = wait_for(lambda: (x := chronos.get_lease(idle_run.lease.id)).state != "active" and x,
                         timeout=30, what="the idle lease to be released")
        assert ended.state == LeaseState.RELEASED and ended.end_reason.startswith("idle since"), (
            ended, idle_run.proc.poll(), idle_run.err)
        assert ended.ended_at is not None and ended.ended_at >= since + 8
        assert idle_run.proc.poll() is None  # release leaves the processes running: their memory is unmanaged now
        busy = chronos.get_lease(busy_run.lease.id)
        assert busy.state == "active" and busy.idle_since is None  # SM use kept it
        kinds = [e.event for e in default_engine().events(lease_id=idle_run.lease.id)]
        assert kinds[:1] == ["granted"] and kinds[-3:] == ["idle", "idle-warning", "released"]
    finally:
        idle_run.stop()
        busy_run.stop()


def test_terminate_stops_the_processes_of_an_idle_lease(chronos_env: Path) -> None:
    configure('[limits]\nidle_after = "2s"\nidle_warning = "1s"\non_idle = "terminate"\n')
    held = Run(label="forgotten")
    try:
        code = held.proc.wait(timeout=60)
        assert code in (128 + 15, 128 + 9)  # SIGTERM, as the shell reports it (SIGKILL after the kill wait)
        ended = chronos.get_lease(held.lease.id)
        assert ended.state == LeaseState.RELEASED and ended.end_action == "terminate"
    finally:
        held.stop()


def test_an_extension_says_still_here(chronos_env: Path) -> None:
    configure('[limits]\nidle_after = "1h"\nidle_warning = "1h"\non_idle = "release"\n')
    lease = chronos.reserve("1G", "2h", bind=False)
    warned = wait_for(lambda: (x := chronos.get_lease(lease.id)).idle_warning is not None and x,
                      what="the warning (it comes at once: the warning is as long as the window)")
    assert warned.idle_since is not None and warned.idle_warning.action_at is not None
    assert chronos.extend(lease.id, "10m").idle_since is None
    assert chronos.get_lease(lease.id).idle_warning is None
    events = default_engine().events(lease_id=lease.id)
    assert [e.detail.get("by") for e in events if e.event == "active"] == ["extend"]


def test_a_request_can_bring_its_own_idle_rule_with_the_system_off(chronos_env: Path) -> None:
    lease = chronos.reserve("1G", "1h", bind=False, idle_after="1s", on_idle="release")
    ended = wait_for(lambda: (x := chronos.get_lease(lease.id)).state != "active" and x, timeout=30,
                     what="the lease to end by its own rule")
    assert ended.state == "released" and "idle since" in (ended.end_reason or "")
    plain = chronos.reserve("1G", "1h", bind=False)
    assert chronos.get_lease(plain.id).idle_since is None  # no rule, nothing watched


def test_the_service_can_evaluate_idleness_from_its_own_samples() -> None:
    # The function the service's loop calls: samples and leases in, decisions out, nothing read or written.
    records = [lease("1"), lease("2", idle_since=0.0)]
    decisions = idle.evaluate(records, sample(4000.0, *records, busy=("2",)), {"1": RULE, "2": RULE})
    assert [(d.lease_id, d.kind) for d in decisions] == [("1", "idle"), ("2", "active")]
