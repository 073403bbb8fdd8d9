"""Many real processes racing for the same simulated GPUs: never over-commit, never lose a lease."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import chronos
from chronos.engine import Engine
from tests.ledger_watch import overcommit_watch
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "race_worker.py"
TOTAL = 80 << 30
PROCESSES = 16


def _spawn(out: Path, rounds: int, seed: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(out), str(rounds), str(seed), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )


def test_sixteen_processes_never_overcommit_nor_lose_a_lease(tmp_path: Path, chronos_env: Path) -> None:
    engine = Engine()
    engine.leases()  # creates the ledger before the race
    db = engine.ledger.path
    outs = [tmp_path / f"worker{i}.txt" for i in range(PROCESSES)]
    with overcommit_watch(db, TOTAL) as seen:
        workers = [_spawn(out, 40, seed) for seed, out in enumerate(outs)]
        for worker in workers:
            _, err = worker.communicate(timeout=240)
            assert worker.returncode == 0, err
    assert seen == []
    granted = [line for out in outs for line in out.read_text().split()]
    assert granted, "no worker got a lease"
    assert len(granted) == len(set(granted)), "a lease id was granted twice"
    history = {lease.id: lease for lease in engine.leases(all=True)}
    assert set(granted) == set(history), "the ledger and the workers disagree on what was granted"
    assert {lease.state for lease in history.values()} == {"released"}
    granted_events = Counter(e.lease_id for e in engine.events() if e.event == "granted")
    assert all(granted_events[i] == 1 for i in granted)
    assert engine.ledger.integrity_check() == "ok"


def test_holders_killed_at_random_points_have_their_leases_reclaimed(tmp_path: Path, chronos_env: Path) -> None:
    engine = Engine()
    engine.leases()
    rng = random.Random(7)
    outs = [tmp_path / f"worker{i}.txt" for i in range(PROCESSES)]
    workers = [_spawn(out, rng.randint(5, 60), seed, "hold") for seed, out in enumerate(outs)]
    wait_for(lambda: len(engine.leases()) >= 4, timeout=60, interval=0.05, what="four leases held")
    # Kill every worker at a random moment: some mid-race, some while holding their lease.
    order = list(workers)
    rng.shuffle(order)
    for worker in order:
        time.sleep(rng.random() * 0.15)
        os.kill(worker.pid, signal.SIGKILL)
    for worker in workers:
        worker.communicate(timeout=60)
    leases = engine.leases()  # the next operation reclaims everything the dead held
    assert leases == []
    history = engine.leases(all=True)
    assert history, "no worker got a lease before being killed"
    assert {lease.state for lease in history} <= {"released", "revoked"}
    granted = [line for out in outs if out.exists() for line in out.read_text().split()]
    assert set(granted) <= {lease.id for lease in history}
    assert engine.ledger.integrity_check() == "ok"
    for d in chronos.devices():
        assert d.memory_reserved_bytes == 0 and d.memory_available_bytes == TOTAL


def test_many_processes_opening_a_new_ledger_at_once_all_succeed(tmp_path: Path, chronos_env: Path) -> None:
    """The first use of a state directory may come from many processes together (a hub starting)."""
    code = (
        "import sys, chronos\n"
        "engine = chronos.api.default_engine()\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()  # every process opens the new ledger at the same moment\n"
        "engine.ledger\n"
        "lease = chronos.reserve('1G', '1m')\n"
        "print(lease.id)\n"
        "lease.release()\n"
    )
    fresh = tmp_path / "fresh-state"
    env = {**os.environ, "CHRONOS_STATE_DIR": str(fresh), "CHRONOS_SIM_GPUS": "2x80G"}
    for _ in range(5):  # each round starts from a directory that does not exist yet
        shutil.rmtree(fresh, ignore_errors=True)
        starters = [
            subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(PROCESSES)
        ]
        for p in starters:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in starters:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [(*p.communicate(timeout=120), p.returncode) for p in starters]
        assert [rc for _, _, rc in results] == [0] * PROCESSES, [err for _, err, rc in results if rc]
        ids = [out.strip() for out, _, _ in results]
        assert len(set(ids)) == PROCESSES
