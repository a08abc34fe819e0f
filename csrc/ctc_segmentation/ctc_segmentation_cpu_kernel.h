// Trellis fill of alignops::ctc_segmentation, compiled once per CPU capability (see CMakeLists.txt).
#pragma once

#include <cstdint>

namespace alignops::ctc_segmentation {

// Constants of the ctc-segmentation package: the fill's floor ("prob_max") and the backtrace's floor /
// initial table value ("max_prob"). Both are exact in fp32.
constexpr float kFillFloor = -1000000000.0f;
constexpr float kTableFloor = -10000000000.0f;

// flags bits, as CtcSegmentationParameters.flags builds them.
constexpr int64_t kBlankTransitionCostZero = 1;
constexpr int64_t kPreambleTransitionCostZero = 2;

// One problem: lpz [T, V] row-major, ground truth [C, S] (-1 = no symbol) row-major.
template <typename scalar_t>
struct Problem {
  const scalar_t* lpz;
  int64_t T, V;
  const int64_t* gt;
  int64_t C, S;
  int64_t blank;
  int64_t flags;
};

struct CtcSegmentationKernels {
  // Fills table [C][W] (column-major: column c is contiguous) and offsets [C] exactly as the package's
  // cython_fill_table fills its [W, C] table (fp32 arithmetic, lpz rounded to fp32), and returns the
  // first argmax row of the last column. scratch holds 3 * W floats.
  int64_t (*fill_f32)(const Problem<float>& p, int64_t W, float* table, int64_t* offsets, float* scratch);
  int64_t (*fill_f64)(const Problem<double>& p, int64_t W, float* table, int64_t* offsets, float* scratch);
};

namespace DEFAULT {
extern const CtcSegmentationKernels ctc_segmentation_kernels;
}
#if ALIGNOPS_X86
namespace AVX2 {
extern const CtcSegmentationKernels ctc_segmentation_kernels;
}
#endif

}  // namespace alignops::ctc_segmentation
