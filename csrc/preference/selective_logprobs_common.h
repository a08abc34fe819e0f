// Argument checks shared by the CPU and CUDA launchers of selective_logprobs.
#pragma once

#include "common/checks.h"

namespace alignops::preference {

inline void check_selective_logprobs_args(const at::Tensor& logits, const at::Tensor& targets, double temperature) {
  check_dim(logits, 2, "logits", "[N, V]");
  check_floating(logits, "logits");
  check_dim(targets, 1, "targets", "[N]");
  check_integer(targets, "targets");
  check_same_device(targets, logits, "targets", "logits");
  TORCH_CHECK_VALUE(targets.sym_size(0) == logits.sym_size(0),
                    "targets must have one entry per row of logits [N=", logits.sym_size(0), "], got ",
                    targets.sym_size(0));
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature), "temperature must be a finite value > 0, got ",
                    temperature);
}

inline void check_selective_logprobs_backward_args(const at::Tensor& grad, const at::Tensor& logits,
                                                   const at::Tensor& targets, const at::Tensor& lse,
                                                   double temperature) {
  check_selective_logprobs_args(logits, targets, temperature);
  const auto acc = acc_type_of(logits);
  for (const auto& [t, name] : {std::pair{&grad, "grad_logp"}, std::pair{&lse, "lse"}}) {
    check_dim(*t, 1, name, "[N]");
    check_same_shape(*t, targets, name, "targets");
    check_same_device(*t, logits, name, "logits");
    TORCH_CHECK_VALUE(t->scalar_type() == acc, name, " must be ", dtype_name(acc), " for ",
                      dtype_name(logits.scalar_type()), " logits, got ", dtype_name(t->scalar_type()));
  }
}

}  // namespace alignops::preference
