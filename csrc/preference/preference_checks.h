// The argument checks of preference_loss and selective_logprobs (forward and backward), written once for the two
// libraries that register these ops: alignops._C (at::Tensor; sizes read as SymInts so that the checks also run on
// fake tensors; ValueError) and the LibTorch stable-ABI library of csrc/stable/ (torch::stable::Tensor; header-only
// torch, so no ATen here; RuntimeError). Each library instantiates them with its `Ops`, a struct of static
// functions over its tensor type:
//   dim(t), size(t, d), dtype(t), sizes(t) (streams as "[a, b]"), same_shape(a, b), same_device(a, b),
//   device(t) (streams), fail(args...) (throws the library's error with the streamed message; never returns).
// The messages are those of csrc/common/checks.h (check_dim, check_floating, check_same_* ...).
#pragma once

#include <torch/headeronly/core/ScalarType.h>

#include <cmath>
#include <cstddef>
#include <optional>
#include <string>

#include "preference/preference_loss_math.h"

namespace alignops::preference::checks {

// "torch.float32", as Python prints a dtype.
inline std::string dtype_name(c10::ScalarType s) {
  switch (s) {
    case c10::ScalarType::Float:
      return "torch.float32";
    case c10::ScalarType::Double:
      return "torch.float64";
    case c10::ScalarType::Half:
      return "torch.float16";
    case c10::ScalarType::BFloat16:
      return "torch.bfloat16";
    case c10::ScalarType::Long:
      return "torch.int64";
    case c10::ScalarType::Int:
      return "torch.int32";
    case c10::ScalarType::Bool:
      return "torch.bool";
    default:
      return std::string("torch.") + torch::headeronly::toString(s);
  }
}

inline bool is_floating(c10::ScalarType s) {
  return s == c10::ScalarType::Float || s == c10::ScalarType::Double || s == c10::ScalarType::Half ||
         s == c10::ScalarType::BFloat16;
}

inline c10::ScalarType acc_type(c10::ScalarType s) {
  return s == c10::ScalarType::Double ? c10::ScalarType::Double : c10::ScalarType::Float;
}

template <typename Ops, typename Tensor>
void dim(const Tensor& t, int64_t d, const char* name, const char* shape) {
  if (Ops::dim(t) != d) {
    Ops::fail(name, " must be a ", d, "-D tensor of shape ", shape, ", got shape ", Ops::sizes(t));
  }
}

template <typename Ops, typename Tensor>
void floating(const Tensor& t, const char* name) {
  if (!is_floating(Ops::dtype(t))) {
    Ops::fail(name, " must be float32, float64, float16 or bfloat16, got ", dtype_name(Ops::dtype(t)));
  }
}

template <typename Ops, typename Tensor>
void same_device(const Tensor& t, const Tensor& like, const char* name, const char* like_name) {
  if (!Ops::same_device(t, like)) {
    Ops::fail(name, " must be on the device of ", like_name, " (", Ops::device(like), "), got ", Ops::device(t));
  }
}

template <typename Ops, typename Tensor>
void same_shape(const Tensor& t, const Tensor& like, const char* name, const char* like_name) {
  if (!Ops::same_shape(t, like)) {
    Ops::fail(name, " must have the shape of ", like_name, " ", Ops::sizes(like), ", got ", Ops::sizes(t));
  }
}

// pc, pr, rc, rr: [B] of one floating dtype and device; beta / chosen_lengths / rejected_lengths: [B] of any real
// dtype; one weight per loss type, at most kMaxLossTerms terms, every code known. Codes lists: anything with size()
// and operator[] (c10::IntArrayRef, HeaderOnlyArrayRef).
template <typename Ops, typename Tensor, typename Codes, typename Weights>
void preference_loss(const Tensor& pc, const Tensor& pr, const Tensor& rc, const Tensor& rr,
                     const std::optional<Tensor>& beta, const std::optional<Tensor>& chosen_lengths,
                     const std::optional<Tensor>& rejected_lengths, const Codes& loss_types,
                     const Weights& loss_weights, int64_t f_divergence) {
  dim<Ops>(pc, 1, "policy_chosen_logps", "[B]");
  floating<Ops>(pc, "policy_chosen_logps");
  const std::pair<const Tensor*, const char*> others[] = {
      {&pr, "policy_rejected_logps"}, {&rc, "ref_chosen_logps"}, {&rr, "ref_rejected_logps"}};
  for (const auto& [t, name] : others) {
    same_shape<Ops>(*t, pc, name, "policy_chosen_logps");
    if (Ops::dtype(*t) != Ops::dtype(pc)) {
      Ops::fail(name, " must have the dtype of policy_chosen_logps (", dtype_name(Ops::dtype(pc)), "), got ",
                dtype_name(Ops::dtype(*t)));
    }
    same_device<Ops>(*t, pc, name, "policy_chosen_logps");
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
      dim<Ops>(**t, 1, name, "[B]");
      same_shape<Ops>(**t, pc, name, "policy_chosen_logps");
      same_device<Ops>(**t, pc, name, "policy_chosen_logps");
      const auto s = Ops::dtype(**t);
      if (s == c10::ScalarType::Bool || s == c10::ScalarType::ComplexHalf || s == c10::ScalarType::ComplexFloat ||
          s == c10::ScalarType::ComplexDouble) {
        Ops::fail(name, " must be a real numeric tensor, got ", dtype_name(s));
      }
    }
  }
}

// logits [N, V] floating, targets [N] int64 / int32 on its device, temperature finite and > 0.
template <typename Ops, typename Tensor>
void selective_logprobs(const Tensor& logits, const Tensor& targets, double temperature) {
  dim<Ops>(logits, 2, "logits", "[N, V]");
  floating<Ops>(logits, "logits");
  dim<Ops>(targets, 1, "targets", "[N]");
  const auto ts = Ops::dtype(targets);
  if (ts != c10::ScalarType::Long && ts != c10::ScalarType::Int) {
    Ops::fail("targets must be int64 or int32, got ", dtype_name(ts));
  }
  same_device<Ops>(targets, logits, "targets", "logits");
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
  const auto acc = acc_type(Ops::dtype(logits));
  const std::pair<const Tensor*, const char*> stats[] = {{&grad, "grad_logp"}, {&lse, "lse"}};
  for (const auto& [t, name] : stats) {
    dim<Ops>(*t, 1, name, "[N]");
    same_shape<Ops>(*t, targets, name, "targets");
    same_device<Ops>(*t, logits, name, "logits");
    if (Ops::dtype(*t) != acc) {
      Ops::fail(name, " must be ", dtype_name(acc), " for ", dtype_name(Ops::dtype(logits)), " logits, got ",
                dtype_name(Ops::dtype(*t)));
    }
  }
}

}  // namespace alignops::preference::checks
