// CPU launcher of alignops::selective_logprobs(_backward): checks, allocation, capability choice.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/cpu_capability.h"
#include "common/registration.h"
#include "common/value_checks.h"
#include "preference/preference_schemas.h"
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
  check_target_values(targets, logits.size(1), ignore_index);  // the kernel reads logits[n, targets[n]]
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
  check_target_values(targets, logits.size(1), ignore_index);
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

// The schemas of this file's ops, defined here and nowhere else.
TORCH_LIBRARY_FRAGMENT(alignops, m) {
  // ---- preference: log p(target) per row of a logits matrix, without materialising log_softmax -----
  // The schemas are shared with the stable-ABI library (preference_schemas.h).
  def_checked(m, schemas::kSelectiveLogprobs);
  def_checked(m, schemas::kSelectiveLogprobsBackward);
  // The targets' range, ignore_index or [0, vocab), for selective_logprobs and fused_linear_logprobs: it reads them
  // (on any device, one host sync); their CPU launchers call the same function (csrc/common/value_checks.h).
  m.def("check_target_values(Tensor targets, int vocab, int ignore_index) -> ()");
}

TORCH_LIBRARY_IMPL(alignops, CompositeImplicitAutograd, m) {
  m.impl("selective_logprobs_check", &selective_logprobs_check);
  m.impl("selective_logprobs_backward_check", &selective_logprobs_backward_check);
  m.impl("check_target_values", &check_target_values);
}

TORCH_LIBRARY_IMPL(alignops, CPU, m) {
  m.impl("selective_logprobs", &selective_logprobs_cpu);
  m.impl("selective_logprobs_backward", &selective_logprobs_backward_cpu);
}

}  // namespace alignops::preference
