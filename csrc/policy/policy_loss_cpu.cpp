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
#include "common/registration.h"
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

// The schemas of this file's ops, defined here and nowhere else.
TORCH_LIBRARY_FRAGMENT(alignops, m) {
  // ---- policy: the GRPO-family policy-gradient loss of TRL's GRPOTrainer._compute_loss ------------
  // per_token_logps [B, T] float (bf16/fp16/fp32/fp64); every other float tensor in the accumulation
  // dtype acc (fp64 for fp64 input, else fp32): advantages [B], [B, 1] or [B, T]; old / ref / sampling
  // log-probs [B, T] (old None = per_token_logps detached, sampling None = old); importance_sampling_ratio
  // [B], [B, 1] or [B, T]; entropy_mask [B, T]; completion_mask [B, T] bool or acc. loss_type and
  // importance_sampling_level are alignops._codes.PolicyLossType / ImportanceSamplingLevel; epsilon_high,
  // like TRL's, is already resolved (= epsilon_low when unset); delta None = no two-sided clip;
  // off_policy_mask_threshold None = no off-policy sequence mask; beta 0 = no KL term (ref unused).
  // Returns (loss_sum, grad, row_stats):
  //   loss_sum  0-dim acc: sum_b rs_b sum_t m_bt ptl_bt, ptl the per-token loss of TRL, rs_b = 1/max(M_b, 1)
  //             for grpo / sapo, else 1 (the global normaliser of the loss type is applied by the caller);
  //   grad      [B, T] in the dtype of per_token_logps: d loss_sum / d per_token_logps (empty [0] when
  //             compute_grad is false); row b's loss depends only on row b, so d row_stats[b, 7] / d lp_b
  //             is grad[b] too;
  //   row_stats [B, 8] acc, per row b (M_b = sum_t m_bt; "a token sum" is sum_t m_bt x_bt when TRL's tensor x
  //             is [B, T], its one value x_b when x is [B, 1], i.e. sequence level with advantages [B]/[B, 1]):
  //     0 M_b;  1 clip low  (coef_1 < 1 - eps_low  and A < 0), token sum;
  //     2 clip high (coef_1 > 1 + eps_high and A > 0; cispo: coef_1 > eps_high and A > 0), token sum;
  //     3 clip region (1 or 2), token sum;  4 sum_t m_bt kl_bt (k3 KL, times coef_1 when bias-corrected;
  //     0 when beta = 0);  5 coef_1 (after the delta clamp), token sum of coef_1's own shape ([B, 1] at
  //     sequence level whatever A's shape);  6 vespo's phi (0 for other loss types): phi_b when A is [B] /
  //     [B, 1] (at either level: TRL's gamma weights are a row value), its masked sum when A is [B, T];
  //     7 the row's loss rs_b sum_t m_bt ptl_bt.  Clip columns are 0 for sapo / vespo (and 1, 3 for cispo).
  def_checked(
      m,
      "policy_loss(Tensor per_token_logps, Tensor advantages, Tensor completion_mask, Tensor? old_per_token_logps, "
      "Tensor? ref_per_token_logps, Tensor? importance_sampling_ratio, Tensor? sampling_per_token_logps, "
      "Tensor? entropy_mask, int loss_type, int importance_sampling_level, float epsilon_low, float epsilon_high, "
      "float? delta, float beta, bool use_bias_correction_kl, float? off_policy_mask_threshold, "
      "float sapo_temperature_pos, float sapo_temperature_neg, float vespo_k_pos, float vespo_lambda_pos, "
      "float vespo_k_neg, float vespo_lambda_neg, bool compute_grad) -> (Tensor loss_sum, Tensor grad, "
      "Tensor row_stats)");
}

TORCH_LIBRARY_IMPL(alignops, CPU, m) { m.impl("policy_loss", &policy_loss_cpu); }

TORCH_LIBRARY_IMPL(alignops, CompositeImplicitAutograd, m) { m.impl("policy_loss_check", &policy_loss_check); }

}  // namespace alignops::policy
