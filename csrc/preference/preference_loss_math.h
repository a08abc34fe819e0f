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

// Codes of the loss types, in the order of alignops.preference.LOSS_TYPE_CODES.
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

template <typename T>
struct Params {
  T beta_value, label_smoothing, gamma, discopop_tau, f_alpha;
  int f_divergence;
  LossTerms terms;
};

template <typename T>
ALIGNOPS_HD T sigmoid(T x) {
  // Two branches so that exp never overflows.
  if (x >= T(0)) {
    return T(1) / (T(1) + std::exp(-x));
  }
  const T e = std::exp(x);
  return e / (T(1) + e);
}

template <typename T>
ALIGNOPS_HD T log_sigmoid(T x) {
  return (x < T(0) ? x : T(0)) - std::log1p(std::exp(-std::fabs(x)));
}

// f-divergence score s(x) and its derivative s'(x) (TRL's f_divergence_type).
template <typename T>
ALIGNOPS_HD void f_score(T x, int kind, T alpha, T* s, T* ds) {
  switch (kind) {
    case kForwardKl: {  // f'(t) = 1 - 1/t
      const T e = std::exp(-x);
      *s = T(1) - e;
      *ds = e;
      return;
    }
    case kJsDivergence: {  // f'(t) = log 2 + logsig(log t)
      *s = T(0.69314718055994530942) + log_sigmoid(x);
      *ds = sigmoid(-x);
      return;
    }
    case kAlphaDivergence: {  // f'(t) = (t^(a-1) - 1) / (a - 1); TRL clamps the exponent at 80
      if (std::fabs(alpha - T(1)) < T(1e-6)) {
        break;
      }
      const T t = (alpha - T(1)) * x;
      const T tc = t < T(80) ? t : T(80);
      const T e = std::exp(tc);
      *s = (e - T(1)) / (alpha - T(1));
      *ds = t < T(80) ? e : T(0);
      return;
    }
    default:
      break;
  }
  *s = x;
  *ds = T(1);
}

// d/dz of -(1-e) logsig(z) - e logsig(-z).
template <typename T>
ALIGNOPS_HD T smoothed_logistic(T z, T e, T* dz) {
  *dz = -(T(1) - e) * sigmoid(-z) + e * sigmoid(z);
  return -(T(1) - e) * log_sigmoid(z) - e * log_sigmoid(-z);
}

// One pair: returns the weighted sum of the loss terms and writes d loss / d (pc, pr, rc, rr).
template <typename T>
ALIGNOPS_HD T pair_loss(T pc, T pr, T rc, T rr, T beta, T nc, T nr, const Params<T>& p, T grad[4]) {
  const T xc = pc - rc;
  const T xr = pr - rr;
  T sc, dsc, sr, dsr;
  f_score(xc, p.f_divergence, p.f_alpha, &sc, &dsc);
  f_score(xr, p.f_divergence, p.f_alpha, &sr, &dsr);
  const T delta = sc - sr;
  const T e = p.label_smoothing;
  nc = nc < T(1) ? T(1) : nc;
  nr = nr < T(1) ? T(1) : nr;

  T loss = T(0);
  T g_xc = T(0), g_xr = T(0);  // through the log-ratios: pc and rc (with opposite signs), pr and rr
  T g_pc = T(0), g_pr = T(0);  // reference-free terms: pc and pr only
  for (int k = 0; k < p.terms.n; ++k) {
    const T w = T(p.terms.weight[k]);
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
        l = m > T(0) ? m : T(0);
        d_delta = m > T(0) ? -beta : T(0);
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
        const T q = sigmoid(z), qn = sigmoid(-z);
        const T lq = log_sigmoid(z), lqn = log_sigmoid(-z);
        const T log_e = std::log(e), log_1me = std::log1p(-e);
        l = q * (lq - log_1me) + qn * (lqn - log_e);
        d_delta = beta * q * qn * (z + log_e - log_1me);
        break;
      }
      case kNcaPair: {
        const T a = beta * xc, b = beta * xr;
        l = -log_sigmoid(a) - T(0.5) * log_sigmoid(-a) - T(0.5) * log_sigmoid(-b);
        d_xc = beta * (-sigmoid(-a) + T(0.5) * sigmoid(a));
        d_xr = beta * T(0.5) * sigmoid(b);
        break;
      }
      case kRobust: {
        const T z = beta * delta;
        l = (-(T(1) - e) * log_sigmoid(z) + e * log_sigmoid(-z)) / (T(1) - T(2) * e);
        d_delta = beta * (-(T(1) - e) * sigmoid(-z) - e * sigmoid(z)) / (T(1) - T(2) * e);
        break;
      }
      case kBcoPair: {
        const T a = beta * xc, b = beta * xr;
        l = -log_sigmoid(a) - log_sigmoid(-b);
        d_xc = -beta * sigmoid(-a);
        d_xr = beta * sigmoid(b);
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
        const T z = beta * delta, tau = p.discopop_tau;
        const T m = sigmoid(z / tau);
        const T A = -log_sigmoid(z);
        const T Em = std::exp(-z + log_sigmoid(z / tau));
        const T dm = m * (T(1) - m) / tau;
        // E m' = E m (1 - m) / tau
        l = A * (T(1) - m) + Em;
        const T dz = -sigmoid(-z) * (T(1) - m) - A * dm + Em * (T(1) - m) / tau - Em;
        d_delta = beta * dz;
        break;
      }
      case kSigmoidNorm: {
        const T z = beta * (sc / nc - sr / nr);
        l = -log_sigmoid(z);
        const T dz = -sigmoid(-z);
        d_xc = beta * dz * dsc / nc;
        d_xr = -beta * dz * dsr / nr;
        break;
      }
      case kSimpo: {
        T dz;
        l = smoothed_logistic(beta * (pc / nc - pr / nr) - p.gamma, e, &dz);
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
    loss += w * l;
    g_xc += w * (d_xc + d_delta * dsc);
    g_xr += w * (d_xr - d_delta * dsr);
    g_pc += w * d_pc;
    g_pr += w * d_pr;
  }
  grad[0] = g_xc + g_pc;
  grad[1] = g_xr + g_pr;
  grad[2] = -g_xc;
  grad[3] = -g_xr;
  return loss;
}

}  // namespace alignops::preference
