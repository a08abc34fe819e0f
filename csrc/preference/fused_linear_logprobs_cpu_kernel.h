// Tile epilogues of fused_linear_logprobs, compiled once per CPU capability (see CMakeLists.txt).
#pragma once

#include <ATen/core/Tensor.h>

namespace alignops::preference {

// The logit transform z = softcap * tanh(logit_scale * u / softcap) / T (no tanh when softcap <= 0)
// applied to a GEMM output u (bias already added).
struct LogitTransform {
  double logit_scale, softcap, inv_temperature;
};

struct FusedLinearKernels {
  // Online logsumexp over the columns [v0, v0 + tile.size(1)) of every row: updates the running max m,
  // sum s = sum exp(z - m), target logit zt (when the target falls in the tile) and, when ez is defined,
  // ez = sum exp(z - m) z (for the entropy). All state is in the tile's dtype (fp32 or fp64).
  void (*forward_tile)(const at::Tensor& tile, int64_t v0, const at::Tensor& targets, const LogitTransform& f,
                       at::Tensor& m, at::Tensor& s, at::Tensor& zt, at::Tensor& ez);
  // In place: tile (u) becomes dz = g dz/du (1[v = y] - exp(z - lse)). When grad_entropy (ge) and entropy (H)
  // are defined, the entropy's gradient is added: dH/dz_v = -p_v (z_v - lse + H), so
  // dz = dz/du (g 1[v = y] - p_v (g + ge (z_v - lse + H))).
  void (*backward_tile)(at::Tensor& tile, int64_t v0, const at::Tensor& targets, const at::Tensor& grad,
                        const at::Tensor& lse, const at::Tensor& grad_entropy, const at::Tensor& entropy,
                        const LogitTransform& f);
};

namespace DEFAULT {
extern const FusedLinearKernels fused_linear_kernels;
}
#if ALIGNOPS_X86
namespace AVX2 {
extern const FusedLinearKernels fused_linear_kernels;
}
#endif

}  // namespace alignops::preference
