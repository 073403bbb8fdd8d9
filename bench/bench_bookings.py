"""The round trip (reserve+release) with many bookings to come, against the same with none, in one run.

Every write looks at the unclaimed bookings: a no-show to end, a booking's window to keep free. This
benchmark makes ``--bookings`` bookings on a ledger of 8 simulated GPUs (one an hour, each on one GPU, from
tomorrow on) and times reserve+release on it, alternated in blocks of 50 with a ledger holding none. With
``--baseline TREE`` it does the same with an earlier tree's Chronos, in a process of its own, after this
tree's.

    python bench/bench_bookings.py [--bookings 2000] [--rounds 400] [--baseline TREE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: One tree's figures: the time to make the bookings, and both ledgers' round trips, alternated.
WORKER = """
import json, shutil, statistics, sys, tempfile, time
import chronos
from chronos.engine import Engine
bookings, rounds = int(sys.argv[1]), int(sys.argv[2])
engines, dirs = {}, []
made_s = 0.0
for count in (0, bookings):
    state = tempfile.mkdtemp(prefix=f"chronos-bench-booked-{count}-")
    dirs.append(state)
    engine = Engine(state_dir=state)
    start = time.perf_counter()
    for i in range(count):
        engine.book("1G", "1h", time.time() + 86400 + i * 3600, device=i % 8)
    made_s = time.perf_counter() - start
    for _ in range(50):
        engine.reserve("1G", "10m", bind=False).release()
    engines[count] = engine
samples = {count: [] for count in engines}
while len(samples[bookings]) < rounds:
    for count, engine in engines.items():
        for _ in range(50):
            t0 = time.perf_counter()
            engine.reserve("1G", "10m", bind=False).release()
            samples[count].append((time.perf_counter() - t0) * 1e3)
for engine in engines.values():
    engine.close()
for state in dirs:
    shutil.rmtree(state, ignore_errors=True)
def figures(times):
    ordered = sorted(times)
    return {"median_ms": statistics.median(ordered), "p99_ms": ordered[int(len(ordered) * 0.99)]}
print(json.dumps({"source": chronos.__file__, "made_s": made_s, "none": figures(samples[0]),
                  "many": figures(samples[bookings])}))
"""


def _run(tree: Path, bookings: int, rounds: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as work:
        env = {k: v for k, v in os.environ.items() if k != "CHRONOS_SERVER"}
        none = str(Path(work) / "none.toml")
        env.update({"CHRONOS_BACKEND": "simulated", "CHRONOS_SIM_GPUS": "8x80G", "CHRONOS_STATE_DIR": work,
                    "CHRONOS_CONFIG": none, "CHRONOS_USER_CONFIG": none, "PYTHONPATH": str(tree),
                    "PYTHONSAFEPATH": "1"})
        out = subprocess.run([sys.executable, "-c", WORKER, str(bookings), str(rounds)], env=env, capture_output=True,
                             text=True, check=True)
    found: dict[str, object] = json.loads(out.stdout)
    if not Path(str(found["source"])).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the worker ran the Chronos in {found['source']}, not the one in {tree}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bookings", type=int, default=2000, help="bookings to come on the busy ledger")
    parser.add_argument("--rounds", type=int, default=400, help="round trips timed on each ledger")
    parser.add_argument("--baseline", type=Path, help="an earlier source tree, measured after this one")
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {platform.node()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}; {args.bookings:,} bookings")
    trees = [("this tree", ROOT)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    for label, tree in trees:
        found = _run(tree, args.bookings, args.rounds)
        none, many = found["none"], found["many"]
        assert isinstance(none, dict) and isinstance(many, dict)
        print(f"{label} ({tree}): {args.bookings:,} bookings made in {found['made_s']:.1f} s; round trip median "
              f"{many['median_ms']:.3f} ms with them, {none['median_ms']:.3f} ms with none "
              f"({many['median_ms'] / none['median_ms']:.2f}x); p99 {many['p99_ms']:.3f} / {none['p99_ms']:.3f} ms")


if __name__ == "__main__":
    main()
