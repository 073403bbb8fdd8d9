#!/usr/bin/env bash
# Third device call: every GPU test again, now with the JAX, CuPy and in-process (apply_caps) caps.
# Run from the repository root on the device machine:  bash scripts/h200/frameworks.sh
set -u
OUT=${OUT:-./h200-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CHRONOS_GPU_RECORD=$OUT/record.jsonl
exec > >(tee -a "$OUT/log.txt") 2>&1
echo "=== GPU tests ($(date -u +%H:%M:%S))"
python3 -c 'import jax, cupy; print("jax", jax.__version__, "cupy", cupy.__version__)'
timeout 400 python3 -m pytest tests/gpu -m gpu -v --junitxml="$OUT/gpu-tests.xml"
echo "pytest rc=$?"
nvidia-smi --query-gpu=memory.used --format=csv
echo "=== done ($(date -u +%H:%M:%S))"
