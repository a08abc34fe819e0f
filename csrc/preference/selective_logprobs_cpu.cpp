// CPU launcher of alignops::selective_logprobs(_backward): checks, allocation, capability choice.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/cpu_capability.h"
#include "preference/selective_logprobs_common.h"
#include "preference/selective_logprobs_cpu_kernel.h"

namespace alignops::preference {
namespace {

const SelectiveLogprobsKernels& kernels() {
#if ALIGNOPS_X86
  return pick_cpu_kernels(DEFAULT::selective_logprobs_kernels, &AVX2::selective_logprobs_kernels);
#else
  return DEFAULT::selective_logprobs_kernels;
#endif
}

std::tuple<at::Tensor, at::Tensor> selective_logprobs_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                                          int64_t ignore_index, double temperature) {
  check_selective_logprobs_args(logits, targets, temperature);
  check_device(logits, c10::DeviceType::CPU, "logits");
  const auto x = logits.contiguous();
  const auto y = targets.contiguous();
  const auto opts = logits.options().dtype(acc_type_of(logits));
  auto logp = at::empty({logits.size(0)}, opts);
  auto lse = at::empty({logits.size(0)}, opts);
  kernels().forward(x, y, ignore_index, temperature, logp, lse);
  return {logp, lse};
}

at::Tensor selective_logprobs_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& targets,
                                           const at::Tensor& lse, int64_t ignore_index, double temperature) {
  check_selective_logprobs_backward_args(grad, logits, targets, lse, temperature);
  check_device(logits, c10::DeviceType::CPU, "logits");
  const auto x = logits.contiguous();
  auto grad_logits = at::empty_like(x);
  kernels().backward(grad.contiguous(), x, targets.contiguous(), lse.contiguous(), ignore_index, temperature,
                     grad_logits);
  return grad_logits;
}

// The checks with the ops' arguments: alignops::selective_logprobs_check and selective_logprobs_backward_check.
void selective_logprobs_check(const at::Tensor& logits, const at::Tensor& targets, int64_t /*ignore_index*/,
                              double temperature) {
  check_selective_logprobs_args(logits, targets, temperature);
}

void selective_logprobs_backward_check(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& targets,
                                       const at::Tensor& lse, int64_t /*ignore_index*/, double temperature) {
  check_selective_logprobs_backward_args(grad, logits, targets, lse, temperature);
}

}  // namespace

TORCH_LIBRARY_IMPL(alignops, CompositeImplicitAutograd, m) {
  m.impl("selective_logprobs_check", &selective_logprobs_check);
  m.impl("selective_logprobs_backward_check", &selective_logprobs_backward_check);
}

TORCH_LIBRARY_IMPL(alignops, CPU, m) {
  m.impl("selective_logprobs", &selective_logprobs_cpu);
  m.impl("selective_logprobs_backward", &selective_logprobs_backward_cpu);
}

}  // namespace alignops::preference
