#!/usr/bin/env bash
# The GPU-machine check, in one or two device calls: build with the CUDA kernels (sm_90), run the CUDA and
# Triton tests, then the GPU benchmark against the reference and the installed peers.
# Usage: bash bench/gpu_check.sh OUT_DIR [all|tests|bench]   (logs, CSVs and plots land in OUT_DIR)
# Each phase builds first (a no-op when build/gpu is current); run "tests" and "bench" as two device calls
# when one call's 10 minutes are too short for both.
set -uo pipefail
OUT="${1:?usage: bash bench/gpu_check.sh OUT_DIR [all|tests|bench]}"
PHASE="${2:-all}"
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
tests_status=0
bench_status=0
if [ "$PHASE" != bench ]; then
  timeout 300 python -m pytest tests/test_*_cuda.py tests/test_*_triton.py -q -ra 2>&1 | tee "$OUT/tests_cuda.log"
  tests_status=${PIPESTATUS[0]}
fi
if [ "$PHASE" != tests ]; then
  timeout 420 alignops bench --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench_cuda.log"
  bench_status=${PIPESTATUS[0]}
fi
echo "tests exit ${tests_status}, bench exit ${bench_status}, total $(( $(date +%s) - start )) s"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
