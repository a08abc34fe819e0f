// Vectorised inner loop of alignops::bootstrap_confusion for C <= 4 classes (<= 16 codes, uint8) and
// multiplicities that fit uint16 (N < 2^16): one compare-select-add pass per code, which the compiler
// vectorises (32 uint8 codes per AVX2 compare, widened to 32-bit sums). Exact integer arithmetic: the sums
// are the same counts as the scalar histogram of bootstrap_confusion_cpu.cpp. CMake compiles this file once
// per CPU capability; bootstrap_confusion_cpu.cpp picks one at run time.
#include "metrics/bootstrap_confusion_cpu_kernel.h"

namespace alignops::metrics {
namespace CPU_CAPABILITY {
namespace {

// Blocks of 2^15 items: the uint32 partial sums of uint16 values cannot overflow inside a block (2^31).
constexpr int64_t kBlock = int64_t(1) << 15;

void code_sums(const uint8_t* codes, const uint16_t* w, int64_t N, int64_t num_codes, int32_t* out) {
  for (int64_t k = 0; k < num_codes; ++k) {
    const uint16_t code = static_cast<uint16_t>(k);
    int64_t total = 0;
    for (int64_t b = 0; b < N; b += kBlock) {
      const int64_t e = b + kBlock < N ? b + kBlock : N;
      uint32_t s = 0;
      for (int64_t n = b; n < e; ++n) {
        // A mask, not a ?: -- the compiler keeps a branch for the conditional form (mispredicted on random
        // codes, ~20x slower) but vectorises the and.
        s += static_cast<uint32_t>(w[n] & static_cast<uint16_t>(-static_cast<uint16_t>(codes[n] == code)));
      }
      total += s;
    }
    out[k] = static_cast<int32_t>(total);
  }
}

}  // namespace

const BootstrapConfusionKernels bootstrap_confusion_kernels{code_sums};

}  // namespace CPU_CAPABILITY
}  // namespace alignops::metrics
