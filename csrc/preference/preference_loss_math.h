// Closed-form DPO-family losses and their gradients for one preference pair, shared by the CPU and the
// CUDA kernels so both compute bit-for-bit the same formulas. The Triton kernel in kernels/preference.py
// and the reference in python/alignops/reference/preference.py mirror this file.
//
// Notation (TRL's): xc = pc - rc, xr = pr - rr are the chosen / rejected log-ratios; s() is the
// f-divergence score (identity for reverse KL); delta = s(xc) - s(xr); nc, nr are completion lengths
// clamped to >= 1. Each loss is written with its derivative so that backward is one multiply.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define ALIGNOPS_HD __host__ __device__ __forceinline__
#else
#define ALIGNOPS_HD inline
#endif

namespace alignops::preference {

// Codes of the loss types and f-divergences: python/alignops/_codes.py (LossType, FDivergence) holds the same
// names and values for Python and Triton; tests/test_codes.py compares them through alignops::codes
// (csrc/common/codes_cpu.cpp).
enum LossType : int {
  kSigmoid = 0,      // -(1-e) logsig(b d) - e logsig(-b d)            (DPO; e > 0 is cDPO)
  kHinge = 1,        // relu(1 - b d)                                   (SLiC)
  kIpo = 2,          // (s(xc)/nc - s(xr)/nr - 1/(2b))^2                (IPO, per-token when lengths given)
  kExoPair = 3,      // q (log q - log(1-e)) + (1-q)(log(1-q) - log e), q = sig(b d)
  kNcaPair = 4,      // -logsig(b xc) - logsig(-b xc)/2 - logsig(-b xr)/2
  kRobust = 5,       // (-(1-e) logsig(b d) + e logsig(-b d)) / (1 - 2e)
  kBcoPair = 6,      // -logsig(b xc) - logsig(-b xr)
  kSppoHard = 7,     // (xc - 1/(2b))^2 + (xr + 1/(2b))^2
  kAot = 8,          // sigmoid with label smoothing on inputs the caller has sorted (aot, aot_unpaired)
  kApoZero = 9,      // 1 - sig(b xc) + sig(b xr)
  kApoDown = 10,     // sig(b xc) + 1 - sig(b (xc - xr))
  kDiscopop = 11,    // logistic/exponential blend modulated by sig(b d / tau)
  kSigmoidNorm = 12, // -logsig(b (s(xc)/nc - s(xr)/nr))                 (LN-DPO)
  kSimpo = 13,       // -(1-e) logsig(z) - e logsig(-z), z = b (pc/nc - pr/nr) - gamma  (reference-free)
  kCpo = 14,         // -(1-e) logsig(z) - e logsig(-z), z = b (pc - pr)                 (reference-free)
  kNumLossTypes = 15,
};

enum FDivergence : int { kReverseKl = 0, kForwardKl = 1, kJsDivergence = 2, kAlphaDivergence = 3 };

constexpr int kMaxLossTerms = 16;

// Passed by value to the kernels (fits in CUDA kernel-parameter space).
struct LossTerms {
  int n = 0;
  int type[kMaxLossTerms];
  double weight[kMaxLossTerms];
};

template <typename S>
struct Params {
  S beta_value, label_smoothing, gamma, discopop_tau, f_alpha;
  int f_divergence;
  LossTerms terms;
};

// The elementary functions the losses need, for a scalar T (host or device). The CPU kernel specialises
// MathOps for at::vec::Vectorized<T>, so the same pair_loss runs on 8 or 16 pairs at once: every loss
// below is written with select() instead of branches on values.
template <typename T>
struct MathOps {
  using Mask = bool;
  static ALIGNOPS_HD T exp(T x) { return std::exp(x); }
  static ALIGNOPS_HD T log(T x) { return std::log(x); }
  static ALIGNOPS_HD T log1p(T x) { return std::log1p(x); }
  static ALIGNOPS_HD T abs(T x) { return std::fabs(x); }
  static ALIGNOPS_HD T min(T a, T b) { return a < b ? a : b; }
  static ALIGNOPS_HD T max(T a, T b) { return a > b ? a : b; }
  static ALIGNOPS_HD Mask gt(T a, T b) { return a > b; }
  static ALIGNOPS_HD T select(Mask m, T a, T b) { return m ? a : b; }
};

// sigmoid(x), sigmoid(-x), logsig(x) and logsig(-x) from one exp and one log1p, never overflowing.
template <typename T>
struct Logistic {
  T sig, sig_neg, log_sig, log_sig_neg;
};

template <typename T>
ALIGNOPS_HD Logistic<T> logistic(T x) {
  using M = MathOps<T>;
  const T e = M::exp(-M::abs(x));
  const T inv = T(1) / (T(1) + e);
  const T l = M::log1p(e);
  const auto pos = M::gt(x, T(0));
  return {M::select(pos, inv, e * inv), M::select(pos, e * inv, inv), M::min(x, T(0)) - l, M::min(-x, T(0)) - l};
}

template <typename T>
ALIGNOPS_HD T sigmoid(T x) {
  return logistic(x).sig;
}

template <typename T>
ALIGNOPS_HD T log_sigmoid(T x) {
  return logistic(x).log_sig;
}

// f-divergence score s(x) and its derivative s'(x) (TRL's f_divergence_type); `kind` is uniform.
template <typename T, typename S>
ALIGNOPS_HD void f_score(T x, int kind, S alpha, T* s, T* ds) {
  using M = MathOps<T>;
  if (kind == kForwardKl) {  // f'(t) = 1 - 1/t
    const T e = M::exp(-x);
    *s = T(1) - e;
    *ds = e;
  } else if (kind == kJsDivergence) {  // f'(t) = log 2 + logsig(log t)
    const auto g = logistic(x);
    *s = T(0.69314718055994530942) + g.log_sig;
    *ds = g.sig_neg;
  } else if (kind == kAlphaDivergence && (alpha - S(1) > S(1e-6) || S(1) - alpha > S(1e-6))) {
    // f'(t) = (t^(a-1) - 1) / (a - 1); TRL clamps the exponent at 80.
    const T t = T(alpha - S(1)) * x;
    const T e = M::exp(M::min(t, T(80)));
    *s = (e - T(1)) / T(alpha - S(1));
    *ds = M::select(M::gt(T(80), t), e, T(0));
  } else {
    *s = x;
    *ds = T(1);
  }
}

// -(1-e) logsig(z) - e logsig(-z) and its derivative in z.
template <typename T>
ALIGNOPS_HD T smoothed_logistic(T z, T e, T* dz) {
  const auto g = logistic(z);
  *dz = -(T(1) - e) * g.sig_neg + e * g.sig;
  return -(T(1) - e) * g.log_sig - e * g.log_sig_neg;
}

// One pair (or one vector of pairs): the weighted sum of the loss terms, and d loss / d (pc, pr, rc, rr).
template <typename T, typename S>
ALIGNOPS_HD T pair_loss(T pc, T pr, T rc, T rr, T beta, T nc, T nr, const Params<S>& p, T grad[4]) {
  using M = MathOps<T>;
  const T xc = pc - rc;
  const T xr = pr - rr;
  T sc, dsc, sr, dsr;
  f_score(xc, p.f_divergence, p.f_alpha, &sc, &dsc);
  f_score(xr, p.f_divergence, p.f_alpha, &sr, &dsr);
  const T delta = sc - sr;
  const T e = T(p.label_smoothing);
  nc = M::max(nc, T(1));
  nr = M::max(nr, T(1));

  T loss = T(0);
  T g_xc = T(0), g_xr = T(0);  // through the log-ratios: pc and rc (with opposite signs), pr and rr
  T g_pc = T(0), g_pr = T(0);  // reference-free terms: pc and pr only
  for (int k = 0; k < p.terms.n; ++k) {
    const T w = T(S(p.terms.weight[k]));
    T l = T(0), d_delta = T(0), d_xc = T(0), d_xr = T(0), d_pc = T(0), d_pr = T(0);
    switch (p.terms.type[k]) {
      case kSigmoid: {
        T dz;
        l = smoothed_logistic(beta * delta, e, &dz);
        d_delta = beta * dz;
        break;
      }
      case kHinge: {
        const T m = T(1) - beta * delta;
        l = M::max(m, T(0));
        d_delta = M::select(M::gt(m, T(0)), -beta, T(0));
        break;
      }
      case kIpo: {
        const T r = sc / nc - sr / nr - T(1) / (T(2) * beta);
        l = r * r;
        d_xc = T(2) * r * dsc / nc;
        d_xr = -T(2) * r * dsr / nr;
        break;
      }
      case kExoPair: {
        const T z = beta * delta;
        const auto g = logistic(z);
        const T log_e = M::log(e), log_1me = M::log1p(-e);
        l = g.sig * (g.log_sig - log_1me) + g.sig_neg * (g.log_sig_neg - log_e);
        d_delta = beta * g.sig * g.sig_neg * (z + log_e - log_1me);
        break;
      }
      case kNcaPair: {
        const auto a = logistic(beta * xc), b = logistic(beta * xr);
        l = -a.log_sig - T(0.5) * a.log_sig_neg - T(0.5) * b.log_sig_neg;
        d_xc = beta * (-a.sig_neg + T(0.5) * a.sig);
        d_xr = beta * T(0.5) * b.sig;
        break;
      }
      case kRobust: {
        const auto g = logistic(beta * delta);
        l = (-(T(1) - e) * g.log_sig + e * g.log_sig_neg) / (T(1) - T(2) * e);
        d_delta = beta * (-(T(1) - e) * g.sig_neg - e * g.sig) / (T(1) - T(2) * e);
        break;
      }
      case kBcoPair: {
        const auto a = logistic(beta * xc), b = logistic(beta * xr);
        l = -a.log_sig - b.log_sig_neg;
        d_xc = -beta * a.sig_neg;
        d_xr = beta * b.sig;
        break;
      }
      case kSppoHard: {
        const T u = xc - T(0.5) / beta, v = xr + T(0.5) / beta;
        l = u * u + v * v;
        d_xc = T(2) * u;
        d_xr = T(2) * v;
        break;
      }
      case kAot: {
        T dz;
        l = smoothed_logistic(beta * (xc - xr), e, &dz);
        d_xc = beta * dz;
        d_xr = -beta * dz;
        break;
      }
      case kApoZero: {
        const T a = sigmoid(beta * xc), b = sigmoid(beta * xr);
        l = T(1) - a + b;
        d_xc = -beta * a * (T(1) - a);
        d_xr = beta * b * (T(1) - b);
        break;
      }
      case kApoDown: {
        const T a = sigmoid(beta * xc), c = sigmoid(beta * (xc - xr));
        l = a + T(1) - c;
        d_xc = beta * (a * (T(1) - a) - c * (T(1) - c));
        d_xr = beta * c * (T(1) - c);
        break;
      }
      case kDiscopop: {
        // l = A (1 - m) + E m with A = -logsig(z), E = exp(-z), m = sig(z / tau). E m is formed in log
        // space, exp(-z + logsig(z / tau)), so a large negative margin gives 0 * inf nowhere.
        const T z = beta * delta, inv_tau = T(S(1) / p.discopop_tau);
        const auto g = logistic(z), gm = logistic(z * inv_tau);
        const T m = gm.sig;
        const T A = -g.log_sig;
        const T Em = M::exp(-z + gm.log_sig);
        const T dm = m * gm.sig_neg * inv_tau;
        l = A * (T(1) - m) + Em;
        // dl/dz = A'(1 - m) - A m' + E' m + E m', with E m' = E m (1 - m) / tau and E' m = -E m.
        d_delta = beta * (-g.sig_neg * (T(1) - m) - A * dm + Em * gm.sig_neg * inv_tau - Em);
        break;
      }
      case kSigmoidNorm: {
        const auto g = logistic(beta * (sc / nc - sr / nr));
        l = -g.log_sig;
        d_xc = -beta * g.sig_neg * dsc / nc;
        d_xr = beta * g.sig_neg * dsr / nr;
        break;
      }
      case kSimpo: {
        T dz;
        l = smoothed_logistic(beta * (pc / nc - pr / nr) - T(p.gamma), e, &dz);
        d_pc = beta * dz / nc;
        d_pr = -beta * dz / nr;
        break;
      }
      case kCpo: {
        T dz;
        l = smoothed_logistic(beta * (pc - pr), e, &dz);
        d_pc = beta * dz;
        d_pr = -beta * dz;
        break;
      }
      default:
        break;
    }
    loss = loss + w * l;
    g_xc = g_xc + w * (d_xc + d_delta * dsc);
    g_xr = g_xr + w * (d_xr - d_delta * dsr);
    g_pc = g_pc + w * d_pc;
    g_pr = g_pr + w * d_pr;
  }
  grad[0] = g_xc + g_pc;
  grad[1] = g_xr + g_pr;
  grad[2] = -g_xc;
  grad[3] = -g_xr;
  return loss;
}

}  // namespace alignops::preference
