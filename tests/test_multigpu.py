"""Gang leases and their enforcement on four simulated GPUs joined as two NVLink pairs.

The same list as tests/gpu/test_multigpu_gpu.py proves on a real machine with several GPUs, here on
``CHRONOS_SIM_GPUS=4x80G`` with ``CHRONOS_SIM_TOPOLOGY=0-1,2-3``: placement by topology, all-or-none
grants, a waiting gang granted on release, a ``chronos run --gpus 2`` child that sees exactly its two
devices and is ended when it goes over its cap on the second, and a burst of real processes mixing
gang and single-GPU requests that never over-commits a device and loses no lease.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

import chronos
from chronos import api
from chronos import api as engine_module
from chronos.devices import get_backend
from chronos.devices.base import LINK_NVLINK, LINK_SAME, LINK_SYSTEM
from chronos.engine import Engine
from tests.conftest import ROOT, run_cli
from tests.ledger_watch import overcommit_watch, replay
from tests.waiting import WaiterPolls, quiet_for, wait_for

GIB = 1 << 30
TOTAL = 80 * GIB
PAIRS = {(0, 1), (2, 3)}
ENDED = {"released", "expired", "revoked"}


@pytest.fixture(autouse=True)
def four_gpus(chronos_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Four 80 GiB simulated GPUs, 0-1 and 2-3 joined by NVLink, pairs across sockets."""
    monkeypatch.setenv("CHRONOS_SIM_GPUS", "4x80G")
    monkeypatch.setenv("CHRONOS_SIM_TOPOLOGY", "0-1,2-3")
    engine_module.reset_default_engine()
    return chronos_env


def reserve_json(*args: str) -> dict[str, object]:
    result = run_cli("reserve", *args, "--json")
    assert result.returncode == 0, result.stderr
    granted: dict[str, object] = json.loads(result.stdout)
    return granted


def uuid_index() -> dict[str, int]:
    return {d.uuid: d.index for d in get_backend().devices()}


def test_the_topology_is_the_one_described() -> None:
    distances = get_backend().distances()
    assert len(distances) == 4
    for a in range(4):
        for b in range(4):
            want = LINK_SAME if a == b else LINK_NVLINK if (min(a, b), max(a, b)) in PAIRS else LINK_SYSTEM
            assert distances[a][b] == want, (a, b, distances)


def test_gangs_on_an_empty_machine_get_the_two_nvlink_pairs() -> None:
    first = reserve_json("8G", "1h", "--gpus", "2")
    second = reserve_json("8G", "1h", "--gpus", "2")
    pairs: set[tuple[int, ...]] = {tuple(first["devices"]), tuple(second["devices"])}  # type: ignore[arg-type]
    assert pairs == PAIRS
    for granted in (first, second):
        assert granted["state"] == "active" and granted["memory_bytes"] == 8 * GIB
        uuids = granted["device_uuids"]
        assert isinstance(uuids, list) and len(set(uuids)) == 2
        assert [uuid_index()[u] for u in uuids] == granted["devices"]
    for d in api.gpus():
        assert d.memory_reserved_bytes == 8 * GIB and d.active_leases == 1


def test_a_partly_taken_pair_sends_gangs_to_the_other_pair() -> None:
    # Least-loaded placement alone would pick 0,2 (ties broken by index); topology must pick 2,3.
    chronos.reserve("75G", "1h", device=1, bind=False)
    assert reserve_json("8G", "1h", "--gpus", "2")["devices"] == [2, 3]
    # 0 is now the emptiest GPU, but 0 with 2 or 3 crosses sockets: the NVLink pair 2,3 still wins.
    assert reserve_json("8G", "1h", "--gpus", "2")["devices"] == [2, 3]
    before = {lease.id for lease in chronos.leases()}
    # 70G per GPU fits only on GPU 0: all or none, so none, and nothing half-granted is left behind.
    refused = run_cli("reserve", "70G", "1h", "--gpus", "2")
    assert refused.returncode == 3, refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    waited = run_cli("reserve", "70G", "1h", "--gpus", "2", "--wait", "1s")
    assert waited.returncode == 3 and "gave up after waiting" in waited.stderr, waited.stderr
    assert {lease.id for lease in chronos.leases()} == before
    reserved = [d.memory_reserved_bytes for d in api.gpus()]
    assert reserved == [0, 75 * GIB, 16 * GIB, 16 * GIB]


def test_with_no_pair_free_a_gang_crosses_pairs_rather_than_wait() -> None:
    # Topology is a preference, not a requirement: the gang is granted across sockets.
    chronos.reserve("75G", "1h", device=1, bind=False)
    chronos.reserve("75G", "1h", device=3, bind=False)
    granted = reserve_json("8G", "1h", "--gpus", "2")
    assert granted["devices"] == [0, 2] and granted["state"] == "active"


def test_a_waiting_gang_is_granted_when_the_blocking_lease_is_released() -> None:
    chronos.reserve("75G", "1h", device=[0, 1], bind=False)
    blocker = chronos.reserve("75G", "1h", device=2, bind=False)
    waiter = subprocess.Popen(
        [sys.executable, "-m", "chronos", "reserve", "8G", "1h", "--gpus", "2", "--wait", "60", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        def queued_now() -> list[chronos.Lease]:
            if waiter.poll() is not None:
                raise AssertionError(f"the waiter exited: {waiter.communicate(timeout=5)}")
            return [lease for lease in chronos.leases() if lease.state == "queued"]

        queued = wait_for(queued_now, timeout=30, interval=0.05, what="the gang to queue")
        assert len(queued) == 1, queued

        def granted() -> bool:  # read from the audit log: reading leases would end the counting leases
            return waiter.poll() is not None or any(
                e.event == "granted" for e in api.default_engine().events(lease_id=queued[0].id))

        # Several of the waiter's polls: GPU 3 alone fits, and it must not take it alone. (GPU 0 holds
        # the leases that count them: the gang cannot use its 5 GiB.)
        with WaiterPolls(waiter.pid, device=0) as polls:
            quiet_for(polls, 4, granted, what="the gang left waiting while only GPU 3 fits")
        assert waiter.poll() is None
        assert api.gpus()[3].memory_reserved_bytes == 0
        assert chronos.get_lease(queued[0].id).state == "queued"
        chronos.release(blocker.id)
        out, err = waiter.communicate(timeout=30)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    assert waiter.returncode == 0, err
    granted = json.loads(out)
    assert granted["id"] == queued[0].id and granted["devices"] == [2, 3] and granted["state"] == "active"
    assert "queued as lease" in err
    assert [d.memory_reserved_bytes for d in api.gpus()] == [75 * GIB, 75 * GIB, 8 * GIB, 8 * GIB]


ENV_CHILD = textwrap.dedent("""
    import json, os, sys
    uuids = os.environ["CUDA_VISIBLE_DEVICES"].split(",")
    json.dump({"uuids": uuids, "lease": os.environ["CHRONOS_LEASE_ID"]}, open(sys.argv[1], "w"))
""")

# Claims argv[1] bytes on the first visible simulated GPU and argv[2] on the second, then sleeps.
ALLOC_CHILD = textwrap.dedent("""
    import os, sys, time
    from chronos.devices import get_backend
    from chronos.devices.simulated import allocate
    by_uuid = {d.uuid: d.index for d in get_backend().devices()}
    first, second = (by_uuid[u] for u in os.environ["CUDA_VISIBLE_DEVICES"].split(","))
    allocate(first, int(sys.argv[1]))
    allocate(second, int(sys.argv[2]))
    print("allocated", flush=True)
    time.sleep(float(sys.argv[3]))
""")


def test_run_child_sees_exactly_its_two_gpus(tmp_path: Path) -> None:
    out = tmp_path / "env.json"
    result = run_cli("run", "4G", "10m", "--gpus", "2", "--", sys.executable, "-c", ENV_CHILD, str(out))
    assert result.returncode == 0, result.stderr
    seen = json.loads(out.read_text())
    (lease,) = chronos.leases(all=True)
    assert seen["lease"] == lease.id
    assert len(seen["uuids"]) == 2 and tuple(seen["uuids"]) == lease.device_uuids
    assert tuple(uuid_index()[u] for u in seen["uuids"]) == lease.devices
    assert lease.devices in PAIRS and lease.memory_bytes == 4 * GIB
    assert lease.state == "released"
    assert f"on GPU {lease.devices[0]},{lease.devices[1]}:" in result.stderr.strip().splitlines()[-1]


def test_usage_under_the_cap_on_both_gpus_is_left_alone() -> None:
    result = run_cli(
        "run", "4G", "10m", "--gpus", "2", "--grace", "0.3", "--kill-wait", "5",
        "--", sys.executable, "-c", ALLOC_CHILD, str(3 * GIB), str(3 * GIB), "1.5",
    )
    assert result.returncode == 0, result.stderr
    assert "ended the command" not in result.stderr
    (lease,) = chronos.leases(all=True)
    assert lease.state == "released" and lease.peak_memory_bytes == 3 * GIB
    assert lease.gpu_seconds is not None and lease.gpu_seconds > 0


def test_overuse_on_the_second_gpu_ends_the_child() -> None:
    result = run_cli(
        "run", "4G", "10m", "--gpus", "2", "--grace", "0.3", "--kill-wait", "5",
        "--", sys.executable, "-c", ALLOC_CHILD, str(1 * GIB), str(6 * GIB), "60",
    )
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    (lease,) = chronos.leases(all=True)
    second = lease.devices[1]
    lines = result.stderr.strip().splitlines()
    reasons = [line for line in lines if line.startswith("chronos: ended the command (SIGTERM): ")]
    assert len(reasons) == 1, result.stderr
    assert f"GPU {second}: 6 GiB used, over the lease's 4 GiB cap" in reasons[0]
    assert f"GPU {lease.devices[0]}:" not in reasons[0]
    assert "peak 6 GiB of 4 GiB" in lines[-1]
    assert lease.state == "released" and lease.peak_memory_bytes == 6 * GIB
    # The child is gone, so are its claims, and the lease no longer holds either GPU.
    for d in api.gpus():
        assert d.memory_used_bytes == 0 and d.memory_reserved_bytes == 0


def test_overuse_on_the_second_gpu_through_the_python_api() -> None:
    from chronos.run import run

    result = run([sys.executable, "-c", ALLOC_CHILD, str(GIB), str(5 * GIB), "60"], "2G", "10m",
                 gpus=2, grace=0.3, kill_wait=5, stderr=None)
    assert result.exit_code == 128 + signal.SIGTERM and result.signal_name == "SIGTERM"
    assert len(result.devices) == 2 and result.devices in PAIRS
    assert result.reason is not None and result.reason.startswith(f"GPU {result.devices[1]}: ")
    assert result.peak_memory_bytes == 5 * GIB
    assert result.lease_id is not None and chronos.get_lease(result.lease_id).state == "released"


# --------------------------------------------------------------------------- a burst of processes

BURST_WORKER = textwrap.dedent("""
    import random, sys, time
    import chronos
    from chronos.errors import UnavailableError

    out_path, rounds, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    with open(out_path, "a", buffering=1) as out:
        for _ in range(rounds):
            size = rng.choice(["10G", "20G", "30G", "25%", "50G"])
            kind = rng.random()
            kwargs = {}
            if kind < 0.35:
                kwargs["gpus"] = 2
            elif kind < 0.45:
                kwargs["device"] = rng.choice([[0, 1], [2, 3], [1, 2]])
            elif kind < 0.75:
                kwargs["device"] = rng.randrange(4)
            if rng.random() < 0.2:
                kwargs["wait"] = 0.3
            want = len(kwargs["device"]) if isinstance(kwargs.get("device"), list) else kwargs.get("gpus", 1)
            try:
                lease = chronos.reserve(size, "10m", **kwargs)
            except UnavailableError:
                continue
            out.write(f"{lease.id} {want} {','.join(map(str, lease.devices))}\\n")
            time.sleep(rng.random() * 0.02)
            lease.release()
""")


def test_a_burst_of_gang_and_single_requests_never_overcommits(tmp_path: Path) -> None:
    engine = Engine()
    engine.leases()  # the ledger exists before the race
    worker = tmp_path / "burst_worker.py"
    worker.write_text(BURST_WORKER)
    outs = [tmp_path / f"worker{i}.txt" for i in range(10)]
    with overcommit_watch(engine.ledger.path, TOTAL) as seen:
        procs = [
            subprocess.Popen([sys.executable, str(worker), str(out), "15", str(seed)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for seed, out in enumerate(outs)
        ]
        # Two `chronos run --gpus 2` wrappers join the race; they may wait their turn.
        runs = [
            subprocess.Popen([sys.executable, "-m", "chronos", "run", "40G", "1m", "--gpus", "2", "--wait", "60",
                              "--", sys.executable, "-c", "import time; time.sleep(0.3)"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        for proc in procs + runs:
            _, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err
    assert seen == []
    granted = [line.split() for out in outs for line in out.read_text().splitlines()]
    kinds = Counter(int(want) for _, want, _ in granted)
    assert kinds[1] > 0 and kinds[2] > 0, f"the burst must mix single and gang grants, got {kinds}"
    for lease_id, want, devices in granted:
        indices = [int(i) for i in devices.split(",")]
        assert len(indices) == int(want) == len(set(indices)), (lease_id, want, devices)
    ids = [lease_id for lease_id, _, _ in granted]
    assert len(ids) == len(set(ids)), "a lease id was granted twice"
    history = {lease.id: lease for lease in engine.leases(all=True)}
    run_leases = {i for i, lease in history.items() if lease.label == Path(sys.executable).name}
    assert len(run_leases) == 2 and all(len(history[i].devices) == 2 for i in run_leases)
    assert set(ids) | run_leases == {i for i, lease in history.items() if lease.state != "withdrawn"}
    assert {history[i].state for i in set(ids) | run_leases} == {"released"}
    peak, over = replay(engine, TOTAL)
    assert over == []
    assert max(peak.values()) > TOTAL // 2, f"the burst never loaded a GPU past half: {peak}"
    granted_events = Counter(e.lease_id for e in engine.events() if e.event == "granted")
    assert all(granted_events[i] == 1 for i in set(ids) | run_leases)
    assert engine.ledger.integrity_check() == "ok"
    assert all(d.memory_reserved_bytes == 0 for d in api.gpus())
