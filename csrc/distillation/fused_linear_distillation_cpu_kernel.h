// Row-block epilogue of fused_linear_distillation, compiled once per CPU capability (see CMakeLists.txt).
#pragma once

#include <ATen/core/Tensor.h>

namespace alignops::distillation {

enum class Mode { ForwardKL, ReverseKL, JSD, TV, SkewKL, SkewReverseKL };

// z = softcap tanh(scale u / softcap) / T (scale u / T when softcap <= 0).
struct Transform {
  double scale, softcap, inv_t;
};

struct DistillationKernels {
  // zs, zt: [R, V] GEMM outputs (bias added) of the student and the teacher for R kept rows; w: [R] row weights.
  // Writes per row the divergence d[r] and the student's entropy ent[r]. When `grad`, zs becomes
  // dz_s/du_s = w dz/du (ps (G - sum_v ps G)) (ForwardKL: w dz/du (ps - pt)) in place, the closed-form gradient of
  // w d w.r.t. the student's GEMM output; zt is scratch. Nothing else of size V is allocated.
  void (*block)(at::Tensor& zs, at::Tensor& zt, const at::Tensor& w, const Transform& fs, const Transform& ft,
                Mode mode, double coef, bool grad, at::Tensor& d, at::Tensor& ent);
};

namespace DEFAULT {
extern const DistillationKernels distillation_kernels;
}
#if ALIGNOPS_X86
namespace AVX2 {
extern const DistillationKernels distillation_kernels;
}
#endif

}  // namespace alignops::distillation
