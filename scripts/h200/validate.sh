#!/usr/bin/env bash
# Enforcement validation on the lent H200, in one device call (see docs/gpu-validation.md).
# Run from the repository root on the device machine:  bash scripts/h200/validate.sh
# Writes to $OUT (default ./h200-out): log.txt, env.txt, gpu-tests.xml, record.jsonl,
# bench_watchdog_nvml.json, gpu_overhead.json, doctor.json.
set -u
OUT=${OUT:-./h200-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CHRONOS_GPU_RECORD=$OUT/record.jsonl
exec > >(tee -a "$OUT/log.txt") 2>&1

section() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

section environment
{
  date -u
  uname -a
  nvidia-smi
  nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,driver_version,compute_mode --format=csv
  nvidia-smi topo -m
  nvidia-smi -q -d COMPUTE,MEMORY
  python3 -c 'import sys, torch, psutil, pynvml; print(sys.version); print("torch", torch.__version__, "psutil", psutil.__version__, "nvidia-ml-py", getattr(pynvml, "__version__", "?"))'
  python3 -m pytest --version
  command -v nvidia-cuda-mps-control || ls /usr/local/nvidia/bin /usr/bin | grep -i mps || echo "no nvidia-cuda-mps-control"
} > "$OUT/env.txt" 2>&1
head -40 "$OUT/env.txt"

section "chronos doctor and stats"
CHRONOS_STATE_DIR=$(mktemp -d) CHRONOS_BACKEND=nvml python3 -m chronos doctor --json > "$OUT/doctor.json"; echo "doctor rc=$?"
CHRONOS_STATE_DIR=$(mktemp -d) CHRONOS_BACKEND=nvml python3 -m chronos doctor
CHRONOS_STATE_DIR=$(mktemp -d) CHRONOS_BACKEND=nvml python3 -m chronos stats

section "GPU tests"
timeout 300 python3 -m pytest tests/gpu -m gpu -v --junitxml="$OUT/gpu-tests.xml"
echo "pytest rc=$?"
nvidia-smi --query-gpu=memory.used --format=csv

section "watchdog benchmark (NVML)"
CHRONOS_STATE_DIR=$(mktemp -d) CHRONOS_BACKEND=nvml timeout 200 \
  python3 bench/bench_watchdog.py --trials 20 --cpu-seconds 10 --leases 1,8 --json "$OUT/bench_watchdog_nvml.json"
echo "bench_watchdog rc=$?"

section "GPU overhead benchmark"
CHRONOS_STATE_DIR=$(mktemp -d) CHRONOS_BACKEND=nvml timeout 240 \
  python3 bench/gpu_overhead.py --rounds 3 --seconds 4 --json "$OUT/gpu_overhead.json"
echo "gpu_overhead rc=$?"

section done
nvidia-smi --query-gpu=memory.used --format=csv
