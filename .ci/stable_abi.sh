#!/usr/bin/env bash
# One .so for every torch >= 2.10: builds csrc/stable/preference_stable.cpp ONCE against the main venv's torch
# (2.14) headers with TORCH_TARGET_VERSION = 2.10, checks that it needs no C++ symbol of libtorch (only the
# extern "C" stable shim), then runs tests/test_stable_abi.py with that same file under torch 2.14 (the main
# venv, against alignops too) and under torch 2.13.0+cpu (its own venv under build/stable_abi/venv213, made on
# the first run from the local wheel, no alignops build: --noconftest, as the suite's conftest imports
# alignops). Not part of the package build (docs/stable-abi.md). About 1 minute once the 2.13 venv exists
# (~2 more minutes to make it).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python}"
WHEEL="${TORCH_COMPAT_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}"
OUT=build/stable_abi
SO="$OUT/_alignops_stable.so"
export PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$OUT"

# 1. Build once. Only torch/include (stable + headeronly headers) is needed; libtorch_cpu.so is linked by soname so
# the loader binds the torch already in the process, whichever version it is.
TORCH_DIR="$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
echo "stable_abi: building against torch $("$PY" -c 'import torch; print(torch.__version__)') headers"
"${CXX:-g++}" -std=c++17 -O3 -fPIC -shared -fvisibility=hidden \
  -DTORCH_TARGET_VERSION=0x020a000000000000 \
  -I"$TORCH_DIR/include" -Icsrc \
  csrc/stable/preference_stable.cpp -o "$SO.tmp" \
  -Wl,--no-undefined -L"$TORCH_DIR/lib" -ltorch_cpu
mv "$SO.tmp" "$SO"

# 2. The point of the stable ABI: no mangled c10:: / at:: / torch:: symbol may be left for libtorch to resolve.
if nm -D --undefined-only "$SO" | c++filt | grep -E 'c10::|at::|torch::'; then
  echo "stable_abi: $SO needs libtorch C++ symbols (above): it would break across torch versions" >&2
  exit 1
fi
echo "stable_abi: $SO needs only the C shim: $(nm -D --undefined-only "$SO" | grep -cE ' (aoti_torch|torch)_') symbols"

# 3. Torch 2.14 (main venv): against the reference, alignops.preference_loss and the native op.
"$PY" -m pytest -q -p no:cacheprovider tests/test_stable_abi.py

# 4. Torch 2.13.0+cpu, the same .so: against the reference (no alignops build for this torch).
if [ ! -x "$OUT/venv213/bin/python" ]; then
  python3 -m venv "$OUT/venv213"
  "$OUT/venv213/bin/pip" install -q "$WHEEL" numpy pytest expecttest hypothesis
fi
"$OUT/venv213/bin/python" -c "import torch; assert torch.__version__.startswith('2.13'), torch.__version__"
"$OUT/venv213/bin/python" -m pytest -q -p no:cacheprovider --noconftest tests/test_stable_abi.py
