// Vectorised tile epilogues of alignops::fused_linear_logprobs (CPU). A tile is the fp32 (or fp64) GEMM
// output u = hidden_kept @ weight[v0:v1]^T (+ bias) for every kept row; nothing of size V is kept.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>

#include "preference/fused_linear_logprobs_cpu_kernel.h"

namespace alignops::preference {
namespace CPU_CAPABILITY {
namespace {

template <typename T>
inline T transform_scalar(T u, const LogitTransform& f) {
  T z = T(f.logit_scale) * u;
  if (f.softcap > 0) {
    z = T(f.softcap) * std::tanh(z / T(f.softcap));
  }
  return z * T(f.inv_temperature);
}

// dz/du of the transform at u.
template <typename T>
inline T transform_grad_scalar(T u, const LogitTransform& f) {
  T d = T(f.logit_scale) * T(f.inv_temperature);
  if (f.softcap > 0) {
    const T t = std::tanh(T(f.logit_scale) * u / T(f.softcap));
    d *= T(1) - t * t;
  }
  return d;
}

template <typename T>
inline at::vec::Vectorized<T> transform_vec(at::vec::Vectorized<T> u, const LogitTransform& f) {
  using V = at::vec::Vectorized<T>;
  V z = V(T(f.logit_scale)) * u;
  if (f.softcap > 0) {
    z = V(T(f.softcap)) * (z * V(T(1.0 / f.softcap))).tanh();
  }
  return z * V(T(f.inv_temperature));
}

template <typename T>
void forward_tile_impl(const at::Tensor& tile, int64_t v0, const at::Tensor& targets, const LogitTransform& f,
                       at::Tensor& m, at::Tensor& s, at::Tensor& zt, at::Tensor& ez) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t W = V::size();
  const int64_t K = tile.size(0), vt = tile.size(1);
  const T* up = tile.const_data_ptr<T>();
  const int64_t* y = targets.const_data_ptr<int64_t>();
  T* mp = m.mutable_data_ptr<T>();
  T* sp = s.mutable_data_ptr<T>();
  T* ztp = zt.mutable_data_ptr<T>();
  T* ezp = ez.defined() ? ez.mutable_data_ptr<T>() : nullptr;
  at::parallel_for(0, K, std::max<int64_t>(1, 8192 / std::max<int64_t>(vt, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = up + r * vt;
      // Pass 1: the tile's max of z (the row is in L1/L2 for the second pass).
      V vmax(std::numeric_limits<T>::lowest());
      int64_t j = 0;
      for (; j + W <= vt; j += W) {
        vmax = at::vec::maximum(vmax, transform_vec<T>(V::loadu(row + j), f));
      }
      T tmax = at::vec::vec_reduce_all<T>([](V& a, V& b) { return at::vec::maximum(a, b); }, vmax);
      for (; j < vt; ++j) {
        tmax = std::max(tmax, transform_scalar<T>(row[j], f));
      }
      const T m_new = std::max(mp[r], tmax);
      const T rescale = std::exp(mp[r] - m_new);
      // Pass 2: sum exp(z - m_new) (and z exp(z - m_new) for the entropy).
      V vs(T(0)), ve(T(0));
      const V vm(m_new);
      j = 0;
      for (; j + W <= vt; j += W) {
        const V z = transform_vec<T>(V::loadu(row + j), f);
        const V e = (z - vm).exp();
        vs = vs + e;
        if (ezp) {
          ve = at::vec::fmadd(e, z, ve);
        }
      }
      T ts = at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, vs);
      T te = ezp ? at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, ve) : T(0);
      for (; j < vt; ++j) {
        const T z = transform_scalar<T>(row[j], f);
        const T e = std::exp(z - m_new);
        ts += e;
        te += e * z;
      }
      sp[r] = sp[r] * rescale + ts;
      if (ezp) {
        ezp[r] = ezp[r] * rescale + te;
      }
      mp[r] = m_new;
      const int64_t c = y[r] - v0;
      if (c >= 0 && c < vt) {
        ztp[r] = transform_scalar<T>(row[c], f);
      }
    }
  });
}

template <typename T>
void backward_tile_impl(at::Tensor& tile, int64_t v0, const at::Tensor& targets, const at::Tensor& grad,
                        const at::Tensor& lse, const at::Tensor& grad_entropy, const at::Tensor& entropy,
                        const LogitTransform& f) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t W = V::size();
  const int64_t K = tile.size(0), vt = tile.size(1);
  T* up = tile.mutable_data_ptr<T>();
  const int64_t* y = targets.const_data_ptr<int64_t>();
  const T* gp = grad.const_data_ptr<T>();
  const T* lp = lse.const_data_ptr<T>();
  const T* gep = grad_entropy.defined() ? grad_entropy.const_data_ptr<T>() : nullptr;
  const T* hp = gep ? entropy.const_data_ptr<T>() : nullptr;
  const bool plain = f.softcap <= 0;
  at::parallel_for(0, K, std::max<int64_t>(1, 8192 / std::max<int64_t>(vt, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = up + r * vt;
      const T g = gp[r];
      const T ge = gep ? gep[r] : T(0);
      if (g == T(0) && ge == T(0)) {
        std::fill(row, row + vt, T(0));
        continue;
      }
      const int64_t c = y[r] - v0;
      const T target_u = (c >= 0 && c < vt) ? row[c] : T(0);
      int64_t j = 0;
      if (ge == T(0)) {
        if (plain) {
          const V coef(-g * T(f.logit_scale * f.inv_temperature)), shift(lp[r]);
          for (; j + W <= vt; j += W) {
            (coef * (transform_vec<T>(V::loadu(row + j), f) - shift).exp()).store(row + j);
          }
        }
        for (; j < vt; ++j) {
          row[j] = -g * transform_grad_scalar<T>(row[j], f) * std::exp(transform_scalar<T>(row[j], f) - lp[r]);
        }
      } else {
        // With the entropy term: -p_v (g + ge (z_v - lse + H)) dz/du; (z_v - lse) is log p_v.
        const T offset = g + ge * hp[r];
        if (plain) {
          const V coef(-T(f.logit_scale * f.inv_temperature)), shift(lp[r]), vge(ge), voff(offset);
          for (; j + W <= vt; j += W) {
            const V logp = transform_vec<T>(V::loadu(row + j), f) - shift;
            (coef * logp.exp() * at::vec::fmadd(vge, logp, voff)).store(row + j);
          }
        }
        for (; j < vt; ++j) {
          const T logp = transform_scalar<T>(row[j], f) - lp[r];
          row[j] = -transform_grad_scalar<T>(row[j], f) * std::exp(logp) * (offset + ge * logp);
        }
      }
      if (c >= 0 && c < vt) {
        // Recomputed from the saved raw logit: one rounding, however small p_target is.
        const T d = transform_grad_scalar<T>(target_u, f);
        const T logp = transform_scalar<T>(target_u, f) - lp[r];
        const T p = std::exp(logp);
        row[c] = ge == T(0) ? g * d * (T(1) - p) : d * (g * (T(1) - p) - ge * p * (logp + hp[r]));
      }
    }
  });
}

void forward_tile(const at::Tensor& tile, int64_t v0, const at::Tensor& targets, const LogitTransform& f, at::Tensor& m,
                  at::Tensor& s, at::Tensor& zt, at::Tensor& ez) {
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "fused_linear_forward_tile",
                             [&] { forward_tile_impl<scalar_t>(tile, v0, targets, f, m, s, zt, ez); });
}

void backward_tile(at::Tensor& tile, int64_t v0, const at::Tensor& targets, const at::Tensor& grad,
                   const at::Tensor& lse, const at::Tensor& grad_entropy, const at::Tensor& entropy,
                   const LogitTransform& f) {
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "fused_linear_backward_tile", [&] {
    backward_tile_impl<scalar_t>(tile, v0, targets, grad, lse, grad_entropy, entropy, f);
  });
}

}  // namespace

const FusedLinearKernels fused_linear_kernels{&forward_tile, &backward_tile};

}  // namespace CPU_CAPABILITY
}  // namespace alignops::preference
