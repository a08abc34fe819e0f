// Vectorised row kernels of alignops::selective_logprobs. CMake compiles this file once per CPU
// capability (DEFAULT, AVX2) into its own inline namespace; selective_logprobs_cpu.cpp picks one.
//
// Forward, per row: lse = logsumexp(z / T) in a single pass (blockwise online logsumexp: one exp per
// element plus one rescale per block), logp = z_y / T - lse. Nothing of size V is written.
// Backward, per row: dz_v = g / T * (1[v = y] - exp(z_v / T - lse)), written once.
// Exponents are formed as (z - max) / T (see RowStats), so a tiny T stays finite as in torch.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>

#include "common/cpu_vec.h"
#include "preference/selective_logprobs_cpu_kernel.h"

namespace alignops::preference {
namespace CPU_CAPABILITY {
namespace {

using vec::CPU_CAPABILITY::kW;
using vec::CPU_CAPABILITY::load2_float;
using vec::CPU_CAPABILITY::store2_float;
using vec::CPU_CAPABILITY::Vec;
constexpr int64_t kUnroll = 4;
constexpr int64_t kBlock = 2 * kW * kUnroll;  // elements consumed per step (two float vectors per load)

// Row statistics in the logits' own units: max = max_v x_v and log_sum = log sum_v exp((x_v - max) / T),
// so lse = max / T + log_sum and logp = (x_y - max) / T - log_sum. Every exponent is a product formed
// after the difference, which a compiler cannot fuse into an FMA. Written as x * inv_t - M (M the scaled
// max), -ffp-contract (on by default in the AVX2 and aarch64 builds) subtracts the rounded M from the
// exact product; at T = 1e-10 that gap is the product's rounding error, hundreds, so exp overflowed or
// underflowed and logp came out -inf or +inf.
template <typename acc_t>
struct RowStats {
  acc_t max;
  acc_t log_sum;
};

// The running max starts at the lowest finite float, not -inf, so that rows with masked (-inf) logits
// never form -inf - -inf.
template <typename scalar_t>
RowStats<float> row_stats(const scalar_t* x, int64_t V, float inv_t) {
  const Vec scale(inv_t);
  Vec m(std::numeric_limits<float>::lowest());
  Vec s(0.f);
  int64_t v = 0;
  for (; v + kBlock <= V; v += kBlock) {
    Vec z[2 * kUnroll];
    for (int64_t u = 0; u < kUnroll; ++u) {
      load2_float(x + v + 2 * kW * u, z[2 * u], z[2 * u + 1]);
    }
    Vec bm = m;
    for (const auto& zi : z) {
      bm = at::vec::maximum(bm, zi);
    }
    s = s * ((m - bm) * scale).exp_u20();
    for (const auto& zi : z) {
      s = s + ((zi - bm) * scale).exp_u20();
    }
    m = bm;
  }
  float lane_m[kW], lane_s[kW];
  m.store(lane_m);
  s.store(lane_s);
  float M = std::numeric_limits<float>::lowest();
  for (int64_t i = 0; i < kW; ++i) {
    M = std::max(M, lane_m[i]);
  }
  for (int64_t i = v; i < V; ++i) {
    M = std::max(M, float(x[i]));
  }
  float S = 0.f;
  for (int64_t i = 0; i < kW; ++i) {
    S += lane_s[i] * std::exp((lane_m[i] - M) * inv_t);
  }
  for (int64_t i = v; i < V; ++i) {
    S += std::exp((float(x[i]) - M) * inv_t);
  }
  return {M, std::log(S)};
}

// fp64 keeps full precision with a plain two-pass loop.
RowStats<double> row_stats(const double* x, int64_t V, double inv_t) {
  double M = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < V; ++i) {
    M = std::max(M, x[i]);
  }
  if (!std::isfinite(M)) {
    return {M, 0.0};
  }
  double S = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    S += std::exp((x[i] - M) * inv_t);
  }
  return {M, std::log(S)};
}

template <typename scalar_t>
float row_max(const scalar_t* x, int64_t V) {
  Vec m(std::numeric_limits<float>::lowest());
  int64_t v = 0;
  for (; v + 2 * kW <= V; v += 2 * kW) {
    Vec a, b;
    load2_float(x + v, a, b);
    m = at::vec::maximum(m, at::vec::maximum(a, b));
  }
  float lane_m[kW];
  m.store(lane_m);
  float M = std::numeric_limits<float>::lowest();
  for (int64_t i = 0; i < kW; ++i) {
    M = std::max(M, lane_m[i]);
  }
  for (; v < V; ++v) {
    M = std::max(M, float(x[v]));
  }
  return M;
}

double row_max(const double* x, int64_t V) {
  double M = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < V; ++i) {
    M = std::max(M, x[i]);
  }
  return M;
}

// max / T rounded once (the volatile keeps it out of any FMA): lse = scaled_max + log_sum in forward, and
// the backward recovers log_sum as lse - scaled_max with the same rounding.
template <typename acc_t>
acc_t scaled_max(acc_t max, acc_t inv_t) {
  volatile acc_t r = max * inv_t;
  return r;
}

// Above this |lse| the fp32 lse no longer resolves log_sum (its ulp passes 2^-6), so the backward anchors
// the exponent at the row max: exp((x - max) / T - log_sum), one extra read of the row.
template <typename acc_t>
constexpr acc_t kAnchorAbove = acc_t(1 << 17);

// dz_v = -g / T * exp((x_v - c) / T - r), with (c, r) = (0, lse) or (max, log_sum).
template <typename scalar_t>
void row_grad(scalar_t* out, const scalar_t* x, int64_t V, float inv_t, float c, float r, float g) {
  const Vec scale(inv_t), anchor(c), shift(r), coef(-g * inv_t);
  int64_t v = 0;
  for (; v + 2 * kW <= V; v += 2 * kW) {
    Vec a, b;
    load2_float(x + v, a, b);
    store2_float(out + v, coef * ((a - anchor) * scale - shift).exp_u20(),
                 coef * ((b - anchor) * scale - shift).exp_u20());
  }
  for (; v < V; ++v) {
    out[v] = scalar_t(-g * inv_t * std::exp((float(x[v]) - c) * inv_t - r));
  }
}

void row_grad(double* out, const double* x, int64_t V, double inv_t, double c, double r, double g) {
  for (int64_t v = 0; v < V; ++v) {
    out[v] = -g * inv_t * std::exp((x[v] - c) * inv_t - r);
  }
}

inline int64_t rows_per_task(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

void forward(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index, double temperature,
             at::Tensor& logp, at::Tensor& lse) {
  const int64_t N = logits.size(0), V = logits.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "selective_logprobs_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    AT_DISPATCH_INDEX_TYPES(targets.scalar_type(), "selective_logprobs_cpu_targets", [&] {
      const scalar_t* x = logits.const_data_ptr<scalar_t>();
      const index_t* y = targets.const_data_ptr<index_t>();
      acc_t* out = logp.mutable_data_ptr<acc_t>();
      acc_t* lse_p = lse.mutable_data_ptr<acc_t>();
      const acc_t inv_t = acc_t(1) / acc_t(temperature);
      at::parallel_for(0, N, rows_per_task(V), [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          const index_t t = y[n];
          if (static_cast<int64_t>(t) == ignore_index) {
            out[n] = acc_t(0);
            lse_p[n] = acc_t(0);
            continue;
          }
          const scalar_t* row = x + n * V;
          const RowStats<acc_t> st = row_stats(row, V, inv_t);
          lse_p[n] = scaled_max(st.max, inv_t) + st.log_sum;
          out[n] = (acc_t(row[t]) - st.max) * inv_t - st.log_sum;
        }
      });
    });
  });
}

void backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
              int64_t ignore_index, double temperature, at::Tensor& grad_logits) {
  const int64_t N = logits.size(0), V = logits.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "selective_logprobs_backward_cpu", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        AT_DISPATCH_INDEX_TYPES(targets.scalar_type(), "selective_logprobs_backward_cpu_targets", [&] {
          const scalar_t* x = logits.const_data_ptr<scalar_t>();
          const index_t* y = targets.const_data_ptr<index_t>();
          const acc_t* g = grad.const_data_ptr<acc_t>();
          const acc_t* lse_p = lse.const_data_ptr<acc_t>();
          scalar_t* out = grad_logits.mutable_data_ptr<scalar_t>();
          const acc_t inv_t = acc_t(1) / acc_t(temperature);
          at::parallel_for(0, N, rows_per_task(V), [&](int64_t begin, int64_t end) {
            for (int64_t n = begin; n < end; ++n) {
              scalar_t* row_out = out + n * V;
              const index_t t = y[n];
              if (static_cast<int64_t>(t) == ignore_index || g[n] == acc_t(0)) {
                std::fill(row_out, row_out + V, scalar_t(0));
                continue;
              }
              const scalar_t* row = x + n * V;
              const acc_t gn = g[n], l = lse_p[n];
              acc_t c = acc_t(0), r = l;
              if (std::abs(l) > kAnchorAbove<acc_t>) {
                c = row_max(row, V);
                r = l - scaled_max(c, inv_t);
              }
              row_grad(row_out, row, V, inv_t, c, r, gn);
              // Recomputed in the accumulation type: adding g/T to an already-rounded bf16 value would lose it.
              row_out[t] = scalar_t(gn * inv_t * (acc_t(1) - std::exp((acc_t(row[t]) - c) * inv_t - r)));
            }
          });
        });
      });
}

}  // namespace

const SelectiveLogprobsKernels selective_logprobs_kernels{&forward, &backward};

}  // namespace CPU_CAPABILITY
}  // namespace alignops::preference
