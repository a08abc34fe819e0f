// The row kernel of alignops::policy_loss, compiled once per CPU capability (see CMakeLists.txt);
// policy_loss_cpu.cpp checks the arguments, allocates and picks one.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace alignops::policy {

struct PolicyLossParams {
  int64_t loss_type, level;
  double eps_low, eps_high;
  std::optional<double> delta;
  double beta;
  bool bias_kl;
  std::optional<double> opm_threshold;
  double sapo_pos, sapo_neg, k_pos, lam_pos, k_neg, lam_neg;
};

// Inputs contiguous and checked; grad [B, T] (or undefined: no gradient), row_stats [B, kNumRowStats].
struct PolicyLossKernels {
  void (*rows)(const at::Tensor& lp, const at::Tensor& mask, const at::Tensor& adv,
               const std::optional<at::Tensor>& old, const std::optional<at::Tensor>& ref,
               const std::optional<at::Tensor>& isr, const std::optional<at::Tensor>& samp,
               const std::optional<at::Tensor>& ent, at::Tensor& grad, at::Tensor& row_stats,
               const PolicyLossParams& params);
};

namespace DEFAULT {
extern const PolicyLossKernels policy_loss_kernels;
}
#if ALIGNOPS_X86
namespace AVX2 {
extern const PolicyLossKernels policy_loss_kernels;
}
#endif

}  // namespace alignops::policy
