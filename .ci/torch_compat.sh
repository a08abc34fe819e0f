#!/usr/bin/env bash
# A second torch for CI: the CPU-only torch 2.13.0 wheel on local disk with triton 3.7.1 (the version torch 2.13.0
# pins), in a venv and a CPU-only build of their own under build/torch213 (the main venv's editable install and
# build dir are left alone; both installs point at this source tree). Runs the registration tests, which differ
# between torch < 2.14 and 2.14 (triton_op's schema=, see python/alignops/ops/_registration.py), and the
# preference tests (native and Triton ops) under it; then, with triton uninstalled, the whole suite (every CPU
# path must work on a CPU-only torch install without Triton). About 12 minutes on 2 busy cores.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEEL="${TORCH_COMPAT_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}"
ROOT=build/torch213
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -f "$WHEEL" ]; then
  echo "torch_compat: $WHEEL not found (set TORCH_COMPAT_WHEEL)" >&2
  exit 1
fi
python3 -m venv "$ROOT/venv"
source "$ROOT/venv/bin/activate"
pip install -q "$WHEEL" "triton==3.7.1" numpy Cython pytest expecttest hypothesis "scikit-build-core>=0.10" ninja \
  "cmake>=3.25"
# The CPU peers of the test suite. Not torchaudio (its wheels need a CUDA torch) nor Liger-Kernel (needs triton):
# their tests skip here.
pip install -q scipy scikit-learn pot geomloss matplotlib
pip install -q --no-build-isolation ctc-segmentation
ALIGNOPS_ENABLE_CUDA=OFF pip install -q --no-build-isolation --no-deps -e . -Cbuild-dir="$ROOT/cmake"
python -c "import torch, triton, alignops; print('torch_compat: torch', torch.__version__, 'triton', triton.__version__)"
# 1. With Triton 3.7.1: the registration of the Triton ops, and the preference family through both backends.
python -m pytest -q tests/test_registration.py tests/test_check_values.py tests/test_preference.py tests/test_preference_triton.py \
  -k "not test_cli_bench_quick_writes_table_and_csv"
# 2. Without triton, as every CPU-only torch install is: the whole suite; every CPU path must work and the
# Triton tests skip. (The bench end to end, test_cli_bench_quick..., needs the peers this venv lacks.)
pip uninstall -q -y triton
python -c "import importlib.util as u, alignops; assert u.find_spec('triton') is None; print('torch_compat: no triton')"
python -m pytest -q tests -k "not test_cli_bench_quick_writes_table_and_csv"
