"""Core benchmarks: reserve+release round trip, multi-process throughput, CLI cold start.

Run: python bench/bench_core.py [--rounds N] [--procs P] [--seconds S] [--active N] [--writers N] [--baseline TREE]
Each figure is printed with the baseline it is compared with, measured in the same run.
Uses a fresh temporary state directory and simulated GPUs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any


def _env(state: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"CHRONOS_STATE_DIR": state, "CHRONOS_BACKEND": "simulated", "CHRONOS_SIM_GPUS": "8x80G",
                "CHRONOS_CONFIG": os.path.join(state, "none.toml"),
                "CHRONOS_USER_CONFIG": os.path.join(state, "none-user.toml")})
    return env


def _percentiles(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {"median_ms": statistics.median(samples) * 1e3, "p99_ms": samples[int(len(samples) * 0.99) - 1] * 1e3}


def _bare(path: str) -> tuple[sqlite3.Connection, Callable[[], None]]:
    """The floor of a reserve+release: the same two write transactions (an insert, then an update) on a
    bare SQLite file in WAL mode, as the ledger is; the connection and one round of it."""
    bare = sqlite3.connect(path, isolation_level=None, timeout=30)
    bare.execute("PRAGMA journal_mode = WAL")
    bare.execute("PRAGMA synchronous = NORMAL")
    bare.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, state TEXT)")

    def floor() -> None:
        bare.execute("BEGIN IMMEDIATE")
        row = bare.execute("INSERT INTO t (state) VALUES ('active')").lastrowid
        bare.execute("COMMIT")
        bare.execute("BEGIN IMMEDIATE")
        bare.execute("UPDATE t SET state = 'released' WHERE id = ?", (row,))
        bare.execute("COMMIT")

    return bare, floor


def round_trip(rounds: int, state: str) -> dict[str, dict[str, float]]:
    """reserve+release through the API, alternated in blocks of 100 with the floor (:func:`_bare`)
    on a file beside the ledger."""
    import chronos

    bare, floor = _bare(os.path.join(state, "bare.db"))
    for _ in range(50):  # warm up: ledger created, caches filled
        chronos.reserve("1G", "10m").release()
        floor()
    ours: list[float] = []
    base: list[float] = []
    while len(ours) < rounds:
        for _ in range(100):
            t0 = time.perf_counter()
            chronos.reserve("1G", "10m").release()
            ours.append(time.perf_counter() - t0)
        for _ in range(100):
            t0 = time.perf_counter()
            floor()
            base.append(time.perf_counter() - t0)
    bare.close()
    return {"chronos": _percentiles(ours), "bare": _percentiles(base)}


#: A round-trip worker for :func:`round_trip_against`: each line it reads is a block size and a mode; it
#: answers with that many reserve+release times as a JSON list, 8 other leases held all along. In mode
#: ``after`` another connection commits to the ledger file before each reserve and each release, as another
#: process's write would.
_RT_WORKER = """
import json, os, sqlite3, sys, time
import chronos
for _ in range(50):
    chronos.reserve("1G", "10m").release()
other = sqlite3.connect(os.path.join(os.environ["CHRONOS_STATE_DIR"], "chronos.db"), isolation_level=None)
other.execute("CREATE TABLE IF NOT EXISTS bench_other (x INTEGER)")
held = [chronos.reserve("1G", "2h", bind=False) for _ in range(8)]  # a machine's worth of leases, read again
chronos.reserve("1G", "10m").release()  # the new table read once
for line in sys.stdin:
    count, mode = line.split()
    times = []
    for _ in range(int(count)):
        if mode == "after":
            other.execute("INSERT INTO bench_other VALUES (1)")
        t0 = time.perf_counter()
        lease = chronos.reserve("1G", "10m")
        t1 = time.perf_counter()
        if mode == "after":
            other.execute("INSERT INTO bench_other VALUES (1)")
        t2 = time.perf_counter()
        lease.release()
        times.append(time.perf_counter() - t2 + t1 - t0)
    print(json.dumps(times), flush=True)
"""


def round_trip_against(rounds: int, baseline: str) -> dict[str, dict[str, float]]:
    """reserve+release through the API of this Chronos and of the one in ``baseline``, each in a process of
    its own on a ledger of its own, alternated in blocks of 100: alone, and each operation just after another
    connection's commit (``... after``: the ledger read again, as in any process that shares it)."""
    import chronos

    trees = {"this": os.path.dirname(os.path.dirname(chronos.__file__)), "baseline": os.path.abspath(baseline)}
    dirs, workers = [], {}
    for name, tree in trees.items():
        state = tempfile.mkdtemp(prefix=f"chronos-bench-{name}-")
        dirs.append(state)
        workers[name] = subprocess.Popen(
            [sys.executable, "-c", _RT_WORKER], env={**_env(state), "PYTHONPATH": tree, "PYTHONSAFEPATH": "1"},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    samples: dict[str, list[float]] = {f"{name}{mode}": [] for name in trees for mode in ("", " after")}
    try:
        while len(samples["this"]) < rounds:
            for mode in ("alone", "after"):
                for name, worker in workers.items():
                    assert worker.stdin is not None and worker.stdout is not None
                    worker.stdin.write(f"100 {mode}\n")
                    worker.stdin.flush()
                    samples[name + ("" if mode == "alone" else " after")] += json.loads(worker.stdout.readline())
    finally:
        for worker in workers.values():
            if worker.stdin is not None:
                worker.stdin.close()
            worker.wait(timeout=60)
        for state in dirs:
            shutil.rmtree(state, ignore_errors=True)
    return {name: _percentiles(found) for name, found in samples.items()}


def active_scaling(rounds: int, many: int) -> dict[str, dict[str, float]]:
    """The round trip with 1 active lease and with ``many``, two ledgers alternated in blocks of 50."""
    from chronos.engine import Engine

    engines = {}
    dirs = []
    for count in (1, many):
        state = tempfile.mkdtemp(prefix=f"chronos-bench-{count}-")
        dirs.append(state)
        engine = Engine(state_dir=state)
        for _ in range(count):
            engine.reserve("10M", "2h", bind=False)
        for _ in range(50):
            engine.reserve("1G", "10m").release()
        engines[count] = engine
    samples: dict[int, list[float]] = {1: [], many: []}
    while len(samples[many]) < rounds:
        for count, engine in engines.items():
            for _ in range(50):
                t0 = time.perf_counter()
                engine.reserve("1G", "10m").release()
                samples[count].append(time.perf_counter() - t0)
    for engine in engines.values():
        engine.close()
    for state in dirs:
        shutil.rmtree(state, ignore_errors=True)
    return {str(count): _percentiles(found) for count, found in samples.items()}


def _timed_worker(seconds: float, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    import chronos
    from chronos.errors import StateError, UnavailableError

    samples, busy = [], 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        try:
            chronos.reserve("1G", "10m").release()
        except UnavailableError:
            continue
        except StateError:
            busy += 1
            continue
        samples.append(time.perf_counter() - t0)
    queue.put((samples, busy))


def _cpu_worker(seconds: float, unit_s: float, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    """Units of pure computation ``unit_s`` long, each timed: no lock, no file, no Chronos."""
    samples = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        cpu = time.thread_time()
        while time.thread_time() - cpu < unit_s:
            pass
        samples.append(time.perf_counter() - t0)
    queue.put((samples, 0))


def _at_once(procs: int, target: Callable[..., None], *args: object) -> list[tuple[Any, int]]:
    """``procs`` processes of ``target`` started together; what each put on its queue."""
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    workers = [ctx.Process(target=target, args=(*args, queue)) for _ in range(procs)]
    for w in workers:
        w.start()
    results = [queue.get() for _ in workers]
    for w in workers:
        w.join()
    return results


def _spread(procs: int, target: Callable[..., None], *args: object) -> dict[str, float]:
    """``procs`` processes of ``target`` at once: each one's p99 against the median of every sample."""
    results = _at_once(procs, target, *args)
    every = [x for samples, _ in results for x in samples]
    p99s = [_percentiles(samples)["p99_ms"] for samples, _ in results if samples]
    median = statistics.median(every) * 1e3
    return {"median_ms": median, "worst_p99_ms": max(p99s), "ratio": max(p99s) / median,
            "busy_errors": sum(b for _, b in results), "round_trips": len(every)}


def fairness(procs: int, seconds: float) -> dict[str, dict[str, float]]:
    """``procs`` writers at once, each one's p99 against the median of every round trip; then the
    floor: as many processes computing, with no lock and no file, in units of CPU time as long as that
    median (how evenly this machine's scheduler alone serves that many processes, whatever they do)."""
    ours = _spread(procs, _timed_worker, seconds)
    return {"chronos": ours, "floor": _spread(procs, _cpu_worker, seconds, ours["median_ms"] / 1e3)}


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


def _bare_worker(path: str, seconds: float, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    bare, floor = _bare(path)
    count = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        floor()
        count += 1
    bare.close()
    queue.put((count, 0))


def throughput(procs: int, seconds: float, state: str) -> dict[str, float]:
    """``procs`` processes reserving and releasing for ``seconds``, the audit log replayed; then the
    floor: as many processes running the bare transactions (:func:`_bare`) on one file beside it."""
    granted = sum(count for count, _ in _at_once(procs, _worker, seconds))
    floor_db = os.path.join(state, "bare.db")
    _bare(floor_db)[0].close()  # made (and switched to WAL) once: processes doing so at once can deadlock
    bare = sum(count for count, _ in _at_once(procs, _bare_worker, floor_db, seconds))

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
            "grants_per_s": granted / seconds, "overcommits": overcommits, "floor_per_s": bare / seconds}


def cold_start(state: str, runs: int, baseline: str | None = None) -> dict[str, dict[str, float]]:
    """Wall and CPU time of ``chronos --version``, ``--help`` and ``list`` against ``python -c pass``,
    alternated in one run, with Chronos's bytecode compiled first (as ``pip install`` leaves it). With
    ``baseline`` (a source tree holding an earlier ``chronos`` package), each command is timed for that
    Chronos too, alternated with this one: its figures are named ``... (baseline)``."""
    import compileall
    import resource

    import chronos

    trees = {"": os.path.dirname(os.path.dirname(chronos.__file__))}
    if baseline is not None:
        trees[" (baseline)"] = os.path.abspath(baseline)
    for tree in trees.values():
        compileall.compile_dir(os.path.join(tree, "chronos"), quiet=1)
    commands = {"chronos --version": ["-m", "chronos", "--version"], "chronos --help": ["-m", "chronos", "--help"],
                "chronos list": ["-m", "chronos", "list"]}
    # Each run names its tree on the path and leaves the working directory off it (PYTHONSAFEPATH: so the
    # directory's own Chronos never wins), ``python -c pass`` too: every start searches the same path.
    runs_of = {"python -c pass": (["-c", "pass"], {**_env(state), "PYTHONPATH": trees[""], "PYTHONSAFEPATH": "1"})}
    for name, args in commands.items():
        for suffix, tree in trees.items():
            runs_of[name + suffix] = (args, {**_env(state), "PYTHONPATH": tree, "PYTHONSAFEPATH": "1"})
    wall: dict[str, list[float]] = {name: [] for name in runs_of}
    cpu: dict[str, list[float]] = {name: [] for name in runs_of}
    for _ in range(runs):  # alternate, so drift hits every command alike
        for name, (args, env) in runs_of.items():
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           check=True)
            wall[name].append(time.perf_counter() - t0)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[name].append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
    base_wall, base_cpu = statistics.median(wall["python -c pass"]), statistics.median(cpu["python -c pass"])
    return {name: {"wall_ms": statistics.median(wall[name]) * 1e3, "wall_x": statistics.median(wall[name]) / base_wall,
                   "cpu_ms": statistics.median(cpu[name]) * 1e3, "cpu_x": statistics.median(cpu[name]) / base_cpu}
            for name in runs_of}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--procs", default="8", help="comma-separated process counts, e.g. 1,2,4,8")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--cold-runs", type=int, default=20)
    parser.add_argument("--active", type=int, default=1000, help="active leases for the scaling figure")
    parser.add_argument("--writers", type=int, default=16, help="processes for the fairness figure")
    parser.add_argument("--baseline", metavar="TREE",
                        help="a source tree holding an earlier chronos package: its round trip and cold start "
                             "too, alternated")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        os.environ.update(_env(state))
        rt = round_trip(args.rounds, state)
        c, b = rt["chronos"], rt["bare"]
        print(f"round trip (reserve+release): median {c['median_ms']:.3f} ms, p99 {c['p99_ms']:.3f} ms; bare SQLite "
              f"(the floor, alternated): median {b['median_ms']:.3f} ms, p99 {b['p99_ms']:.3f} ms "
              "(goal: p99 <= ~1 ms, median <= half of it)")
        if args.baseline is not None:
            vs = round_trip_against(args.rounds, args.baseline)
            for mode in ("", " after"):
                ours, theirs = vs["this" + mode], vs["baseline" + mode]
                what = " after another connection's commit" if mode else ""
                print(f"round trip{what} against the baseline tree, alternated in two processes: median "
                      f"{ours['median_ms']:.3f} against {theirs['median_ms']:.3f} ms "
                      f"({ours['median_ms'] / theirs['median_ms']:.2f}x), p99 {ours['p99_ms']:.3f} against "
                      f"{theirs['p99_ms']:.3f} ms")
        sc = active_scaling(max(500, args.rounds // 2), args.active)
        one, many = sc["1"], sc[str(args.active)]
        print(f"round trip with 1 active lease: median {one['median_ms']:.3f} ms; with {args.active}: "
              f"{many['median_ms']:.3f} ms ({many['median_ms'] / one['median_ms']:.2f}x; goal <= 2x)")
    with tempfile.TemporaryDirectory() as state:
        os.environ.update(_env(state))
        both = fairness(args.writers, args.seconds)
        fair, floor = both["chronos"], both["floor"]
        print(f"{args.writers} writers: median {fair['median_ms']:.2f} ms, worst process's p99 "
              f"{fair['worst_p99_ms']:.2f} ms ({fair['ratio']:.1f}x; goal <= 10x), {fair['busy_errors']} busy errors, "
              f"{fair['round_trips']} round trips; the floor, {args.writers} processes computing in units of that "
              f"median: median {floor['median_ms']:.2f} ms, worst p99 {floor['worst_p99_ms']:.2f} ms "
              f"({floor['ratio']:.1f}x)")
    for procs in (int(p) for p in args.procs.split(",")):
        with tempfile.TemporaryDirectory() as state:
            os.environ.update(_env(state))
            tp = throughput(procs, args.seconds, state)
            print(f"throughput, {tp['processes']} processes for {tp['seconds']:.0f} s: {tp['grants_per_s']:.0f} "
                  f"reserve+release/s, {tp['overcommits']} over-commits (goal >= 3,000/s at 8 processes); the floor, "
                  f"as many processes running the bare transactions: {tp['floor_per_s']:.0f}/s")
    with tempfile.TemporaryDirectory() as state:
        subprocess.run([sys.executable, "-m", "chronos", "reserve", "1G"], env=_env(state), check=True,
                       stdout=subprocess.DEVNULL)
        cs = cold_start(state, args.cold_runs, args.baseline)
        for name, fig in cs.items():
            print(f"cold start: {name:29} wall {fig['wall_ms']:6.1f} ms ({fig['wall_x']:.2f}x), "
                  f"CPU {fig['cpu_ms']:6.1f} ms ({fig['cpu_x']:.2f}x)")
        print("  (goal: --version and --help < 2x python -c pass, list < 3x)")


if __name__ == "__main__":
    main()
