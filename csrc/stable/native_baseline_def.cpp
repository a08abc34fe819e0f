// Only for bench/stable_abi_overhead.py under a torch that has no alignops build (2.13 in .ci/stable_abi.sh):
// today's registration of the CPU preference_loss and selective_logprobs, compiled against that torch, as the
// baseline of the stable-ABI op's per-call overhead. The ops' schemas come with the files linked beside this one
// (def_checked in csrc/preference/{preference_loss,selective_logprobs}_cpu.cpp, from preference_schemas.h); this
// file only declares the library, as csrc/registration.cpp does for alignops._C. Never linked into the package.
#include <torch/library.h>

TORCH_LIBRARY(alignops, m) {}
