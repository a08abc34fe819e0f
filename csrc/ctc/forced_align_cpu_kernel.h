// The per-utterance Viterbi of alignops::forced_align, compiled once per CPU capability (see CMakeLists.txt).
#pragma once

#include <ATen/core/Tensor.h>

namespace alignops::ctc {

struct ForcedAlignKernels {
  // targets / lengths are int64 and already validated; star_scores is undefined when no star state is used.
  void (*align)(const at::Tensor& log_probs, const at::Tensor& targets, const at::Tensor& input_lengths,
                const at::Tensor& target_lengths, int64_t blank, const at::Tensor& star_scores, int64_t star_id,
                int64_t checkpoint, at::Tensor& paths, at::Tensor& scores, at::Tensor& feasible);
};

namespace DEFAULT {
extern const ForcedAlignKernels forced_align_kernels;
}
#if ALIGNOPS_X86
namespace AVX2 {
extern const ForcedAlignKernels forced_align_kernels;
}
#endif

}  // namespace alignops::ctc
