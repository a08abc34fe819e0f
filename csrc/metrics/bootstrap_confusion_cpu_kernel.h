// Inner loop of bootstrap_confusion for few classes, compiled once per CPU capability (see CMakeLists.txt).
#pragma once

#include <cstdint>

namespace alignops::metrics {

struct BootstrapConfusionKernels {
  // out[k] = sum over n < N of w[n] * (codes[n] == k), for k < num_codes.
  void (*code_sums)(const uint8_t* codes, const uint16_t* w, int64_t N, int64_t num_codes, int32_t* out);
};

namespace DEFAULT {
extern const BootstrapConfusionKernels bootstrap_confusion_kernels;
}
#if ALIGNOPS_X86
namespace AVX2 {
extern const BootstrapConfusionKernels bootstrap_confusion_kernels;
}
#endif

}  // namespace alignops::metrics
