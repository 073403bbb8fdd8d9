#!/usr/bin/env bash
# Second device call: the GPU tests again after the fixes the first call showed were needed,
# the MPS pipe directory's contents, and the watchdog's CPU cost after the membership change.
# Run from the repository root on the device machine:  bash scripts/h200/rerun.sh
set -u
OUT=${OUT:-./h200-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CHRONOS_GPU_RECORD=$OUT/record.jsonl
exec > >(tee -a "$OUT/log.txt") 2>&1

echo "=== GPU tests ($(date -u +%H:%M:%S))"
timeout 300 python3 -m pytest tests/gpu -m gpu -v --junitxml="$OUT/gpu-tests.xml"
echo "pytest rc=$?"
nvidia-smi --query-gpu=memory.used --format=csv

echo "=== watchdog benchmark, NVML ($(date -u +%H:%M:%S))"
CHRONOS_STATE_DIR=$(mktemp -d) CHRONOS_BACKEND=nvml timeout 150 \
  python3 bench/bench_watchdog.py --trials 5 --default-grace-trials 0 --cpu-seconds 10 --leases 1,8 \
  --json "$OUT/bench_watchdog_nvml.json"
echo "bench_watchdog rc=$?"
echo "=== done ($(date -u +%H:%M:%S))"
