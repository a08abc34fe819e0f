// The row kernels of selective_logprobs, compiled once per CPU capability (see CMakeLists.txt).
#pragma once

#include <ATen/core/Tensor.h>

namespace alignops::preference {

struct SelectiveLogprobsKernels {
  void (*forward)(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index, double temperature,
                  at::Tensor& logp, at::Tensor& lse);
  void (*backward)(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                   int64_t ignore_index, double temperature, at::Tensor& grad_logits);
};

namespace DEFAULT {
extern const SelectiveLogprobsKernels selective_logprobs_kernels;
}
#if ALIGNOPS_X86
namespace AVX2 {
extern const SelectiveLogprobsKernels selective_logprobs_kernels;
}
#endif

}  // namespace alignops::preference
