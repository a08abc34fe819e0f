// Argument checks and output allocation shared by the CPU and CUDA launchers of preference_loss.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "common/checks.h"
#include "preference/preference_loss_math.h"

namespace alignops::preference {

struct PreferenceInputs {
  at::Tensor pc, pr, rc, rr;        // contiguous, input dtype
  at::Tensor beta, lc, lr;          // contiguous, accumulation dtype; undefined when absent
  at::Tensor loss, chosen_rewards, rejected_rewards, grad;  // outputs
};

inline at::Tensor optional_per_pair(const std::optional<at::Tensor>& t, const at::Tensor& like, at::ScalarType acc,
                                    const char* name) {
  if (!t.has_value()) {
    return at::Tensor();
  }
  check_dim(*t, 1, name, "[B]");
  check_same_shape(*t, like, name, "policy_chosen_logps");
  check_same_device(*t, like, name, "policy_chosen_logps");
  TORCH_CHECK_VALUE(!at::isComplexType(t->scalar_type()) && t->scalar_type() != at::kBool, name,
                    " must be a real numeric tensor, got ", dtype_name(t->scalar_type()));
  return t->to(acc).contiguous();
}

template <typename T>
Params<T> make_params(c10::IntArrayRef loss_types, c10::ArrayRef<double> loss_weights, double beta_value,
                      double label_smoothing, double gamma, double discopop_tau, int64_t f_divergence, double f_alpha) {
  TORCH_CHECK_VALUE(loss_types.size() == loss_weights.size(), "loss_weights must have one weight per loss type: got ",
                    loss_weights.size(), " weights for ", loss_types.size(), " loss types");
  TORCH_CHECK_VALUE(loss_types.size() <= static_cast<size_t>(kMaxLossTerms), "at most ", kMaxLossTerms,
                    " loss types can be combined, got ", loss_types.size());
  TORCH_CHECK_VALUE(f_divergence >= kReverseKl && f_divergence <= kAlphaDivergence,
                    "f_divergence code must be in [0, 3], got ", f_divergence);
  Params<T> p;
  p.beta_value = T(beta_value);
  p.label_smoothing = T(label_smoothing);
  p.gamma = T(gamma);
  p.discopop_tau = T(discopop_tau);
  p.f_alpha = T(f_alpha);
  p.f_divergence = static_cast<int>(f_divergence);
  p.terms.n = static_cast<int>(loss_types.size());
  for (size_t k = 0; k < loss_types.size(); ++k) {
    TORCH_CHECK_VALUE(loss_types[k] >= 0 && loss_types[k] < kNumLossTypes, "loss type code must be in [0, ",
                      static_cast<int>(kNumLossTypes), "), got ", loss_types[k]);
    p.terms.type[k] = static_cast<int>(loss_types[k]);
    p.terms.weight[k] = loss_weights[k];
  }
  return p;
}

inline PreferenceInputs prepare_preference_inputs(const at::Tensor& pc, const at::Tensor& pr, const at::Tensor& rc,
                                                  const at::Tensor& rr, const std::optional<at::Tensor>& beta,
                                                  const std::optional<at::Tensor>& chosen_lengths,
                                                  const std::optional<at::Tensor>& rejected_lengths,
                                                  bool compute_grad) {
  check_dim(pc, 1, "policy_chosen_logps", "[B]");
  check_floating(pc, "policy_chosen_logps");
  const std::pair<const at::Tensor*, const char*> others[] = {
      {&pr, "policy_rejected_logps"}, {&rc, "ref_chosen_logps"}, {&rr, "ref_rejected_logps"}};
  for (const auto& [t, name] : others) {
    check_same_shape(*t, pc, name, "policy_chosen_logps");
    check_same_dtype(*t, pc, name, "policy_chosen_logps");
    check_same_device(*t, pc, name, "policy_chosen_logps");
  }
  const auto acc = acc_type_of(pc);
  PreferenceInputs in;
  in.pc = pc.contiguous();
  in.pr = pr.contiguous();
  in.rc = rc.contiguous();
  in.rr = rr.contiguous();
  in.beta = optional_per_pair(beta, pc, acc, "beta");
  in.lc = optional_per_pair(chosen_lengths, pc, acc, "chosen_lengths");
  in.lr = optional_per_pair(rejected_lengths, pc, acc, "rejected_lengths");
  const auto opts = pc.options().dtype(acc);
  const int64_t B = pc.size(0);
  in.loss = at::empty({B}, opts);
  in.chosen_rewards = at::empty({B}, opts);
  in.rejected_rewards = at::empty({B}, opts);
  in.grad = compute_grad ? at::empty({4, B}, opts) : at::empty({0}, opts);
  return in;
}

}  // namespace alignops::preference
