// CPU launcher of alignops::ctc_segmentation, ctc_segmentation_prefixes and
// ctc_segmentation_utterance_score: the ctc-segmentation package's algorithm (trellis fill with window
// re-centring, value-matching backtrace, window doubling on failure, min-mean utterance score), one
// problem per thread of at::parallel_for. The backtrace reproduces the package's Python code statement
// by statement, including Python's negative-index wrap-around and its IndexError (here a failed
// attempt), so segments and scores match the package on every input it accepts.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

#include "common/checks.h"
#include "common/cpu_capability.h"
#include "common/registration.h"
#include "ctc_segmentation/ctc_segmentation_cpu_kernel.h"

namespace alignops::ctc_segmentation {
namespace {

constexpr int64_t kStay = -1;      // states: a stay (self) transition, the package's "ε"
constexpr int64_t kNotOnPath = -2;  // states: a frame the path never visits, the package's ""

const CtcSegmentationKernels& kernels() {
#if ALIGNOPS_X86
  return pick_cpu_kernels(DEFAULT::ctc_segmentation_kernels, &AVX2::ctc_segmentation_kernels);
#else
  return DEFAULT::ctc_segmentation_kernels;
#endif
}

void fill(const Problem<float>& p, int64_t W, float* const* columns, int64_t c0, int64_t c1, int64_t r0,
          const int64_t* row_end, FillState& st, int64_t* offsets, const Emissions& em) {
  kernels().fill_f32(p, W, columns, c0, c1, r0, row_end, st, offsets, em);
}
void fill(const Problem<double>& p, int64_t W, float* const* columns, int64_t c0, int64_t c1, int64_t r0,
          const int64_t* row_end, FillState& st, int64_t* offsets, const Emissions& em) {
  kernels().fill_f64(p, W, columns, c0, c1, r0, row_end, st, offsets, em);
}

// lpz columns of the tokens the ground truth uses (and blank), rounded to fp32 and stored time-major,
// so a trellis column reads its emissions contiguously: gathering them from the [T, V] rows costs a
// cache line per cell and dominated the fill. Past a memory budget (the table's size, or 64 MiB) the
// fill gathers from the rows instead.
template <typename scalar_t>
class EmissionStore {
 public:
  explicit EmissionStore(const Problem<scalar_t>& p) : slot_(p.V, -1) {
    int64_t n = 0;
    slot_[p.blank] = n++;
    for (int64_t i = 0; i < p.C * p.S; ++i) {
      if (p.gt[i] >= 0 && slot_[p.gt[i]] == -1) slot_[p.gt[i]] = n++;
    }
    if (n * p.T > std::max<int64_t>(p.C * std::min<int64_t>(p.T, 8000), int64_t{1} << 24)) return;
    cols_.resize(n * p.T);
    for (int64_t t = 0; t < p.T; ++t) {
      const scalar_t* row = p.lpz + t * p.V;
      for (int64_t v = 0; v < p.V; ++v) {
        if (slot_[v] >= 0) cols_[slot_[v] * p.T + t] = static_cast<float>(row[v]);
      }
    }
  }
  Emissions view() const { return {cols_.empty() ? nullptr : cols_.data(), slot_.data()}; }

 private:
  std::vector<int64_t> slot_;
  std::vector<float> cols_;
};

// The package's [W, C] table, column-major, whole (block == 0) or checkpointed: the forward fill keeps
// only the S columns before every block of `block` columns and the fill state there; the backtrace, which
// walks the columns downwards, gets each block refilled once from its checkpoint. Same values,
// (block + S * C / block) * W floats instead of C * W. The refill stops each column at the rows the walk
// can still reach: its frame (offsets[c] + t) drops by exactly one per step when S == 1, so column c
// needs rows <= frame - offsets[c] only, about half the window; a read past that refills the block whole.
template <typename scalar_t>
class Trellis {
 public:
  Trellis(const Problem<scalar_t>& p, int64_t W, int64_t block, const Emissions& em)
      : p_(p), W_(W), K_(block == 0 ? p.C : std::max(block, p.S)), em_(em), offsets_(p.C), ptrs_(p.C), cur_(p.S) {
    nb_ = (p.C + K_ - 1) / K_;
    store_.reset(new float[W * (nb_ == 1 ? p.C : K_)]);
    if (nb_ > 1) {
      ck_.reset(new float[nb_ * p.S * W]);
      snap_cur_.resize(nb_ * p.S);
      snap_arg_.resize(nb_);
      row_end_.assign(K_, W);
    }
  }

  // A whole table in caller-owned memory: column c at table + c * stride, rows below r0 already filled
  // (fill_all then fills rows r0 .. W - 1 only).
  Trellis(const Problem<scalar_t>& p, int64_t W, float* table, int64_t stride, int64_t r0, const Emissions& em)
      : p_(p), W_(W), K_(p.C), nb_(1), r0_(r0), em_(em), offsets_(p.C), ptrs_(p.C), cur_(p.S) {
    for (int64_t c = 0; c < p.C; ++c) ptrs_[c] = table + c * stride;
  }

  // Fills every column; returns numpy's argmax of the last column.
  int64_t fill_all() {
    FillState st{cur_.data(), -1};
    for (int64_t k = 0; k < nb_; ++k) {
      if (k > 0) {
        std::copy(cur_.begin(), cur_.end(), snap_cur_.begin() + k * p_.S);
        snap_arg_[k] = st.last_arg_max;
      }
      if (store_) point_block(k);
      fill(p_, W_, ptrs_.data(), k * K_, end(k), r0_, nullptr, st, offsets_.data(), em_);
      if (k + 1 < nb_) {  // the S columns the next block's switches read
        for (int64_t c = std::max<int64_t>(0, end(k) - p_.S); c < end(k); ++c) {
          std::copy(ptrs_[c], ptrs_[c] + W_, ck_.get() + ((k + 1) * p_.S + c - (end(k) - p_.S)) * W_);
        }
      }
    }
    block_ = nb_ - 1;
    return st.last_arg_max;
  }

  // The walk's current frame, offsets[c] + t: bounds the rows a refill must compute.
  void set_frame(int64_t frame) { frame_ = frame; }

  // table[r, c] (r in [0, W)); refills c's block when the walk has left the resident one or reads a
  // row the refill left out.
  float at(int64_t c, int64_t r) {
    if (nb_ > 1) {
      const bool checkpoint = c < block_ * K_ && c >= block_ * K_ - p_.S;
      if (c / K_ != block_ && !checkpoint) {
        refill(c / K_, p_.S == 1);
      } else if (!checkpoint && r >= row_end_[c - block_ * K_]) {
        refill(block_, false);
      }
    }
    return ptrs_[c][r];
  }

  const int64_t* offsets() const { return offsets_.data(); }

 private:
  int64_t end(int64_t k) const { return std::min(p_.C, (k + 1) * K_); }

  void refill(int64_t k, bool truncate) {
    std::vector<int64_t> cur(snap_cur_.begin() + k * p_.S, snap_cur_.begin() + (k + 1) * p_.S);
    FillState st{cur.data(), snap_arg_[k]};
    for (int64_t c = k * K_; c < end(k); ++c) {
      row_end_[c - k * K_] = truncate ? std::clamp<int64_t>(frame_ - offsets_[c] + 1, 0, W_) : W_;
    }
    point_block(k);
    fill(p_, W_, ptrs_.data(), k * K_, end(k), 0, row_end_.data(), st, offsets_.data(), em_);
    block_ = k;
  }

  void point_block(int64_t k) {
    for (int64_t c = k * K_; c < end(k); ++c) ptrs_[c] = store_.get() + (c - k * K_) * W_;
    for (int64_t c = std::max<int64_t>(0, k * K_ - p_.S); c < k * K_; ++c) {
      ptrs_[c] = ck_.get() + (k * p_.S + c - (k * K_ - p_.S)) * W_;
    }
  }

  const Problem<scalar_t>& p_;
  int64_t W_, K_, nb_, r0_ = 0, block_ = 0, frame_ = 0;
  Emissions em_;
  std::vector<int64_t> offsets_;
  std::vector<float*> ptrs_;
  std::vector<int64_t> cur_, snap_cur_, snap_arg_, row_end_;
  std::unique_ptr<float[]> store_, ck_;
};

// Python's index rule: a negative index counts from the end; anything else outside [0, n) raises.
inline bool py_index(int64_t i, int64_t n, int64_t& out) {
  if (i < 0) i += n;
  out = i;
  return i >= 0 && i < n;
}

template <typename acc_t>
inline acc_t py_max(acc_t a, acc_t b) {
  return b > a ? b : a;
}

// The package's backtracking loop from (t, c), over a [W, C] table stored column-major. Arithmetic in
// lpz's dtype (numpy's promotion of an fp32 table difference with an lpz scalar); false where the
// package raises IndexError. timings hold frame indices (the package multiplies them by the duration).
template <typename scalar_t>
bool backtrace(const Problem<scalar_t>& p, int64_t W, Trellis<scalar_t>& table, int64_t t, int64_t c, int64_t* timings,
               double* char_probs, int64_t* states) {
  const int64_t* offsets = table.offsets();
  using acc_t = scalar_t;
  const int64_t T = p.T, V = p.V, S = p.S;
  const acc_t floor = static_cast<acc_t>(kTableFloor);
  int64_t offset = 0;  // like the package's, it keeps the last value the s loop gave it
  while (t != 0 || c != 0) {
    const int64_t* g = p.gt + c * S;
    int64_t tr, r;
    if (!py_index(t, W, tr)) return false;
    table.set_frame(offsets[c] + t);
    const float here = table.at(c, tr);
    int64_t min_s = -1;
    acc_t min_delta = std::numeric_limits<acc_t>::infinity();
    acc_t max_lpz = floor;
    for (int64_t s = 0; s < S; ++s) {
      if (g[s] == -1) continue;
      offset = offsets[c] - (c - s > 0 ? offsets[c - 1 - s] : 0);
      acc_t switch_prob = floor;
      if (c > 0) {
        if (!py_index(t + offsets[c], T, r)) return false;
        switch_prob = p.lpz[r * V + g[s]];
      }
      if (!py_index(t - 1 + offset, W, r)) return false;
      const float est = here - table.at(c - 1 - s, r);
      const acc_t delta = std::abs(switch_prob - static_cast<acc_t>(est));
      if (delta < min_delta) {
        min_delta = delta;
        min_s = s;
      }
      max_lpz = py_max(max_lpz, switch_prob);
    }
    acc_t stay_prob = floor;
    if (t > 0) {
      if (!py_index(t + offsets[c], T, r)) return false;
      stay_prob = py_max(static_cast<acc_t>(p.lpz[r * V + p.blank]), max_lpz);
    }
    if (!py_index(t - 1, W, r)) return false;
    const float est_stay = here - table.at(c, r);
    int64_t frame;
    if (std::abs(stay_prob - static_cast<acc_t>(est_stay)) > min_delta) {
      if (c > 0) {
        for (int64_t s = 0; s <= min_s; ++s) timings[c - s] = offsets[c] + t;
        if (!py_index(offsets[c] + t, T, frame)) return false;
        char_probs[frame] = max_lpz;
        states[frame] = g[min_s];
      }
      c -= 1 + min_s;
      t -= 1 - offset;
    } else {
      if (!py_index(offsets[c] + t, T, frame)) return false;
      char_probs[frame] = stay_prob;
      states[frame] = kStay;
      t -= 1;
    }
  }
  return true;
}

struct Outputs {
  int64_t* timings;
  double* char_probs;
  int64_t* states;
};

void reset(const Outputs& o, int64_t C, int64_t T) {
  std::fill(o.timings, o.timings + C, 0);
  std::fill(o.char_probs, o.char_probs + T, 0.0);
  std::fill(o.states, o.states + T, kNotOnPath);
}

// The package's outer loop: window min_window_size, doubled after a failed backtrace while it stays
// below max_window_size. Returns the window that worked, or -(last window tried) on failure.
// The package's outer loop: window min_window_size, doubled after a failed backtrace while it stays
// below max_window_size. Returns the window that worked, or -(last window tried) on failure.
// block_columns: 0 keeps the whole table, k > 0 checkpoints it every k columns, -1 picks (whole up to
// 64 MiB, else blocks of sqrt(C * S) columns).
template <typename scalar_t>
int64_t align_one(const Problem<scalar_t>& p, int64_t min_window, int64_t max_window, bool from_max_t,
                  int64_t block_columns, const Outputs& out) {
  const EmissionStore<scalar_t> em(p);
  int64_t window = min_window, last_W = -1;
  while (true) {
    const int64_t W = std::min(window, p.T);
    reset(out, p.C, p.T);
    // A window past T gives the table of the last attempt again, hence the same failure.
    if (W != last_W) {
      int64_t block = block_columns;
      if (block < 0) {
        block = W * p.C <= (int64_t{16} << 20) ? 0 : static_cast<int64_t>(std::ceil(std::sqrt(double(p.C * p.S))));
      }
      Trellis<scalar_t> table(p, W, block, em.view());
      int64_t t = table.fill_all();
      if (from_max_t) t = W - 1;
      if (backtrace(p, W, table, t, p.C - 1, out.timings, out.char_probs, out.states)) return window;
      last_W = W;
    }
    window *= 2;
    if (!(window < max_window)) {
      reset(out, p.C, p.T);
      return -(window / 2);
    }
  }
}

template <typename scalar_t>
bool log_probs_ok(const scalar_t* x, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= !(std::isnan(x[i]) || x[i] == std::numeric_limits<scalar_t>::infinity());
  return ok;
}

struct Batch {
  at::Tensor lpz, lpz_lengths, gt, gt_lengths;
  int64_t B, T, V, C, S;
};

Batch check_batch(const at::Tensor& lpz, const at::Tensor& lpz_lengths, const at::Tensor& ground_truth,
                  const at::Tensor& gt_lengths, int64_t blank, bool text_fits = true) {
  check_dim(lpz, 3, "lpz", "[B, T, V]");
  check_device(lpz, c10::DeviceType::CPU, "lpz");
  TORCH_CHECK_VALUE(lpz.scalar_type() == at::kFloat || lpz.scalar_type() == at::kDouble,
                    "lpz must be float32 or float64, got ", dtype_name(lpz.scalar_type()));
  check_dim(ground_truth, 3, "ground_truth", "[B, C, S]");
  check_device(ground_truth, c10::DeviceType::CPU, "ground_truth");
  TORCH_CHECK_VALUE(ground_truth.scalar_type() == at::kLong, "ground_truth must be int64, got ",
                    dtype_name(ground_truth.scalar_type()));
  const int64_t B = lpz.size(0), T = lpz.size(1), V = lpz.size(2), C = ground_truth.size(1), S = ground_truth.size(2);
  TORCH_CHECK_VALUE(ground_truth.size(0) == B, "ground_truth must have B = ", B, " problems (lpz's), got ",
                    ground_truth.size(0));
  TORCH_CHECK_VALUE(S >= 1, "ground_truth must have S >= 1 symbol spans per position, got shape ",
                    ground_truth.sizes());
  TORCH_CHECK_VALUE(blank >= 0 && blank < V, "blank must be in [0, V) = [0, ", V, "), got ", blank);
  for (const auto& [len, name] : {std::pair{lpz_lengths, "lpz_lengths"}, std::pair{gt_lengths, "gt_lengths"}}) {
    TORCH_CHECK_VALUE(len.dim() == 1 && len.size(0) == B && len.scalar_type() == at::kLong, name,
                      " must be an int64 tensor of shape [B] = [", B, "], got ", dtype_name(len.scalar_type()), " ",
                      len.sizes());
    check_device(len, c10::DeviceType::CPU, name);
  }
  Batch b{
      lpz.contiguous(), lpz_lengths.contiguous(), ground_truth.contiguous(), gt_lengths.contiguous(), B, T, V, C, S};
  const int64_t* tl = b.lpz_lengths.data_ptr<int64_t>();
  const int64_t* cl = b.gt_lengths.data_ptr<int64_t>();
  const int64_t* gt = b.gt.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK_VALUE(tl[i] >= 1 && tl[i] <= T, "lpz_lengths[", i, "] must be in [1, T] = [1, ", T, "], got ", tl[i]);
    TORCH_CHECK_VALUE(cl[i] >= 2 && cl[i] <= C, "gt_lengths[", i, "] must be in [2, C] = [2, ", C,
                      "] (the start row and at least one symbol), got ", cl[i]);
    TORCH_CHECK_VALUE(!text_fits || cl[i] <= tl[i], "problem ", i, ": audio is shorter than text (", cl[i],
                      " ground-truth positions for ", tl[i], " frames)");
    const bool finite = b.lpz.scalar_type() == at::kFloat
                            ? log_probs_ok(b.lpz.data_ptr<float>() + i * T * V, tl[i] * V)
                            : log_probs_ok(b.lpz.data_ptr<double>() + i * T * V, tl[i] * V);
    TORCH_CHECK_VALUE(finite, "lpz[", i, "] must hold log-probabilities: it has NaN or +inf in its first lpz_lengths[",
                      i, "] frames");
    const int64_t* g = gt + i * C * S;
    for (int64_t c = 0; c < cl[i]; ++c) {
      for (int64_t s = 0; s < S; ++s) {
        const int64_t v = g[c * S + s];
        TORCH_CHECK_VALUE(v >= -1 && v < V, "ground_truth[", i, ", ", c, ", ", s, "] must be -1 or a token in [0, ", V,
                          "), got ", v);
        TORCH_CHECK_VALUE(v == -1 || s < c, "ground_truth[", i, ", ", c, ", ", s,
                          "] must be -1: row 0 is the start-of-ground-truth marker and a span of s + 1 symbols "
                          "cannot reach it (got token ",
                          v, ")");
      }
    }
  }
  return b;
}

// Problems one by one in each thread of at::parallel_for, largest (T * C) first, each thread taking the
// next one from a shared counter: ragged batches stay balanced, and a thread the OS deschedules holds up
// at most one problem instead of its static share. One problem runs inline (no OpenMP team wake-up).
template <typename F>
void for_each_problem(const Batch& b, const F& f) {
  const int64_t B = b.B;
  const int64_t* lengths_t = b.lpz_lengths.data_ptr<int64_t>();
  const int64_t* lengths_c = b.gt_lengths.data_ptr<int64_t>();
  if (B == 1) {
    f(0, 1);
    return;
  }
  std::vector<int64_t> order(B);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t i, int64_t j) { return lengths_t[i] * lengths_c[i] > lengths_t[j] * lengths_c[j]; });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(B, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t k = next++; k < B; k = next++) f(order[k], order[k] + 1);
  });
}

template <typename scalar_t>
Problem<scalar_t> problem(const Batch& b, int64_t i, int64_t blank, int64_t flags) {
  return {b.lpz.data_ptr<scalar_t>() + i * b.T * b.V,
          b.lpz_lengths.data_ptr<int64_t>()[i],
          b.V,
          b.gt.data_ptr<int64_t>() + i * b.C * b.S,
          b.gt_lengths.data_ptr<int64_t>()[i],
          b.S,
          blank,
          flags};
}

void check_flags(int64_t flags) {
  TORCH_CHECK_VALUE(flags >= 0 && flags <= 3, "flags must be in [0, 3] (1: blank_transition_cost_zero, ",
                    "2: preamble_transition_cost_zero), got ", flags);
}

void check_options(int64_t min_window_size, int64_t max_window_size, int64_t flags, int64_t block_columns) {
  check_flags(flags);
  TORCH_CHECK_VALUE(min_window_size >= 1, "min_window_size must be >= 1, got ", min_window_size);
  TORCH_CHECK_VALUE(max_window_size >= 1, "max_window_size must be >= 1, got ", max_window_size);
  TORCH_CHECK_VALUE(block_columns >= -1, "block_columns must be -1 (auto), 0 (whole table) or > 0, got ",
                    block_columns);
}

// Every check of ctc_segmentation, values included (the op reads its inputs on the CPU anyway), as the op
// alignops::ctc_segmentation_check_values: the reference backend (alignops.ctc_segmentation, backend="torch") runs
// it, so both backends refuse the same inputs with the same messages.
void ctc_segmentation_check_values(const at::Tensor& lpz, const at::Tensor& lpz_lengths, const at::Tensor& ground_truth,
                                   const at::Tensor& gt_lengths, int64_t blank, int64_t min_window_size,
                                   int64_t max_window_size, int64_t flags, bool /*backtrack_from_max_t*/,
                                   int64_t block_columns) {
  check_batch(lpz, lpz_lengths, ground_truth, gt_lengths, blank);
  check_options(min_window_size, max_window_size, flags, block_columns);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ctc_segmentation_cpu(
    const at::Tensor& lpz, const at::Tensor& lpz_lengths, const at::Tensor& ground_truth, const at::Tensor& gt_lengths,
    int64_t blank, int64_t min_window_size, int64_t max_window_size, int64_t flags, bool backtrack_from_max_t,
    int64_t block_columns) {
  const Batch b = check_batch(lpz, lpz_lengths, ground_truth, gt_lengths, blank);
  check_options(min_window_size, max_window_size, flags, block_columns);
  auto timings = at::empty({b.B, b.C}, lpz.options().dtype(at::kLong));
  auto char_probs = at::empty({b.B, b.T}, lpz.options().dtype(at::kDouble));
  auto states = at::empty({b.B, b.T}, lpz.options().dtype(at::kLong));
  auto windows = at::empty({b.B}, lpz.options().dtype(at::kLong));
  int64_t* win = windows.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(b.lpz.scalar_type(), "ctc_segmentation_cpu", [&] {
    for_each_problem(b, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const Outputs out{timings.data_ptr<int64_t>() + i * b.C, char_probs.data_ptr<double>() + i * b.T,
                          states.data_ptr<int64_t>() + i * b.T};
        reset(out, b.C, b.T);  // the padding past this problem's lengths included
        win[i] = align_one(problem<scalar_t>(b, i, blank, flags), min_window_size, max_window_size,
                           backtrack_from_max_t, block_columns, out);
      }
    });
  });
  for (int64_t i = 0; i < b.B; ++i) {
    TORCH_CHECK_VALUE(win[i] > 0, "ctc_segmentation: backtracking failed for problem ", i,
                      " with every window size up to ", -win[i], " (max_window_size = ", max_window_size,
                      "); the audio may be too short for the text, or the token ids may not match lpz");
  }
  return {timings, char_probs, states, windows};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ctc_segmentation_prefixes_cpu(
    const at::Tensor& lpz, const at::Tensor& lpz_lengths, const at::Tensor& ground_truth, const at::Tensor& gt_lengths,
    const at::Tensor& end_columns, int64_t blank, int64_t flags, bool backtrack_from_max_t,
    const std::optional<at::Tensor>& previous_table, const std::optional<at::Tensor>& previous_lengths,
    bool return_table) {
  // The ground truth may outgrow the audio here: only the prefixes that are backtracked must fit.
  const Batch b = check_batch(lpz, lpz_lengths, ground_truth, gt_lengths, blank, false);
  check_flags(flags);
  TORCH_CHECK_VALUE(end_columns.dim() == 2 && end_columns.size(0) == b.B && end_columns.scalar_type() == at::kLong,
                    "end_columns must be an int64 tensor of shape [B, E] with B = ", b.B, ", got ",
                    dtype_name(end_columns.scalar_type()), " ", end_columns.sizes());
  check_device(end_columns, c10::DeviceType::CPU, "end_columns");
  const auto ends = end_columns.contiguous();
  const int64_t E = ends.size(1);
  const int64_t* e = ends.data_ptr<int64_t>();
  const int64_t* cl = b.gt_lengths.data_ptr<int64_t>();
  const int64_t* tl = b.lpz_lengths.data_ptr<int64_t>();
  for (int64_t i = 0; i < b.B; ++i) {
    for (int64_t j = 0; j < E; ++j) {
      const int64_t c = e[i * E + j];
      TORCH_CHECK_VALUE(c == -1 || (c >= 1 && c < cl[i] && c < tl[i]), "end_columns[", i, ", ", j,
                        "] must be -1 (unused) or a column in [1, min(gt_lengths[", i, "], lpz_lengths[", i,
                        "])) = [1, ", std::min(cl[i], tl[i]), ") (audio is shorter than that text), got ", c);
    }
  }
  TORCH_CHECK_VALUE(previous_table.has_value() == previous_lengths.has_value(),
                    "previous_table and previous_lengths go together");
  at::Tensor prev, prev_len;
  if (previous_table.has_value()) {
    prev = previous_table->contiguous();
    prev_len = previous_lengths->contiguous();
    TORCH_CHECK_VALUE(prev.dim() == 3 && prev.size(0) == b.B && prev.size(1) == b.C && prev.scalar_type() == at::kFloat,
                      "previous_table must be a float32 tensor of shape [B, C, T'] = [", b.B, ", ", b.C, ", T'], got ",
                      dtype_name(prev.scalar_type()), " ", prev.sizes());
    TORCH_CHECK_VALUE(prev_len.dim() == 1 && prev_len.size(0) == b.B && prev_len.scalar_type() == at::kLong,
                      "previous_lengths must be an int64 tensor of shape [B] = [", b.B, "], got ",
                      dtype_name(prev_len.scalar_type()), " ", prev_len.sizes());
    check_device(prev, c10::DeviceType::CPU, "previous_table");
    for (int64_t i = 0; i < b.B; ++i) {
      const int64_t n = prev_len.data_ptr<int64_t>()[i];
      TORCH_CHECK_VALUE(n >= 0 && n <= std::min(prev.size(2), tl[i]), "previous_lengths[", i,
                        "] must be in [0, min(T', lpz_lengths[", i, "])] = [0, ", std::min(prev.size(2), tl[i]),
                        "], got ", n);
    }
  }
  auto timings = at::empty({b.B, E, b.C}, lpz.options().dtype(at::kLong));
  auto char_probs = at::empty({b.B, E, b.T}, lpz.options().dtype(at::kDouble));
  auto states = at::empty({b.B, E, b.T}, lpz.options().dtype(at::kLong));
  auto ok = at::empty({b.B, E}, lpz.options().dtype(at::kBool));
  auto table_out = at::empty({return_table ? b.B : 0, b.C, b.T}, lpz.options().dtype(at::kFloat));
  bool* okp = ok.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(b.lpz.scalar_type(), "ctc_segmentation_prefixes_cpu", [&] {
    for_each_problem(b, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const auto p = problem<scalar_t>(b, i, blank, flags);
        for (int64_t j = 0; j < E; ++j) {
          reset({timings.data_ptr<int64_t>() + (i * E + j) * b.C, char_probs.data_ptr<double>() + (i * E + j) * b.T,
                 states.data_ptr<int64_t>() + (i * E + j) * b.T},
                b.C, b.T);
          okp[i * E + j] = false;
        }
        // The whole lpz in one window: offsets stay 0, so a cell depends on no later column and no later
        // row. One table serves every prefix of the ground truth, and a longer lpz (a grown window)
        // extends the previous table by its new rows.
        const int64_t W = p.T;
        const EmissionStore<scalar_t> em(p);
        std::unique_ptr<float[]> own;
        float* base;
        int64_t stride = W, r0 = 0;
        if (return_table) {
          base = table_out.data_ptr<float>() + i * b.C * b.T;
          stride = b.T;
        } else {
          own.reset(new float[W * p.C]);
          base = own.get();
        }
        if (prev.defined()) {
          r0 = prev_len.data_ptr<int64_t>()[i];
          const int64_t old_stride = prev.size(2);
          const float* src = prev.data_ptr<float>() + i * b.C * old_stride;
          for (int64_t c = 0; c < p.C; ++c) {
            std::copy(src + c * old_stride, src + c * old_stride + r0, base + c * stride);
          }
        }
        Trellis<scalar_t> table(p, W, base, stride, r0, em.view());
        table.fill_all();
        for (int64_t j = 0; j < E; ++j) {
          const int64_t c = e[i * E + j];
          if (c == -1) continue;
          const float* col = base + c * stride;  // a whole table
          const int64_t t = backtrack_from_max_t ? W - 1 : std::max_element(col, col + W) - col;
          const Outputs out{timings.data_ptr<int64_t>() + (i * E + j) * b.C,
                            char_probs.data_ptr<double>() + (i * E + j) * b.T,
                            states.data_ptr<int64_t>() + (i * E + j) * b.T};
          okp[i * E + j] = backtrace(p, W, table, t, c, out.timings, out.char_probs, out.states);
          if (!okp[i * E + j]) reset(out, b.C, b.T);
        }
      }
    });
  });
  return {timings, char_probs, states, ok, table_out};
}

// numpy's pairwise summation of a contiguous float64 run (add.reduce), so means match np.mean bit for bit.
template <typename scalar_t>
double pairwise_sum(const scalar_t* a, int64_t n) {
  if (n < 8) {
    double res = 0.0;
    for (int64_t i = 0; i < n; ++i) res += static_cast<double>(a[i]);
    return res;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = static_cast<double>(a[j]);
    int64_t i = 8;
    for (; i < n - (n % 8); i += 8) {
      for (int j = 0; j < 8; ++j) r[j] += static_cast<double>(a[i + j]);
    }
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += static_cast<double>(a[i]);
    return res;
  }
  int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

// The op's checks (also its op alignops::ctc_segmentation_utterance_score_check, which the Triton twin calls);
// the spans' range is read by the CPU kernel only.
void check_utterance_score(const at::Tensor& frame_logprobs, const at::Tensor& starts, const at::Tensor& ends,
                           int64_t window) {
  check_dim(frame_logprobs, 2, "frame_logprobs", "[B, T]");
  TORCH_CHECK_VALUE(frame_logprobs.scalar_type() == at::kFloat || frame_logprobs.scalar_type() == at::kDouble,
                    "frame_logprobs must be float32 or float64, got ", dtype_name(frame_logprobs.scalar_type()));
  check_dim(starts, 2, "starts", "[B, U]");
  check_same_shape(ends, starts, "ends", "starts");
  for (const auto& [x, name] : {std::pair{starts, "starts"}, std::pair{ends, "ends"}}) {
    TORCH_CHECK_VALUE(x.scalar_type() == at::kLong, name, " must be int64, got ", dtype_name(x.scalar_type()));
    check_same_device(x, frame_logprobs, name, "frame_logprobs");
  }
  TORCH_CHECK_VALUE(starts.sym_size(0) == frame_logprobs.sym_size(0),
                    "starts must have B = ", frame_logprobs.sym_size(0), " rows (frame_logprobs'), got ",
                    starts.sym_size(0));
  TORCH_CHECK_VALUE(window >= 1, "window must be >= 1, got ", window);
}

// The spans' range (reads them: ATen reductions, one host sync), as the op
// alignops::ctc_segmentation_utterance_score_check_values: the CPU kernel calls it, and the public function before
// the reference and Triton backends, so a span outside [0, T] never reaches an index on any backend.
void check_utterance_score_values(const at::Tensor& frame_logprobs, const at::Tensor& starts, const at::Tensor& ends,
                                  int64_t /*window*/) {
  const int64_t T = frame_logprobs.size(1);
  const auto bad = ((ends > starts) & ((starts < 0) | (ends > T))).nonzero();
  if (bad.numel() > 0) {
    const int64_t b = bad[0][0].item<int64_t>(), u = bad[0][1].item<int64_t>();
    TORCH_CHECK_VALUE(false, "utterance ", b, ", ", u, ": a non-empty span [start, end) must lie in [0, T] = [0, ", T,
                      "], got [", starts[b][u].item<int64_t>(), ", ", ends[b][u].item<int64_t>(), ")");
  }
}

at::Tensor ctc_segmentation_utterance_score_cpu(const at::Tensor& frame_logprobs, const at::Tensor& starts,
                                                const at::Tensor& ends, int64_t window) {
  check_utterance_score(frame_logprobs, starts, ends, window);
  check_device(frame_logprobs, c10::DeviceType::CPU, "frame_logprobs");
  const int64_t B = frame_logprobs.size(0), T = frame_logprobs.size(1), U = starts.size(1);
  check_utterance_score_values(frame_logprobs, starts, ends, window);
  const auto s_c = starts.contiguous(), e_c = ends.contiguous();
  const int64_t* sp = s_c.data_ptr<int64_t>();
  const int64_t* ep = e_c.data_ptr<int64_t>();
  auto score = at::empty({B, U}, frame_logprobs.options().dtype(at::kDouble));
  double* out = score.data_ptr<double>();
  const auto cp = frame_logprobs.contiguous();
  AT_DISPATCH_FLOATING_TYPES(cp.scalar_type(), "ctc_segmentation_utterance_score_cpu", [&] {
    const scalar_t* base = cp.data_ptr<scalar_t>();
    at::parallel_for(0, B * U, 256, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const scalar_t* row = base + (i / U) * T;
        const int64_t s = sp[i], e = ep[i];
        if (e <= s) {
          out[i] = static_cast<double>(kTableFloor);
        } else if (e - s <= window) {
          out[i] = pairwise_sum(row + s, e - s) / static_cast<double>(e - s);
        } else {
          // The package's windows start at s .. e - window - 1: the last full window is left out.
          double m = 0.0;
          for (int64_t t = s; t < e - window; ++t) {
            const double v = pairwise_sum(row + t, window) / static_cast<double>(window);
            if (v < m) m = v;
          }
          out[i] = m;
        }
      }
    });
  });
  return score;
}

}  // namespace

// The schemas of this file's ops, defined here and nowhere else.
TORCH_LIBRARY_FRAGMENT(alignops, m) {
  // ---- ctc_segmentation: the ctc-segmentation package's algorithm, batched over problems ------------
  // lpz [B, T, V] (fp32 / fp64 log-probs), ground_truth [B, C, S] int64 (row 0 = start marker, -1 = no
  // symbol; S > 1 for multi-character spans), lengths [B]. flags: 1 blank_transition_cost_zero,
  // 2 preamble_transition_cost_zero. Returns (timings [B, C] int64 frame of each ground-truth position,
  // char_probs [B, T] fp64, states [B, T] int64 (token id, -1 stay, -2 not on the path), window [B] int64).
  // block_columns: -1 auto, 0 whole [W, C] table, k > 0 checkpointed every k columns (same results).
  m.def(
      "ctc_segmentation(Tensor lpz, Tensor lpz_lengths, Tensor ground_truth, Tensor gt_lengths, int blank, "
      "int min_window_size, int max_window_size, int flags, bool backtrack_from_max_t, int block_columns) "
      "-> (Tensor, Tensor, Tensor, Tensor)");

  // One full-length trellis per problem (no re-centring), backtracked from each of end_columns [B, E]
  // (-1 = unused): the package's result for every ground-truth prefix ending there, without refilling.
  // previous_table [B, C, T'] (a table this op returned for the same ground truth on the first
  // previous_lengths [B] frames of lpz) is extended by the new rows only. Returns (timings [B, E, C],
  // char_probs [B, E, T], states [B, E, T], ok [B, E] bool, table [B, C, T] fp32 or [0, C, T]).
  // ctc_segmentation's checks, values included (CPU tensors): the reference backend runs them.
  m.def(
      "ctc_segmentation_check_values(Tensor lpz, Tensor lpz_lengths, Tensor ground_truth, Tensor gt_lengths, "
      "int blank, int min_window_size, int max_window_size, int flags, bool backtrack_from_max_t, int block_columns) "
      "-> ()");
  m.def(
      "ctc_segmentation_prefixes(Tensor lpz, Tensor lpz_lengths, Tensor ground_truth, Tensor gt_lengths, "
      "Tensor end_columns, int blank, int flags, bool backtrack_from_max_t, Tensor? previous_table, "
      "Tensor? previous_lengths, bool return_table) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // The package's utterance score over [start, end) frame spans: [B, T] x [B, U] -> [B, U] fp64.
  def_checked(
      m, "ctc_segmentation_utterance_score(Tensor frame_logprobs, Tensor starts, Tensor ends, int window) -> Tensor");
  // Its spans' range (reads them, on any device): the reference and Triton backends run it.
  m.def(
      "ctc_segmentation_utterance_score_check_values(Tensor frame_logprobs, Tensor starts, Tensor ends, int window) "
      "-> ()");
}

TORCH_LIBRARY_IMPL(alignops, CPU, m) {
  m.impl("ctc_segmentation", &ctc_segmentation_cpu);
  m.impl("ctc_segmentation_prefixes", &ctc_segmentation_prefixes_cpu);
  m.impl("ctc_segmentation_utterance_score", &ctc_segmentation_utterance_score_cpu);
}

TORCH_LIBRARY_IMPL(alignops, CompositeImplicitAutograd, m) {
  m.impl("ctc_segmentation_utterance_score_check", &check_utterance_score);
  m.impl("ctc_segmentation_utterance_score_check_values", &check_utterance_score_values);
  m.impl("ctc_segmentation_check_values", &ctc_segmentation_check_values);
}

}  // namespace alignops::ctc_segmentation
