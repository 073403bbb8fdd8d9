"""Kernel start through ChronosProvisioner against jupyter_client's plain local provisioner.

Run: python bench/bench_kernel_start.py [--n 10] [--backend simulated|nvml]

Two kernelspecs with the same argv, one naming the ``chronos`` provisioner (1 GiB for 10 minutes)
and one with no provisioner stanza (``local-provisioner``), are started alternately in one run,
through AsyncKernelManager as Jupyter Server does. Per start it records:

* launch: ``await km.start_kernel()`` (for chronos: take the lease, build the environment, launch,
  bind the lease to the kernel's pid);
* ready: launch plus the first kernel_info reply (what a user waits for);
* shutdown: ``await km.shutdown_kernel()`` (for chronos: also release the lease);
* poll: one poll of the kernel's watchdog in the server (the steady cost, once per check_interval).

The figure of merit is the difference of medians (chronos minus local), goal under 150 ms for ready.
Uses a fresh temporary state directory, and simulated GPUs unless --backend nvml.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any


def _setup(backend: str) -> str:
    state = tempfile.mkdtemp(prefix="chronos-bench-state-")
    os.environ.update({
        "CHRONOS_STATE_DIR": state, "CHRONOS_BACKEND": backend,
        "CHRONOS_CONFIG": os.path.join(state, "none.toml"),
        "CHRONOS_USER_CONFIG": os.path.join(state, "none-user.toml"),
        "JUPYTER_PLATFORM_DIRS": "1",
    })
    if backend == "simulated":
        os.environ.setdefault("CHRONOS_SIM_GPUS", "2x80G")
    jupyter = tempfile.mkdtemp(prefix="chronos-bench-jupyter-")
    os.environ["JUPYTER_PATH"] = os.path.join(jupyter, "share", "jupyter")
    os.environ["JUPYTER_RUNTIME_DIR"] = os.path.join(jupyter, "runtime")
    os.environ["IPYTHONDIR"] = os.path.join(jupyter, "ipython")

    from chronos_jupyter.kernelspec import install_kernel

    install_kernel("bench-chronos", "1G", "10m", prefix=jupyter)
    local = os.path.join(jupyter, "share", "jupyter", "kernels", "bench-local")
    os.makedirs(local)
    with open(os.path.join(jupyter, "share", "jupyter", "kernels", "bench-chronos", "kernel.json")) as fh:
        spec = json.load(fh)
    spec["metadata"].pop("kernel_provisioner")
    spec["display_name"] = "bench local"
    with open(os.path.join(local, "kernel.json"), "w") as fh:
        json.dump(spec, fh)
    return jupyter


async def _one(name: str) -> dict[str, float]:
    import subprocess

    from jupyter_client.manager import AsyncKernelManager

    km = AsyncKernelManager(kernel_name=name)
    t0 = time.perf_counter()
    await km.start_kernel(stderr=subprocess.DEVNULL)
    t1 = time.perf_counter()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=120)
        t2 = time.perf_counter()
    finally:
        kc.stop_channels()
    polls: list[float] = []
    if name == "bench-chronos":
        import chronos

        prov: Any = km.provisioner
        lease = chronos.get_lease(prov.lease_id)
        assert lease.active and lease.pid == prov.pid
        for _ in range(50):  # wait for the provisioner's watchdog, then time its polls
            if prov.watchdog is not None:
                break
            await asyncio.sleep(0.01)
        dog = prov.watchdog
        assert dog is not None, "the provisioner started no watchdog"
        for _ in range(10):
            p0 = time.perf_counter()
            dog.poll()
            polls.append(time.perf_counter() - p0)
    t3 = time.perf_counter()
    await km.shutdown_kernel()
    t4 = time.perf_counter()
    out = {"launch": t1 - t0, "ready": t2 - t0, "shutdown": t4 - t3}
    if polls:
        out["poll"] = statistics.median(polls)
    return out


async def _run(n: int) -> dict[str, dict[str, list[float]]]:
    samples: dict[str, dict[str, list[float]]] = {
        k: {"launch": [], "ready": [], "shutdown": [], "poll": []} for k in ("chronos", "local")
    }
    await _one("bench-chronos")  # warm up imports, the ledger, page cache
    await _one("bench-local")
    for i in range(n):
        order = ("chronos", "local") if i % 2 == 0 else ("local", "chronos")
        for which in order:
            got = await _one(f"bench-{which}")
            for key, value in got.items():
                samples[which][key].append(value)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10, help="starts of each kind (default 10)")
    parser.add_argument("--backend", default="simulated", choices=("simulated", "nvml"))
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args(argv)
    _setup(args.backend)
    samples = asyncio.run(_run(args.n))

    import chronos

    leftover = [x.id for x in chronos.leases()]
    assert leftover == [], f"leases left behind: {leftover}"
    result: dict[str, Any] = {
        "n": args.n, "backend": args.backend, "python": platform.python_version(), "cpus": os.cpu_count(),
    }
    print(f"kernel start, n={args.n} each, alternated; backend={args.backend}; {os.cpu_count()} CPUs")
    print(f"{'phase':<10}{'local median':>14}{'chronos median':>16}{'added':>10}{'local p90':>12}{'chronos p90':>13}")
    for phase in ("launch", "ready", "shutdown"):
        local = sorted(samples["local"][phase])
        mine = sorted(samples["chronos"][phase])
        lm, cm = statistics.median(local) * 1e3, statistics.median(mine) * 1e3
        lp, cp = local[int(0.9 * (len(local) - 1))] * 1e3, mine[int(0.9 * (len(mine) - 1))] * 1e3
        result[phase] = {"local_median_ms": round(lm, 1), "chronos_median_ms": round(cm, 1),
                         "added_ms": round(cm - lm, 1), "local_p90_ms": round(lp, 1), "chronos_p90_ms": round(cp, 1)}
        print(f"{phase:<10}{lm:>12.1f}ms{cm:>14.1f}ms{cm - lm:>8.1f}ms{lp:>10.1f}ms{cp:>11.1f}ms")
    poll = statistics.median(samples["chronos"]["poll"]) * 1e3
    result["watchdog_poll_median_ms"] = round(poll, 3)
    print(f"watchdog poll in the server (one per kernel per check_interval, 1 s by default): {poll:.2f} ms")
    added = result["ready"]["added_ms"]
    print(f"added at the median (ready): {added:.1f} ms; goal < 150 ms: {'met' if added < 150 else 'NOT met'}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
