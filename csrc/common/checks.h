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

#include "common/checks_portable.h"

#include <optional>
#include <string>
#include <string_view>

namespace alignops {

// "torch.float32", as Python prints a dtype (c10 alone would say "Float").
inline std::string dtype_name(at::ScalarType s) { return "torch." + std::string(c10::getDtypeNames(s).first); }

// The at::Tensor operations of the generic checks (checks_portable.h): sizes as SymInts, errors as ValueError.
struct AtenOps {
  static int64_t dim(const at::Tensor& t) { return t.dim(); }
  static c10::SymInt size(const at::Tensor& t, int64_t d) { return t.sym_size(d); }
  static at::ScalarType dtype(const at::Tensor& t) { return t.scalar_type(); }
  static std::string dtype_name(at::ScalarType s) { return alignops::dtype_name(s); }
  static c10::SymIntArrayRef sizes(const at::Tensor& t) { return t.sym_sizes(); }
  static bool same_shape(const at::Tensor& a, const at::Tensor& b) { return a.sym_sizes() == b.sym_sizes(); }
  static bool same_device(const at::Tensor& a, const at::Tensor& b) { return a.device() == b.device(); }
  static c10::Device device(const at::Tensor& t) { return t.device(); }
  template <typename... Args>
  static void fail(const Args&... args) {
    TORCH_CHECK_VALUE(false, args...);
  }
};

inline void check_dim(const at::Tensor& t, int64_t dim, std::string_view name, std::string_view shape) {
  portable::dim<AtenOps>(t, dim, name, shape);
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& like, std::string_view name,
                             std::string_view like_name) {
  portable::same_shape<AtenOps>(t, like, name, like_name);
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& like, std::string_view name,
                              std::string_view like_name) {
  portable::same_device<AtenOps>(t, like, name, like_name);
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& like, std::string_view name,
                             std::string_view like_name) {
  portable::same_dtype<AtenOps>(t, like, name, like_name);
}

inline void check_floating(const at::Tensor& t, std::string_view name) { portable::floating<AtenOps>(t, name); }

inline void check_integer(const at::Tensor& t, std::string_view name) { portable::integer<AtenOps>(t, name); }

inline void check_device(const at::Tensor& t, c10::DeviceType type, std::string_view name) {
  TORCH_CHECK_VALUE(t.device().type() == type, name, " must be a ", c10::DeviceTypeName(type, true), " tensor, got ",
                    t.device());
}

inline at::ScalarType acc_type_of(const at::Tensor& t) { return portable::acc_type(t.scalar_type()); }

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

}  // namespace alignops
