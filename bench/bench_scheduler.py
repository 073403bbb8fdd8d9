"""How long one scheduling decision takes on a busy machine.

A snapshot of 8 GPUs (80 GiB each, NVLink pairs, PCIe switches per four) holding 1,000 active
leases, with 1,000 requests queued (mixed priorities, 1-, 2- and 4-GPU gangs, some naming a GPU).
Each case builds a fresh snapshot per run (so nothing is cached between runs) and times the call:

  queue-new     a new request that does not fit now (refused at once, the usual case when busy)
  backfill      a new request that fits now, checked against the slots of every request ahead
  backfill-64   the same on a queue of 64 (the depth checked exactly), all of which could start
                before the request would end: the longest exact check a decision makes
  waiter        the last queued request re-checking, as each waiting process does
  estimate      decide() with the estimated start, as shown to a waiting user
  plan          every queued request's slot (``chronos queue``)
  extend        extend_conflict for one active lease

The baseline, timed in the same run, is the bare cost of reading the snapshot: summing the free
memory per device over the active leases. Ratios are against it.

    python bench/bench_scheduler.py [--leases 1000] [--queued 1000] [--devices 8] [--runs 200]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from collections.abc import Callable

from chronos import scheduler
from chronos.devices.base import LINK_NUMA, LINK_NVLINK, LINK_PCIE_SWITCH, LINK_SAME
from chronos.model import Priority
from chronos.units import MemorySpec

GIB = 1 << 30


def _distances(n: int) -> tuple[tuple[int, ...], ...]:
    def link(a: int, b: int) -> int:
        if a == b:
            return LINK_SAME
        if a // 2 == b // 2:
            return LINK_NVLINK
        if a // 4 == b // 4:
            return LINK_PCIE_SWITCH
        return LINK_NUMA

    return tuple(tuple(link(a, b) for b in range(n)) for a in range(n))


def make_snapshot(leases: int, queued: int, ndev: int, seed: int, now: float) -> scheduler.Snapshot:
    rng = random.Random(seed)
    total = 80 * GIB
    devices = tuple(scheduler.DeviceState(i, f"GPU-{i:04d}", total, 0) for i in range(ndev))
    per_device = leases // ndev + 1
    active = []
    for i in range(leases):
        dev = i % ndev
        # Every GPU nearly full; the last one has about 12 GiB left, where a small request may backfill.
        budget = total - (12 * GIB if dev == ndev - 1 else GIB // 2)
        size = max(64 << 20, int(budget / per_device * rng.uniform(0.97, 1.0)))
        active.append(scheduler.Holding(f"a{i}", (dev,), size, now + rng.uniform(60, 8 * 3600)))
    queue = []
    for i in range(queued):
        roll = rng.random()
        gpus = 1 if roll < 0.85 else (2 if roll < 0.95 else 4)
        named = (rng.randrange(ndev),) if gpus == 1 and rng.random() < 0.1 else None
        queue.append(scheduler.Request(
            memory=MemorySpec(nbytes=rng.randint(16, 40) * GIB),
            duration_s=rng.uniform(600, 4 * 3600),
            gpus=gpus,
            devices=named,
            priority=Priority(rng.choice(("low", "normal", "normal", "normal", "high"))),
            seq=i + 1,
            lease_id=str(10_000 + i),
        ))
    return scheduler.Snapshot(now=now, devices=devices, active=tuple(active), queue=tuple(queue),
                              distances=_distances(ndev))


def timed(runs: int, build: Callable[[], scheduler.Snapshot],
          call: Callable[[scheduler.Snapshot], object]) -> list[float]:
    out = []
    for _ in range(runs):
        snap = build()
        start = time.perf_counter()
        call(snap)
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leases", type=int, default=1000)
    parser.add_argument("--queued", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    now = time.time()
    counter = iter(range(1 << 30))

    def build() -> scheduler.Snapshot:
        # A fresh snapshot (new objects, new ``now``) for every run.
        return make_snapshot(args.leases, args.queued, args.devices, 7, now + next(counter) * 1e-3)

    big = scheduler.Request(memory=MemorySpec(nbytes=30 * GIB), duration_s=3600, priority=Priority.NORMAL)
    small = scheduler.Request(memory=MemorySpec(nbytes=8 * GIB), duration_s=600, priority=Priority.NORMAL)

    def baseline(s: scheduler.Snapshot) -> object:
        free = {d.index: d.total_bytes - d.unmanaged_bytes for d in s.devices}
        for h in s.active:
            for i in h.devices:
                free[i] -= h.memory_bytes
        return free

    depth = scheduler.BACKFILL_DEPTH

    def build_deep() -> scheduler.Snapshot:
        # Only as many queued requests as backfill checks exactly, all able to start within 8 hours.
        return make_snapshot(args.leases, depth, args.devices, 7, now + next(counter) * 1e-3)

    long_small = scheduler.Request(memory=MemorySpec(nbytes=4 * GIB), duration_s=8 * 3600, priority=Priority.NORMAL)

    def waiter(s: scheduler.Snapshot) -> object:
        return scheduler.decide(s, scheduler.queue_order(s)[-1])

    def extend(s: scheduler.Snapshot) -> object:
        return scheduler.extend_conflict(s, "a7", s.active[7].expires_at + 3600)

    cases: list[tuple[str, Callable[[scheduler.Snapshot], object], int, Callable[[], scheduler.Snapshot]]] = [
        ("baseline", baseline, args.runs, build),
        ("queue-new", lambda s: scheduler.decide(s, big), args.runs, build),
        ("backfill", lambda s: scheduler.decide(s, small), args.runs, build),
        (f"backfill-{depth}", lambda s: scheduler.decide(s, long_small), args.runs, build_deep),
        ("waiter", waiter, args.runs, build),
        ("estimate", lambda s: scheduler.decide(s, big, estimate=True), max(10, args.runs // 10), build),
        ("plan", scheduler.plan, max(10, args.runs // 10), build),
        ("extend", extend, max(10, args.runs // 10), build),
    ]
    sample = build()
    granted_small = scheduler.decide(sample, small)
    print(f"chronos scheduler benchmark: {args.leases} active leases, {args.queued} queued, "
          f"{args.devices} GPUs; python {platform.python_version()} on {platform.machine()}")
    print(f"  (backfill request granted: {granted_small.granted}, "
          f"reason: {granted_small.reason or 'fits without delaying anyone'})")
    base = None
    deep = scheduler.decide(build_deep(), long_small)
    print(f"  (backfill-{depth} granted: {deep.granted}, reason: {deep.reason or 'fits without delaying anyone'})")
    print(f"{'case':<12} {'runs':>5} {'median ms':>10} {'p99 ms':>9} {'x baseline':>11}")
    for name, call, runs, builder in cases:
        samples = timed(runs, builder, call)
        median = statistics.median(samples)
        p99 = sorted(samples)[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))]
        if base is None:
            base = median
        print(f"{name:<12} {runs:>5} {median * 1e3:>10.3f} {p99 * 1e3:>9.3f} {median / base:>11.1f}")


if __name__ == "__main__":
    main()
