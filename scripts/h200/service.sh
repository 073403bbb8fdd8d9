#!/usr/bin/env bash
# Device call: the service's one enforcement loop and device gating on the lent H200, with NVML.
# Run from the repository root on the device machine, as root:   bash scripts/h200/service.sh
# Here, with no GPU (simulated GPUs, stand-in device files):     bash scripts/h200/service.sh --dry-run
# Checks (scripts/h200/service_proof.py): an over-cap process and another user's unmanaged process are
# ended by the enforcer; with /dev/nvidia0 made 0660, a second OS user cannot create a CUDA context
# without a lease (no ACL entry), can with one, has a context still held at the lease's end ended, and
# cannot again after it. Device modes and ACLs are put back at the end. Writes $OUT/log.txt and
# $OUT/service.json.
set -u
OUT=${OUT:-./h200-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1

# The proof restores the device files itself; this puts their modes back even if it is killed.
modes=$(stat -c '%a %n' /dev/nvidia[0-9]* 2>/dev/null || true)
restore() {
  if [ -n "$modes" ]; then
    echo "$modes" | while read -r mode file; do chmod "$mode" "$file"; done
  fi
  stat -c '%a %U:%G %n' /dev/nvidia* 2>/dev/null || true
}
trap restore EXIT

echo "=== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo no-git) ${1:-}"
if [ "${1:-}" != "--dry-run" ]; then
  nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,driver_version --format=csv
  cat /proc/driver/nvidia/params 2>/dev/null | grep -E 'DeviceFile|ModifyDeviceFiles' || true
  command -v nvidia-modprobe || echo "no nvidia-modprobe"
fi
stat -c '%a %U:%G %n' /dev/nvidia* 2>/dev/null || true
timeout 300 python3 scripts/h200/service_proof.py --out "$OUT" "$@"
echo "service_proof rc=$?"
echo "=== done $(date -u +%T)"
