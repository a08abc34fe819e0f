// CPU launcher of alignops::preference_loss: checks, allocation, choice of the vectorised pair loop.
#include <torch/library.h>

#include "common/cpu_capability.h"
#include "common/registration.h"
#include "preference/preference_loss_cpu_kernel.h"
#include "preference/preference_schemas.h"

namespace alignops::preference {
namespace {

const PreferenceLossKernels& kernels() {
#if ALIGNOPS_X86
  return pick_cpu_kernels(DEFAULT::preference_loss_kernels, &AVX2::preference_loss_kernels);
#else
  return DEFAULT::preference_loss_kernels;
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> preference_loss_cpu(
    const at::Tensor& pc, const at::Tensor& pr, const at::Tensor& rc, const at::Tensor& rr,
    const std::optional<at::Tensor>& beta, const std::optional<at::Tensor>& chosen_lengths,
    const std::optional<at::Tensor>& rejected_lengths, c10::IntArrayRef loss_types, c10::ArrayRef<double> loss_weights,
    double beta_value, double label_smoothing, double gamma, double discopop_tau, int64_t f_divergence, double f_alpha,
    bool compute_grad) {
  check_preference_loss_args(pc, pr, rc, rr, beta, chosen_lengths, rejected_lengths, loss_types, loss_weights,
                             beta_value, label_smoothing, gamma, discopop_tau, f_divergence, f_alpha, compute_grad);
  check_device(pc, c10::DeviceType::CPU, "policy_chosen_logps");
  auto in = prepare_preference_inputs(pc, pr, rc, rr, beta, chosen_lengths, rejected_lengths, compute_grad);
  const auto params = make_params<double>(loss_types, loss_weights, beta_value, label_smoothing, gamma, discopop_tau,
                                          f_divergence, f_alpha);
  kernels().forward(in, params, compute_grad);
  return {in.loss, in.chosen_rewards, in.rejected_rewards, in.grad};
}

}  // namespace

// The schemas of this file's ops, defined here and nowhere else.
TORCH_LIBRARY_FRAGMENT(alignops, m) {
  // ---- preference: closed-form DPO-family losses on per-sequence log-probs -------------------------
  // The schema is shared with the stable-ABI library (preference_schemas.h).
  def_checked(m, schemas::kPreferenceLoss);
}

TORCH_LIBRARY_IMPL(alignops, CPU, m) { m.impl("preference_loss", &preference_loss_cpu); }

TORCH_LIBRARY_IMPL(alignops, CompositeImplicitAutograd, m) {
  m.impl("preference_loss_check", &check_preference_loss_args);
}

}  // namespace alignops::preference
