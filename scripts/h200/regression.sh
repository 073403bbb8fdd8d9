#!/usr/bin/env bash
# Final device call: every GPU-marked test again, on the code as it lands.
# Run from the repository root on the device machine:  bash scripts/h200/regression.sh
set -u
OUT=${OUT:-./h200-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CHRONOS_GPU_RECORD=$OUT/record.jsonl
exec > >(tee -a "$OUT/log.txt") 2>&1

echo "=== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo no-git)"
nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,driver_version --format=csv
echo "=== GPU tests"
timeout 420 python3 -m pytest tests/gpu tests/test_devices.py -m gpu -v -p no:cacheprovider \
  --junitxml="$OUT/gpu-tests.xml"
echo "pytest rc=$?"
echo "=== chronos stats --json (NVML)"
CHRONOS_STATE_DIR=$(mktemp -d) CHRONOS_BACKEND=nvml python3 -m chronos stats --json
echo "=== done $(date -u +%T)"
