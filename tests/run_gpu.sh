#!/usr/bin/env bash
# Everything that needs a GPU, in one call (for a lent H100/H200; CI has no GPU and does not run this).
#   bash tests/run_gpu.sh [--no-bench]
# 1. builds the CUDA extension for the visible GPU; 2. runs the whole suite (CUDA C++ and Triton kernels
# against the reference, bf16 included); 3. runs the Triton-marked tests again with the real compiler;
# 4. runs every benchmark suite (tables, CSV and plots under benchmarks/results/<gpu>/).
# Logs go to $OUT when it is set (the device tool's output folder), else to benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-benchmarks/results}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
status=0
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOG/gpu.txt"
$PY -m qpeft.build 2>&1 | tee "$LOG/build.log" || status=1
$PY -m pytest tests -q -p no:cacheprovider -rs 2>&1 | tee "$LOG/pytest_gpu.log" || status=1
QPEFT_BACKEND=triton $PY -m pytest tests -q -p no:cacheprovider -m triton 2>&1 | tee "$LOG/pytest_triton_gpu.log" || status=1
if [ "${1:-}" != "--no-bench" ]; then
  $PY -m benchmarks 2>&1 | tee "$LOG/benchmarks.log" || status=1
fi
exit $status
