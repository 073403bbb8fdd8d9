"""What NVML's per-process utilisation returns, call after call, for a computing child of a lease.

Prints, for each of a dozen polls: the raw samples (pid, timestamp, SM%) for a fixed and a moving
``lastSeenTimeStamp``, the backend's answer, and which lease the membership rule gives the child.
Run on the GPU machine:  python3 scripts/h200/idle_probe.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("CHRONOS_STATE_DIR", tempfile.mkdtemp())
os.environ["CHRONOS_BACKEND"] = "nvml"

import pynvml  # noqa: TID251 (a probe of NVML's raw answers, beside the backend's)

import chronos
from chronos.accounting import Membership
from chronos.api import default_engine

CHILD = """
import torch
x = torch.randn(4096, 4096, device="cuda")
print("ready", flush=True)
while True:
    x = (x @ x).clamp_(-1, 1)
    torch.cuda.synchronize()
"""

lease = chronos.reserve("4G", "10m", bind=False)
engine = default_engine()
proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
                        env=lease.env(dict(os.environ)))
assert proc.stdout is not None
print("child", proc.pid, proc.stdout.readline().strip(), flush=True)
pynvml.nvmlInit()
handle = pynvml.nvmlDeviceGetHandleByIndex(0)
start_us = int((time.time() - 10) * 1e6)
moving = start_us
membership = Membership(engine.active_records(), ledger=engine.ledger_id)
print("env lease", lease.env({}).get("CHRONOS_LEASE_ID"), "ledger", lease.env({}).get("CHRONOS_LEDGER"),
      "engine ledger", engine.ledger_id)
try:
    for n in range(12):
        time.sleep(1.0)
        now_us = int(time.time() * 1e6)
        for name, since in (("fixed", start_us), ("moving", moving)):
            try:
                raw = [(s.pid, s.timeStamp, s.smUtil) for s in pynvml.nvmlDeviceGetProcessUtilization(handle, since)]
            except pynvml.NVMLError as exc:
                raw = [f"error {exc}"]
            mine = [r for r in raw if isinstance(r, tuple) and r[0] == proc.pid]
            print(f"{n} now={now_us} {name} since={since} n={len(raw)} child={mine[-3:]} other_pids="
                  f"{sorted({r[0] for r in raw if isinstance(r, tuple)} - {proc.pid})}", flush=True)
            if name == "moving":
                stamps = [r[1] for r in raw if isinstance(r, tuple)]
                if stamps:
                    moving = max(stamps)
        print(f"{n} backend={engine.backend.utilization([0])} lease_of={membership.lease_of(proc.pid)}", flush=True)
    print("policies samples", engine.policies.samples, "idle_since", chronos.get_lease(lease.id).idle_since)
finally:
    proc.kill()
    proc.wait()
    lease.release()
