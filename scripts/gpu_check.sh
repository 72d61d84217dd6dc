#!/usr/bin/env bash
# The GPU check of the performance issue (see scripts/gpu_check.py): on a CUDA machine it writes
# benchmarks/gpu.json in under 5 minutes; without CUDA it says so and exits 0.
#   bash scripts/gpu_check.sh [--out benchmarks/gpu.json]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export OMP_WAIT_POLICY=PASSIVE
exec timeout 300 "$PY" scripts/gpu_check.py "$@"
