"""A process that races others to reserve and release; run by tests/test_concurrency.py.

Usage: race_worker.py OUTFILE ROUNDS SEED [hold]
Writes one line per granted lease id; with ``hold`` it keeps its last lease and sleeps (to be killed).
"""

from __future__ import annotations

import random
import sys
import time

import chronos
from chronos.errors import UnavailableError


def main() -> None:
    out_path, rounds, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    hold = len(sys.argv) > 4 and sys.argv[4] == "hold"
    rng = random.Random(seed)
    with open(out_path, "a", buffering=1) as out:
        for _ in range(rounds):
            size = rng.choice(["10G", "20G", "30G", "25%"])
            kwargs: dict[str, object] = {}
            choice = rng.random()
            if choice < 0.2:
                kwargs["gpus"] = 2
            elif choice < 0.5:
                kwargs["device"] = rng.choice([0, 1])
            try:
                lease = chronos.reserve(size, "10m", **kwargs)  # type: ignore[arg-type]
            except UnavailableError:
                continue
            out.write(f"{lease.id}\n")
            time.sleep(rng.random() * 0.01)
            if not hold:
                lease.release()
    if hold:
        print("holding", flush=True)
        time.sleep(600)


if __name__ == "__main__":
    main()
