// oneDNN-prepacked FFN weights for alignops::skip_ffn on the CPU (inference).
//
// Why: a BF16 GEMM through at::mm reorders the [2I, H] and [H, I] weights into oneDNN's blocked layout on
// every call. At the small row counts that skipping leaves (65 of 650 rows at 90% skipped) that reorder is
// a fixed cost comparable to the GEMM itself, so t(s) / t(0) could not fall with the kept fraction.
// Weights registered once with skip_ffn_prepack keep a packed copy here; skip_ffn multiplies with it.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace alignops::skip {

// The packed copy of w when w was registered (nullopt otherwise); repacked first when w's storage, offset
// or version changed since.
std::optional<at::Tensor> prepacked(const at::Tensor& w);

// x @ w^T + bias with w's packed copy; with `other`, other + x @ w^T + bias in one rounding.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias);
at::Tensor packed_linear_add(const at::Tensor& x, const at::Tensor& other, const at::Tensor& packed,
                             const std::optional<at::Tensor>& bias);

}  // namespace alignops::skip
