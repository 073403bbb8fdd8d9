"""A client that races others through the service: reserve, extend, release at random; run by
tests/test_service_race.py. Usage: service_race_worker.py OUTFILE ROUNDS SEED

Writes ``granted ID`` for each lease it gets and ``released ID`` for each it ends, so the test can
check that no lease is lost or doubled, whenever this process is killed.
"""

from __future__ import annotations

import random
import sys

import chronos
from chronos.errors import ChronosError


def main() -> None:
    out_path, rounds, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    held: list[chronos.Lease] = []
    with open(out_path, "a", buffering=1) as out:
        for _ in range(rounds):
            choice = rng.random()
            try:
                if choice < 0.5 or not held:
                    kwargs: dict[str, object] = {"device": rng.choice([0, 1])} if rng.random() < 0.5 else {}
                    lease = chronos.reserve(rng.choice(["10G", "20G", "30G", "25%"]), "10m", **kwargs)  # type: ignore[arg-type]
                    held.append(lease)
                    out.write(f"granted {lease.id}\n")
                elif choice < 0.7:
                    rng.choice(held).extend("1m")
                else:
                    lease = held.pop(rng.randrange(len(held)))
                    lease.release()
                    out.write(f"released {lease.id}\n")
            except ChronosError:
                continue  # full (3), or a lease ended meanwhile


if __name__ == "__main__":
    main()
