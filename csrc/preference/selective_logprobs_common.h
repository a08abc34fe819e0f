// Argument checks shared by the CPU and CUDA launchers of selective_logprobs: those of
// csrc/preference/preference_checks.h, which the stable-ABI library shares, on at::Tensor.
#pragma once

#include "common/checks.h"
#include "preference/preference_checks.h"

namespace alignops::preference {

inline void check_selective_logprobs_args(const at::Tensor& logits, const at::Tensor& targets, double temperature) {
  checks::selective_logprobs<AtenOps>(logits, targets, temperature);
}

inline void check_selective_logprobs_backward_args(const at::Tensor& grad, const at::Tensor& logits,
                                                   const at::Tensor& targets, const at::Tensor& lse,
                                                   double temperature) {
  checks::selective_logprobs_backward<AtenOps>(grad, logits, targets, lse, temperature);
}

}  // namespace alignops::preference
