// The per-utterance CTC forward-backward of ctc_posteriors, compiled once per CPU capability (see CMakeLists.txt).
#pragma once

#include <ATen/core/Tensor.h>

namespace alignops::ctc {

// log_probs [B, T, C] contiguous (any float dtype), targets [B, L] int64 contiguous, lengths [B] int64, all
// validated by the launcher. loss [B] is written for every utterance; states [B, T, 2L+1], tokens [B, T, L]
// and grad [B, T, C] are written where defined, and must come in zero-filled (only reachable cells are written).
struct CtcPosteriorsKernels {
  void (*run)(const at::Tensor& log_probs, const at::Tensor& targets, const at::Tensor& input_lengths,
              const at::Tensor& target_lengths, int64_t blank, at::Tensor& loss, at::Tensor& states, at::Tensor& tokens,
              at::Tensor& grad);
};

namespace DEFAULT {
extern const CtcPosteriorsKernels ctc_posteriors_kernels;
}
#if ALIGNOPS_X86
namespace AVX2 {
extern const CtcPosteriorsKernels ctc_posteriors_kernels;
}
#endif

}  // namespace alignops::ctc
