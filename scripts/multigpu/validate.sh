#!/usr/bin/env bash
# Gang leases and their enforcement on a machine with several NVIDIA GPUs, in one device call.
# README: run from the repository root on that machine:  bash scripts/multigpu/validate.sh
# (see docs/gpu-validation.md, "Several GPUs"). Needs at least 2 GPUs; with fewer the GPU tests
# are skipped, not failed. Writes to $OUT (default ./multigpu-out): log.txt, env.txt, topo.txt,
# stats.json, stats-all.json, doctor.json, multigpu-gpu-tests.xml, multigpu-sim-tests.xml and
# record.jsonl (what the GPU tests saw, the topology matrix included).
set -u
OUT=${OUT:-./multigpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CHRONOS_GPU_RECORD=$OUT/record.jsonl
exec > >(tee -a "$OUT/log.txt") 2>&1

section() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

section environment
{
  date -u
  uname -a
  nvidia-smi
  nvidia-smi -L
  nvidia-smi --query-gpu=index,uuid,name,pci.bus_id,memory.total,memory.used,driver_version,compute_mode,mig.mode.current --format=csv
  nvidia-smi -q -d COMPUTE,MEMORY
  python3 -c 'import sys, psutil, pynvml; print(sys.version); print("psutil", psutil.__version__, "nvidia-ml-py", getattr(pynvml, "__version__", "?"))'
  python3 -c 'import torch; print("torch", torch.__version__, "cuda devices", torch.cuda.device_count())' || echo "no torch"
  python3 -m pytest --version
} > "$OUT/env.txt" 2>&1
head -30 "$OUT/env.txt"
echo "GPUs: $(nvidia-smi -L | grep -c '^GPU ')"

section topology
nvidia-smi topo -m | tee "$OUT/topo.txt"
CHRONOS_STATE_DIR=$(mktemp -d) CHRONOS_BACKEND=nvml python3 -c '
from chronos.devices import get_backend
print("chronos distances (LINK_* levels: 0 same, 5 NVLink, 10 PCIe switch, 20 several switches, 30 host bridge, 40 NUMA node, 50 across sockets):")
for row in get_backend().distances():
    print(" ".join(f"{v:3d}" for v in row))
' | tee -a "$OUT/topo.txt"

section "chronos doctor and stats"
CHRONOS_STATE_DIR=$(mktemp -d) CHRONOS_BACKEND=nvml python3 -m chronos doctor --json > "$OUT/doctor.json"; echo "doctor rc=$?"
CHRONOS_STATE_DIR=$(mktemp -d) CHRONOS_BACKEND=nvml python3 -m chronos stats --json > "$OUT/stats.json"; echo "stats rc=$?"
CHRONOS_STATE_DIR=$(mktemp -d) CHRONOS_BACKEND=nvml python3 -m chronos stats --all --json > "$OUT/stats-all.json"; echo "stats --all rc=$?"
CHRONOS_STATE_DIR=$(mktemp -d) CHRONOS_BACKEND=nvml python3 -m chronos stats --all

section "multi-GPU tests (NVML)"
timeout 420 python3 -m pytest tests/gpu/test_multigpu_gpu.py -m gpu -v -rs -s --junitxml="$OUT/multigpu-gpu-tests.xml"
echo "pytest (GPU) rc=$?"
nvidia-smi --query-gpu=index,memory.used --format=csv

section "multi-GPU tests (simulated, same machine)"
timeout 120 python3 -m pytest tests/test_multigpu.py -v --junitxml="$OUT/multigpu-sim-tests.xml"
echo "pytest (simulated) rc=$?"

section done
