"""Gang leases and their enforcement on a real machine with several NVIDIA GPUs.

Skipped (not failed) where fewer than two GPUs are present. Run on such a machine with
``bash scripts/multigpu/validate.sh`` (see docs/gpu-validation.md, "Several GPUs"). Each test
drives real processes through the ``chronos`` CLI against NVML; where ``CHRONOS_GPU_RECORD`` names
a file, what was seen (the topology matrix included) is appended to it as JSON lines.
tests/test_multigpu.py proves the same list on simulated GPUs in CI.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import chronos
from chronos import api
from chronos.devices import get_backend
from chronos.devices.base import (
    LINK_HOST_BRIDGE,
    LINK_NUMA,
    LINK_NVLINK,
    LINK_PCIE_MULTI,
    LINK_PCIE_SWITCH,
    LINK_SAME,
    LINK_SYSTEM,
)
from chronos.engine import Engine
from tests.waiting import WaiterPolls, quiet_for, wait_for

GIB = 1 << 30
MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
ENDED = {"released", "expired", "revoked"}
SMI_LINKS = {"X": LINK_SAME, "PIX": LINK_PCIE_SWITCH, "PXB": LINK_PCIE_MULTI, "PHB": LINK_HOST_BRIDGE,
             "NODE": LINK_NUMA, "SYS": LINK_SYSTEM, "SOC": LINK_SYSTEM}


def gpu_count() -> int:
    """Physical GPUs as ``nvidia-smi -L`` lists them (MIG instances not counted); 0 without a driver."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


GPUS = gpu_count()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(GPUS < 2, reason=f"needs at least 2 NVIDIA GPUs, found {GPUS}"),
]


def record(test: str, **data: Any) -> None:
    path = os.environ.get("CHRONOS_GPU_RECORD")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"test": test, **data}) + "\n")


def smi(*fields: str) -> list[list[str]]:
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    return [[cell.strip() for cell in line.split(",")] for line in out.strip().splitlines()]


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chronos", *args], capture_output=True, text=True,
                          timeout=timeout)


def cli_json(*args: str) -> Any:
    result = cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def fill(index: int, leave: int = 4 * GIB) -> chronos.Lease | None:
    """An unbound lease on GPU ``index`` leaving about ``leave`` bytes of it available (None: already so)."""
    available = next(d.memory_available_bytes for d in api.devices() if d.index == index)
    if available - leave < GIB:
        return None
    return chronos.reserve(available - leave, "30m", device=index, bind=False)


# --------------------------------------------------------------------------- stats and topology


def test_stats_matches_nvidia_smi_for_every_gpu() -> None:
    rows = smi("index", "uuid", "name", "memory.total", "memory.used")
    assert len(rows) == GPUS
    plain = cli_json("stats")
    detailed = cli_json("stats", "--all")["devices"]
    assert [(s["index"], s["uuid"]) for s in plain] == [(int(r[0]), r[1]) for r in rows]
    assert [d["index"] for d in detailed] == [int(r[0]) for r in rows]
    for s, d, (_, _, name, total_mib, used_mib) in zip(plain, detailed, rows, strict=True):
        for figures in (s, d):
            assert figures["name"] == name
            assert abs(figures["memory_total_bytes"] // MIB - int(total_mib)) <= 1
            # NVML's v2 query leaves reserved memory out of "used"; nvidia-smi counts it
            assert abs(figures["memory_used_bytes"] // MIB - int(used_mib)) <= 1024
    record("multigpu_stats_vs_smi", smi=rows, stats=plain, stats_all=detailed)


def smi_topology() -> tuple[str, list[list[str]]]:
    text = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, check=True,
                          timeout=60).stdout
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    cells = []
    for line in text.splitlines():  # rows start at the margin; the header and the legend are indented
        parts = line.split()
        if re.match(r"GPU\d+\s", line) and len(parts) > GPUS:
            cells.append(parts[1:1 + GPUS])
    return text, cells


def test_topology_matches_nvidia_smi_topo() -> None:
    distances = get_backend().distances()
    text, cells = smi_topology()
    record("multigpu_topology", distances=distances, smi_topo=text, driver=get_backend().driver_version())
    print("chronos distances (LINK_* levels, smaller is closer):")
    for row in distances:
        print(" ".join(f"{v:3d}" for v in row))
    print(text)
    assert len(distances) == GPUS and all(len(row) == GPUS for row in distances)
    assert len(cells) == GPUS, text
    for i in range(GPUS):
        for j in range(GPUS):
            assert distances[i][j] == distances[j][i]
            want = LINK_NVLINK if cells[i][j].startswith("NV") else SMI_LINKS.get(cells[i][j])
            assert want is not None, f"unknown nvidia-smi topo cell {cells[i][j]!r}"
            assert distances[i][j] == want, (i, j, cells[i][j], distances[i][j])


def closest(indices: list[int], distances: list[list[int]]) -> int:
    return min(distances[a][b] for a in indices for b in indices if a < b)


def test_gangs_take_the_closest_gpus_that_fit() -> None:
    distances = get_backend().distances()
    everyone = list(range(GPUS))
    first = cli_json("reserve", "8G", "30m", "--gpus", "2")
    a, b = first["devices"]
    assert distances[a][b] == closest(everyone, distances), (first["devices"], distances)
    # Fill one GPU of that pair: the next gang must take the closest pair among the GPUs still fitting.
    blocker = fill(a)
    assert blocker is not None
    rest = [i for i in everyone if i != a]
    if len(rest) >= 2:
        second = cli_json("reserve", "8G", "30m", "--gpus", "2")
        assert a not in second["devices"]
        c, d = second["devices"]
        assert distances[c][d] == closest(rest, distances), (second["devices"], distances)
    else:
        second = None
        assert cli("reserve", "8G", "30m", "--gpus", "2").returncode == 3
    record("multigpu_gang_placement", distances=distances, first=first["devices"],
           blocked=a, second=second["devices"] if second else None)


def test_a_gang_is_all_or_none_and_a_waiting_gang_gets_the_released_gpus() -> None:
    per_gpu = min(d.memory_available_bytes for d in api.devices()) - 4 * GIB
    first = chronos.reserve(per_gpu, "30m", gpus=2, bind=False)
    assert len(first.devices) == 2 and len(set(first.device_uuids)) == 2
    blockers = [fill(i) for i in range(GPUS)]  # no GPU keeps 8 GiB available
    leases_before = {lease.id for lease in chronos.leases()}
    refused = cli("reserve", "8G", "30m", "--gpus", "2")
    assert refused.returncode == 3 and "Traceback" not in refused.stderr, refused.stderr
    assert {lease.id for lease in chronos.leases()} == leases_before
    waiter = subprocess.Popen(
        [sys.executable, "-m", "chronos", "reserve", "8G", "30m", "--gpus", "2", "--wait", "120", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    def queued_now() -> list[chronos.Lease]:
        if waiter.poll() is not None:
            raise AssertionError(f"the waiter exited: {waiter.communicate(timeout=5)}")
        return [lease for lease in chronos.leases() if lease.state == "queued"]

    def granted() -> bool:  # read from the audit log: reading leases would end the counting leases
        return waiter.poll() is not None or any(
            e.event == "granted" for e in api.default_engine().events(lease_id=queued[0].id))

    try:
        queued = wait_for(queued_now, timeout=60, interval=0.1, what="the gang to queue")
        assert len(queued) == 1
        # Several of the waiter's polls with no GPU pair free: it stays queued. (A 1 GiB lease on GPU 0
        # counts them; every GPU keeps about 4 GiB available, too little for the gang's 8 GiB.)
        with WaiterPolls(waiter.pid, device=0) as polls:
            quiet_for(polls, 6, granted, what="the gang left waiting while no pair has room")
        assert waiter.poll() is None and chronos.get_lease(queued[0].id).state == "queued"
        released_at = time.monotonic()
        chronos.release(first.id)
        out, err = waiter.communicate(timeout=60)
        waited = time.monotonic() - released_at
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    assert waiter.returncode == 0, err
    granted = json.loads(out)
    assert granted["id"] == queued[0].id and sorted(granted["devices"]) == sorted(first.devices)
    record("multigpu_wait", first=list(first.devices), blockers=[b.devices for b in blockers if b],
           granted=granted["devices"], granted_after_release_s=round(waited, 3))


# --------------------------------------------------------------------------- chronos run --gpus 2

CUDA_PRELUDE = textwrap.dedent("""
    import ctypes, json, os, sys, time
    cuda = ctypes.CDLL("libcuda.so.1")
    def check(rc, what):
        if rc != 0:
            print(json.dumps({"error": what, "rc": rc}), flush=True)
            raise SystemExit(3)
    check(cuda.cuInit(0), "cuInit")
""")

SEES_CHILD = CUDA_PRELUDE + textwrap.dedent("""
    out = {"visible": os.environ["CUDA_VISIBLE_DEVICES"], "lease": os.environ["CHRONOS_LEASE_ID"]}
    count = ctypes.c_int()
    check(cuda.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
    out["driver_count"] = count.value
    uuids = []
    for i in range(count.value):
        dev = ctypes.c_int()
        check(cuda.cuDeviceGet(ctypes.byref(dev), i), "cuDeviceGet")
        raw = (ctypes.c_ubyte * 16)()
        check(cuda.cuDeviceGetUuid(raw, dev), "cuDeviceGetUuid")
        h = bytes(raw).hex()
        uuids.append(f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    out["driver_uuids"] = uuids
    try:
        import torch
    except ImportError:
        torch = None
    keep = []
    if torch is not None:
        n = torch.cuda.device_count()
        out["torch_count"] = n
        out["torch_uuids"] = [str(torch.cuda.get_device_properties(i).uuid) for i in range(n)]
        out["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
        over = {}
        for i in range(n):
            keep.append(torch.ones(1 << 30, dtype=torch.uint8, device=f"cuda:{i}"))
            try:
                keep.append(torch.empty(6 << 30, dtype=torch.uint8, device=f"cuda:{i}"))
                over[i] = "allocated"
            except torch.cuda.OutOfMemoryError:
                over[i] = "OutOfMemoryError"
            torch.cuda.synchronize(i)
        out["six_gib"] = over
        import pynvml
        pynvml.nvmlInit()
        usage = {}
        for u in uuids:
            h = pynvml.nvmlDeviceGetHandleByUUID(u)
            usage[u] = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)
                        if p.pid == os.getpid()]
        out["nvml_process_bytes"] = usage
    print(json.dumps(out), flush=True)
    time.sleep(3)  # past the watchdog's grace: a child over its cap on either GPU would be ended now
""")

# Allocates argv[2] MiB through the driver API on visible device argv[1], past every framework cap.
OVER_CHILD = CUDA_PRELUDE + textwrap.dedent("""
    ordinal, mib = int(sys.argv[1]), int(sys.argv[2])
    dev = ctypes.c_int()
    check(cuda.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
    ctx = ctypes.c_void_p()
    check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    check(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    ptr, nbytes = ctypes.c_uint64(), ctypes.c_size_t(mib << 20)
    check(cuda.cuMemAlloc_v2(ctypes.byref(ptr), nbytes), "cuMemAlloc")
    check(cuda.cuMemsetD8_v2(ptr, ctypes.c_ubyte(0), nbytes), "cuMemsetD8")
    check(cuda.cuCtxSynchronize(), "cuCtxSynchronize")
    print(json.dumps({"allocated_mib": mib, "t": time.time()}), flush=True)
    time.sleep(60)
""")


def test_run_child_sees_exactly_its_two_gpus_and_the_cap_holds_on_both() -> None:
    result = cli("run", "4G", "10m", "--gpus", "2", "--", sys.executable, "-c", SEES_CHILD)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    (lease,) = chronos.leases(all=True)
    record("multigpu_run_sees", child=seen, lease=lease.to_dict(), stderr=result.stderr.strip().splitlines())
    assert seen["lease"] == lease.id and lease.state == "released" and len(lease.devices) == 2
    assert seen["visible"].split(",") == list(lease.device_uuids)
    assert seen["driver_count"] == 2 and seen["driver_uuids"] == list(lease.device_uuids)
    assert "ended the command" not in result.stderr
    if "torch_count" not in seen:
        pytest.skip("PyTorch is not installed: the per-framework part was not checked")
    assert seen["torch_count"] == 2
    assert [u.lower() for u in seen["torch_uuids"]] == [u.lower().removeprefix("gpu-") for u in lease.device_uuids]
    assert seen["six_gib"] == {"0": "OutOfMemoryError", "1": "OutOfMemoryError"}
    for u in lease.device_uuids:
        assert seen["nvml_process_bytes"][u] and max(seen["nvml_process_bytes"][u]) < 4 * GIB


@pytest.mark.parametrize("ordinal", [0, 1], ids=["first-gpu", "second-gpu"])
def test_watchdog_ends_a_child_over_its_cap_on_either_gpu(ordinal: int) -> None:
    started = time.monotonic()
    result = cli("run", "4G", "10m", "--gpus", "2", "--grace", "0.5", "--kill-wait", "5",
                 "--", sys.executable, "-c", OVER_CHILD, str(ordinal), "6144")
    wall = time.monotonic() - started
    (lease,) = chronos.leases(all=True)
    record("multigpu_overuse", ordinal=ordinal, devices=list(lease.devices), returncode=result.returncode,
           stdout=result.stdout.strip().splitlines(), stderr=result.stderr.strip().splitlines(), wall_s=wall,
           peak=lease.peak_memory_bytes)
    assert '"allocated_mib": 6144' in result.stdout, result.stdout + result.stderr
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    over = lease.devices[ordinal]
    reasons = [line for line in result.stderr.splitlines() if line.startswith("chronos: ended the command")]
    assert len(reasons) == 1 and f"GPU {over}: " in reasons[0] and "over the lease's 4 GiB cap" in reasons[0]
    assert lease.state == "released" and (lease.peak_memory_bytes or 0) >= 6 * GIB


# --------------------------------------------------------------------------- a burst of processes

BURST_WORKER = textwrap.dedent("""
    import random, sys, time
    import chronos
    from chronos.errors import UnavailableError

    out_path, rounds, seed, gpus = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    with open(out_path, "a", buffering=1) as out:
        for _ in range(rounds):
            kwargs = {}
            kind = rng.random()
            if kind < 0.35:
                kwargs["gpus"] = rng.choice([2, min(gpus, 3)])
            elif kind < 0.7:
                kwargs["device"] = rng.randrange(gpus)
            if rng.random() < 0.2:
                kwargs["wait"] = 0.5
            want = kwargs.get("gpus", 1)
            try:
                lease = chronos.reserve(rng.choice(["10%", "25%", "40%"]), "10m", **kwargs)
            except UnavailableError:
                continue
            out.write(f"{lease.id} {want} {','.join(map(str, lease.devices))}\\n")
            time.sleep(rng.random() * 0.05)
            lease.release()
""")


def test_a_burst_of_gang_and_single_leases_never_overcommits(tmp_path: Path) -> None:
    totals = {d.index: d.memory_total_bytes for d in get_backend().devices()}
    engine = Engine()
    engine.leases()
    stop, seen = threading.Event(), []  # type: ignore[var-annotated]

    def watch() -> None:
        conn = sqlite3.connect(f"file:{engine.ledger.path}?mode=ro", uri=True, timeout=30)
        try:
            while not stop.is_set():
                used: Counter[int] = Counter()
                for devices, nbytes in conn.execute(
                        "SELECT devices, memory_bytes FROM leases WHERE state = 'active'"):
                    for index in json.loads(devices):
                        used[index] += nbytes
                seen.extend(f"GPU {i}: {n} > {totals[i]}" for i, n in used.items() if n > totals[i])
                time.sleep(0.005)
        finally:
            conn.close()

    monitor = threading.Thread(target=watch)
    worker = tmp_path / "burst_worker.py"
    worker.write_text(BURST_WORKER)
    outs = [tmp_path / f"worker{i}.txt" for i in range(12)]
    rng = random.Random(11)
    monitor.start()
    started = time.monotonic()
    try:
        runs = [subprocess.Popen(
            [sys.executable, "-m", "chronos", "run", "30%", "2m", "--gpus", "2", "--wait", "120",
             "--", sys.executable, "-c", "import time; time.sleep(2)"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
        procs = [subprocess.Popen([sys.executable, str(worker), str(out), str(rng.randint(10, 20)), str(seed),
                                   str(GPUS)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for seed, out in enumerate(outs)]
        for proc in procs + runs:
            _, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err
    finally:
        stop.set()
        monitor.join()
    wall = time.monotonic() - started
    granted = [line.split() for out in outs for line in out.read_text().splitlines()]
    kinds = Counter(int(want) for _, want, _ in granted)
    history = {lease.id: lease for lease in engine.leases(all=True)}
    held: dict[str, tuple[list[int], int]] = {}
    now: Counter[int] = Counter()
    over = []
    for event in sorted(engine.events(), key=lambda e: e.id):
        if event.event == "granted":
            held[event.lease_id] = (list(event.detail["devices"]), int(event.detail["memory_bytes"]))
            for index in held[event.lease_id][0]:
                now[index] += held[event.lease_id][1]
                if now[index] > totals[index]:
                    over.append(f"event {event.id}: GPU {index}")
        elif event.event in ENDED and event.lease_id in held:
            devices, nbytes = held.pop(event.lease_id)
            for index in devices:
                now[index] -= nbytes
    record("multigpu_burst", granted_by_width=dict(kinds), leases=len(history), wall_s=round(wall, 2),
           states=dict(Counter(lease.state for lease in history.values())), overcommits=seen + over)
    assert seen == [] and over == [] and held == {}
    assert kinds[1] > 0 and kinds[2] > 0, kinds
    for lease_id, want, listed in granted:
        indices = [int(i) for i in listed.split(",")]
        assert len(indices) == int(want) == len(set(indices)), (lease_id, want, listed)
    ids = {lease_id for lease_id, _, _ in granted}
    run_ids = {i for i, lease in history.items() if lease.label == Path(sys.executable).name}
    assert len(run_ids) == 3 and all(len(history[i].devices) == 2 for i in run_ids)
    assert ids | run_ids == {i for i, lease in history.items() if lease.state != "withdrawn"}
    assert {history[i].state for i in ids | run_ids} == {"released"}
    assert engine.ledger.integrity_check() == "ok"
