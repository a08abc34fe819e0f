// The argument checks of preference_loss and selective_logprobs (forward and backward), written once for the two
// libraries that register these ops: alignops._C (AtenOps, csrc/common/checks.h) and the LibTorch stable-ABI
// library of csrc/stable/ (StableOps). Built on the generic checks of csrc/common/checks_portable.h, whose `Ops`
// they take; header-only torch, so no ATen here.
#pragma once

#include <torch/headeronly/core/ScalarType.h>

#include <cmath>
#include <cstddef>
#include <optional>
#include <utility>

#include "common/checks_portable.h"
#include "preference/preference_loss_math.h"

namespace alignops::preference::checks {

// pc, pr, rc, rr: [B] of one floating dtype and device; beta / chosen_lengths / rejected_lengths: [B] of any real
// dtype; one weight per loss type, at most kMaxLossTerms terms, every code known. Codes lists: anything with size()
// and operator[] (c10::IntArrayRef, HeaderOnlyArrayRef).
template <typename Ops, typename Tensor, typename Codes, typename Weights>
void preference_loss(const Tensor& pc, const Tensor& pr, const Tensor& rc, const Tensor& rr,
                     const std::optional<Tensor>& beta, const std::optional<Tensor>& chosen_lengths,
                     const std::optional<Tensor>& rejected_lengths, const Codes& loss_types,
                     const Weights& loss_weights, int64_t f_divergence) {
  portable::dim<Ops>(pc, 1, "policy_chosen_logps", "[B]");
  portable::floating<Ops>(pc, "policy_chosen_logps");
  const std::pair<const Tensor*, const char*> others[] = {
      {&pr, "policy_rejected_logps"}, {&rc, "ref_chosen_logps"}, {&rr, "ref_rejected_logps"}};
  for (const auto& [t, name] : others) {
    portable::same_shape<Ops>(*t, pc, name, "policy_chosen_logps");
    portable::same_dtype<Ops>(*t, pc, name, "policy_chosen_logps");
    portable::same_device<Ops>(*t, pc, name, "policy_chosen_logps");
  }
  if (loss_types.size() != loss_weights.size()) {
    Ops::fail("loss_weights must have one weight per loss type: got ", loss_weights.size(), " weights for ",
              loss_types.size(), " loss types");
  }
  if (loss_types.size() > static_cast<size_t>(kMaxLossTerms)) {
    Ops::fail("at most ", kMaxLossTerms, " loss types can be combined, got ", loss_types.size());
  }
  for (size_t k = 0; k < loss_types.size(); ++k) {
    if (loss_types[k] < 0 || loss_types[k] >= kNumLossTypes) {
      Ops::fail("loss type code must be in [0, ", static_cast<int>(kNumLossTypes), "), got ", loss_types[k]);
    }
  }
  if (f_divergence < kReverseKl || f_divergence > kAlphaDivergence) {
    Ops::fail("f_divergence code must be in [0, 3], got ", f_divergence);
  }
  const std::pair<const std::optional<Tensor>*, const char*> optional[] = {
      {&beta, "beta"}, {&chosen_lengths, "chosen_lengths"}, {&rejected_lengths, "rejected_lengths"}};
  for (const auto& [t, name] : optional) {
    if (t->has_value()) {
      portable::dim<Ops>(**t, 1, name, "[B]");
      portable::same_shape<Ops>(**t, pc, name, "policy_chosen_logps");
      portable::same_device<Ops>(**t, pc, name, "policy_chosen_logps");
      const auto s = Ops::dtype(**t);
      if (s == c10::ScalarType::Bool || s == c10::ScalarType::ComplexHalf || s == c10::ScalarType::ComplexFloat ||
          s == c10::ScalarType::ComplexDouble) {
        Ops::fail(name, " must be a real numeric tensor, got ", Ops::dtype_name(s));
      }
    }
  }
}

// logits [N, V] floating, targets [N] int64 / int32 on its device, temperature finite and > 0.
template <typename Ops, typename Tensor>
void selective_logprobs(const Tensor& logits, const Tensor& targets, double temperature) {
  portable::dim<Ops>(logits, 2, "logits", "[N, V]");
  portable::floating<Ops>(logits, "logits");
  portable::dim<Ops>(targets, 1, "targets", "[N]");
  portable::integer<Ops>(targets, "targets");
  portable::same_device<Ops>(targets, logits, "targets", "logits");
  if (Ops::size(targets, 0) != Ops::size(logits, 0)) {
    Ops::fail("targets must have one entry per row of logits [N=", Ops::size(logits, 0), "], got ",
              Ops::size(targets, 0));
  }
  if (!(temperature > 0.0 && std::isfinite(temperature))) {
    Ops::fail("temperature must be a finite value > 0, got ", temperature);
  }
}

// As selective_logprobs, plus grad_logp and lse: [N] in the accumulation dtype of logits, on its device.
template <typename Ops, typename Tensor>
void selective_logprobs_backward(const Tensor& grad, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                                 double temperature) {
  selective_logprobs<Ops>(logits, targets, temperature);
  const auto acc = portable::acc_type(Ops::dtype(logits));
  const std::pair<const Tensor*, const char*> stats[] = {{&grad, "grad_logp"}, {&lse, "lse"}};
  for (const auto& [t, name] : stats) {
    portable::dim<Ops>(*t, 1, name, "[N]");
    portable::same_shape<Ops>(*t, targets, name, "targets");
    portable::same_device<Ops>(*t, logits, name, "logits");
    if (Ops::dtype(*t) != acc) {
      Ops::fail(name, " must be ", Ops::dtype_name(acc), " for ", Ops::dtype_name(Ops::dtype(logits)), " logits, got ",
                Ops::dtype_name(Ops::dtype(*t)));
    }
  }
}

}  // namespace alignops::preference::checks
