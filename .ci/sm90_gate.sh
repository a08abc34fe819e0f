#!/usr/bin/env bash
# The Hopper compile gate (bench/sm90_gate.py), run after the test suite recorded its Triton launches:
#   bash .ci/sm90_gate.sh CAPTURE.jsonl OUT_DIR
# 1. the bench's GPU launches are added to CAPTURE (sm90_shapes: V = 128256, H = 4096 / I = 11008, Sinkhorn up
#    to 8192^2, fp64, point clouds, ...);
# 2. every distinct specialisation is compiled for sm_90 with the Triton of this environment (3.8 with
#    torch 2.14.1) and with Triton 3.6 (the GPU machine's, installed beside it in .triton36), ptxas resources
#    into OUT_DIR/triton_sm90.csv and OUT_DIR/triton_sm90_triton3.6.csv;
# 3. the CUDA C++ kernels of the built extension: registers, stack, local memory -> OUT_DIR/cuda_sm90.csv.
# Any compile error or a spill over 1 KB that bench/sm90_gate.py does not list fails the gate.
set -uo pipefail
CAPTURE="${1:?usage: .ci/sm90_gate.sh CAPTURE.jsonl OUT_DIR}"
OUT="${2:?usage: .ci/sm90_gate.sh CAPTURE.jsonl OUT_DIR}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
unset TRITON_INTERPRET ALIGNOPS_TRITON_CAPTURE
status=0
python -m alignops.bench.sm90_gate bench-shapes "$CAPTURE" || status=1
python -m alignops.bench.sm90_gate triton "$CAPTURE" --csv "$OUT/triton_sm90.csv" || status=1
if [ ! -f .triton36/triton/__init__.py ]; then
  python -m pip install -q --no-deps --target .triton36 triton==3.6.0 || status=1
fi
PYTHONPATH="$PWD/.triton36${PYTHONPATH:+:$PYTHONPATH}" \
  python -m alignops.bench.sm90_gate triton "$CAPTURE" --csv "$OUT/triton_sm90_triton3.6.csv" || status=1
lib="$(python -c 'import alignops._C as c; print(c.__file__)')"
python -m alignops.bench.sm90_gate cuda "$lib" --csv "$OUT/cuda_sm90.csv" || status=1
exit $status
