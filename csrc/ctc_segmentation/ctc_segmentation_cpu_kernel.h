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

// The lpz columns the fill reads, rounded to fp32 and time-major (column of token v at cols + slot[v] * T),
// built once per problem by the launcher; cols == nullptr makes the fill gather them from lpz's rows.
struct Emissions {
  const float* cols;
  const int64_t* slot;
};

// What the fill carries from one column to the next: the package's cur_offset [S] and the argmax row of
// the last column filled (the next offset re-centres on it). offset_sum is offsets[c - 1].
struct FillState {
  int64_t* cur_offset;
  int64_t last_arg_max;
};

struct CtcSegmentationKernels {
  // Fills columns c_begin .. c_end - 1 of the package's [W, C] table exactly as its cython_fill_table does
  // (fp32 arithmetic on lpz rounded to fp32), column c at columns[c] (W contiguous floats; columns
  // c - S .. c - 1 must hold their values), and offsets [C]. c_begin == 0 starts the fill (st is then
  // initialised); a later c_begin resumes from the state and offsets an earlier call left. Rows below r0
  // are taken as already filled (a grown window with offsets 0: a cell depends on rows <= its own only).
  // row_end [c_end - c_begin] (or nullptr) makes it a replay of columns filled before: offsets are read,
  // not computed, column c gets rows < row_end[c - c_begin] only, and the argmax state is not kept.
  void (*fill_f32)(const Problem<float>& p, int64_t W, float* const* columns, int64_t c_begin, int64_t c_end,
                   int64_t r0, const int64_t* row_end, FillState& st, int64_t* offsets, const Emissions& em);
  void (*fill_f64)(const Problem<double>& p, int64_t W, float* const* columns, int64_t c_begin, int64_t c_end,
                   int64_t r0, const int64_t* row_end, FillState& st, int64_t* offsets, const Emissions& em);
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
