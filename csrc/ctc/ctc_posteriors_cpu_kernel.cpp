// Vectorised CTC forward-backward of alignops::ctc_posteriors. CMake compiles this file once per CPU
// capability (DEFAULT, AVX2) into its own namespace; ctc_posteriors_cpu.cpp picks one. One utterance per
// task of at::parallel_for (a single long utterance uses two threads, see two_threads); inside an utterance
// the states of a frame are vectorised (4 doubles per step).
//
// Precision: alpha and beta are log-domain fp64 whatever the input dtype (each step is a 3-term
// logsumexp), so occupancy rows sum to 1 within ~1e-10 even at T = 1e5; outputs are rounded once at the end.
//
// Memory: an utterance whose fp64 alpha fits in 64 MB keeps it for every frame (one alpha pass). Longer ones
// keep one row per block of K = ceil(sqrt(T)) frames (checkpoints) plus the rows of the last block; the
// backward pass recomputes the K alpha rows of each earlier block from its checkpoint and sweeps beta through
// it, emitting the occupancy of each frame as soon as alpha and beta meet. Per utterance in flight:
// (T / K + K + 4) * (S + 4) doubles, i.e. O(S sqrt(T)) (T = 45000, S = 27001: 92 MB, against the 4.9 GB of a
// stored [T, S] fp32 alpha), at the price of a second alpha pass. The two-thread mode keeps checkpoints of
// both alpha and beta (twice that) and does the same work.
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

// Buffers of one thread working on an utterance (rows of W = S + 4 doubles, -inf padded).
struct Scratch {
  std::vector<double> em, ring, beta, bb, g, gbuf, blk;
  Scratch(int64_t W, int64_t C, int64_t block_rows)
      : em(W, kNegInf), ring(2 * W, kNegInf), beta(W, kNegInf), bb(W, kNegInf), g(W, 0.0), gbuf(C, 0.0),
        blk(block_rows * W, kNegInf) {}
};

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

  int64_t S = 0, W = 0, K = 0, n_blocks = 0;
  double log_z = kNegInf;
  std::vector<int64_t> label;
  std::vector<double> skip_v;

  double* at(std::vector<double>& v, int64_t i) const { return v.data() + i * W + kPad; }
  void copy_row(const double* src, double* dst) const { std::copy(src - kPad, src - kPad + W, dst - kPad); }
  const double* skip() const { return skip_v.data() + kPad; }
  int64_t lo(int64_t t) const { return std::max<int64_t>(0, S - 2 * (T - t)); }
  int64_t hi(int64_t t) const { return std::min<int64_t>(S, 2 * (t + 1)); }

  // em[s] = log_probs[t, label(s)] for s in [a, b).
  void gather(double* em, int64_t t, int64_t a, int64_t b) const {
    const scalar_t* x = lp + t * C;
    for (int64_t s = a; s < b; ++s) {
      em[s] = static_cast<double>(x[label[s]]);
    }
  }

  void fill_neg(double* r, int64_t a, int64_t b) const {
    std::fill(r + std::max<int64_t>(a, 0), r + std::min(b, S), kNegInf);
  }

  void alpha_first(double* a, double* em) const {
    std::fill(a - kPad, a - kPad + W, kNegInf);
    const int64_t n = std::min<int64_t>(S, 2);
    gather(em, 0, 0, n);
    std::copy(em, em + n, a);
  }

  void alpha_step(const double* prev, double* cur, int64_t t, double* em) const {
    const int64_t l = lo(t), h = hi(t);
    gather(em, t, l, h);
    lse3_row<-1, -2, 0>(cur, prev, skip(), em, l, h);
    fill_neg(cur, l - 2, l);
    fill_neg(cur, h, h + 2);
  }

  // beta_t from bb = beta_{t+1} + e_{t+1}; the end states of the last frame start at 0.
  void beta_step(double* beta, const double* bb, int64_t t) const {
    if (t == T - 1) {
      std::fill(beta - kPad, beta - kPad + W, kNegInf);
      beta[S - 1] = 0.0;
      if (S >= 2) {
        beta[S - 2] = 0.0;
      }
    } else {
      lse3_row<1, 2, 2>(beta, bb, skip(), nullptr, lo(t), hi(t));
    }
  }

  // bb = beta_t + e_t, the input of beta_{t-1}; the two cells below the band that it reads are -inf.
  void beta_carry(double* bb, const double* beta, int64_t t, double* em) const {
    const int64_t l = lo(t), h = hi(t);
    gather(em, t, l, h);
    for (int64_t s = l; s < h; ++s) {
      bb[s] = beta[s] + em[s];
    }
    fill_neg(bb, l - 2, l);
  }

  // Occupancy of frame t (alpha, beta rows of that frame) into the requested outputs.
  void emit(int64_t t, const double* alpha, const double* beta, double* g, double* gbuf) const {
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

  // Alpha over every frame; the first row of each block k < keep_from goes to ckpt, the rows of frames
  // >= keep_from * K to x.blk (the block the backward sweep starts with). Sets log_z.
  void forward(Scratch& x, std::vector<double>& ckpt, int64_t keep_from, bool store) {
    const int64_t last0 = keep_from * K;
    auto dst = [&](int64_t t) { return t >= last0 ? at(x.blk, t - last0) : at(x.ring, t & 1); };
    double* em = x.em.data() + kPad;
    double* prev = dst(0);
    alpha_first(prev, em);
    for (int64_t t = 0; t < T; ++t) {
      double* cur = prev;
      if (t > 0) {
        cur = dst(t);
        alpha_step(prev, cur, t, em);
      }
      if (store && t % K == 0 && t < last0) {
        copy_row(cur, at(ckpt, t / K));
      }
      prev = cur;
    }
    log_z = S >= 2 ? lse3(prev[S - 1], prev[S - 2], kNegInf) : prev[S - 1];
  }

  // Beta from the last frame down to frame t_end, keeping beta of the last frame of each block in bckpt;
  // leaves x.bb = beta_{t_end} + e_{t_end}.
  void backward_part(Scratch& x, std::vector<double>& bckpt, int64_t t_end) const {
    double* em = x.em.data() + kPad;
    double* beta = x.beta.data() + kPad;
    double* bb = x.bb.data() + kPad;
    for (int64_t t = T - 1; t >= t_end; --t) {
      beta_step(beta, bb, t);
      if ((t + 1) % K == 0 || t == T - 1) {
        copy_row(beta, at(bckpt, t / K));
      }
      beta_carry(bb, beta, t, em);
    }
  }

  // The alpha rows of block k into x.blk, from its checkpoint.
  void recompute_block(Scratch& x, std::vector<double>& ckpt, int64_t k) const {
    const int64_t t0 = k * K, t1 = std::min(T, t0 + K);
    copy_row(at(ckpt, k), at(x.blk, 0));
    for (int64_t t = t0 + 1; t < t1; ++t) {
      alpha_step(at(x.blk, t - t0 - 1), at(x.blk, t - t0), t, x.em.data() + kPad);
    }
  }

  // Block k, its alpha rows in x.blk: beta down through the block (from x.bb, or from beta_last for its last
  // frame when given), occupancy emitted frame by frame.
  void sweep_block(Scratch& x, int64_t k, const double* beta_last) const {
    double* em = x.em.data() + kPad;
    double* beta = x.beta.data() + kPad;
    double* bb = x.bb.data() + kPad;
    const int64_t t0 = k * K, t1 = std::min(T, t0 + K);
    for (int64_t t = t1 - 1; t >= t0; --t) {
      if (beta_last != nullptr && t == t1 - 1) {
        copy_row(beta_last, beta);
      } else {
        beta_step(beta, bb, t);
      }
      emit(t, at(x.blk, t - t0), beta, x.g.data() + kPad, x.gbuf.data());
      if (t > 0) {
        beta_carry(bb, beta, t, em);
      }
    }
  }

  // A long utterance with an idle thread (a batch smaller than the thread count): one thread runs alpha
  // over the first half of the blocks while the other runs beta over the second half; they meet at frame
  // tm - 1, where log Z = logsumexp_s(alpha + beta). Then the first thread carries alpha on through the
  // second half (beta restarted per block from the second thread's checkpoints) and the second carries beta
  // down through the first half (alpha recomputed per block from the first thread's checkpoints). The work
  // is that of the one-thread path, in about half the wall time, with two synchronisations in all.
  void two_threads(std::vector<double>& ckpt, std::vector<double>& bckpt, Scratch& xa, Scratch& xb) {
    const int64_t mid = n_blocks / 2, tm = mid * K;
    at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (i == 0) {
          double* em = xa.em.data() + kPad;
          double* prev = at(xa.ring, 0);
          alpha_first(prev, em);
          copy_row(prev, at(ckpt, 0));
          for (int64_t t = 1; t < tm; ++t) {
            double* cur = at(xa.ring, t & 1);
            alpha_step(prev, cur, t, em);
            if (t % K == 0) {
              copy_row(cur, at(ckpt, t / K));
            }
            prev = cur;
          }
        } else {
          backward_part(xb, bckpt, tm);
        }
      }
    });
    const double* alpha_m = at(xa.ring, (tm - 1) & 1);
    double* beta_m = xa.beta.data() + kPad;
    beta_step(beta_m, xb.bb.data() + kPad, tm - 1);
    double m = kNegInf;
    for (int64_t s = lo(tm - 1); s < hi(tm - 1); ++s) {
      m = std::max(m, alpha_m[s] + beta_m[s]);
    }
    if (!(m > kNegInf) || std::isnan(m)) {
      return;  // log_z stays -inf
    }
    double sum = 0.0;
    for (int64_t s = lo(tm - 1); s < hi(tm - 1); ++s) {
      sum += std::exp(alpha_m[s] + beta_m[s] - m);
    }
    log_z = m + std::log(sum);
    at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (i == 0) {
          double* em = xa.em.data() + kPad;
          double* carry = at(xa.ring, 0);
          if (alpha_m != carry) {
            copy_row(alpha_m, carry);
          }
          for (int64_t k = mid; k < n_blocks; ++k) {
            const int64_t t0 = k * K, t1 = std::min(T, t0 + K);
            const double* prev = carry;
            for (int64_t t = t0; t < t1; ++t) {
              alpha_step(prev, at(xa.blk, t - t0), t, em);
              prev = at(xa.blk, t - t0);
            }
            copy_row(prev, carry);
            sweep_block(xa, k, at(bckpt, k));
          }
        } else {
          for (int64_t k = mid - 1; k >= 0; --k) {
            recompute_block(xb, ckpt, k);
            sweep_block(xb, k, nullptr);
          }
        }
      }
    });
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
    for (int64_t s = 0; s < S; ++s) {
      label[s] = (s & 1) ? tok[s >> 1] : blank;
      if ((s & 1) && s >= 3 && tok[s >> 1] != tok[(s >> 1) - 1]) {
        skip_v[kPad + s] = 0.0;
      }
    }
    const bool backward = states != nullptr || tokens != nullptr || grad != nullptr;
    K = T * W * static_cast<int64_t>(sizeof(double)) <= kFullAlphaBytes
            ? T
            : std::max<int64_t>(1, static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(T)))));
    n_blocks = (T + K - 1) / K;
    const int64_t C_buf = grad != nullptr ? C : 0;
    if (!backward) {
      Scratch x(W, 0, 0);
      std::vector<double> none;
      forward(x, none, T, false);
    } else if (n_blocks >= 2 && !at::in_parallel_region() && at::get_num_threads() >= 2) {
      std::vector<double> ckpt(n_blocks * W, kNegInf), bckpt(n_blocks * W, kNegInf);
      Scratch xa(W, C_buf, K), xb(W, C_buf, K);
      two_threads(ckpt, bckpt, xa, xb);
    } else {
      // Alpha rows of the last block stay from the forward pass; short utterances are a single block.
      std::vector<double> ckpt((n_blocks - 1) * W, kNegInf);
      Scratch x(W, C_buf, K);
      forward(x, ckpt, n_blocks - 1, true);
      if (log_z > kNegInf) {
        for (int64_t k = n_blocks - 1; k >= 0; --k) {
          if (k != n_blocks - 1) {
            recompute_block(x, ckpt, k);
          }
          sweep_block(x, k, nullptr);
        }
      }
    }
    if (!(log_z > kNegInf) || std::isnan(log_z)) {
      return std::numeric_limits<acc_t>::infinity();  // every alignment has score -inf
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
    auto utterances = [&](int64_t begin, int64_t end) {
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
    };
    // One utterance is run outside any parallel region, so that a long one can use two threads itself
    // (at::parallel_for marks even its serial path as a parallel region, which disables nested splits).
    if (B == 1) {
      utterances(0, 1);
    } else {
      at::parallel_for(0, B, 1, utterances);
    }
  });
}

}  // namespace

const CtcPosteriorsKernels ctc_posteriors_kernels{&run};

}  // namespace CPU_CAPABILITY
}  // namespace alignops::ctc
