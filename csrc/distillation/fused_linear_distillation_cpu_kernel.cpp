// Vectorised row-block epilogue of alignops::fused_linear_distillation (CPU): both softmaxes, the divergence, the
// student's entropy and the closed-form gradient w.r.t. the student's logits, in four passes over each row of the
// two [R, V] GEMM outputs and in place, so the block needs no [R, V] buffer beyond those two (the ATen expression
// it replaces held about ten at once: ~160 MB next to the gradient at V = 128256).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>

#include "distillation/fused_linear_distillation_cpu_kernel.h"

namespace alignops::distillation {
namespace CPU_CAPABILITY {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// The row's last, partial vector: its n valid lanes and `pad` in the others. Each pass pads with a value that
// adds nothing to its reductions (the lowest finite logit: exp() of it is 0, and 0 times any finite value is 0).
template <typename T>
inline Vec<T> load(const T* p, int64_t n, T pad) {
  if (n == Vec<T>::size()) {
    return Vec<T>::loadu(p);
  }
  alignas(64) T buf[Vec<T>::size()];
  for (int64_t i = 0; i < Vec<T>::size(); ++i) {
    buf[i] = i < n ? p[i] : pad;
  }
  return Vec<T>::loadu(buf);
}

template <typename T>
inline void store(const Vec<T>& v, T* p, int64_t n) {
  if (n == Vec<T>::size()) {
    v.store(p);
  } else {
    v.store(p, n);
  }
}

template <typename T>
inline T sum(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, v);
}

template <typename T>
inline T max(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); }, v);
}

template <typename T>
inline Vec<T> transform(const Vec<T>& u, const Transform& f) {
  if (f.softcap > 0) {
    return Vec<T>(T(f.softcap * f.inv_t)) * (u * Vec<T>(T(f.scale / f.softcap))).tanh();
  }
  return u * Vec<T>(T(f.scale * f.inv_t));
}

// log(exp(a) + exp(b)), -inf when both are -inf (a - b would be NaN there), NaN when either is NaN.
template <typename T>
inline Vec<T> logaddexp(const Vec<T>& a, const Vec<T>& b) {
  const Vec<T> m = at::vec::maximum(a, b);
  const Vec<T> r = m + (Vec<T>(T(0)) - (a - b).abs()).exp().log1p();
  return Vec<T>::blendv(r, m, m == Vec<T>(-std::numeric_limits<T>::infinity()));
}

template <typename T>
inline Vec<T> sign(const Vec<T>& x) {
  const Vec<T> zero(T(0));
  return Vec<T>::blendv(Vec<T>::blendv(x, Vec<T>(T(-1)), x < zero), Vec<T>(T(1)), x > zero);
}

template <typename T>
void block_impl(at::Tensor& zs, at::Tensor& zt, const at::Tensor& w, const Transform& fs, const Transform& ft,
                Mode mode, double coef_d, bool grad, at::Tensor& d, at::Tensor& ent) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const int64_t R = zs.size(0), NV = zs.size(1);
  T* sp = zs.mutable_data_ptr<T>();
  T* tp = zt.mutable_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  T* dp = d.mutable_data_ptr<T>();
  T* ep = ent.mutable_data_ptr<T>();
  const T lowest = std::numeric_limits<T>::lowest();
  const T coef = T(coef_d);
  const V la(T(std::log1p(-coef_d))), lb(T(std::log(coef_d))), vcoef(coef), vone_minus(T(1) - coef);
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* s = sp + r * NV;
      T* t = tp + r * NV;
      // A: the logits (transform in place) and their maxima.
      V ms(lowest), mt(lowest);
      for (int64_t j = 0; j < NV; j += W) {
        const int64_t n = std::min(W, NV - j);
        const V a = transform(load(s + j, n, T(0)), fs), b = transform(load(t + j, n, T(0)), ft);
        store(a, s + j, n);
        store(b, t + j, n);
        ms = at::vec::maximum(ms, load(s + j, n, lowest));  // reloaded: the padding must not raise the max
        mt = at::vec::maximum(mt, load(t + j, n, lowest));
      }
      // B: the logsumexps.
      const V vms(max(ms)), vmt(max(mt));
      V es(T(0)), et(T(0));
      for (int64_t j = 0; j < NV; j += W) {
        const int64_t n = std::min(W, NV - j);
        es = es + (load(s + j, n, lowest) - vms).exp();
        et = et + (load(t + j, n, lowest) - vmt).exp();
      }
      const V lse_s(max(ms) + std::log(sum(es))), lse_t(max(mt) + std::log(sum(et)));
      // C: log p of both, the entropy, the divergence and G (dz = ps (G - sum_v ps G)), kept in zt's row.
      V vent(T(0)), vd(T(0)), vS(T(0));
      for (int64_t j = 0; j < NV; j += W) {
        const int64_t n = std::min(W, NV - j);
        const V ls = load(s + j, n, lowest) - lse_s, lt = load(t + j, n, lowest) - lse_t;
        const V ps = ls.exp(), pt = lt.exp();
        vent = vent - ps * ls;
        V G;
        switch (mode) {
          case Mode::ForwardKL:
            vd = vd + pt * (lt - ls);
            G = pt;  // dz = ps - pt: pt is what pass D needs
            break;
          case Mode::ReverseKL:
            G = ls - lt;
            vd = vd + ps * G;
            break;
          case Mode::JSD: {
            const V log_m = logaddexp(ls + la, lt + lb);
            G = ls - log_m;
            vd = vd + vcoef * pt * (lt - log_m) + vone_minus * ps * G;
            G = G * vone_minus;
            break;
          }
          case Mode::TV: {
            const V diff = ps - pt;
            vd = vd + V(T(0.5)) * diff.abs();
            G = V(T(0.5)) * sign(diff);
            break;
          }
          case Mode::SkewKL: {
            const V lr = lt - logaddexp(lt + lb, ls + la);
            vd = vd + pt * lr;
            G = V(-(T(1) - coef)) * lr.exp();
            break;
          }
          case Mode::SkewReverseKL: {
            const V lr = ls - logaddexp(ls + lb, lt + la);
            vd = vd + ps * lr;
            G = lr - vcoef * lr.exp();
            break;
          }
        }
        if (mode != Mode::ForwardKL) {
          vS = vS + ps * G;
        }
        if (grad) {
          store(G, t + j, n);
        }
      }
      dp[r] = sum(vd);
      ep[r] = sum(vent);
      if (!grad) {
        continue;
      }
      // D: dz = w dz/du (ps (G - S)) (ForwardKL: w dz/du (ps - pt)) over the student's row, in place. dz/du comes
      // back from z itself: with softcap, z = c tanh(.) / T, so dz/du = scale / T (1 - (z T / c)^2).
      const V S(sum(vS)), scale(T(wp[r] * fs.scale * fs.inv_t));
      const V inv_cap(T(fs.softcap > 0 ? 1.0 / (fs.softcap * fs.inv_t) : 0.0)), one(T(1));
      for (int64_t j = 0; j < NV; j += W) {
        const int64_t n = std::min(W, NV - j);
        const V z = load(s + j, n, lowest), G = load(t + j, n, T(0));
        const V ps = (z - lse_s).exp();
        V dz = mode == Mode::ForwardKL ? ps - G : ps * (G - S);
        if (fs.softcap > 0) {
          const V th = z * inv_cap;
          dz = dz * (one - th * th);
        }
        store(dz * scale, s + j, n);
      }
    }
  });
}

void block(at::Tensor& zs, at::Tensor& zt, const at::Tensor& w, const Transform& fs, const Transform& ft, Mode mode,
           double coef, bool grad, at::Tensor& d, at::Tensor& ent) {
  AT_DISPATCH_FLOATING_TYPES(zs.scalar_type(), "fused_linear_distillation_block",
                             [&] { block_impl<scalar_t>(zs, zt, w, fs, ft, mode, coef, grad, d, ent); });
}

}  // namespace

const DistillationKernels distillation_kernels{&block};

}  // namespace CPU_CAPABILITY
}  // namespace alignops::distillation
