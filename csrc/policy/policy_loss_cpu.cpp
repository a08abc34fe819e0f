// CPU launcher of alignops::policy_loss: memory-safety checks, allocation, the capability's row kernel
// (policy_loss_cpu_kernel.cpp), and the row losses' sum.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/cpu_capability.h"
#include "policy/policy_codes.h"
#include "policy/policy_loss_cpu_kernel.h"

namespace alignops::policy {
namespace {

const PolicyLossKernels& kernels() {
#if ALIGNOPS_X86
  return pick_cpu_kernels(DEFAULT::policy_loss_kernels, &AVX2::policy_loss_kernels);
#else
  return DEFAULT::policy_loss_kernels;
#endif
}

void check_policy_inputs(const at::Tensor& lp, const at::Tensor& adv, const at::Tensor& mask,
                         const std::optional<at::Tensor>& old, const std::optional<at::Tensor>& ref,
                         const std::optional<at::Tensor>& isr, const std::optional<at::Tensor>& samp,
                         const std::optional<at::Tensor>& ent, int64_t loss_type, int64_t level, double beta) {
  // Memory safety only: the public alignops.policy_loss checks values and gives the user-facing messages.
  check_dim(lp, 2, "per_token_logps", "[B, T]");
  check_floating(lp, "per_token_logps");
  const auto acc = acc_type_of(lp);
  const auto B = lp.sym_size(0), T = lp.sym_size(1);
  auto row_or_token = [&](const at::Tensor& t, const char* name) {
    check_same_device(t, lp, name, "per_token_logps");
    TORCH_CHECK_VALUE(t.scalar_type() == acc, name, " must be ", dtype_name(acc), ", got ",
                      dtype_name(t.scalar_type()));
    const bool ok = (t.dim() == 1 && t.sym_size(0) == B) ||
                    (t.dim() == 2 && t.sym_size(0) == B && (t.sym_size(1) == 1 || t.sym_size(1) == T));
    TORCH_CHECK_VALUE(ok, name, " must have shape [B], [B, 1] or [B, T] = [", B, ", ", T, "], got ", t.sym_sizes());
  };
  auto full = [&](const at::Tensor& t, const char* name) {
    check_same_device(t, lp, name, "per_token_logps");
    check_same_shape(t, lp, name, "per_token_logps");
    TORCH_CHECK_VALUE(t.scalar_type() == acc, name, " must be ", dtype_name(acc), ", got ",
                      dtype_name(t.scalar_type()));
  };
  row_or_token(adv, "advantages");
  check_same_device(mask, lp, "completion_mask", "per_token_logps");
  check_same_shape(mask, lp, "completion_mask", "per_token_logps");
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool || mask.scalar_type() == acc, "completion_mask must be bool or ",
                    dtype_name(acc), ", got ", dtype_name(mask.scalar_type()));
  if (old) full(*old, "old_per_token_logps");
  if (ref) full(*ref, "ref_per_token_logps");
  if (samp) full(*samp, "sampling_per_token_logps");
  if (ent) full(*ent, "entropy_mask");
  if (isr) row_or_token(*isr, "importance_sampling_ratio");
  TORCH_CHECK_VALUE(beta == 0.0 || ref.has_value(), "ref_per_token_logps is required when beta != 0");
  TORCH_CHECK_VALUE(loss_type >= 0 && loss_type < kNumPolicyLossTypes, "loss_type must be a PolicyLossType code, got ",
                    loss_type);
  TORCH_CHECK_VALUE(level == kToken || level == kSequence, "importance_sampling_level must be 0 or 1, got ", level);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_loss_cpu(
    const at::Tensor& per_token_logps, const at::Tensor& advantages, const at::Tensor& completion_mask,
    const std::optional<at::Tensor>& old_per_token_logps, const std::optional<at::Tensor>& ref_per_token_logps,
    const std::optional<at::Tensor>& importance_sampling_ratio,
    const std::optional<at::Tensor>& sampling_per_token_logps, const std::optional<at::Tensor>& entropy_mask,
    int64_t loss_type, int64_t importance_sampling_level, double epsilon_low, double epsilon_high,
    std::optional<double> delta, double beta, bool use_bias_correction_kl,
    std::optional<double> off_policy_mask_threshold, double sapo_temperature_pos, double sapo_temperature_neg,
    double vespo_k_pos, double vespo_lambda_pos, double vespo_k_neg, double vespo_lambda_neg, bool compute_grad) {
  check_policy_inputs(per_token_logps, advantages, completion_mask, old_per_token_logps, ref_per_token_logps,
                      importance_sampling_ratio, sampling_per_token_logps, entropy_mask, loss_type,
                      importance_sampling_level, beta);
  check_device(per_token_logps, c10::DeviceType::CPU, "per_token_logps");
  auto contig = [](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    if (!t.has_value()) return std::nullopt;
    return t->contiguous();
  };
  const auto lp = per_token_logps.contiguous();
  const auto adv = advantages.contiguous();
  const auto mask = completion_mask.contiguous();
  const auto old = contig(old_per_token_logps);
  const auto ref = contig(ref_per_token_logps);
  const auto isr = contig(importance_sampling_ratio);
  const auto samp = contig(sampling_per_token_logps);
  const auto ent = contig(entropy_mask);
  const int64_t B = lp.size(0), T = lp.size(1);
  const auto acc = acc_type_of(lp);
  auto row_stats = at::zeros({B, kNumRowStats}, lp.options().dtype(acc));
  auto grad = compute_grad ? at::empty({B, T}, lp.options()) : at::empty({0}, lp.options());
  at::Tensor grad_arg = compute_grad ? grad : at::Tensor();
  const PolicyLossParams P{loss_type,
                           importance_sampling_level,
                           epsilon_low,
                           epsilon_high,
                           delta,
                           beta,
                           use_bias_correction_kl,
                           off_policy_mask_threshold,
                           sapo_temperature_pos,
                           sapo_temperature_neg,
                           vespo_k_pos,
                           vespo_lambda_pos,
                           vespo_k_neg,
                           vespo_lambda_neg};
  if (B > 0) kernels().rows(lp, mask, adv, old, ref, isr, samp, ent, grad_arg, row_stats, P);
  // The row losses are summed in fp64 in row order: deterministic whatever the thread count.
  const auto stats64 = row_stats.select(1, kRowLoss).to(at::kDouble).contiguous();
  double total = 0;
  const double* s = stats64.const_data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) total += s[b];
  auto loss_sum = at::scalar_tensor(total, lp.options().dtype(acc));
  return {loss_sum, grad, row_stats};
}

// The op's checks with its arguments (alignops::policy_loss_check, which the Triton twin calls).
void policy_loss_check(const at::Tensor& per_token_logps, const at::Tensor& advantages,
                       const at::Tensor& completion_mask, const std::optional<at::Tensor>& old_per_token_logps,
                       const std::optional<at::Tensor>& ref_per_token_logps,
                       const std::optional<at::Tensor>& importance_sampling_ratio,
                       const std::optional<at::Tensor>& sampling_per_token_logps,
                       const std::optional<at::Tensor>& entropy_mask, int64_t loss_type,
                       int64_t importance_sampling_level, double, double, std::optional<double>, double beta, bool,
                       std::optional<double>, double, double, double, double, double, double, bool) {
  check_policy_inputs(per_token_logps, advantages, completion_mask, old_per_token_logps, ref_per_token_logps,
                      importance_sampling_ratio, sampling_per_token_logps, entropy_mask, loss_type,
                      importance_sampling_level, beta);
}

}  // namespace

TORCH_LIBRARY_IMPL(alignops, CPU, m) { m.impl("policy_loss", &policy_loss_cpu); }

TORCH_LIBRARY_IMPL(alignops, CompositeImplicitAutograd, m) { m.impl("policy_loss_check", &policy_loss_check); }

}  // namespace alignops::policy
