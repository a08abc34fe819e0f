// Vectorised row kernels of alignops::skip_ffn (CPU): the gather fused with RMSNorm, and the activation
// fused into one pass (SwiGLU reads gate and up once and rounds once). CMake compiles this file once per
// CPU capability; skip_ffn_cpu.cpp picks one at run time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>

#include "common/cpu_vec.h"
#include "skip/skip_ffn_cpu_kernel.h"

namespace alignops::skip {
namespace CPU_CAPABILITY {
namespace {

using vec::CPU_CAPABILITY::kW;
using vec::CPU_CAPABILITY::store2_float;
using vec::CPU_CAPABILITY::Vec;

template <typename scalar_t>
inline Vec load_float(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return Vec::loadu(p);
  } else {
    Vec out;
    at::vec::load_to_float<scalar_t>(p, out);
    return out;
  }
}

// Rounds two float vectors to scalar_t and back (the cast HF's RMSNorm applies before the weight).
template <typename scalar_t>
inline void round_trip(Vec& a, Vec& b) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    std::tie(a, b) = at::vec::convert_to_float<scalar_t>(at::vec::convert_from_float<scalar_t>(a, b));
  }
}

template <typename scalar_t>
void gather_rms_norm_impl(const at::Tensor& x, const int64_t* index, int64_t K, const at::Tensor& weight, double eps,
                          at::Tensor& out, at::Tensor& rstd) {
  const int64_t H = x.size(1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* wp = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  float* rp = rstd.defined() && rstd.numel() > 0 ? rstd.mutable_data_ptr<float>() : nullptr;
  at::parallel_for(0, K, std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = xp + index[r] * H;
      scalar_t* dst = op + r * H;
      if (wp == nullptr) {
        std::copy(row, row + H, dst);
        continue;
      }
      Vec acc(0.f);
      int64_t j = 0;
      for (; j + kW <= H; j += kW) {
        const Vec v = load_float(row + j);
        acc = at::vec::fmadd(v, v, acc);
      }
      float ss = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
      for (; j < H; ++j) {
        const float v = static_cast<float>(row[j]);
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + static_cast<float>(eps));
      if (rp) {
        rp[r] = inv;
      }
      // HF's rounding: the normalised row is cast to the input dtype before the weight multiplies it.
      const Vec vinv(inv);
      for (j = 0; j + 2 * kW <= H; j += 2 * kW) {
        Vec a = load_float(row + j) * vinv, b = load_float(row + j + kW) * vinv;
        round_trip<scalar_t>(a, b);
        store2_float(dst + j, a * load_float(wp + j), b * load_float(wp + j + kW));
      }
      for (; j < H; ++j) {
        const scalar_t n = static_cast<scalar_t>(static_cast<float>(row[j]) * inv);
        dst[j] = static_cast<scalar_t>(static_cast<float>(wp[j]) * static_cast<float>(n));
      }
    }
  });
}

void gather_rms_norm(const at::Tensor& x, const int64_t* index, int64_t K, const at::Tensor& weight, double eps,
                     at::Tensor& out, at::Tensor& rstd) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "skip_ffn_gather_rms_norm", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      const int64_t H = x.size(1);
      const double* xp = x.const_data_ptr<double>();
      const double* wp = weight.defined() ? weight.const_data_ptr<double>() : nullptr;
      double* op = out.mutable_data_ptr<double>();
      double* rp = rstd.defined() && rstd.numel() > 0 ? rstd.mutable_data_ptr<double>() : nullptr;
      at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const double* row = xp + index[r] * H;
          if (wp == nullptr) {
            std::copy(row, row + H, op + r * H);
            continue;
          }
          // fp64 stays fp64 throughout (gradcheck-grade), unlike HF's fp32 detour.
          double ss = 0.0;
          for (int64_t j = 0; j < H; ++j) {
            ss += row[j] * row[j];
          }
          const double inv = 1.0 / std::sqrt(ss / static_cast<double>(H) + eps);
          if (rp) {
            rp[r] = inv;
          }
          for (int64_t j = 0; j < H; ++j) {
            op[r * H + j] = wp[j] * (row[j] * inv);
          }
        }
      });
    } else {
      gather_rms_norm_impl<scalar_t>(x, index, K, weight, eps, out, rstd);
    }
  });
}

template <typename T>
inline T act_scalar(T g, T u, int64_t activation) {
  switch (activation) {
    case kSwiglu:
      return g / (T(1) + std::exp(-g)) * u;
    case kGelu:
      return T(0.5) * g * (T(1) + std::erf(g * T(M_SQRT1_2)));
    default: {
      const T k = T(0.7978845608028654);  // sqrt(2 / pi)
      return T(0.5) * g * (T(1) + std::tanh(k * (g + T(0.044715) * g * g * g)));
    }
  }
}

inline Vec act_vec(const Vec& g, const Vec& u, int64_t activation) {
  const Vec one(1.f), half(0.5f);
  switch (activation) {
    case kSwiglu:
      return g / (one + g.neg().exp()) * u;
    case kGelu:
      return half * g * (one + (g * Vec(float(M_SQRT1_2))).erf());
    default: {
      const Vec k(0.7978845608028654f), c(0.044715f);
      return half * g * (one + (k * (g + c * g * g * g)).tanh());
    }
  }
}

void activate(const at::Tensor& pre, int64_t activation, at::Tensor& act) {
  const int64_t K = act.size(0), I = act.size(1), G = pre.size(1);
  const int64_t up_offset = activation == kSwiglu ? I : 0;  // gelu: u unused
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre.scalar_type(), "skip_ffn_activate", [&] {
    const scalar_t* pp = pre.const_data_ptr<scalar_t>();
    scalar_t* ap = act.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, K, std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* gate = pp + r * G;
        const scalar_t* up = gate + up_offset;
        scalar_t* dst = ap + r * I;
        int64_t j = 0;
        if constexpr (!std::is_same_v<scalar_t, double>) {
          const bool swiglu = activation == kSwiglu;
          for (; j + 2 * kW <= I; j += 2 * kW) {
            const Vec g0 = load_float(gate + j), g1 = load_float(gate + j + kW);
            const Vec u0 = swiglu ? load_float(up + j) : Vec(1.f), u1 = swiglu ? load_float(up + j + kW) : Vec(1.f);
            store2_float(dst + j, act_vec(g0, u0, activation), act_vec(g1, u1, activation));
          }
        }
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        for (; j < I; ++j) {
          const acc_t u = activation == kSwiglu ? static_cast<acc_t>(up[j]) : acc_t(1);
          dst[j] = static_cast<scalar_t>(act_scalar<acc_t>(static_cast<acc_t>(gate[j]), u, activation));
        }
      }
    });
  });
}

// The criterion from the row sums of h.r, h.h, r.r and (h - r)^2, with cosine_similarity's eps.
template <typename T>
inline T criterion_value(int64_t criterion, T hr, T hh, T rr, T dd) {
  const T eps = T(1e-12);
  const T nr = std::max(std::sqrt(rr), eps);
  if (criterion == kCosine) {
    return T(1) - hr / (std::max(std::sqrt(hh), eps) * nr);
  }
  return std::sqrt(dd) / nr;
}

template <typename scalar_t>
void add_score_impl(const at::Tensor& residual, const at::Tensor& delta, int64_t criterion, at::Tensor& h,
                    at::Tensor& score) {
  const int64_t N = residual.size(0), H = residual.size(1);
  const scalar_t* rp = residual.const_data_ptr<scalar_t>();
  const scalar_t* dp = delta.const_data_ptr<scalar_t>();
  scalar_t* hp = h.mutable_data_ptr<scalar_t>();
  float* sp = score.mutable_data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* r = rp + n * H;
      const scalar_t* d = dp + n * H;
      scalar_t* out = hp + n * H;
      Vec hr(0.f), hh(0.f), rr(0.f), dd(0.f);
      int64_t j = 0;
      for (; j + 2 * kW <= H; j += 2 * kW) {
        const Vec r0 = load_float(r + j), r1 = load_float(r + j + kW);
        Vec h0 = r0 + load_float(d + j), h1 = r1 + load_float(d + j + kW);
        round_trip<scalar_t>(h0, h1);  // the criterion sees the h the FFN will see
        store2_float(out + j, h0, h1);
        hr = at::vec::fmadd(h0, r0, at::vec::fmadd(h1, r1, hr));
        hh = at::vec::fmadd(h0, h0, at::vec::fmadd(h1, h1, hh));
        rr = at::vec::fmadd(r0, r0, at::vec::fmadd(r1, r1, rr));
        const Vec e0 = h0 - r0, e1 = h1 - r1;
        dd = at::vec::fmadd(e0, e0, at::vec::fmadd(e1, e1, dd));
      }
      const auto sum = [](const Vec& v) {
        return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
      };
      float s_hr = sum(hr), s_hh = sum(hh), s_rr = sum(rr), s_dd = sum(dd);
      for (; j < H; ++j) {
        const float rv = static_cast<float>(r[j]);
        out[j] = static_cast<scalar_t>(rv + static_cast<float>(d[j]));
        const float hv = static_cast<float>(out[j]);
        s_hr += hv * rv;
        s_hh += hv * hv;
        s_rr += rv * rv;
        s_dd += (hv - rv) * (hv - rv);
      }
      sp[n] = criterion_value<float>(criterion, s_hr, s_hh, s_rr, s_dd);
    }
  });
}

void add_score(const at::Tensor& residual, const at::Tensor& delta, int64_t criterion, at::Tensor& h,
               at::Tensor& score) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, residual.scalar_type(), "skip_add_score", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      const int64_t N = residual.size(0), H = residual.size(1);
      const double* rp = residual.const_data_ptr<double>();
      const double* dp = delta.const_data_ptr<double>();
      double* hp = h.mutable_data_ptr<double>();
      double* sp = score.mutable_data_ptr<double>();
      at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          double hr = 0, hh = 0, rr = 0, dd = 0;
          for (int64_t j = 0; j < H; ++j) {
            const double rv = rp[n * H + j], hv = rv + dp[n * H + j];
            hp[n * H + j] = hv;
            hr += hv * rv;
            hh += hv * hv;
            rr += rv * rv;
            dd += (hv - rv) * (hv - rv);
          }
          sp[n] = criterion_value<double>(criterion, hr, hh, rr, dd);
        }
      });
    } else {
      add_score_impl<scalar_t>(residual, delta, criterion, h, score);
    }
  });
}

}  // namespace

const SkipFfnKernels skip_ffn_kernels{&gather_rms_norm, &activate, &add_score};

}  // namespace CPU_CAPABILITY
}  // namespace alignops::skip
