// Vectorised CTC forward-backward of alignops::ctc_posteriors. CMake compiles this file once per CPU
// capability (DEFAULT, AVX2) into its own namespace; ctc_posteriors_cpu.cpp picks one. One utterance per
// task of at::parallel_for; inside an utterance the states of a frame are vectorised (4 doubles per step).
//
// Precision: alpha and beta are log-domain fp64 whatever the input dtype (each step is a 3-term
// logsumexp), so occupancy rows sum to 1 within ~1e-10 even at T = 1e5; outputs are rounded once at the end.
//
// Memory: an utterance whose fp64 alpha fits in 64 MB keeps it for every frame (one alpha pass). Longer ones
// keep one row per block of K = ceil(sqrt(T)) frames (checkpoints) plus the rows of the last block; the
// backward pass recomputes the K alpha rows of each earlier block from its checkpoint and sweeps beta through
// it, emitting the occupancy of each frame as soon as alpha and beta meet. Per utterance in flight:
// (T / K + K + 4) * (S + 4) doubles, i.e. O(S sqrt(T)) (T = 45000, S = 27001: 92 MB, against the 4.9 GB of a
// stored [T, S] fp32 alpha), at the price of a second alpha pass.
//
// Band: at frame t only states s with 2(t+1) > s (reachable from the start) and s >= S - 2(T - t) (able to
// reach the end) can carry occupancy, so each frame computes just that band [lo(t), hi(t)); the cells just
// outside it that the next step reads are set to -inf.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "ctc/ctc_posteriors_cpu_kernel.h"

namespace alignops::ctc {
namespace CPU_CAPABILITY {
namespace {

using Vd = at::vec::Vectorized<double>;
constexpr int64_t kW = Vd::size();
constexpr double kNegInf = -std::numeric_limits<double>::infinity();
constexpr int64_t kPad = 2;  // -inf cells on both sides of every row: s - 2 and s + 2 are always in bounds
constexpr int64_t kFullAlphaBytes = int64_t(64) << 20;  // up to this, an utterance keeps alpha for every frame

inline double lse3(double a, double b, double c) {
  const double m = std::max(a, std::max(b, c));
  if (m == kNegInf) {
    return kNegInf;
  }
  return m + std::log(std::exp(a - m) + std::exp(b - m) + std::exp(c - m));
}

// Vectorised: with m the max, mid the median and lo the min of the triple, m + log(1 + exp(mid - m) +
// exp(lo - m)) needs two exps. The max is clamped to the lowest finite double so that -inf entries give
// exp(-inf) = 0 terms, never -inf - -inf; an all -inf triple is patched to -inf at the end.
inline Vd lse3(const Vd& a, const Vd& b, const Vd& c) {
  const Vd hi_ab = at::vec::maximum(a, b), lo_ab = at::vec::minimum(a, b);
  const Vd m = at::vec::maximum(hi_ab, c);
  const Vd mid = at::vec::maximum(lo_ab, at::vec::minimum(hi_ab, c));
  const Vd lo = at::vec::minimum(lo_ab, c);
  const Vd mc = at::vec::maximum(m, Vd(std::numeric_limits<double>::lowest()));
  const Vd r = mc + (Vd(1.0) + (mid - mc).exp() + (lo - mc).exp()).log();
  return Vd::blendv(r, m, m == Vd(kNegInf));
}

// out[s] = lse3(x[s], x[s + D1], x[s + D2] + skip[s + DS]) (+ add[s]) for s in [lo, hi); skip[s] is 0 where
// state s may be entered from s - 2, else -inf.
// alpha: D = (-1, -2, 0), add = emissions of frame t; beta: D = (+1, +2, +2) on beta + emission of frame t + 1.
template <int D1, int D2, int DS>
void lse3_row(double* out, const double* x, const double* skip, const double* add, int64_t lo, int64_t hi) {
  int64_t s = lo;
  for (; s + kW <= hi; s += kW) {
    Vd r = lse3(Vd::loadu(x + s), Vd::loadu(x + s + D1), Vd::loadu(x + s + D2) + Vd::loadu(skip + s + DS));
    if (add != nullptr) {
      r = r + Vd::loadu(add + s);
    }
    r.store(out + s);
  }
  for (; s < hi; ++s) {
    const double r = lse3(x[s], x[s + D1], x[s + D2] + skip[s + DS]);
    out[s] = add != nullptr ? r + add[s] : r;
  }
}

template <typename scalar_t, typename acc_t>
struct Utterance {
  // Inputs: scores [T_full, C] of this utterance, its tokens, sizes; outputs (nullptr when not requested).
  const scalar_t* lp;
  int64_t T, C, blank, Lfull;
  const int64_t* tok;
  int64_t Lb;
  acc_t* states;
  acc_t* tokens;
  scalar_t* grad;

  int64_t S = 0, W = 0;
  std::vector<int64_t> label;
  std::vector<double> skip_v, em_v;

  double* row(std::vector<double>& v, int64_t i) const { return v.data() + i * W + kPad; }
  int64_t lo(int64_t t) const { return std::max<int64_t>(0, S - 2 * (T - t)); }
  int64_t hi(int64_t t) const { return std::min<int64_t>(S, 2 * (t + 1)); }

  void gather(int64_t t, int64_t a, int64_t b) {
    const scalar_t* x = lp + t * C;
    double* em = em_v.data() + kPad;
    for (int64_t s = a; s < b; ++s) {
      em[s] = static_cast<double>(x[label[s]]);
    }
  }

  void fill_neg(double* r, int64_t a, int64_t b) const {
    std::fill(r + std::max<int64_t>(a, 0), r + std::min(b, S), kNegInf);
  }

  void alpha_first(double* a) {
    std::fill(a - kPad, a - kPad + W, kNegInf);
    const int64_t n = std::min<int64_t>(S, 2);
    gather(0, 0, n);
    std::copy(em_v.data() + kPad, em_v.data() + kPad + n, a);
  }

  void alpha_step(const double* prev, double* cur, int64_t t) {
    const int64_t l = lo(t), h = hi(t);
    gather(t, l, h);
    lse3_row<-1, -2, 0>(cur, prev, skip_v.data() + kPad, em_v.data() + kPad, l, h);
    fill_neg(cur, l - 2, l);
    fill_neg(cur, h, h + 2);
  }

  // Occupancy of frame t (alpha, beta rows of that frame) into the requested outputs.
  void emit(int64_t t, const double* alpha, const double* beta, double log_z, double* g, double* gbuf) {
    const int64_t l = lo(t), h = hi(t);
    const Vd lz(log_z);
    int64_t s = l;
    for (; s + kW <= h; s += kW) {
      (Vd::loadu(alpha + s) + Vd::loadu(beta + s) - lz).exp().store(g + s);
    }
    for (; s < h; ++s) {
      g[s] = std::exp(alpha[s] + beta[s] - log_z);
    }
    if (states != nullptr) {
      acc_t* out = states + t * (2 * Lfull + 1);
      for (s = l; s < h; ++s) {
        out[s] = static_cast<acc_t>(g[s]);
      }
    }
    if (tokens != nullptr) {
      acc_t* out = tokens + t * Lfull;
      for (s = l | 1; s < h; s += 2) {
        out[s >> 1] = static_cast<acc_t>(g[s]);
      }
    }
    if (grad != nullptr) {
      // A class may label several states (blank, repeated tokens): sum in fp64, write once, reset.
      scalar_t* out = grad + t * C;
      for (s = l; s < h; ++s) {
        gbuf[label[s]] -= g[s];
      }
      for (s = l; s < h; ++s) {
        out[label[s]] = static_cast<scalar_t>(gbuf[label[s]]);
      }
      for (s = l; s < h; ++s) {
        gbuf[label[s]] = 0.0;
      }
    }
  }

  acc_t run() {
    int64_t repeats = 0;
    for (int64_t j = 1; j < Lb; ++j) {
      repeats += tok[j] == tok[j - 1];
    }
    if (T < Lb + repeats) {
      return std::numeric_limits<acc_t>::infinity();  // no alignment: outputs stay 0
    }
    if (T == 0) {
      return acc_t(0);  // feasible with T = 0 means the empty target: probability 1
    }
    S = 2 * Lb + 1;
    W = S + 2 * kPad;
    label.resize(S);
    skip_v.assign(W, kNegInf);
    em_v.assign(W, kNegInf);
    double* skip = skip_v.data() + kPad;
    for (int64_t s = 0; s < S; ++s) {
      label[s] = (s & 1) ? tok[s >> 1] : blank;
      if ((s & 1) && s >= 3 && tok[s >> 1] != tok[(s >> 1) - 1]) {
        skip[s] = 0.0;
      }
    }
    // Alpha rows of the last block are kept by the forward pass itself; short utterances are one block.
    const bool backward = states != nullptr || tokens != nullptr || grad != nullptr;
    const int64_t K = T * W * static_cast<int64_t>(sizeof(double)) <= kFullAlphaBytes
                          ? T
                          : std::max<int64_t>(1, static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(T)))));
    const int64_t n_blocks = (T + K - 1) / K;
    const int64_t last0 = backward ? (n_blocks - 1) * K : T;  // first frame of the block kept in `blk`
    std::vector<double> ckpt(backward ? (n_blocks - 1) * W : 0, kNegInf), ring(2 * W, kNegInf);
    std::vector<double> blk(backward ? K * W : 0, kNegInf);
    auto dst = [&](int64_t t) { return t >= last0 ? row(blk, t - last0) : row(ring, t & 1); };

    // Forward pass: alpha for every frame, keeping the first row of each earlier block.
    double* prev = dst(0);
    alpha_first(prev);
    for (int64_t t = 0; t < T; ++t) {
      double* cur = prev;
      if (t > 0) {
        cur = dst(t);
        alpha_step(prev, cur, t);
      }
      if (backward && t % K == 0 && t < last0) {
        std::copy(cur - kPad, cur - kPad + W, row(ckpt, t / K) - kPad);
      }
      prev = cur;
    }
    const double log_z = S >= 2 ? lse3(prev[S - 1], prev[S - 2], kNegInf) : prev[S - 1];
    if (!(log_z > kNegInf) || std::isnan(log_z)) {
      return std::numeric_limits<acc_t>::infinity();  // every alignment has score -inf
    }
    if (!backward) {
      return static_cast<acc_t>(-log_z);
    }

    // Backward pass, block by block from the end: recompute the block's alpha rows, sweep beta through it.
    std::vector<double> beta_v(W, kNegInf), bb_v(W, kNegInf), g_v(W, 0.0);
    std::vector<double> gbuf(grad != nullptr ? C : 0, 0.0);
    double* beta = beta_v.data() + kPad;
    double* bb = bb_v.data() + kPad;  // beta + emission of the frame after the current one
    for (int64_t k = n_blocks - 1; k >= 0; --k) {
      const int64_t t0 = k * K, t1 = std::min(T, t0 + K);
      if (k < n_blocks - 1) {
        std::copy(row(ckpt, k) - kPad, row(ckpt, k) - kPad + W, row(blk, 0) - kPad);
        for (int64_t t = t0 + 1; t < t1; ++t) {
          alpha_step(row(blk, t - t0 - 1), row(blk, t - t0), t);
        }
      }
      for (int64_t t = t1 - 1; t >= t0; --t) {
        const int64_t l = lo(t), h = hi(t);
        if (t == T - 1) {
          std::fill(beta - kPad, beta - kPad + W, kNegInf);
          beta[S - 1] = 0.0;
          if (S >= 2) {
            beta[S - 2] = 0.0;
          }
        } else {
          lse3_row<1, 2, 2>(beta, bb, skip, nullptr, l, h);
        }
        emit(t, row(blk, t - t0), beta, log_z, g_v.data() + kPad, gbuf.data());
        if (t > 0) {
          gather(t, l, h);
          const double* em = em_v.data() + kPad;
          for (int64_t s = l; s < h; ++s) {
            bb[s] = beta[s] + em[s];
          }
          fill_neg(bb, l - 2, l);
        }
      }
    }
    return static_cast<acc_t>(-log_z);
  }
};

void run(const at::Tensor& log_probs, const at::Tensor& targets, const at::Tensor& input_lengths,
         const at::Tensor& target_lengths, int64_t blank, at::Tensor& loss, at::Tensor& states, at::Tensor& tokens,
         at::Tensor& grad) {
  const int64_t B = log_probs.size(0), T = log_probs.size(1), C = log_probs.size(2), L = targets.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, log_probs.scalar_type(), "ctc_posteriors_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* x = log_probs.const_data_ptr<scalar_t>();
    const int64_t* y = targets.const_data_ptr<int64_t>();
    const int64_t* il = input_lengths.const_data_ptr<int64_t>();
    const int64_t* tl = target_lengths.const_data_ptr<int64_t>();
    acc_t* loss_p = loss.mutable_data_ptr<acc_t>();
    acc_t* st = states.numel() > 0 ? states.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* tk = tokens.numel() > 0 ? tokens.mutable_data_ptr<acc_t>() : nullptr;
    scalar_t* gr = grad.numel() > 0 ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t S = 2 * L + 1;
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        Utterance<scalar_t, acc_t> u{x + b * T * C,
                                     il[b],
                                     C,
                                     blank,
                                     L,
                                     y + b * L,
                                     tl[b],
                                     st != nullptr ? st + b * T * S : nullptr,
                                     tk != nullptr ? tk + b * T * L : nullptr,
                                     gr != nullptr ? gr + b * T * C : nullptr};
        loss_p[b] = u.run();
      }
    });
  });
}

}  // namespace

const CtcPosteriorsKernels ctc_posteriors_kernels{&run};

}  // namespace CPU_CAPABILITY
}  // namespace alignops::ctc
