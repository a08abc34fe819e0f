// The generic argument checks (rank, dtype, shape, device), written once for the two libraries that check tensors:
// alignops._C (csrc/common/checks.h instantiates them with AtenOps: SymInt sizes, ValueError) and the LibTorch
// stable-ABI library of csrc/stable/ (StableOps: torch::stable::Tensor, RuntimeError). Header-only torch, so no
// ATen here. `Ops` is a struct of static functions over the library's tensor type:
//   dim(t), size(t, d), dtype(t), dtype_name(scalar_type) ("torch.float32"), sizes(t) (streams as "[a, b]"),
//   same_shape(a, b), same_device(a, b), device(t) (streams), fail(args...) (throws the library's error with the
//   streamed message; never returns).
#pragma once

#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>
#include <string_view>

namespace alignops::portable {

inline bool is_floating(c10::ScalarType s) {
  return s == c10::ScalarType::Float || s == c10::ScalarType::Double || s == c10::ScalarType::Half ||
         s == c10::ScalarType::BFloat16;
}

// fp32 accumulation for every floating input, fp64 kept as fp64.
inline c10::ScalarType acc_type(c10::ScalarType s) {
  return s == c10::ScalarType::Double ? c10::ScalarType::Double : c10::ScalarType::Float;
}

template <typename Ops, typename Tensor>
void dim(const Tensor& t, int64_t d, std::string_view name, std::string_view shape) {
  if (Ops::dim(t) != d) {
    Ops::fail(name, " must be a ", d, "-D tensor of shape ", shape, ", got shape ", Ops::sizes(t));
  }
}

template <typename Ops, typename Tensor>
void floating(const Tensor& t, std::string_view name) {
  if (!is_floating(Ops::dtype(t))) {
    Ops::fail(name, " must be float32, float64, float16 or bfloat16, got ", Ops::dtype_name(Ops::dtype(t)));
  }
}

template <typename Ops, typename Tensor>
void integer(const Tensor& t, std::string_view name) {
  const auto s = Ops::dtype(t);
  if (s != c10::ScalarType::Long && s != c10::ScalarType::Int) {
    Ops::fail(name, " must be int64 or int32, got ", Ops::dtype_name(s));
  }
}

template <typename Ops, typename Tensor>
void same_shape(const Tensor& t, const Tensor& like, std::string_view name, std::string_view like_name) {
  if (!Ops::same_shape(t, like)) {
    Ops::fail(name, " must have the shape of ", like_name, " ", Ops::sizes(like), ", got ", Ops::sizes(t));
  }
}

template <typename Ops, typename Tensor>
void same_dtype(const Tensor& t, const Tensor& like, std::string_view name, std::string_view like_name) {
  if (Ops::dtype(t) != Ops::dtype(like)) {
    Ops::fail(name, " must have the dtype of ", like_name, " (", Ops::dtype_name(Ops::dtype(like)), "), got ",
              Ops::dtype_name(Ops::dtype(t)));
  }
}

template <typename Ops, typename Tensor>
void same_device(const Tensor& t, const Tensor& like, std::string_view name, std::string_view like_name) {
  if (!Ops::same_device(t, like)) {
    Ops::fail(name, " must be on the device of ", like_name, " (", Ops::device(like), "), got ", Ops::device(t));
  }
}

}  // namespace alignops::portable
