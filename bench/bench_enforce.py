"""Enforcement CPU: N leases covered by one service poll loop against N separate per-lease watchdogs.

    python3 bench/bench_enforce.py [--leases 100] [--seconds 10] [--rounds 2] [--rate 4] [--json FILE]

The backend is CHRONOS_BACKEND's (simulated GPUs, ``4x80G``, in a private state directory when unset).
Each of the N leases is bound to its own holder process (a ``sleep``) that keeps 256 MiB on a GPU
(simulated: claimed for its pid with ``allocate``), spread over the GPUs. Then, in this one process,
over the same wall time, at the same rate (4 Hz, the watchdog's default):

* watchdogs: N :class:`chronos.enforce.watchdog.Watchdog` threads, one per lease, as N kernels or
  ``chronos run`` wrappers would run them (here all in one process, so their CPU is counted together);
* enforcer: one :class:`chronos.service.enforcer.Enforcer` loop over all of them, as the service runs it.

CPU is ``time.process_time()`` (every thread) over the window, less this process idle over the same
window (measured first, in the same run). Rounds alternate the two (watchdogs, enforcer, enforcer,
watchdogs, ...) so that load from elsewhere on the machine falls on both alike; the ratio is of the
medians. Both must see every lease's memory in every pass: a check at the end asserts it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MIB = 1 << 20


def _setup_env() -> None:
    if not os.environ.get("CHRONOS_BACKEND"):
        os.environ["CHRONOS_BACKEND"] = "simulated"
        os.environ.setdefault("CHRONOS_SIM_GPUS", "4x80G")
    if not os.environ.get("CHRONOS_STATE_DIR"):
        os.environ["CHRONOS_STATE_DIR"] = tempfile.mkdtemp(prefix="chronos-bench-enforce-")


def _window(seconds: float) -> tuple[float, float]:
    """CPU seconds of this process over ``seconds`` of wall time, and the wall time itself."""
    t0, c0 = time.monotonic(), time.process_time()
    time.sleep(seconds)
    return time.process_time() - c0, time.monotonic() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leases", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each mode, alternated")
    parser.add_argument("--rate", type=float, default=4.0, help="polls per second of both (default 4)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    _setup_env()

    from chronos.devices.simulated import allocate
    from chronos.enforce.watchdog import Watchdog
    from chronos.engine import Engine
    from chronos.service.enforcer import Enforcer

    engine = Engine()
    count = len(engine.backend.devices())
    simulated = engine.backend.name == "simulated"
    holders: list[subprocess.Popen[bytes]] = []
    leases = []
    try:
        for i in range(args.leases):
            holder = subprocess.Popen(["sleep", str(3600)])
            holders.append(holder)
            device = i % count
            if simulated:
                allocate(device, 256 * MIB, pid=holder.pid)
            leases.append(engine.reserve("1G", "2h", device=device, bind=holder.pid))
        idle_cpu, idle_wall = _window(args.seconds)
        idle = idle_cpu / idle_wall
        order = ["watchdogs", "enforcer", "enforcer", "watchdogs"] * ((args.rounds + 1) // 2)
        order = order[:2 * args.rounds]
        runs: dict[str, list[dict[str, float]]] = {"watchdogs": [], "enforcer": []}
        for mode in order:
            if mode == "watchdogs":
                dogs = [Watchdog(lease, rate_hz=args.rate).start() for lease in leases]
                time.sleep(1.0)  # past start-up (first ledger read, the baseline query)
                polls0 = sum(d.polls for d in dogs)
                cpu, wall = _window(args.seconds)
                polls = sum(d.polls for d in dogs) - polls0
                seen = all(d.usage.get(lease.devices[0], 0) >= 256 * MIB for d, lease in zip(dogs, leases, strict=True))
                for d in dogs:
                    d.stop()
                passes = polls / args.leases
            else:
                enforcer = Enforcer(engine)
                stop = threading.Event()
                loop = threading.Thread(target=enforcer.run, args=(stop, 1.0 / args.rate), daemon=True)
                loop.start()
                time.sleep(1.0)
                polls0 = enforcer.polls
                cpu, wall = _window(args.seconds)
                passes = enforcer.polls - polls0
                stop.set()
                loop.join(10)
                from chronos import accounting

                used = accounting.usage(engine.backend.processes(), enforcer.membership)
                seen = all((used.get(lease.id, {}).get(lease.devices[0]) or 0) >= 256 * MIB for lease in leases)
                assert not enforcer.findings, [f.message for f in enforcer.findings][:3]
            assert seen, f"{mode}: not every lease's memory was seen"
            runs[mode].append({"cpu_s": round(cpu - idle * wall, 4), "wall_s": round(wall, 3),
                               "passes_per_s": round(passes / wall, 2)})
            print(f"{mode:9s}  CPU {cpu - idle * wall:7.3f} s over {wall:.2f} s wall "
                  f"({100 * (cpu / wall - idle):6.2f} % of one core), {passes / wall:.2f} passes/s", flush=True)
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
        for lease in leases:
            lease.release()
    dogs_cpu = statistics.median(r["cpu_s"] for r in runs["watchdogs"])
    loop_cpu = statistics.median(r["cpu_s"] for r in runs["enforcer"])
    result: dict[str, Any] = {
        "leases": args.leases, "seconds": args.seconds, "rate_hz": args.rate, "backend": engine.backend.name,
        "idle_percent_of_core": round(100 * idle, 4), "runs": runs,
        "watchdogs_cpu_s": dogs_cpu, "enforcer_cpu_s": loop_cpu,
        "watchdogs_percent_of_core": round(100 * dogs_cpu / args.seconds, 2),
        "enforcer_percent_of_core": round(100 * loop_cpu / args.seconds, 2),
        "ratio": round(dogs_cpu / loop_cpu, 2) if loop_cpu > 0 else None,
    }
    print(f"{args.leases} leases at {args.rate:g} Hz for {args.seconds:g} s: watchdogs {dogs_cpu:.3f} CPU s, "
          f"one enforcer loop {loop_cpu:.3f} CPU s: the loop takes 1/{result['ratio']} of the watchdogs' CPU")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
