"""Every history-reading command, on an empty ledger and on one holding a long history.

Two state directories: one with no history, one with ``--ended`` ended leases (half of them the
caller's, half another user's, each with its grant and release in the audit log) that ended 31 to
400 days ago, and 61 leases of today in both (more than a page). ``[history] keep = "none"`` so nothing is pruned
while measuring. Each figure alternates between the two ledgers in one process (the ratio is what
counts) and times the call a command makes:

  list --all   ``engine.leases(all=True, limit=50)``: the default page
  stats        ``stats.detailed(engine)``: ``chronos stats --detailed`` and ``%chronos stats``
  suggest      ``stats.suggest(engine)``
  report       ``gather_report(since=30 days ago)``: ``chronos report``

Then the peak memory of each command as its own process (``chronos list --all`` and so on), and
the pruning: with ``keep = "180d"``, how long one batch holds the write lock and how many batches
bring the ledger back to its bound.

    python bench/bench_history.py [--ended 1000000] [--runs 30]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

DAY = 86400.0


def _env(state: str, keep: str = "none") -> dict[str, str]:
    config = os.path.join(state, "config.toml")
    Path(config).write_text(f'[history]\nkeep = "{keep}"\n')
    return {"CHRONOS_STATE_DIR": state, "CHRONOS_BACKEND": "simulated", "CHRONOS_SIM_GPUS": "8x80G",
            "CHRONOS_CONFIG": config, "CHRONOS_USER_CONFIG": os.path.join(state, "none-user.toml")}


def _fill(state: str, ended: int) -> None:
    """Write ``ended`` old leases straight into the ledger (as months of use would have)."""
    from chronos.ledger import Ledger

    Ledger(Path(state)).close()  # the schema
    conn = sqlite3.connect(os.path.join(state, "chronos.db"))
    me, now = os.getuid(), time.time()
    span = 369 * DAY
    conn.execute("PRAGMA synchronous = OFF")
    with conn:
        for start in range(0, ended, 50_000):
            rows, events = [], []
            for i in range(start, min(ended, start + 50_000)):
                end = now - 31 * DAY - span * (ended - i) / ended
                uid, owner = (me, "me") if i % 2 else (me + 1, "other")
                rows.append((i + 1, uid, owner, "[0]", '["GPU-0"]', 4 << 30, end - 3600, end - 3600, end, 3600.0,
                             "normal", "released", None, None, None, end, "released", 3 << 30, 1800.0,
                             '{"memory": "4G"}'))
                detail = json.dumps({"devices": [0], "memory_bytes": 4 << 30, "expires_at": end})
                events.append((end - 3600, i + 1, "granted", uid, owner, 1, detail))
                events.append((end, i + 1, "released", uid, owner, 1, '{"reason": "released"}'))
            conn.executemany("INSERT INTO leases (seq, uid, owner, devices, device_uuids, memory_bytes, created_at, "
                             "started_at, expires_at, duration_s, priority, state, label, pid, pid_start, ended_at, "
                             "end_reason, peak_memory_bytes, gpu_seconds, request) VALUES "
                             "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            conn.executemany("INSERT INTO events (at, lease_seq, event, uid, user, pid, detail) VALUES "
                             "(?, ?, ?, ?, ?, ?, ?)", events)
    conn.close()


def _today(env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-c", "import chronos\nfor _ in range(60): chronos.reserve('2G', '1h').release()\n"
                    "chronos.reserve('2G', '1h', bind=False)"], env={**os.environ, **env}, check=True)


def _engine(env: dict[str, str]) -> object:
    from chronos import settings
    from chronos.engine import Engine

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return Engine(settings=settings.current())
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _timed(call: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        out.append(time.perf_counter() - t0)
    return out


def _peak_mib(env: dict[str, str], *args: str) -> float:
    # VmHWM, not ru_maxrss: the latter starts a forked child at its parent's peak.
    code = ("import runpy, sys\nsys.argv = ['chronos', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('chronos', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1], file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code, *args], env={**os.environ, **env}, capture_output=True,
                         text=True, check=True)
    return int(out.stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ended", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    from chronos import stats
    from chronos.policy.figures import gather_report

    with tempfile.TemporaryDirectory(prefix="chronos-bench-empty-") as empty, \
            tempfile.TemporaryDirectory(prefix="chronos-bench-full-") as full:
        t0 = time.perf_counter()
        _fill(full, args.ended)
        print(f"wrote {args.ended:,} ended leases in {time.perf_counter() - t0:.1f} s; ledger "
              f"{os.path.getsize(os.path.join(full, 'chronos.db')) / 2**20:.0f} MiB")
        envs = {"empty": _env(empty), "full": _env(full)}
        for env in envs.values():
            _today(env)
        engines = {name: _engine(env) for name, env in envs.items()}
        calls: dict[str, Callable[[object], object]] = {
            "list --all": lambda e: e.leases(all=True, limit=50),  # type: ignore[attr-defined]
            "stats --detailed": lambda e: stats.detailed(e),  # type: ignore[arg-type]
            "suggest": lambda e: stats.suggest(e),  # type: ignore[arg-type]
            "report": lambda e: gather_report(e, since=time.time() - 30 * DAY),  # type: ignore[arg-type]
        }
        full_label = f"{args.ended:,} ended"
        print(f"{'command':18} {'empty ledger':>13} {full_label:>13} {'ratio':>6}   (median of {args.runs}, "
              "alternated; goal <= 1.2x)")
        for name, call in calls.items():
            samples: dict[str, list[float]] = {"empty": [], "full": []}
            for key in ("empty", "full"):
                call(engines[key])  # warm: caches, the page cache
            for i in range(args.runs):
                order = ("empty", "full") if i % 2 == 0 else ("full", "empty")
                for key in order:
                    samples[key] += _timed(functools.partial(call, engines[key]), 1)
            e, f = statistics.median(samples["empty"]), statistics.median(samples["full"])
            print(f"{name:18} {e * 1e3:10.2f} ms {f * 1e3:10.2f} ms {f / e:6.2f}x")
        print("peak memory of the command as its own process (MiB): empty / full")
        for argv in (["list", "--all"], ["stats", "--detailed"], ["suggest"], ["report"]):
            print(f"  chronos {' '.join(argv):16} {_peak_mib(envs['empty'], *argv):6.1f} / "
                  f"{_peak_mib(envs['full'], *argv):6.1f}")
        _prune(full, envs["full"], args.ended)


def _prune(state: str, env: dict[str, str], ended: int) -> None:
    """Retention on the full ledger: ``keep = 180d`` forgets about half of it, one batch per write."""
    from chronos.ledger import Ledger
    from chronos.policy.retention import BATCH

    ledger = Ledger(Path(state))
    cutoff = time.time() - 180 * DAY
    holds, total = [], 0
    t0 = time.perf_counter()
    while True:
        t = time.perf_counter()
        gone = ledger.prune(cutoff, BATCH)
        holds.append(time.perf_counter() - t)
        total += gone
        if gone < BATCH:
            break
    left = ledger._read("SELECT COUNT(*) FROM leases")[0][0]
    holds.sort()
    print(f"retention 180d: {total:,} leases forgotten in {len(holds)} writes of <= {BATCH} "
          f"({time.perf_counter() - t0:.1f} s in all); one write holds the lock: median "
          f"{statistics.median(holds) * 1e3:.1f} ms, worst {holds[-1] * 1e3:.1f} ms; {left:,} leases left")
    ledger.close()
    _ = (env, ended)


if __name__ == "__main__":
    main()
