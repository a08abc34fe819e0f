#!/usr/bin/env bash
# Fills .whl/ (ignored through .git/info/exclude, carried to the GPU machine by the device tool's `carry`)
# with the benchmark and test peers that the GPU machine's python3 (3.12, torch 2.11, no network) lacks.
# Their other needs (torch, triton, numpy, scipy, setuptools, Cython) are installed there already, so every
# wheel is fetched with --no-deps; never put a torch, numpy or triton wheel here.
# Usage: bash bench/fetch_gpu_wheels.sh   (from anywhere; about 2 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
mkdir -p .whl
fetch() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "$@"
}
fetch liger-kernel==0.8.5   # Requires-Dist: torch, triton (both there)
fetch pot==0.9.7.post1      # numpy, scipy (there); compiled: cp312 manylinux wheel
fetch geomloss==0.3.1       # numpy, scipy, torch (there); pykeops is optional and left out
fetch expecttest==0.3.0     # no requirements
# ctc-segmentation publishes an sdist only (it compiles against numpy with Cython): no wheel to carry, so
# its bench rows and tests skip on the GPU machine.
if ! fetch ctc-segmentation==1.7.5 2>/dev/null; then
  echo "ctc-segmentation: no cp312 manylinux wheel, skipped"
fi
ls -l .whl
du -sh .whl
