"""Leases through the service against embedded mode, measured in the same run.

  round trip   reserve + release from one process (``chronos.reserve(bind=False)`` then
               ``Lease.release()``), median and p99, embedded against the service
  throughput   N client processes reserving and releasing at once for ``--seconds``: grants per
               second (each grant also released), embedded against the service; the audit log is
               replayed afterwards and any instant that over-commits a GPU is counted; and the CPU
               time per grant of every client process and of the service over the window (what a
               loaded machine's swings touch least)

Each figure uses a fresh state directory; the service is ``chronos serve`` started by this script
on a temporary socket, with simulated GPUs ``8x80G``.

``--floor`` adds the floor that any service in Python meets on this machine: a server that does no
work (one selector thread answering every request line at once with a lease-sized answer line) and
clients that send the two requests of a reserve+release and parse the two answers, with nothing of
Chronos in either. What that pair reaches is the most a service can, whatever its engine does.

    python bench/bench_service.py [--rounds 2000] [--procs 8,16] [--seconds 5] [--repeats 3] [--floor]
                                  [--baseline TREE]

The modes alternate, ``--repeats`` times per figure, and each figure is the median of its runs
(over-commits: the sum), so that a change in the machine's load between runs hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30

#: A throughput worker's timed loop, after its set-up: ``{round}`` is one reserve+release.
_TIMED = """
print("ready", flush=True)
while not os.path.exists(start_file):
    time.sleep(0.001)
end = time.time() + seconds
cpu = time.process_time()
grants = 0
while time.time() < end:
    {round}
    grants += 1
print(grants, time.process_time() - cpu, flush=True)
"""

WORKER = """
import os, sys, time
import chronos
start_file, seconds = sys.argv[1], float(sys.argv[2])
chronos.leases()  # connect (or open the ledger) before the clock starts
""" + _TIMED.format(round='chronos.reserve("1G", "10m", bind=False).release()')

#: The floor's server (``--floor``): one selector thread, every request line answered at once.
FLOOR_SERVER = """
import json, os, selectors, socket, sys
path = sys.argv[1]
answer = (json.dumps({"v": 1, "id": 0, "ok": True, "result": {"lease": "x" * 600}}) + "\\n").encode()
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(path + ".tmp")
os.rename(path + ".tmp", path)
listener.listen(128)
listener.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(listener, selectors.EVENT_READ, None)
inbox = {}
while True:
    for key, _ in sel.select():
        if key.data is None:
            conn, _ = listener.accept()
            conn.setblocking(False)
            inbox[conn] = b""
            sel.register(conn, selectors.EVENT_READ, conn)
            continue
        conn = key.data
        data = conn.recv(65536)
        if not data:
            sel.unregister(conn)
            conn.close()
            continue
        inbox[conn] += data
        while b"\\n" in inbox[conn]:
            line, _, inbox[conn] = inbox[conn].partition(b"\\n")
            json.loads(line)
            conn.sendall(answer)
"""

#: The floor's client, connected (argv: start file, seconds, socket); ``FLOOR_ROUND`` is its reserve+release:
#: the two request lines sent, their answers read and parsed.
FLOOR_CLIENT = """
import json, os, socket, sys, time
start_file, seconds, path = sys.argv[1], float(sys.argv[2]), sys.argv[3]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(path)
reader = sock.makefile("rb")
reserve = {"v": 1, "id": 0, "op": "reserve", "args": {"request": {"memory": "1G", "duration": "10m"}, "bind": False}}
release = {"v": 1, "id": 0, "op": "release", "args": {"lease": "x"}}
def ask(message):
    sock.sendall((json.dumps(message) + "\\n").encode())
    return json.loads(reader.readline())
"""
FLOOR_ROUND = "ask(reserve); ask(release)"
FLOOR_WORKER = FLOOR_CLIENT + _TIMED.format(round=FLOOR_ROUND)


def _env(state: Path, server: Path | None, tree: Path = ROOT) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CHRONOS_SERVER"}
    env.update({"CHRONOS_STATE_DIR": str(state), "CHRONOS_BACKEND": "simulated", "CHRONOS_SIM_GPUS": "8x80G",
                "CHRONOS_CONFIG": str(state / "none.toml"), "CHRONOS_USER_CONFIG": str(state / "none.toml"),
                "PYTHONPATH": str(tree),
                # ``python -m`` and ``-c`` put the working directory first on the path: without this, a
                # run from the repository root would import its own Chronos whatever ``tree`` says.
                "PYTHONSAFEPATH": "1"})
    if server is not None:
        env["CHRONOS_SERVER"] = str(server)
    return env


class _Mode:
    """A fresh state directory, and (for the service) a running ``chronos serve`` on it; ``tree`` is the
    source tree whose Chronos the service and its clients run (``--baseline``: an earlier checkout)."""

    def __init__(self, name: str, tree: Path = ROOT) -> None:
        self.name = name
        self.tree = tree
        self.dir = Path(tempfile.mkdtemp(prefix=f"chronos-bench-{name}-"))
        self.state = self.dir / "state"
        self.state.mkdir(mode=0o700)
        self.server: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        if name != "embedded":
            self.server = self.dir / "chronos.sock"
            self.ledger_dir = self.dir / "service-state"
            command = ([sys.executable, "-c", FLOOR_SERVER, str(self.server)] if name == "floor" else
                       [sys.executable, "-m", "chronos", "serve", "--socket", str(self.server), "--state-dir",
                        str(self.ledger_dir)])
            self.process = subprocess.Popen(command, env=_env(self.state, None, tree), stderr=subprocess.DEVNULL)
            deadline = time.time() + 30
            while not self.server.exists():
                if time.time() > deadline or self.process.poll() is not None:
                    raise SystemExit("the service did not start")
                time.sleep(0.02)
        else:
            self.ledger_dir = self.state
        self.env = _env(self.state, self.server, tree)

    def close(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait()
        subprocess.run(["rm", "-rf", str(self.dir)], check=False)


def round_trips(mode: _Mode, rounds: int) -> tuple[float, float]:
    if mode.name == "floor":
        code = (FLOOR_CLIENT + "times = []\n"
                f"for _ in range({rounds}):\n"
                f"    t = time.perf_counter(); {FLOOR_ROUND}\n"
                "    times.append(time.perf_counter() - t)\n"
                "print(' '.join(map(str, times)))\n")
        out = subprocess.run([sys.executable, "-c", code, "-", "0", str(mode.server)], env=mode.env,
                             capture_output=True, text=True, check=True)
        times = sorted(float(x) for x in out.stdout.split())
        return statistics.median(times), times[int(len(times) * 0.99)]
    code = ("import sys, time, chronos\n"
            "print(chronos.__file__)\n"
            "chronos.leases()\n"
            "times = []\n"
            f"for _ in range({rounds}):\n"
            "    t = time.perf_counter(); chronos.reserve('1G', '10m', bind=False).release()\n"
            "    times.append(time.perf_counter() - t)\n"
            "print(' '.join(map(str, times)))\n")
    out = subprocess.run([sys.executable, "-c", code], env=mode.env, capture_output=True, text=True, check=True)
    source, _, measured = out.stdout.partition("\n")
    if not Path(source).resolve().is_relative_to(mode.tree.resolve()):
        raise SystemExit(f"the {mode.name} client ran the Chronos in {source}, not the one in {mode.tree}")
    times = sorted(float(x) for x in measured.split())
    return statistics.median(times), times[int(len(times) * 0.99)]


def _cpu_s(pid: int) -> float:
    """A process's CPU time so far (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(mode: _Mode, procs: int, seconds: float) -> tuple[float, int, float]:
    """Grants per second, over-commits, and CPU milliseconds per grant (every client, plus the service)."""
    start_file = mode.dir / f"go-{procs}"
    command = ([sys.executable, "-c", FLOOR_WORKER, str(start_file), str(seconds), str(mode.server)]
               if mode.name == "floor" else [sys.executable, "-c", WORKER, str(start_file), str(seconds)])
    workers = [subprocess.Popen(command, env=mode.env, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    for worker in workers:
        assert worker.stdout is not None
        if worker.stdout.readline().strip() != "ready":
            raise SystemExit(f"a {mode.name} worker failed to start")
    service_cpu = _cpu_s(mode.process.pid) if mode.process is not None else 0.0
    began = time.time()
    start_file.touch()
    results = [worker.communicate()[0].split()[-2:] for worker in workers]
    elapsed = max(time.time() - began, seconds)
    if mode.process is not None:
        service_cpu = _cpu_s(mode.process.pid) - service_cpu
    grants = sum(int(count) for count, _cpu in results)
    cpu = service_cpu + sum(float(used) for _count, used in results)
    print(f"# {mode.name}, {procs} processes: {grants} grants, CPU {cpu:.2f} s of which the service's "
          f"{service_cpu:.2f} s", flush=True)
    bad = 0 if mode.name == "floor" else overcommits(mode.ledger_dir / "chronos.db", 80 * GIB)
    return grants / elapsed, bad, cpu * 1000 / max(grants, 1)


def overcommits(db: Path, total: int) -> int:
    """Replay the audit log: how many grants pushed a GPU past its memory."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    used: Counter[int] = Counter()
    sizes: dict[int, tuple[list[int], int]] = {}
    bad = 0
    for seq, event, detail in conn.execute("SELECT lease_seq, event, detail FROM events ORDER BY id"):
        info = json.loads(detail)
        if event == "granted":
            sizes[seq] = (info["devices"], info["memory_bytes"])
            for index in info["devices"]:
                used[index] += info["memory_bytes"]
                bad += used[index] > total
        elif event in ("released", "expired", "revoked", "withdrawn") and seq in sizes:
            devices, memory = sizes.pop(seq)
            for index in devices:
                used[index] -= memory
    conn.close()
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--procs", default="8,16")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternate the modes this many times per figure (the machine's load drifts)")
    parser.add_argument("--floor", action="store_true",
                        help="also run the floor: a server that does no work and clients that only send and parse")
    parser.add_argument("--baseline", type=Path,
                        help="also run the service (and its clients) from this source tree, an earlier commit's "
                             "files (`git archive COMMIT chronos | tar -x -C TREE`), alternated with the others")
    args = parser.parse_args()
    trees = {"embedded": ROOT, "service": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {}),
             **({"floor": ROOT} if args.floor else {})}
    print(f"# Python {platform.python_version()} on {os.cpu_count()} cores, simulated 8x80G, "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    samples: dict[str, dict[str, list[float]]] = {}

    def add(figure: str, name: str, value: float) -> None:
        samples.setdefault(figure, {}).setdefault(name, []).append(value)

    modes = {name: _Mode(name, tree) for name, tree in trees.items()}
    try:
        for _ in range(args.repeats):
            for name, mode in modes.items():
                median, p99 = round_trips(mode, args.rounds // args.repeats)
                add("round trip median ms", name, median * 1000)
                add("round trip p99 ms", name, p99 * 1000)
    finally:
        for mode in modes.values():
            mode.close()
    for procs in (int(p) for p in args.procs.split(",")):
        for _ in range(args.repeats):
            for name, tree in trees.items():
                mode = _Mode(name, tree)
                try:
                    rate, bad, cpu = throughput(mode, procs, args.seconds)
                finally:
                    mode.close()
                add(f"{procs} processes grants/s", name, rate)
                add(f"{procs} processes CPU ms/grant", name, cpu)
                add(f"{procs} processes over-commits", name, bad)
    for figure, by in samples.items():
        total = "over-commits" in figure
        value = {n: sum(v) if total else statistics.median(v) for n, v in by.items()}
        emb = value["embedded"]
        line = "   ".join(f"{n} {v:9.2f}" + (f" ({v / emb:.2f}x)" if emb and n != "embedded" else "")
                          for n, v in value.items())
        runs = "; ".join(f"{n} {', '.join(f'{v:.2f}' for v in by[n])}" for n in by)
        print(f"{figure:28} {line}   (x: against embedded; runs: {runs})")
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
