"""A client that races others through the service: reserve, extend, release at random; run by
tests/test_service_race.py. Usage: service_race_worker.py OUTFILE ROUNDS SEED [STOPFILE]

Writes ``granted ID`` for each lease it gets and ``released ID`` for each it ends, so the test can
check that no lease is lost or doubled, whenever this process is killed.

With STOPFILE it is a *victim*: once it holds a lease it always holds one (it releases only when it
holds two or more), and after its rounds it keeps a single small lease until STOPFILE exists, so
that the test, however fast the race ran, kills it alive and holding something.
"""

from __future__ import annotations

import os
import random
import sys
import time

import chronos
from chronos.errors import ChronosError

#: However the test goes, a victim ends by itself after this long.
LONGEST_S = 240.0


def main() -> None:
    out_path, rounds, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    stop = sys.argv[4] if len(sys.argv) > 4 else None
    rng = random.Random(seed)
    held: list[chronos.Lease] = []
    keep = 1 if stop else 0
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
                elif len(held) > keep:
                    lease = held.pop(rng.randrange(len(held)))
                    lease.release()
                    out.write(f"released {lease.id}\n")
            except ChronosError:
                continue  # full (3), or a lease ended meanwhile
        if stop is None:
            return
        began = time.monotonic()
        while len(held) > 1:  # a victim past its rounds keeps the smallest, so that every victim fits
            held.sort(key=lambda x: x.memory_bytes)
            lease = held.pop()
            lease.release()
            out.write(f"released {lease.id}\n")
        while not held and time.monotonic() - began < LONGEST_S:
            try:
                held.append(lease := chronos.reserve("10G", "10m"))
                out.write(f"granted {lease.id}\n")
            except ChronosError:
                time.sleep(0.01)
        while not os.path.exists(stop) and time.monotonic() - began < LONGEST_S:
            time.sleep(0.01)


if __name__ == "__main__":
    main()
