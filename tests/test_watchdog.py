"""The watchdog against real child processes that claim simulated GPU memory."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

import chronos
from chronos import settings
from chronos.accounting import NO_LEASE, WRONG_DEVICE, Membership, unmanaged
from chronos.api import default_engine
from chronos.devices.base import GpuProcess
from chronos.devices.simulated import SimulatedBackend, allocate
from chronos.enforce.watchdog import (
    ExpiryWarning,
    HolderExitedEvent,
    LeaseEndedEvent,
    OveruseEvent,
    SignalEvent,
    UnkillableEvent,
    Watchdog,
    WatchdogEvent,
)
from chronos.errors import InvalidRequestError
from tests.waiting import quiet_for, wait_for, wait_for_async

GIB = 1 << 30

# A child that claims NBYTES on the simulated device named by its CUDA_VISIBLE_DEVICES, says
# "ready" once it has, and sleeps. IGNORE_TERM makes it ignore SIGTERM; ON_INT frees on SIGINT.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from chronos.devices import get_backend
    from chronos.devices.simulated import allocate, free
    uuid = os.environ["CUDA_VISIBLE_DEVICES"].split(",")[0]
    index = [d.index for d in get_backend().devices() if d.uuid == uuid][0]
    nbytes = int(sys.argv[1])
    if len(sys.argv) > 2 and sys.argv[2] == "IGNORE_TERM":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if len(sys.argv) > 2 and sys.argv[2] == "ON_INT":
        def on_int(*_):
            free(index)
            print("freed", flush=True)
        signal.signal(signal.SIGINT, on_int)
    allocate(index, nbytes)
    print("ready", flush=True)
    for _ in range(600):
        time.sleep(0.1)
""")


def _spawn(lease: chronos.Lease, nbytes: int, mode: str = "") -> subprocess.Popen[str]:
    args = [sys.executable, "-c", CHILD, str(nbytes)] + ([mode] if mode else [])
    child = subprocess.Popen(args, env=lease.env(), stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    return child


def _wait(child: subprocess.Popen[str], timeout: float = 20) -> int:
    try:
        return child.wait(timeout)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


def _holder() -> subprocess.Popen[str]:
    """A process to bind a lease to (so the test process itself is not the holder)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], text=True)


def test_over_cap_child_is_terminated_after_grace() -> None:
    lease = chronos.reserve("1G", "1h", device=0, bind=False)
    child = _spawn(lease, 3 * GIB)
    started = time.monotonic()
    events: list[WatchdogEvent] = []
    dog = Watchdog(lease, pid=child.pid, grace_s=0.5, kill_wait_s=5, on_event=events.append).start()
    code = _wait(child)
    elapsed = time.monotonic() - started
    dog.stop()
    assert code == -signal.SIGTERM
    # grace + one poll, with a wide margin for a loaded CI machine
    assert elapsed < 0.5 + 0.25 + 5
    over = [e for e in events if isinstance(e, OveruseEvent)]
    assert over and over[0].used_bytes == 3 * GIB and over[0].cap_bytes == GIB and over[0].device == 0
    assert any(
        isinstance(e, SignalEvent) and e.signal_name == "SIGTERM" and child.pid in e.pids for e in events
    )
    assert dog.end_reason is not None and "over the lease's 1 GiB cap" in dog.end_reason
    recorded = chronos.get_lease(lease.id)
    assert recorded.peak_memory_bytes == 3 * GIB
    assert recorded.gpu_seconds is not None and recorded.gpu_seconds > 0


def test_child_under_cap_is_left_alone() -> None:
    lease = chronos.reserve("2G", "1h", device=1, bind=False)
    child = _spawn(lease, GIB)
    dog = Watchdog(lease, pid=child.pid, grace_s=0.2).start()
    # Five polls: over the cap, the second poll past the 0.2 s grace would have acted already.
    quiet_for(dog, 5, lambda: child.poll() is not None
              or any(isinstance(e, (OveruseEvent, SignalEvent)) for e in dog.events),
              what="the child under its cap left alone")
    assert child.poll() is None
    assert not any(isinstance(e, (OveruseEvent, SignalEvent)) for e in dog.events)
    assert dog.usage == {1: GIB}
    assert dog.peak_bytes == GIB
    child.terminate()
    _wait(child)
    assert dog.wait(5)  # the watched process exited: the watchdog stops by itself
    assert any(isinstance(e, HolderExitedEvent) for e in dog.events)


def test_sigterm_ignored_then_killed_after_kill_wait() -> None:
    lease = chronos.reserve("1G", "1h", bind=False)
    child = _spawn(lease, 2 * GIB, "IGNORE_TERM")
    dog = Watchdog(lease, pid=child.pid, grace_s=0.2, kill_wait_s=0.5).start()
    code = _wait(child)
    dog.stop()
    assert code == -signal.SIGKILL
    sent = [e.signal_name for e in dog.events if isinstance(e, SignalEvent)]
    assert sent == ["SIGTERM", "SIGKILL"]


def test_kill_policy_sends_sigkill_at_once() -> None:
    lease = chronos.reserve("1G", "1h", bind=False)
    child = _spawn(lease, 2 * GIB, "IGNORE_TERM")
    dog = Watchdog(lease, pid=child.pid, grace_s=0.2, on_overuse="kill").start()
    assert _wait(child) == -signal.SIGKILL
    dog.stop()
    assert [e.signal_name for e in dog.events if isinstance(e, SignalEvent)] == ["SIGKILL"]


def test_warn_policy_only_reports() -> None:
    lease = chronos.reserve("1G", "1h", bind=False)
    child = _spawn(lease, 2 * GIB)
    events: list[WatchdogEvent] = []
    dog = Watchdog(lease, pid=child.pid, grace_s=0.2, on_overuse="warn", on_event=events.append).start()
    wait_for(lambda: any(isinstance(e, OveruseEvent) for e in events), timeout=10, what="the overuse warning")

    def acted() -> bool:
        return (child.poll() is not None or sum(isinstance(e, OveruseEvent) for e in events) > 1
                or any(isinstance(e, SignalEvent) for e in events))

    quiet_for(dog, 3, acted, what="a single warning and no signal while the child stays over its cap")
    assert child.poll() is None
    over = [e for e in events if isinstance(e, OveruseEvent)]
    assert len(over) == 1 and over[0].action == "warn"  # once per episode, not every poll
    assert not any(isinstance(e, SignalEvent) for e in events)
    child.terminate()
    _wait(child)
    dog.stop()


def test_interrupt_policy_lets_the_program_recover() -> None:
    lease = chronos.reserve("1G", "1h", bind=False)
    child = _spawn(lease, 2 * GIB, "ON_INT")
    dog = Watchdog(lease, pid=child.pid, grace_s=0.2, on_overuse="interrupt", kill_wait_s=30).start()
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "freed"

    def sent() -> list[str]:
        return [e.signal_name for e in dog.events if isinstance(e, SignalEvent)]

    # Three polls after the child freed its memory: each sees it under the cap, and sends nothing more.
    quiet_for(dog, 3, lambda: child.poll() is not None or sent() != ["SIGINT"],
              what="the interrupted child left running")
    assert child.poll() is None  # SIGINT was handled; usage fell under the cap; nothing more was sent
    assert [e.signal_name for e in dog.events if isinstance(e, SignalEvent)] == ["SIGINT"]
    child.terminate()
    _wait(child)
    dog.stop()


def test_expiry_warns_then_ends_the_child() -> None:
    lease = chronos.reserve("1G", "2s", bind=False)
    child = _spawn(lease, GIB // 2)
    events: list[WatchdogEvent] = []
    dog = Watchdog(
        lease, pid=child.pid, warn_at=(1.2,), kill_wait_s=5, on_expiry="terminate", on_event=events.append
    ).start()
    assert _wait(child) == -signal.SIGTERM
    dog.stop()
    kinds = [type(e) for e in events]
    assert ExpiryWarning in kinds and LeaseEndedEvent in kinds
    assert kinds.index(ExpiryWarning) < kinds.index(LeaseEndedEvent)
    ended = next(e for e in events if isinstance(e, LeaseEndedEvent))
    assert ended.state == "expired" and ended.action == "terminate"
    assert chronos.get_lease(lease.id).state == "expired"


def test_extension_by_another_process_is_seen() -> None:
    lease = chronos.reserve("1G", "3s", bind=False)
    assert lease.expires_at is not None
    first_end = lease.expires_at
    child = _spawn(lease, GIB // 2)
    dog = Watchdog(lease, pid=child.pid, refresh_s=0.2).start()
    from tests.conftest import run_cli

    assert run_cli("extend", lease.id, "1h").returncode == 0

    def ended() -> bool:
        return child.poll() is not None or any(isinstance(e, (LeaseEndedEvent, SignalEvent)) for e in dog.events)

    wait_for(lambda: ended() or time.time() > first_end, timeout=10, what="the lease's first end time")
    quiet_for(dog, 2, ended, what="the child of the extended lease left running")  # two polls past that end
    assert child.poll() is None
    assert dog.lease.expires_at is not None and dog.lease.expires_at > time.time() + 3000
    child.terminate()
    _wait(child)
    dog.stop()


def test_release_by_another_process_ends_the_child_when_asked() -> None:
    lease = chronos.reserve("1G", "1h", bind=False)
    child = _spawn(lease, GIB // 2)
    dog = Watchdog(lease, pid=child.pid, refresh_s=0.2, on_release="terminate", kill_wait_s=5).start()
    from tests.conftest import run_cli

    assert run_cli("release", lease.id).returncode == 0
    assert _wait(child) == -signal.SIGTERM
    dog.stop()
    ended = [e for e in dog.events if isinstance(e, LeaseEndedEvent)]
    assert ended and ended[0].state == "released"


def test_release_without_policy_stops_watching_only() -> None:
    lease = chronos.reserve("1G", "1h", bind=False)
    child = _spawn(lease, GIB // 2)
    dog = Watchdog(lease, pid=child.pid, refresh_s=0.2).start()
    lease.release()
    assert dog.wait(5)
    assert child.poll() is None
    # The watchdog is done, so nothing can signal the child later; a signal sent before now is logged.
    assert not any(isinstance(e, SignalEvent) for e in dog.events)
    child.terminate()
    _wait(child)


def test_asyncio_task_host() -> None:
    lease = chronos.reserve("1G", "1h", bind=False)
    child = _spawn(lease, 2 * GIB)
    seen: list[WatchdogEvent] = []

    async def main() -> int | None:
        dog = Watchdog(lease, pid=child.pid, grace_s=0.3, kill_wait_s=5, on_event=seen.append)
        task = dog.start_task()
        loop = asyncio.get_running_loop()
        code = await loop.run_in_executor(None, _wait, child)
        await asyncio.wait_for(task, 10)  # the watched process is gone: the task ends by itself
        return code

    assert asyncio.run(main()) == -signal.SIGTERM
    assert any(isinstance(e, OveruseEvent) for e in seen)
    assert chronos.get_lease(lease.id).peak_memory_bytes == 2 * GIB


def test_asyncio_task_can_be_cancelled() -> None:
    lease = chronos.reserve("1G", "1h", bind=False)
    holder = _holder()

    async def main() -> None:
        dog = Watchdog(lease, pid=holder.pid)
        task = dog.start_task()
        await wait_for_async(lambda: dog.polls >= 2, what="two polls by the watchdog task")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(main())
    finally:
        holder.kill()
        holder.wait()


def test_grandchildren_count_and_are_signalled() -> None:
    lease = chronos.reserve("1G", "1h", bind=False)
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {CHILD!r}, str({2 * GIB})])
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], env=lease.env())
    dog = Watchdog(lease, pid=parent.pid, grace_s=0.3, kill_wait_s=5).start()
    code = _wait(parent)
    dog.stop()
    assert code == -signal.SIGTERM
    signalled = [e for e in dog.events if isinstance(e, SignalEvent)]
    assert signalled and len(signalled[0].pids) == 2  # the parent and its allocating child
    assert not any(chronos.devices()[i].memory_used_bytes for i in (0, 1))


class _HiddenUsage(SimulatedBackend):
    """GPUs whose driver hides per-process memory (MPS on older drivers, some containers)."""

    def processes(self, indices: list[int] | None = None) -> list[GpuProcess]:
        return [GpuProcess(p.device_index, p.device_uuid, p.pid, None) for p in super().processes(indices)]


def test_accounts_per_device_where_process_figures_are_missing() -> None:
    lease = chronos.reserve("1G", "1h", device=0, bind=False)
    holder = _holder()
    allocate(0, GIB // 4, pid=holder.pid)  # someone else's memory, there before the watchdog starts
    child = _spawn(lease, 0)
    hidden = _HiddenUsage.from_settings(settings.current())
    dog = Watchdog(lease, pid=child.pid, grace_s=0.3, kill_wait_s=5, backend=hidden)
    dog.poll()
    assert dog.usage.get(0, 0) == 0  # the other process's memory is the baseline, not ours
    allocate(0, 3 * GIB, pid=child.pid)
    dog.start()
    try:
        assert _wait(child) == -signal.SIGTERM
    finally:
        holder.kill()
        holder.wait()
    dog.stop()
    over = [e for e in dog.events if isinstance(e, OveruseEvent)]
    assert over and over[0].estimated and over[0].used_bytes == 3 * GIB


def test_stopped_process_is_still_killed() -> None:
    lease = chronos.reserve("1G", "1h", bind=False)
    child = _spawn(lease, 2 * GIB, "IGNORE_TERM")
    dog = Watchdog(lease, pid=child.pid, grace_s=0.1, kill_wait_s=0.2)
    os.kill(child.pid, signal.SIGSTOP)  # stopped: SIGTERM stays pending, SIGKILL still ends it
    dog.start()
    assert _wait(child) == -signal.SIGKILL
    dog.stop()
    assert not any(isinstance(e, UnkillableEvent) for e in dog.events)


def test_bad_settings_are_one_line_errors() -> None:
    lease = chronos.reserve("1G", "1h", bind=False)
    with pytest.raises(InvalidRequestError, match="use one of warn, interrupt, terminate, kill"):
        Watchdog(lease, pid=os.getpid(), on_overuse="explode")
    with pytest.raises(InvalidRequestError, match="positive"):
        Watchdog(lease, pid=os.getpid(), rate_hz=0)
    with pytest.raises(InvalidRequestError, match="no holder process"):
        Watchdog(lease)


def test_dead_holder_lease_is_reclaimed(tmp_path: Path) -> None:
    wrapper = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chronos",
            "run",
            "1G",
            "1h",
            "--",
            sys.executable,
            "-c",
            f"import time; open({str(tmp_path / 'started')!r}, 'w').close(); time.sleep(60)",
        ],
        stderr=subprocess.DEVNULL,
    )
    wait_for((tmp_path / "started").exists, timeout=20, what="the command to start under chronos run")
    (lease,) = chronos.leases()
    assert lease.pid == wrapper.pid and lease.state == "active"
    grandchild_pids = [p for p in _children(wrapper.pid)]
    wrapper.kill()
    wrapper.wait()
    assert chronos.get_lease(lease.id).state == "revoked"
    # the command was told to stop when its wrapper died (PR_SET_PDEATHSIG)
    assert grandchild_pids
    wait_for(lambda: not any(_alive(p) for p in grandchild_pids), timeout=10,
             what=lambda: f"the command to end with its wrapper: {[p for p in grandchild_pids if _alive(p)]} alive")


def _children(pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(pid).children()]


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --------------------------------------------------------------------------- unmanaged


def test_unmanaged_reports_processes_without_a_lease_or_on_other_devices() -> None:
    holder = _holder()
    stranger = _holder()
    try:
        lease = chronos.reserve("4G", "1h", device=0, bind=holder.pid)
        helper = textwrap.dedent("""
            import sys
            from chronos.devices.simulated import allocate
            allocate(int(sys.argv[1]), 1 << 30, pid=int(sys.argv[2]))
        """)
        for device, pid in ((0, holder.pid), (1, holder.pid), (0, stranger.pid)):
            subprocess.run([sys.executable, "-c", helper, str(device), str(pid)], check=True)
        procs = default_engine().backend.processes()
        judge = Membership([lease.record for lease in chronos.leases()])
        found = {(u.process.device_index, u.process.pid): u for u in unmanaged(procs, judge)}
        assert set(found) == {(1, holder.pid), (0, stranger.pid)}
        assert found[(1, holder.pid)].reason == WRONG_DEVICE and found[(1, holder.pid)].lease_id == lease.id
        assert found[(0, stranger.pid)].reason == NO_LEASE
    finally:
        for p in (holder, stranger):
            p.kill()
            p.wait()


@dataclass
class _Table:
    """A judge from a fixed table: what a pure accounting function is given in place of /proc."""

    leases: tuple[chronos.LeaseRecord, ...]
    owners: dict[int, str]

    def lease_of(self, pid: int) -> str | None:
        return self.owners.get(pid)


def test_unmanaged_is_pure_given_a_judge() -> None:
    lease = chronos.reserve("4G", "1h", device=1, bind=False).record
    procs = [GpuProcess(1, "u1", 101, 5), GpuProcess(0, "u0", 101, 5), GpuProcess(1, "u1", 202, 5)]
    found = unmanaged(procs, _Table((lease,), {101: lease.id}))
    assert [(u.process.pid, u.process.device_index, u.reason) for u in found] == [
        (101, 0, WRONG_DEVICE),
        (202, 1, NO_LEASE),
    ]
    ended = replace(lease, state=chronos.LeaseState.RELEASED)
    assert len(unmanaged(procs, Membership([ended]))) == 3  # only active leases count


def test_tree_membership_follows_descendants() -> None:
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); time.sleep(30)",
        ]
    )
    try:
        (kid,) = wait_for(lambda: _children(parent.pid), timeout=10, what="the parent's child to start")
        lease = chronos.reserve("1G", "1h", bind=parent.pid)
        tree = Membership([lease.record])
        assert tree.lease_of(parent.pid) == lease.id and tree.lease_of(kid) == lease.id
        assert tree.lease_of(os.getpid()) is None
        assert {p for p, _ in tree.members(lease.id)} == {parent.pid, kid}
    finally:
        for pid in _children(parent.pid):
            os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()
