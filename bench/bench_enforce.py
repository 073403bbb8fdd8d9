"""Enforcement CPU: N leases covered by one service poll loop against N separate per-lease watchdogs.

    python3 bench/bench_enforce.py [--leases 100] [--seconds 10] [--rounds 2] [--rate 4] [--json FILE]

The backend is CHRONOS_BACKEND's (simulated GPUs, ``4x80G``, in a private state directory when unset).
Each of the N leases is bound to its own holder process (a ``sleep``) that keeps 256 MiB on a GPU
(simulated: claimed for its pid with ``allocate``), spread over the GPUs. Then, in this one process,
over the same wall time, at the same rate (4 Hz, the watchdog's default):

* ``processes``: N watchdogs, each in a process of its own, as N kernels or ``chronos run`` wrappers
  run them (their CPU read from ``/proc`` for the window, their start-up before it);
* ``threads``: N :class:`chronos.enforce.watchdog.Watchdog` threads in this one process (they contend
  for one interpreter's lock, so they may fall behind their rate);
* ``enforcer``: one :class:`chronos.service.enforcer.Enforcer` loop over all of them, as the service runs it.

CPU is ``time.process_time()`` of this process (every thread), plus the watchdog processes' CPU in
``processes``, over the window, less this process idle over the same window (measured first, in the
same run). Rounds alternate the order so that load from elsewhere on the machine falls on all alike;
the ratios are of the medians. Every mode must see every lease's memory: a check asserts it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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
# One lease's watchdog in a process of its own; says "ready" once it has polled, then, for each line
# it is sent, its polls so far and the memory it saw on the lease's GPU.
WORKER = """
import sys, time
import chronos
from chronos.enforce.watchdog import Watchdog
dog = Watchdog(chronos.get_lease(sys.argv[1]), rate_hz=float(sys.argv[2])).start()
while dog.polls < 2:
    time.sleep(0.05)
print("ready", flush=True)
for _ in sys.stdin:
    print(dog.polls, dog.usage.get(int(sys.argv[3]), 0), flush=True)
"""


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


def _processes(engine: Any, leases: list[Any], args: argparse.Namespace) -> tuple[float, float, float, bool]:
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, lease.id, str(args.rate), str(lease.devices[0])],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for lease in leases]
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        time.sleep(1.0)
        polls0 = [_last(w) for w in workers]  # outside the window: each answer wakes a worker up
        t0, c0 = time.monotonic(), time.process_time()
        before = [_cpu_of(w.pid) for w in workers]
        time.sleep(args.seconds)
        after = [_cpu_of(w.pid) for w in workers]
        cpu, wall = time.process_time() - c0, time.monotonic() - t0
        polls1 = [_last(w) for w in workers]
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
            for stream in (worker.stdin, worker.stdout):
                if stream is not None:
                    stream.close()
    passes = sum(p1[0] - p0[0] for p0, p1 in zip(polls0, polls1, strict=True)) / len(leases)
    seen = all(p[1] >= 256 * MIB for p in polls1)
    return cpu + sum(a - b for a, b in zip(after, before, strict=True)), wall, passes, seen


def _cpu_of(pid: int) -> float:
    """User plus system CPU seconds of ``pid`` (/proc/PID/stat, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _last(worker: subprocess.Popen[str]) -> tuple[int, int]:
    """The worker's polls so far and the bytes it last saw on the lease's GPU."""
    assert worker.stdin is not None and worker.stdout is not None
    worker.stdin.write("\n")
    worker.stdin.flush()
    line = worker.stdout.readline().split()
    return int(line[0]), int(line[1])


def _threads(engine: Any, leases: list[Any], args: argparse.Namespace) -> tuple[float, float, float, bool]:
    from chronos.enforce.watchdog import Watchdog

    dogs = [Watchdog(lease, rate_hz=args.rate).start() for lease in leases]
    time.sleep(1.0)  # past start-up (first ledger read, the baseline query)
    polls0 = sum(d.polls for d in dogs)
    cpu, wall = _window(args.seconds)
    polls = sum(d.polls for d in dogs) - polls0
    seen = all(d.usage.get(lease.devices[0], 0) >= 256 * MIB for d, lease in zip(dogs, leases, strict=True))
    for d in dogs:
        d.stop()
    return cpu, wall, polls / len(leases), seen


def _enforcer(engine: Any, leases: list[Any], args: argparse.Namespace) -> tuple[float, float, float, bool]:
    from chronos import accounting
    from chronos.service.enforcer import Enforcer

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
    used = accounting.usage(engine.backend.processes(), enforcer.membership)
    seen = all((used.get(lease.id, {}).get(lease.devices[0]) or 0) >= 256 * MIB for lease in leases)
    assert not enforcer.findings, [f.message for f in enforcer.findings][:3]
    return cpu, wall, passes, seen


MODES = {"processes": _processes, "threads": _threads, "enforcer": _enforcer}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leases", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each mode, alternated")
    parser.add_argument("--rate", type=float, default=4.0, help="polls per second of both (default 4)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a timeout still ends the holders and workers
    _setup_env()

    from chronos.devices.simulated import allocate
    from chronos.engine import Engine

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
        modes = ["processes", "threads", "enforcer"]
        order: list[str] = []
        for r in range(args.rounds):
            order += modes if r % 2 == 0 else modes[::-1]
        runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
        for mode in order:
            cpu, wall, passes, seen = MODES[mode](engine, leases, args)
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
    # CPU per second of wall time: a window of the watchdog processes may run a little longer than asked
    share = {mode: round(statistics.median(r["cpu_s"] / r["wall_s"] for r in found), 5) for mode, found in runs.items()}
    loop = share["enforcer"]
    result: dict[str, Any] = {
        "leases": args.leases, "seconds": args.seconds, "rate_hz": args.rate, "backend": engine.backend.name,
        "idle_percent_of_core": round(100 * idle, 4), "runs": runs,
        "percent_of_core": {mode: round(100 * value, 2) for mode, value in share.items()},
        "ratio_processes": round(share["processes"] / loop, 2) if loop > 0 else None,
        "ratio_threads": round(share["threads"] / loop, 2) if loop > 0 else None,
    }
    print(f"{args.leases} leases at {args.rate:g} Hz, % of one core: {100 * share['processes']:.2f} for a watchdog "
          f"process each, {100 * share['threads']:.2f} for watchdog threads in one process, {100 * loop:.2f} for one "
          f"enforcer loop: ratios {result['ratio_processes']} and {result['ratio_threads']}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
