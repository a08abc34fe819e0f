// Argument checks shared by every op. Each raises a Python ValueError (TORCH_CHECK_VALUE) whose message
// names the argument and what was expected, so bad input never reaches a kernel.
//
// Sizes are read as SymInts (sym_size, sym_sizes): an op's checks are also registered as the op
// `<op>_check` (csrc/registration.cpp), which the Triton twin and torch.compile's tracing call on fake tensors
// whose sizes may be symbolic. On real tensors a SymInt is a plain integer; on symbolic ones a comparison
// becomes a guard. A check never reads tensor data and never names a device type, so it holds for every backend.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <string_view>

namespace alignops {

// "torch.float32", as Python prints a dtype (c10 alone would say "Float").
inline std::string dtype_name(at::ScalarType s) { return "torch." + std::string(c10::getDtypeNames(s).first); }

inline void check_dim(const at::Tensor& t, int64_t dim, std::string_view name, std::string_view shape) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be a ", dim, "-D tensor of shape ", shape, ", got shape ",
                    t.sym_sizes());
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& like, std::string_view name,
                             std::string_view like_name) {
  TORCH_CHECK_VALUE(t.sym_sizes() == like.sym_sizes(), name, " must have the shape of ", like_name, " ",
                    like.sym_sizes(), ", got ", t.sym_sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& like, std::string_view name,
                              std::string_view like_name) {
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on the device of ", like_name, " (", like.device(),
                    "), got ", t.device());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& like, std::string_view name,
                             std::string_view like_name) {
  TORCH_CHECK_VALUE(t.scalar_type() == like.scalar_type(), name, " must have the dtype of ", like_name, " (",
                    dtype_name(like.scalar_type()), "), got ", dtype_name(t.scalar_type()));
}

inline void check_floating(const at::Tensor& t, std::string_view name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, name,
                    " must be float32, float64, float16 or bfloat16, got ", dtype_name(s));
}

inline void check_integer(const at::Tensor& t, std::string_view name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name, " must be int64 or int32, got ",
                    dtype_name(t.scalar_type()));
}

inline void check_device(const at::Tensor& t, c10::DeviceType type, std::string_view name) {
  TORCH_CHECK_VALUE(t.device().type() == type, name, " must be a ", c10::DeviceTypeName(type, true), " tensor, got ",
                    t.device());
}

// fp32 accumulation for every floating input, fp64 kept as fp64.
inline at::ScalarType acc_type_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// An LM head's inputs, the checks of every fused-linear op (fused_linear_logprobs, fused_linear_distillation) and,
// through the op alignops::check_lm_head, of the Python-defined ones (adpa): hidden [N, H] floating, weight [V, H]
// and bias [V] of hidden's dtype and device. The names are the caller's argument names.
inline void check_lm_head(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          std::string_view h, std::string_view w, std::string_view b) {
  check_dim(hidden, 2, h, "[N, H]");
  check_floating(hidden, h);
  check_dim(weight, 2, w, "[V, H]");
  TORCH_CHECK_VALUE(weight.sym_size(1) == hidden.sym_size(1), w,
                    " must have shape [V, H] with H = ", hidden.sym_size(1), " (", h, "'s last dimension), got ",
                    weight.sym_sizes());
  check_same_dtype(weight, hidden, w, h);
  check_same_device(weight, hidden, w, h);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->sym_size(0) == weight.sym_size(0), b, " must have shape [V] = [",
                      weight.sym_size(0), "], got ", bias->sym_sizes());
    check_same_dtype(*bias, hidden, b, h);
    check_same_device(*bias, hidden, b, h);
  }
}

// The at::Tensor operations of the checks shared with the stable-ABI library (csrc/preference/preference_checks.h):
// sizes as SymInts, errors as ValueError, as the checks above.
struct AtenOps {
  static int64_t dim(const at::Tensor& t) { return t.dim(); }
  static c10::SymInt size(const at::Tensor& t, int64_t d) { return t.sym_size(d); }
  static at::ScalarType dtype(const at::Tensor& t) { return t.scalar_type(); }
  static c10::SymIntArrayRef sizes(const at::Tensor& t) { return t.sym_sizes(); }
  static bool same_shape(const at::Tensor& a, const at::Tensor& b) { return a.sym_sizes() == b.sym_sizes(); }
  static bool same_device(const at::Tensor& a, const at::Tensor& b) { return a.device() == b.device(); }
  static c10::Device device(const at::Tensor& t) { return t.device(); }
  template <typename... Args>
  static void fail(const Args&... args) {
    TORCH_CHECK_VALUE(false, args...);
  }
};

}  // namespace alignops
