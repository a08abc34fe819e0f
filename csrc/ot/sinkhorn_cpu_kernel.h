// The kernels of the ot family (sinkhorn, sinkhorn_normalize_pass), compiled once per CPU capability.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace alignops::ot {

struct OtKernels {
  // Batched log-domain Sinkhorn; see the schema comment in csrc/registration.cpp. f, g are zeroed by the caller.
  void (*sinkhorn)(const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b, const at::Tensor& n_sizes,
                   const at::Tensor& m_sizes, const std::vector<double>& eps_schedule, double eps, int64_t n_iters,
                   double tol, bool scores, at::Tensor& f, at::Tensor& g, at::Tensor& iters, at::Tensor& err);
  // The same on the costs |x_i - y_j|_2^p computed on the fly: x [B, N, d], yt [B, d, M] (y transposed).
  void (*sinkhorn_points)(const at::Tensor& x, const at::Tensor& yt, const at::Tensor& a, const at::Tensor& b,
                          const at::Tensor& n_sizes, const at::Tensor& m_sizes, double p,
                          const std::vector<double>& eps_schedule, double eps, int64_t n_iters, double tol,
                          at::Tensor& f, at::Tensor& g, at::Tensor& iters, at::Tensor& err);
  // One pass of the log-domain UCoFiA normalisation over sim [L, N, M].
  void (*normalize_pass)(const at::Tensor& sim, const at::Tensor& col_bias, double scale, bool row_update,
                         at::Tensor& row_bias, at::Tensor& col_lse);
};

namespace DEFAULT {
extern const OtKernels ot_kernels;
}
#if ALIGNOPS_X86
namespace AVX2 {
extern const OtKernels ot_kernels;
}
#endif

}  // namespace alignops::ot
