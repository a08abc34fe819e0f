#!/usr/bin/env bash
# The GPU-machine check, well inside 10 minutes: build with the CUDA kernels (sm_90), run the CUDA and
# Triton tests, then the GPU benchmark against the reference and the installed peers.
# Usage: bash bench/gpu_check.sh OUT_DIR   (logs, CSVs and plots land in OUT_DIR)
set -uo pipefail
OUT="${1:?usage: bash bench/gpu_check.sh OUT_DIR}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" ALIGNOPS_ENABLE_CUDA=ON PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
start=$(date +%s)
if ! pip install --no-build-isolation --no-deps -e . -Cbuild-dir=build/gpu > "$OUT/build.log" 2>&1; then
  tail -n 60 "$OUT/build.log"
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
alignops info | tee "$OUT/info.txt"
timeout 240 python -m pytest tests/test_preference_cuda.py tests/test_preference_triton.py tests/test_skip_triton.py \
  tests/test_fused_linear_triton.py -q -ra 2>&1 | tee "$OUT/tests_cuda.log"
tests_status=${PIPESTATUS[0]}
timeout 240 alignops bench --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench_cuda.log"
bench_status=${PIPESTATUS[0]}
echo "tests exit ${tests_status}, bench exit ${bench_status}, total $(( $(date +%s) - start )) s"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
