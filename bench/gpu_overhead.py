"""GPU overhead of enforcement: a bf16 matmul loop bare vs under ``chronos run`` (watchdog at 4 Hz).

    python3 bench/gpu_overhead.py [--rounds 4] [--seconds 5] [--size 8192] [--json FILE]

Each round runs the same worker twice, alternating which goes first: once bare, once as
``python3 -m chronos run 8G 10m -- python3 bench/gpu_overhead.py --worker``. The worker times
only its steady-state loop (after warm-up), so process and CUDA start-up are left out. Reports
TFLOP/s per run, the medians, and (wrapped / bare - 1) as the slowdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def worker(size: int, seconds: float) -> None:
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(20):
        c = a @ b
    torch.cuda.synchronize()
    iters = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(25):
            c = a @ b
        torch.cuda.synchronize()
        iters += 25
    elapsed = time.perf_counter() - started
    del c
    print(json.dumps({"tflops": 2 * size**3 * iters / elapsed / 1e12, "iters": iters, "seconds": elapsed}))


def _run(wrapped: bool, size: int, seconds: float) -> float:
    inner = [sys.executable, str(Path(__file__).resolve()), "--worker", "--size", str(size), "--seconds", str(seconds)]
    command = [sys.executable, "-m", "chronos", "run", "8G", "10m", "--", *inner] if wrapped else inner
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"worker failed ({'wrapped' if wrapped else 'bare'}): {result.stderr[-2000:]}")
    return float(json.loads(result.stdout.strip().splitlines()[-1])["tflops"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.worker:
        worker(args.size, args.seconds)
        return 0
    runs: dict[str, list[float]] = {"bare": [], "chronos_run": []}
    order: list[str] = []
    for i in range(args.rounds):
        for wrapped in (False, True) if i % 2 == 0 else (True, False):
            key = "chronos_run" if wrapped else "bare"
            runs[key].append(_run(wrapped, args.size, args.seconds))
            order.append(key)
    bare, wrapped_med = statistics.median(runs["bare"]), statistics.median(runs["chronos_run"])
    out: dict[str, Any] = {
        "size": args.size,
        "seconds_per_run": args.seconds,
        "rounds": args.rounds,
        "order": order,
        "tflops": {k: [round(v, 2) for v in vs] for k, vs in runs.items()},
        "median_tflops": {"bare": round(bare, 2), "chronos_run": round(wrapped_med, 2)},
        "slowdown_percent": round(100 * (1 - wrapped_med / bare), 3),
        "spread_percent_bare": round(100 * (max(runs["bare"]) - min(runs["bare"])) / bare, 3),
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
