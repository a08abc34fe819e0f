// Argument checks and output allocation shared by the CPU and CUDA launchers of preference_loss.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "common/checks.h"
#include "preference/preference_checks.h"
#include "preference/preference_loss_math.h"

namespace alignops::preference {

struct PreferenceInputs {
  at::Tensor pc, pr, rc, rr;        // contiguous, input dtype
  at::Tensor beta, lc, lr;          // contiguous, accumulation dtype; undefined when absent
  at::Tensor loss, chosen_rewards, rejected_rewards, grad;  // outputs
};

// Every check of preference_loss, with its arguments (alignops::preference_loss_check: the Triton twin calls it).
// The launchers call it first; the helpers below assume checked arguments.
inline void check_preference_loss_args(const at::Tensor& pc, const at::Tensor& pr, const at::Tensor& rc,
                                       const at::Tensor& rr, const std::optional<at::Tensor>& beta,
                                       const std::optional<at::Tensor>& chosen_lengths,
                                       const std::optional<at::Tensor>& rejected_lengths, c10::IntArrayRef loss_types,
                                       c10::ArrayRef<double> loss_weights, double /*beta_value*/,
                                       double /*label_smoothing*/, double /*gamma*/, double /*discopop_tau*/,
                                       int64_t f_divergence, double /*f_alpha*/, bool /*compute_grad*/) {
  checks::preference_loss<AtenOps>(pc, pr, rc, rr, beta, chosen_lengths, rejected_lengths, loss_types, loss_weights,
                                   f_divergence);
}

inline at::Tensor optional_per_pair(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  if (!t.has_value()) {
    return at::Tensor();
  }
  return t->to(acc).contiguous();
}

template <typename T>
Params<T> make_params(c10::IntArrayRef loss_types, c10::ArrayRef<double> loss_weights, double beta_value,
                      double label_smoothing, double gamma, double discopop_tau, int64_t f_divergence, double f_alpha) {
  Params<T> p;
  p.beta_value = T(beta_value);
  p.label_smoothing = T(label_smoothing);
  p.gamma = T(gamma);
  p.discopop_tau = T(discopop_tau);
  p.f_alpha = T(f_alpha);
  p.f_divergence = static_cast<int>(f_divergence);
  p.terms.n = static_cast<int>(loss_types.size());
  for (size_t k = 0; k < loss_types.size(); ++k) {
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
  const auto acc = acc_type_of(pc);
  PreferenceInputs in;
  in.pc = pc.contiguous();
  in.pr = pr.contiguous();
  in.rc = rc.contiguous();
  in.rr = rr.contiguous();
  in.beta = optional_per_pair(beta, acc);
  in.lc = optional_per_pair(chosen_lengths, acc);
  in.lr = optional_per_pair(rejected_lengths, acc);
  const auto opts = pc.options().dtype(acc);
  const int64_t B = pc.size(0);
  in.loss = at::empty({B}, opts);
  in.chosen_rewards = at::empty({B}, opts);
  in.rejected_rewards = at::empty({B}, opts);
  in.grad = compute_grad ? at::empty({4, B}, opts) : at::empty({0}, opts);
  return in;
}

}  // namespace alignops::preference
