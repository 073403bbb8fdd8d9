#!/usr/bin/env bash
# Device call: the queue and the ledger at scale on the lent host's 16 cores (simulated GPUs: no GPU is
# needed, only the cores). 500 real waiting `chronos reserve ... --wait` processes, twice; then the core
# benchmark once, to see which of its contended figures move with eight times the cores.
# Run from the repository root on the device machine:   bash scripts/h200/scale.sh waiters
# and then (each within one call's ten minutes):         bash scripts/h200/scale.sh core
# Writes $OUT/log.txt.
set -u
OUT=${OUT:-./h200-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1

echo "=== $(date -u +%FT%TZ) $(nproc) cores, $(python3 --version), load $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "${1:-waiters}" = waiters ]; then
for run in 1 2; do
  echo "=== bench_waiters, run $run ($(date -u +%H:%M:%S))"
  timeout 240 python3 bench/bench_waiters.py --waiters 500 --rounds 2000 --idle 10 --grants 50
  echo "bench_waiters rc=$?"
done
else
echo "=== bench_core ($(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg))"
timeout 200 python3 bench/bench_core.py --rounds 3000 --seconds 5 --cold-runs 20 --procs 8,16
echo "bench_core rc=$?"
fi
echo "=== done ($(date -u +%H:%M:%S))"
