// Trellis fill of alignops::ctc_segmentation (CPU), bit-identical to the ctc-segmentation package's
// cython_fill_table: same fp32 operations in the same order, same window re-centring (including its
// cur_offset recurrence for multi-symbol spans). Two changes that do not alter a single value: the table
// is column-major (the package walks a [W, C] row-major table down a column, one cache miss per cell),
// and each column is computed in passes: vectorisable passes for the switch and emission terms, which
// depend on the previous column only, then the sequential max-plus scan down the column (stay_scan).
// CMake compiles this file once per CPU capability; ctc_segmentation_cpu.cpp picks one at run time.
#include <algorithm>
#include <limits>
#include <vector>

#include "ctc_segmentation/ctc_segmentation_cpu_kernel.h"

namespace alignops::ctc_segmentation {
namespace CPU_CAPABILITY {
namespace {

// Cython's (and Python's) max(a, b): b only when b > a.
inline float cmax(float a, float b) { return b > a ? b : a; }

// The stay scan x[t] = max(sw[t], x[t-1] + e[t]) split so that its critical path is one fp32 add per row
// instead of an add and a max. fp32 rounding is monotone, so fl(max(a, b) + e) = max(fl(a + e), fl(b + e))
// and, from a block start x0, x[t] = max(u[t], z[t]) exactly, where z[t] = (..(x0 + e[b]) + ..) + e[t] is
// the all-stay path from x0 and u[t] = max(sw[t], u[t-1] + e[t]) (u[b-1] = -inf) the best path entering
// the block by a switch. The u chains of different blocks are independent: the CPU overlaps them.
constexpr int64_t kBlock = 16;

// The package's running argmax: the first row holding the maximum (strict <), NaN never occurring.
int64_t first_argmax(const float* x, int64_t n) {
  float m = x[0];
  for (int64_t t = 1; t < n; ++t) m = std::max(m, x[t]);
  int64_t i = 0;
  while (x[i] < m) ++i;
  return i;
}

// The first argmax over rows 0..W-1 from a = the first argmax over rows 1..W-1 (W when empty).
inline int64_t with_row0(const float* col, int64_t a, int64_t W) { return a == W || col[0] >= col[a] ? 0 : a; }

// Fills col[t0..W) and returns the first argmax over rows t0..W-1 (the package's, for columns whose loop
// starts at t0 = 1; callers whose loop includes row 0 use with_row0).
int64_t stay_scan(const float* sw, const float* e, float* u, float* col, int64_t t0, int64_t W, float x) {
  for (int64_t b = t0; b < W; b += kBlock) {
    const int64_t end = std::min(W, b + kBlock);
    float acc = -std::numeric_limits<float>::infinity();
    for (int64_t t = b; t < end; ++t) {
      acc = cmax(sw[t], acc + e[t]);
      u[t] = acc;
    }
  }
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t t = t0; t < W; t += kBlock) {
    const int64_t end = std::min(W, t + kBlock);
    float z = x;
    for (int64_t j = t; j < end; ++j) {
      z = z + e[j];
      col[j] = cmax(u[j], z);
      m = std::max(m, col[j]);
    }
    x = col[end - 1];
  }
  int64_t i = t0;
  while (i < W && col[i] < m) ++i;
  return i;
}

// x with x[t] = fp32(lpz[first + t, tok]) for t in [t0, W): the stored column, or buf filled from lpz.
template <typename scalar_t>
const float* emissions(const Problem<scalar_t>& p, const Emissions& em, int64_t tok, int64_t first, int64_t t0,
                       int64_t W, float* buf) {
  if (em.cols != nullptr) return em.cols + em.slot[tok] * p.T + first;
  const scalar_t* rows = p.lpz + first * p.V + tok;
  for (int64_t t = t0; t < W; ++t) buf[t] = static_cast<float>(rows[t * p.V]);
  return buf;
}

template <typename scalar_t>
void fill(const Problem<scalar_t>& p, int64_t W, float* const* columns, int64_t c_begin, int64_t c_end, int64_t r0,
          const int64_t* row_end, FillState& st, int64_t* offsets, const Emissions& em) {
  const int64_t T = p.T, C = p.C, S = p.S;
  std::vector<float> scratch(6 * W);
  float* sw = scratch.data();  // best switch into (t, c)
  float* emit = sw + W;        // the stay transition's weight e[t]
  float* sym = sw + 2 * W;
  float* u = sw + 3 * W;
  float* buf = sw + 4 * W;
  float* buf2 = sw + 5 * W;
  // The package's mean offset goes through a C float before truncation.
  const float mean_offset = static_cast<float>(static_cast<double>(T - W) / static_cast<double>(C));
  const int64_t higher_offset = static_cast<int64_t>(mean_offset) + 1;
  int64_t* cur_offset = st.cur_offset;
  int64_t& last_arg_max = st.last_arg_max;
  int64_t offset_sum = c_begin == 0 ? 0 : offsets[c_begin - 1];
  if (c_begin == 0) {
    std::fill(cur_offset, cur_offset + S, -1);
    last_arg_max = -1;
    if (r0 == 0) columns[0][0] = 0.0f;
  }
  for (int64_t c = c_begin; c < c_end; ++c) {
    if (c > 0) {
      // A replay (row_end given) re-runs columns whose offsets are known.
      const int64_t offset = row_end != nullptr ? offsets[c] - offset_sum
                                                : std::min(std::max<int64_t>(0, last_arg_max - W / 2),
                                                           std::min(higher_offset, (T - W) - offset_sum));
      // The package's recurrence, kept as is: entry s + 1 reads the entry s it has just updated.
      for (int64_t s = 0; s + 1 < S; ++s) cur_offset[s + 1] = cur_offset[s] + offset;
      cur_offset[0] = offset;
      offset_sum += offset;
    }
    offsets[c] = offset_sum;
    const int64_t* g = p.gt + c * S;
    bool has_zero = false;
    for (int64_t s = 0; s < S; ++s) has_zero = has_zero || g[s] == 0;
    const bool stay_zero = (p.flags & kBlankTransitionCostZero) && has_zero;
    const bool preamble = (p.flags & kPreambleTransitionCostZero) && c == 0;
    const int64_t t0 = c == 0 ? 1 : 0;
    const int64_t first = std::max(t0, r0);  // rows below r0 hold their values already
    // A replay computes rows up to row_end only (rows depend on rows above them, never below).
    const int64_t R = row_end != nullptr ? std::min(W, row_end[c - c_begin]) : W;
    if (R <= first) continue;
    float* col = columns[c];
    const float* bl = emissions(p, em, p.blank, offset_sum, first, R, buf);
    if (S == 1 && c > 0 && g[0] != -1 && !stay_zero) {
      // One fused pass for single-symbol positions (token lists): the switch and the stay weight.
      const float* emis = emissions(p, em, g[0], offset_sum, first, R, buf2);
      const float* prev = columns[c - 1] + cur_offset[0] - 1;
      const int64_t lo = std::max<int64_t>(first, 1 - cur_offset[0]);
      const int64_t hi = std::min(R, W + 1 - cur_offset[0]);
      for (int64_t t = first; t < R; ++t) {
        const float e = emis[t];
        emit[t] = cmax(bl[t], cmax(kFillFloor, e));
        sw[t] = kFillFloor;
      }
      for (int64_t t = lo; t < hi; ++t) sw[t] = cmax(kFillFloor, prev[t] + emis[t]);
      if (first == 0) {
        col[0] = cmax(sw[0], kFillFloor);  // no stay into row 0
        last_arg_max = with_row0(col, stay_scan(sw, emit, u, col, 1, R, col[0]), R);
      } else {
        stay_scan(sw, emit, u, col, first, R, col[first - 1]);
        if (row_end == nullptr) last_arg_max = first_argmax(col, W);
      }
      continue;
    }
    std::fill(sw, sw + W, kFillFloor);
    std::fill(sym, sym + W, kFillFloor);
    for (int64_t s = 0; s < S; ++s) {
      const int64_t tok = g[s];
      if (tok == -1) continue;
      const float* emis = emissions(p, em, tok, offset_sum, first, R, buf2);
      for (int64_t t = first; t < R; ++t) sym[t] = cmax(sym[t], emis[t]);
      if (c == 0) continue;
      const float* prev = columns[c - (s + 1)] + cur_offset[s] - 1;
      // Rows t whose predecessor t - 1 + cur_offset[s] lies inside the window.
      const int64_t lo = std::max(first, 1 - cur_offset[s]);
      const int64_t hi = std::min(R, W + 1 - cur_offset[s]);
      for (int64_t t = lo; t < hi; ++t) sw[t] = cmax(sw[t], prev[t] + emis[t]);
    }
    if (preamble) {
      for (int64_t t = first; t < R; ++t) col[t] = cmax(sw[t], 0.0f);
    } else {
      if (stay_zero) {
        std::fill(emit, emit + W, 0.0f);  // x + 0 is x: the free stay
      } else {
        for (int64_t t = first; t < R; ++t) emit[t] = cmax(bl[t], sym[t]);
      }
      if (first == 0) {  // no stay into row 0
        col[0] = cmax(sw[0], kFillFloor);
        last_arg_max = with_row0(col, stay_scan(sw, emit, u, col, 1, R, col[0]), R);
        continue;
      }
      // The scan starts from the row above (table[0, 0] = 0 for column 0).
      last_arg_max = stay_scan(sw, emit, u, col, first, R, col[first - 1]);
      if (first == t0) continue;
    }
    if (row_end == nullptr) last_arg_max = first_argmax(col + t0, W - t0) + t0;
  }
}

}  // namespace

const CtcSegmentationKernels ctc_segmentation_kernels = {&fill<float>, &fill<double>};

}  // namespace CPU_CAPABILITY
}  // namespace alignops::ctc_segmentation
