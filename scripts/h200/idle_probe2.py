"""The idle test's path, traced: each utilisation sample the engine takes for a computing lease, what
it attributed, and the lease's idle mark, under a 6 s idle rule.
Run on the GPU machine:  python3 scripts/h200/idle_probe2.py [--after-another]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

state = tempfile.mkdtemp()
os.environ["CHRONOS_STATE_DIR"] = state
os.environ["CHRONOS_BACKEND"] = "nvml"
config = Path(state) / "config.toml"
config.write_text('[limits]\nidle_after = "6s"\nidle_warning = "3s"\non_idle = "release"\n')
os.environ["CHRONOS_CONFIG"] = str(config)

import chronos  # noqa: E402 (after the environment it reads)
from chronos.api import default_engine  # noqa: E402

CHILD = """
import torch
x = torch.randn(4096, 4096, device="cuda")
print("ready", flush=True)
while True:
    x = (x @ x).clamp_(-1, 1)
    torch.cuda.synchronize()
"""

if "--after-another" in sys.argv:  # as in the test module: a first child computes and is killed first
    from chronos.devices import nvml

    first = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    assert first.stdout is not None and first.stdout.readline().strip() == "ready"
    other = nvml.NvmlBackend()
    for _ in range(30):
        seen = other.utilization([0])
        print("first child:", seen, flush=True)
        if any(u.pid == first.pid and u.sm_percent for u in seen):
            break
        time.sleep(0.2)
    first.kill()
    first.wait()

lease = chronos.reserve("4G", "10m", bind=False)
engine = default_engine()
policies = engine.policies
backend = engine.backend
real = backend.utilization
t0 = time.time()


def traced(indices: list[int] | None = None) -> list[object]:
    out = real(indices)
    print(f"{time.time() - t0:6.2f} utilization({indices}) -> {out}", flush=True)
    return out  # type: ignore[return-value]


backend.utilization = traced  # type: ignore[method-assign]
proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
                        env=lease.env(dict(os.environ)))
assert proc.stdout is not None
print(f"{time.time() - t0:6.2f} child {proc.pid} {proc.stdout.readline().strip()}", flush=True)
try:
    last = None
    while time.time() - t0 < 20:
        record = chronos.get_lease(lease.id)
        sample = policies._sample
        mark = (record.idle_since, policies.samples, sample.busy if sample else None)
        if mark != last:
            print(f"{time.time() - t0:6.2f} idle_since={record.idle_since} samples={policies.samples} "
                  f"busy={mark[2]} judged={sample.judged if sample else None}", flush=True)
            last = mark
        time.sleep(0.1)
finally:
    proc.kill()
    proc.wait()
    lease.release()
