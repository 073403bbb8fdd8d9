#!/usr/bin/env bash
# Idle reclaim on the H200: NVML's per-process utilisation samples and an idle lease released.
# Run from the repository root on the device machine:  bash scripts/h200/idle.sh
set -u
OUT=${OUT:-./h200-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CHRONOS_GPU_RECORD=$OUT/record.jsonl
exec > >(tee -a "$OUT/log.txt") 2>&1

echo "=== $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,driver_version --format=csv
echo "=== idle tests"
timeout 300 python3 -m pytest tests/gpu/test_idle_gpu.py -m gpu -v -p no:cacheprovider \
  --junitxml="$OUT/gpu-tests.xml"
echo "pytest rc=$?"
echo "=== done $(date -u +%T)"
