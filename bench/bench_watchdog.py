"""Watchdog benchmarks: reaction time and CPU cost per lease.

    python3 bench/bench_watchdog.py [--trials 20] [--grace 0] [--cpu-seconds 10] [--leases 1,8] [--json FILE]

The backend is CHRONOS_BACKEND's (simulated GPUs in a private state directory when unset).

* reaction: a child under a 1 GiB lease claims 2 GiB (simulated: ``allocate``; NVML: cuMemAlloc
  through ``bench/gpu_cuda_alloc.py``) and reports the wall-clock time just after; the watchdog
  (thread host, default 4 Hz) ends it. Reaction = the child's end (as the parent's wait() sees it)
  minus that time, less the grace period. On NVML also the time until the device's memory is back
  at its baseline. Median and worst over the trials.
* cpu: N leases, each watched by its own watchdog thread at the default rate over a holder that
  keeps memory on the GPU; the process's CPU time over the window, per lease, as a percentage of
  one core. The same window with no watchdog running is the baseline, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 1 << 30
MIB = 1 << 20

SIM_CHILD = textwrap.dedent("""
    import json, os, sys, time
    from chronos.devices import get_backend
    from chronos.devices.simulated import allocate
    uuid = os.environ["CUDA_VISIBLE_DEVICES"].split(",")[0]
    index = [d.index for d in get_backend().devices() if d.uuid == uuid][0]
    print(json.dumps({"context": True, "t": time.time()}), flush=True)
    allocate(index, int(sys.argv[1]) << 20)
    print(json.dumps({"mib": int(sys.argv[1]), "rc": 0, "t": time.time()}), flush=True)
    time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 60)
""")


def _setup_env() -> None:
    if not os.environ.get("CHRONOS_BACKEND"):
        os.environ["CHRONOS_BACKEND"] = "simulated"
        os.environ.setdefault("CHRONOS_SIM_GPUS", "2x80G")
    if not os.environ.get("CHRONOS_STATE_DIR"):
        os.environ["CHRONOS_STATE_DIR"] = tempfile.mkdtemp(prefix="chronos-bench-")


def _child_command(mib: int, hold: float) -> list[str]:
    from chronos.devices import get_backend

    if get_backend().name == "nvml":
        return [sys.executable, str(ROOT / "bench" / "gpu_cuda_alloc.py"), str(mib), "--hold", str(hold)]
    return [sys.executable, "-c", SIM_CHILD, str(mib), "--hold", str(hold)]


def _device_used(index: int) -> int:
    from chronos.devices import get_backend

    return next(d.memory_used_bytes for d in get_backend().devices() if d.index == index)


def reaction(trials: int, grace: float) -> dict[str, Any]:
    import chronos
    from chronos.devices import get_backend
    from chronos.enforce.watchdog import Watchdog

    nvml = get_backend().name == "nvml"
    times: list[float] = []
    freed: list[float] = []
    for _ in range(trials):
        lease = chronos.reserve("1G", "10m", device=0, bind=False)
        baseline = _device_used(0)
        child = subprocess.Popen(_child_command(2048, 60), env=lease.env(), stdout=subprocess.PIPE, text=True)
        dog = Watchdog(lease, pid=child.pid, grace_s=grace, kill_wait_s=10).start()
        assert child.stdout is not None
        crossed = None
        for line in child.stdout:
            item = json.loads(line)
            if "mib" in item:
                assert item["rc"] == 0, item
                crossed = item["t"]
                break
        child.wait(60)
        ended = time.time()
        child.stdout.close()
        dog.stop()
        assert crossed is not None
        times.append(ended - crossed - grace)
        if nvml:
            while _device_used(0) > baseline + 256 * MIB and time.time() - ended < 20:
                time.sleep(0.01)
            freed.append(time.time() - crossed - grace)
        lease.release()
    out: dict[str, Any] = {
        "trials": trials,
        "grace_s": grace,
        "rate_hz": 4.0,
        "reaction_median_s": round(statistics.median(times), 4),
        "reaction_worst_s": round(max(times), 4),
        "reaction_best_s": round(min(times), 4),
    }
    if freed:
        out["memory_back_median_s"] = round(statistics.median(freed), 4)
        out["memory_back_worst_s"] = round(max(freed), 4)
    return out


def _cpu() -> float:
    return time.process_time()  # CLOCK_PROCESS_CPUTIME_ID: every thread, nanosecond resolution


def cpu_cost(counts: list[int], seconds: float) -> dict[str, Any]:
    import chronos
    from chronos.enforce.watchdog import Watchdog

    results: dict[str, Any] = {"seconds": seconds, "rate_hz": 4.0}
    t0, c0 = time.monotonic(), _cpu()
    time.sleep(seconds)
    idle = (_cpu() - c0) / (time.monotonic() - t0)
    results["idle_percent_of_core"] = round(100 * idle, 4)
    for n in counts:
        holders = []
        leases = []
        for _ in range(n):
            lease = chronos.reserve("1G", "10m", device=0, bind=False)
            child = subprocess.Popen(
                _child_command(256, seconds + 30), env=lease.env(), stdout=subprocess.PIPE, text=True
            )
            assert child.stdout is not None
            for line in child.stdout:
                if "mib" in json.loads(line):
                    break
            holders.append(child)
            leases.append(lease)
        dogs = [Watchdog(lease, pid=child.pid).start() for lease, child in zip(leases, holders, strict=True)]
        time.sleep(1.0)  # past start-up (first ledger read, baseline query)
        polls0 = sum(d.polls for d in dogs)
        t0, c0 = time.monotonic(), _cpu()
        time.sleep(seconds)
        used = (_cpu() - c0) / (time.monotonic() - t0)
        polls = sum(d.polls for d in dogs) - polls0
        for d in dogs:
            d.stop()
        for child in holders:
            child.kill()
            child.wait()
            assert child.stdout is not None
            child.stdout.close()
        for lease in leases:
            lease.release()
        per_lease = (used - idle) / n
        results[f"leases_{n}"] = {
            "percent_of_core_per_lease": round(100 * per_lease, 4),
            "polls_per_second_per_lease": round(polls / seconds / n, 2),
            "cpu_ms_per_poll": round(1000 * (used - idle) * seconds / max(1, polls), 4),
        }
    return results


def poll_costs(samples: int = 200) -> dict[str, Any]:
    """What one poll is made of: the backend's process query and the ledger re-read."""
    import chronos
    from chronos.api import default_engine

    engine = default_engine()
    lease = chronos.reserve("1G", "10m", device=0, bind=False)
    backend = engine.backend
    out: dict[str, Any] = {"backend": backend.name}
    for name, fn in (
        ("processes_ms", lambda: backend.processes([0])),
        ("ledger_get_ms", lambda: engine.get(lease.id)),
        ("devices_ms", backend.devices),
    ):
        fn()
        t0 = time.perf_counter()
        for _ in range(samples):
            fn()
        out[name] = round(1000 * (time.perf_counter() - t0) / samples, 4)
    lease.release()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--grace", type=float, default=0.0)
    parser.add_argument(
        "--default-grace-trials",
        type=int,
        default=3,
        help="extra trials at the default 2 s grace, to show the whole time",
    )
    parser.add_argument("--cpu-seconds", type=float, default=10.0)
    parser.add_argument("--leases", default="1,8")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    _setup_env()
    from chronos.devices import get_backend

    results: dict[str, Any] = {"backend": get_backend().name, "python": sys.version.split()[0]}
    results["poll_costs"] = poll_costs()
    if args.trials:
        results["reaction"] = reaction(args.trials, args.grace)
    if args.default_grace_trials:
        results["reaction_default_grace"] = reaction(args.default_grace_trials, 2.0)
    results["cpu"] = cpu_cost([int(n) for n in args.leases.split(",") if n], args.cpu_seconds)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
