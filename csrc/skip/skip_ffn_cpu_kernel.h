// Row kernels of skip_ffn, compiled once per CPU capability (see CMakeLists.txt).
#pragma once

#include <ATen/core/Tensor.h>

namespace alignops::skip {

enum Activation : int64_t { kSwiglu = 0, kGelu = 1, kGeluTanh = 2 };
enum Criterion : int64_t { kCosine = 0, kNormRatio = 1 };

struct SkipFfnKernels {
  // out[r] = RMSNorm(x[index[r]]) for r < K (HF LlamaRMSNorm rounding); a copy when weight is undefined.
  // rstd[r] is written when rstd is defined.
  void (*gather_rms_norm)(const at::Tensor& x, const int64_t* index, int64_t K, const at::Tensor& weight, double eps,
                          at::Tensor& out, at::Tensor& rstd);
  // act [K, I] = activation(pre [K, G]) computed in fp32 and rounded once.
  void (*activate)(const at::Tensor& pre, int64_t activation, at::Tensor& act);
  // h = residual + delta (rounded to the dtype) and, per row, the change criterion of h against residual:
  // kCosine 1 - cos(h, residual), kNormRatio |h - residual| / |residual| (fp32; fp64 for fp64).
  void (*add_score)(const at::Tensor& residual, const at::Tensor& delta, int64_t criterion, at::Tensor& h,
                    at::Tensor& score);
};

namespace DEFAULT {
extern const SkipFfnKernels skip_ffn_kernels;
}
#if ALIGNOPS_X86
namespace AVX2 {
extern const SkipFfnKernels skip_ffn_kernels;
}
#endif

}  // namespace alignops::skip
