#!/usr/bin/env bash
# Device call: which root programs put /dev/nvidia0's mode back while the driver's ModifyDeviceFiles is 1,
# then the service proof again. Run from the repository root on the device machine, as root:
#   bash scripts/h200/gating.sh        (writes $OUT/gating.txt, $OUT/log.txt, $OUT/service.json)
set -u
OUT=${OUT:-./h200-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mode=$(stat -c '%a' /dev/nvidia0)
trap 'chmod "$mode" /dev/nvidia0; stat -c "%a %U:%G %n" /dev/nvidia0' EXIT
echo "=== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo no-git)" | tee "$OUT/gating.txt"
timeout 240 python3 scripts/h200/gating_probe.py 2>&1 | tee -a "$OUT/gating.txt"
echo "gating_probe rc=${PIPESTATUS[0]}" | tee -a "$OUT/gating.txt"
bash scripts/h200/service.sh
