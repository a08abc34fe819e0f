#!/usr/bin/env bash
# One .so for every torch >= 2.10: builds csrc/stable/preference_stable.cpp (preference_loss, selective_logprobs)
# ONCE against the main venv's torch (2.14) headers with TORCH_TARGET_VERSION = 2.10, checks that it needs no
# C++ symbol of libtorch (only the extern "C" stable shim), then runs tests/test_stable_abi.py with that same
# file under torch 2.14 (the main venv, against alignops too) and under torch 2.13.0+cpu (its own venv under
# build/stable_abi/venv213, made on the first run from the local wheel, no alignops build: --noconftest, as the
# suite's conftest imports alignops). Not part of the package build (docs/stable-abi.md). About 1 minute once
# the 2.13 venv exists (~2 more minutes to make it).
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

# 5. Optional (STABLE_ABI_BENCH=1, ~10 minutes): per-call cost against today's registration under both torches
# (bench/stable_abi_overhead.py; numbers in docs/stable-abi.md). Also builds the variant that allocates its
# outputs with torch::stable::empty (a boxed dispatcher call) instead of aoti_torch_empty_strided, and, for
# torch 2.13 (no alignops build), today's registration of the same ops (csrc/preference/{preference_loss,
# selective_logprobs}_cpu*.cpp + csrc/stable/native_baseline_def.cpp) compiled against that torch.
if [ "${STABLE_ABI_BENCH:-0}" = 1 ]; then
  "${CXX:-g++}" -std=c++17 -O3 -fPIC -shared -fvisibility=hidden -DALIGNOPS_STABLE_DISPATCHER_EMPTY \
    -DTORCH_TARGET_VERSION=0x020a000000000000 -I"$TORCH_DIR/include" -Icsrc \
    csrc/stable/preference_stable.cpp -o "$OUT/_alignops_stable_dispatcher_empty.so" \
    -Wl,--no-undefined -L"$TORCH_DIR/lib" -ltorch_cpu
  T13="$("$OUT/venv213/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
  N="$OUT/native213"
  mkdir -p "$N"
  F=(-std=c++20 -O3 -fPIC -fopenmp -DALIGNOPS_X86=1 -D_GLIBCXX_USE_CXX11_ABI=1 -isystem "$T13/include"
     -isystem "$T13/include/torch/csrc/api/include" -Icsrc)
  g++ "${F[@]}" -c csrc/stable/native_baseline_def.cpp -o "$N/def.o"
  for op in preference_loss selective_logprobs; do
    g++ "${F[@]}" -c "csrc/preference/${op}_cpu.cpp" -o "$N/${op}.o"
    g++ "${F[@]}" -DCPU_CAPABILITY=DEFAULT -DCPU_CAPABILITY_DEFAULT -c "csrc/preference/${op}_cpu_kernel.cpp" \
      -o "$N/${op}_k_default.o"
    g++ "${F[@]}" -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2 -mavx2 -mfma -mf16c \
      -c "csrc/preference/${op}_cpu_kernel.cpp" -o "$N/${op}_k_avx2.o"
  done
  g++ -shared -fopenmp "$N"/def.o "$N"/preference_loss*.o "$N"/selective_logprobs*.o -o "$N/_native_preference.so" \
    -Wl,--no-undefined -L"$T13/lib" -ltorch_cpu -lc10
  for so in "$SO" "$OUT/_alignops_stable_dispatcher_empty.so"; do
    ALIGNOPS_STABLE_SO="$so" "$PY" bench/stable_abi_overhead.py
    ALIGNOPS_STABLE_SO="$so" "$OUT/venv213/bin/python" bench/stable_abi_overhead.py \
      --native-so "$N/_native_preference.so"
  done
fi
