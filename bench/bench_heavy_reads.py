"""Other clients' round trips through the service while one client reads long history, in the same run.

Fills a ledger with ``--ended`` ended leases (two audit lines each), starts ``chronos serve`` on a copy
of it (and with ``--baseline TREE`` on another copy for an earlier tree, one after the other), and
sends each heavy request below from a raw socket client while another process does reserve+release
round trips through ``chronos.reserve(bind=False)``:

  leases all   ``{"op": "leases", "args": {"all": true}}``: every lease (or one page of them)
  events       ``{"op": "events"}``: the whole audit log (or one page)
  report       ``{"op": "report", "args": {"since": 0}}``: usage over the whole log

For each: how long its answer took and how long the answer was, the others' round trips while it ran
(count, median, p99, worst) against the same client's round trips with nothing else running, measured
just before, and the peak memory (``VmHWM``) of the service and of the largest of its child processes.

    python bench/bench_heavy_reads.py [--ended 300000] [--rounds 300] [--baseline TREE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DAY = 86400.0

HEAVY = {
    "leases all": {"v": 1, "id": 1, "op": "leases", "args": {"all": True}},
    "events": {"v": 1, "id": 1, "op": "events", "args": {}},
    "report": {"v": 1, "id": 1, "op": "report", "args": {"since": 0}},
}

#: The heavy client: one request on a raw socket, and how long its answer took and how long it was.
RAW = """
import json, socket, sys, time
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
start = time.perf_counter()
sock.sendall(sys.argv[2].encode() + b"\\n")
line = sock.makefile("rb").readline()
print(json.dumps({"seconds": time.perf_counter() - start, "bytes": len(line), "ok": json.loads(line)["ok"]}))
"""

#: The other client: round trips alone, then round trips for as long as each heavy client runs.
OTHER = """
import json, subprocess, sys, time
import chronos
path, rounds, raw, heavy = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
def trip():
    start = time.perf_counter()
    chronos.reserve("1G", "10m", bind=False).release()
    return (time.perf_counter() - start) * 1e3
chronos.leases()
for _ in range(50):
    trip()
out = {"source": chronos.__file__}
for name, message in heavy.items():
    alone = [trip() for _ in range(rounds)]
    client = subprocess.Popen([sys.executable, "-c", raw, path, json.dumps(message)], stdout=subprocess.PIPE)
    during = []
    while client.poll() is None:
        during.append(trip())
    answer = json.loads(client.stdout.read())
    out[name] = {"alone": alone, "during": during, **answer}
    print(name, file=sys.stderr, flush=True)
print(json.dumps(out))
"""


def _fill(db: Path, ended: int) -> None:
    """``ended`` old leases and their audit lines written straight into a new ledger."""
    sys.path.insert(0, str(ROOT))
    from chronos.ledger import Ledger

    Ledger(db.parent).close()  # the schema
    conn = sqlite3.connect(db)
    now = time.time()
    conn.execute("PRAGMA synchronous = OFF")
    with conn:
        for start in range(0, ended, 50_000):
            rows, lines = [], []
            for i in range(start, min(ended, start + 50_000)):
                end = now - DAY - 180 * DAY * (ended - i) / ended
                rows.append((i + 1, 0, "root", "[0]", '["GPU-0"]', 4 << 30, end - 3600, end - 3600, end, 3600.0,
                             "normal", "released", end, "released"))
                lines.append((end - 3600, i + 1, "granted", json.dumps({"devices": [0], "memory_bytes": 4 << 30})))
                lines.append((end, i + 1, "released", json.dumps({"ended_at": end})))
            conn.executemany("INSERT INTO leases (seq, uid, owner, devices, device_uuids, memory_bytes, created_at, "
                             "started_at, expires_at, duration_s, priority, state, ended_at, end_reason) VALUES "
                             "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            conn.executemany("INSERT INTO events (at, lease_seq, event, uid, user, pid, detail) VALUES "
                             "(?, ?, ?, 0, 'root', 1, ?)", lines)
    conn.close()


def _peak_mib(pid: int) -> float:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:  # gone meanwhile
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith("VmHWM:")), 0.0)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _run(tree: Path, seed: Path, rounds: int) -> dict[str, object]:
    """The heavy requests against a service of ``tree`` on a fresh copy of the seeded ledger."""
    work = Path(tempfile.mkdtemp(prefix="chronos-bench-heavy-"))
    try:
        state, client_state = work / "service-state", work / "client"
        state.mkdir(mode=0o700)
        client_state.mkdir(mode=0o700)
        shutil.copy(seed, state / "chronos.db")
        sock = work / "chronos.sock"
        env = {k: v for k, v in os.environ.items() if k != "CHRONOS_SERVER"}
        env.update({"CHRONOS_STATE_DIR": str(client_state), "CHRONOS_BACKEND": "simulated",
                    "CHRONOS_SIM_GPUS": "8x80G", "CHRONOS_CONFIG": str(work / "none.toml"),
                    "CHRONOS_USER_CONFIG": str(work / "none.toml"), "PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"})
        service = subprocess.Popen([sys.executable, "-m", "chronos", "serve", "--socket", str(sock), "--state-dir",
                                    str(state)], env=env, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 60
            while not sock.exists():
                if time.time() > deadline or service.poll() is not None:
                    raise SystemExit(f"the service of {tree} did not start")
                time.sleep(0.02)
            answers = open(work / "other.json", "w+")  # a file, not a pipe: the client writes all at its end
            other = subprocess.Popen([sys.executable, "-c", OTHER, str(sock), str(rounds), RAW, json.dumps(HEAVY)],
                                     env={**env, "CHRONOS_SERVER": str(sock)}, stdout=answers)
            children_mib = 0.0
            while other.poll() is None:  # a report built in a child process: its memory counts too
                children_mib = max([children_mib, *(_peak_mib(pid) for pid in _children(service.pid))])
                time.sleep(0.1)
            if other.returncode:
                raise SystemExit(f"the round-trip client failed with {other.returncode}")
            with answers:
                answers.seek(0)
                found: dict[str, object] = json.load(answers)
            found["children_mib"] = children_mib
            if not Path(str(found["source"])).resolve().is_relative_to(tree.resolve()):
                raise SystemExit(f"the client ran the Chronos in {found['source']}, not the one in {tree}")
            found["peak_mib"] = _peak_mib(service.pid)
            return found
        finally:
            service.terminate()
            service.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _figures(times: list[float]) -> str:
    if not times:
        return "n=0"
    ordered = sorted(times)
    return (f"n={len(ordered)} median {statistics.median(ordered):.2f} ms, p99 "
            f"{ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]:.2f} ms, worst {ordered[-1]:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ended", type=int, default=300_000, help="ended leases in the ledger")
    parser.add_argument("--rounds", type=int, default=300, help="round trips alone before each heavy request")
    parser.add_argument("--baseline", type=Path, help="an earlier source tree, measured in turn with this one")
    args = parser.parse_args()
    seed_dir = Path(tempfile.mkdtemp(prefix="chronos-bench-heavy-seed-"))
    try:
        _fill(seed_dir / "chronos.db", args.ended)
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {platform.node()}, "
              f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; {args.ended:,} ended leases")
        trees = [("this tree", ROOT)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
        for label, tree in trees:
            found = _run(tree, seed_dir / "chronos.db", args.rounds)
            print(f"{label} ({tree}): service peak memory {found['peak_mib']:.0f} MiB, its child processes' "
                  f"{found['children_mib']:.0f} MiB")
            for name in HEAVY:
                figure = found[name]
                assert isinstance(figure, dict)
                print(f"  {name}: answered in {figure['seconds']:.2f} s, {figure['bytes']:,} bytes, "
                      f"{'ok' if figure['ok'] else 'an error'}")
                print(f"    others alone:  {_figures(figure['alone'])}")
                print(f"    others during: {_figures(figure['during'])}")
    finally:
        shutil.rmtree(seed_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
