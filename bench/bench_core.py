"""Core benchmarks: reserve+release round trip, multi-process throughput, CLI cold start.

Run: python bench/bench_core.py [--rounds N] [--procs P] [--seconds S]
Each figure is printed with the baseline it is compared with, measured in the same run.
Uses a fresh temporary state directory and simulated GPUs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _env(state: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"CHRONOS_STATE_DIR": state, "CHRONOS_BACKEND": "simulated", "CHRONOS_SIM_GPUS": "8x80G",
                "CHRONOS_CONFIG": os.path.join(state, "none.toml"),
                "CHRONOS_USER_CONFIG": os.path.join(state, "none-user.toml")})
    return env


def round_trip(rounds: int) -> dict[str, float]:
    import chronos

    for _ in range(50):  # warm up: ledger created, caches filled
        chronos.reserve("1G", "10m").release()
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        lease = chronos.reserve("1G", "10m")
        lease.release()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return {
        "median_ms": statistics.median(samples) * 1e3,
        "p99_ms": samples[int(len(samples) * 0.99) - 1] * 1e3,
    }


def _worker(seconds: float, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    import chronos
    from chronos.errors import UnavailableError

    count, refused = 0, 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        try:
            lease = chronos.reserve("4G", "10m")
        except UnavailableError:
            refused += 1
            continue
        lease.release()
        count += 1
    queue.put((count, refused))


def throughput(procs: int, seconds: float, state: str) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    workers = [ctx.Process(target=_worker, args=(seconds, queue)) for _ in range(procs)]
    for w in workers:
        w.start()
    results = [queue.get() for _ in workers]
    for w in workers:
        w.join()
    granted = sum(r[0] for r in results)
    import sqlite3

    conn = sqlite3.connect(os.path.join(state, "chronos.db"))
    overcommits = 0
    # Replay the audit log: memory held per device at every grant must stay within the device.
    held: dict[int, int] = {}
    sizes: dict[int, tuple[list[int], int]] = {}
    for lease_seq, event, detail in conn.execute("SELECT lease_seq, event, detail FROM events ORDER BY id"):
        info = json.loads(detail)
        if event == "granted":
            sizes[lease_seq] = (info["devices"], info["memory_bytes"])
            for d in info["devices"]:
                held[d] = held.get(d, 0) + info["memory_bytes"]
                if held[d] > 80 << 30:
                    overcommits += 1
        elif lease_seq in sizes:
            devices, memory = sizes.pop(lease_seq)
            for d in devices:
                held[d] -= memory
    conn.close()
    return {"processes": procs, "seconds": seconds, "grants": granted,
            "grants_per_s": granted / seconds, "overcommits": overcommits}


def cold_start(state: str, runs: int) -> dict[str, float]:
    env = _env(state)
    def timed(cmd: list[str]) -> float:
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        return time.perf_counter() - t0
    base, chronos_list = [], []
    for _ in range(runs):  # alternate, so drift hits both alike
        base.append(timed([sys.executable, "-c", "pass"]))
        chronos_list.append(timed([sys.executable, "-m", "chronos", "list"]))
    b, c = statistics.median(base), statistics.median(chronos_list)
    return {"python_pass_ms": b * 1e3, "chronos_list_ms": c * 1e3, "ratio": c / b}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--procs", default="8", help="comma-separated process counts, e.g. 1,2,4,8")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--cold-runs", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        os.environ.update(_env(state))
        rt = round_trip(args.rounds)
        print(f"reserve+release round trip: median {rt['median_ms']:.3f} ms, p99 {rt['p99_ms']:.3f} ms "
              f"(original Chronos: 0.65 + 0.21 = 0.86 ms; goal < 1 ms)")
    for procs in (int(p) for p in args.procs.split(",")):
        with tempfile.TemporaryDirectory() as state:
            os.environ.update(_env(state))
            tp = throughput(procs, args.seconds, state)
            print(f"throughput, {tp['processes']} processes for {tp['seconds']:.0f} s: {tp['grants_per_s']:.0f} "
                  f"reserve+release/s, {tp['overcommits']} over-commits (original's ceiling ~1,500 creations/s)")
    with tempfile.TemporaryDirectory() as state:
        subprocess.run([sys.executable, "-m", "chronos", "reserve", "1G"], env=_env(state), check=True,
                       stdout=subprocess.DEVNULL)
        cs = cold_start(state, args.cold_runs)
        print(f"cold start: chronos list {cs['chronos_list_ms']:.1f} ms vs python -c pass "
              f"{cs['python_pass_ms']:.1f} ms: {cs['ratio']:.2f}x (goal < 4x)")


if __name__ == "__main__":
    main()
