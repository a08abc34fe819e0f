// CPU kernels of alignops::wasserstein_1d and its backward: per problem, sort both samples (a stable radix sort
// for fp32 rows of >= 64 atoms, std::sort / std::stable_sort otherwise), build the normalised cumulative
// weights and walk the two CDFs in one merge; problems are spread over threads with at::parallel_for. The
// merge is a scalar two-pointer walk and the sort dominates, so there is no vectorised (AVX2) copy of this
// file. Sums run in fp64 whatever the input dtype.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/registration.h"

namespace alignops::wasserstein {
namespace {

// One sorted sample: values ascending, cumulative weights normalised so that the last one is exactly 1,
// and (for the backward) the permutation that sorted it and the total weight.
template <typename acc_t>
struct Sorted {
  std::vector<acc_t> x;
  std::vector<double> c;
  std::vector<int64_t> order;
  std::vector<uint64_t> packed, scratch;  // radix sort buffers (fp32 accumulation)
  double total = 0;
};

// A problem with a NaN atom has a NaN distance and NaN gradients (the sort never sees the NaN: with it `<`
// would not be a strict weak order).
template <typename scalar_t>
bool has_nan(const scalar_t* x, int64_t n) {
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    nan |= std::isnan(static_cast<float>(x[i]));
  }
  return nan;
}

// Order-preserving map of a float to an unsigned key (negative floats reversed, sign bit flipped). -0 is
// mapped to +0 (x + 0 in round-to-nearest), so that they tie as under `<`: stable order, same gradients.
inline uint32_t float_key(float f) {
  f += 0.0f;
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Stable LSD radix sort of (key << 32 | index) words by key, a byte per pass (a pass is skipped when every key
// has the same byte there). About 4x faster than std::sort on a random row of 1024 floats.
void radix_sort_packed(std::vector<uint64_t>& a, std::vector<uint64_t>& tmp) {
  const size_t n = a.size();
  tmp.resize(n);
  uint32_t count[4][256] = {};
  for (const uint64_t x : a) {
    const uint32_t k = static_cast<uint32_t>(x >> 32);
    for (int p = 0; p < 4; ++p) {
      ++count[p][(k >> (8 * p)) & 255u];
    }
  }
  uint64_t* src = a.data();
  uint64_t* dst = tmp.data();
  for (int p = 0; p < 4; ++p) {
    const int shift = 32 + 8 * p;
    if (count[p][(src[0] >> shift) & 255u] == n) {
      continue;
    }
    uint32_t offset[256];
    uint32_t run = 0;
    for (int b = 0; b < 256; ++b) {
      offset[b] = run;
      run += count[p][b];
    }
    for (size_t i = 0; i < n; ++i) {
      const uint64_t x = src[i];
      dst[offset[(x >> shift) & 255u]++] = x;
    }
    std::swap(src, dst);
  }
  if (src != a.data()) {
    std::copy(src, src + n, a.data());
  }
}

// Sorted values and normalised CDF from the permutation s.order.
template <typename scalar_t, typename acc_t>
void fill_sorted(const scalar_t* values, const scalar_t* weights, int64_t n, Sorted<acc_t>& s) {
  double run = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = s.order[i];
    s.x[i] = static_cast<acc_t>(values[k]);
    run += weights == nullptr ? 1.0 : static_cast<double>(weights[k]);
    s.c[i] = run;
  }
  s.total = run;
  for (int64_t i = 0; i < n; ++i) {
    s.c[i] /= run;
  }
  s.c[n - 1] = 1.0;
}

constexpr int64_t kRadixMin = 64;  // below this std::sort wins

template <typename scalar_t, typename acc_t>
void sort_sample(const scalar_t* values, const scalar_t* weights, int64_t n, bool keep_order, Sorted<acc_t>& s) {
  s.x.resize(n);
  s.c.resize(n);
  if constexpr (std::is_same_v<acc_t, float>) {
    if (n >= kRadixMin && n <= int64_t(0xffffffff)) {  // the index must fit the low 32 bits
      s.packed.resize(n);
      for (int64_t i = 0; i < n; ++i) {
        s.packed[i] =
            (static_cast<uint64_t>(float_key(static_cast<float>(values[i]))) << 32) | static_cast<uint64_t>(i);
      }
      radix_sort_packed(s.packed, s.scratch);
      s.order.resize(n);
      for (int64_t i = 0; i < n; ++i) {
        s.order[i] = static_cast<int64_t>(s.packed[i] & 0xffffffffu);
      }
      fill_sorted(values, weights, n, s);
      return;
    }
  }
  if (!keep_order && weights == nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      s.x[i] = static_cast<acc_t>(values[i]);
    }
    std::sort(s.x.begin(), s.x.end());
    for (int64_t i = 0; i < n; ++i) {
      s.c[i] = static_cast<double>(i + 1) / static_cast<double>(n);
    }
    s.total = static_cast<double>(n);
    return;
  }
  // Stable: atoms at the same location keep their input order, so gradients are deterministic.
  s.order.resize(n);
  std::iota(s.order.begin(), s.order.end(), int64_t(0));
  std::stable_sort(s.order.begin(), s.order.end(), [values](int64_t a, int64_t b) {
    return static_cast<acc_t>(values[a]) < static_cast<acc_t>(values[b]);
  });
  fill_sorted(values, weights, n, s);
}

inline double cost_of(double d, double p) {
  const double a = std::abs(d);
  return p == 1.0 ? a : (p == 2.0 ? a * a : std::pow(a, p));
}

// d cost / d d for cost = |d|^p (0 at d = 0 for p = 1: the subgradient of least norm).
inline double dcost_of(double d, double p) {
  if (p == 1.0) {
    return d > 0 ? 1.0 : (d < 0 ? -1.0 : 0.0);
  }
  if (p == 2.0) {
    return 2.0 * d;
  }
  return d == 0 ? 0.0 : p * std::pow(std::abs(d), p - 1.0) * (d > 0 ? 1.0 : -1.0);
}

template <typename acc_t>
double merge_cost(const Sorted<acc_t>& u, const Sorted<acc_t>& v, double p) {
  const int64_t n = static_cast<int64_t>(u.x.size()), m = static_cast<int64_t>(v.x.size());
  double cost = 0, prev = 0;
  int64_t i = 0, j = 0;
  while (i < n && j < m) {
    const double c = cost_of(static_cast<double>(u.x[i]) - static_cast<double>(v.x[j]), p);
    // Ties take u's breakpoint first; the v step that follows has length 0.
    const double q = u.c[i] <= v.c[j] ? u.c[i++] : v.c[j++];
    cost += (q - prev) * c;
    prev = q;
  }
  return cost;
}

// Gradients of g * cost w.r.t. the sorted values (gx) and the cumulative breakpoints (gc). The cost is
// sum_k (q_k - q_{k-1}) c_k, so d/d q_k = c_k - c_{k+1}; ties between breakpoints are kinks, and the
// one-sided derivative of the merge order above (u first) is returned there.
template <typename acc_t>
void merge_grad(const Sorted<acc_t>& u, const Sorted<acc_t>& v, double p, double g, bool breakpoints,
                std::vector<double>& gxu, std::vector<double>& gxv, std::vector<double>& gcu,
                std::vector<double>& gcv) {
  const int64_t n = static_cast<int64_t>(u.x.size()), m = static_cast<int64_t>(v.x.size());
  gxu.assign(n, 0.0);
  gxv.assign(m, 0.0);
  gcu.assign(breakpoints ? n : 0, 0.0);
  gcv.assign(breakpoints ? m : 0, 0.0);
  double prev = 0, c_prev = 0;
  double* last = nullptr;  // the breakpoint taken at the previous step
  int64_t i = 0, j = 0;
  while (i < n && j < m) {
    const double d = static_cast<double>(u.x[i]) - static_cast<double>(v.x[j]);
    const bool take_u = u.c[i] <= v.c[j];
    const double q = take_u ? u.c[i] : v.c[j];
    const double dd = g * (q - prev) * dcost_of(d, p);
    gxu[i] += dd;
    gxv[j] -= dd;
    if (breakpoints) {
      const double c = cost_of(d, p);
      if (last != nullptr) {
        *last = g * (c_prev - c);
      }
      last = take_u ? &gcu[i] : &gcv[j];
      c_prev = c;
    }
    if (take_u) {
      ++i;
    } else {
      ++j;
    }
    prev = q;
  }
}

// d / d w_l of a function of C_i = (sum_{k<=i} w_k) / S, from gc_i = d / d C_i (sorted order):
// (sum_{i>=l} gc_i - sum_i gc_i C_i) / S, scattered back to the input order.
template <typename acc_t, typename scalar_t>
void weight_grad(const Sorted<acc_t>& s, const std::vector<double>& gc, scalar_t* out) {
  const int64_t n = static_cast<int64_t>(gc.size());
  double dot = 0;
  for (int64_t i = 0; i < n; ++i) {
    dot += gc[i] * s.c[i];
  }
  double tail = 0;
  for (int64_t l = n - 1; l >= 0; --l) {
    tail += gc[l];
    out[s.order[l]] = static_cast<scalar_t>((tail - dot) / s.total);
  }
}

// The checks of wasserstein_1d (also its op alignops::wasserstein_1d_check, which the Triton twin calls): shapes,
// dtypes, devices and p; they read no data. The weights' values are checked by check_weight_values.
void check_inputs(const at::Tensor& u, const at::Tensor& v, const std::optional<at::Tensor>& uw,
                  const std::optional<at::Tensor>& vw, double p) {
  check_dim(u, 2, "u", "[B, n]");
  check_dim(v, 2, "v", "[B, m]");
  check_floating(u, "u");
  check_same_dtype(v, u, "v", "u");
  check_same_device(v, u, "v", "u");
  TORCH_CHECK_VALUE(v.sym_size(0) == u.sym_size(0), "v must have as many problems as u (B = ", u.sym_size(0),
                    "), got shape ", v.sym_sizes());
  TORCH_CHECK_VALUE(u.sym_size(1) > 0 && v.sym_size(1) > 0, "u and v need at least one atom each, got shapes ",
                    u.sym_sizes(), " and ", v.sym_sizes());
  TORCH_CHECK_VALUE(p >= 1.0 && std::isfinite(p), "p must be a finite value >= 1, got ", p);
  for (const auto& [w, x, name, xname] :
       {std::tuple{&uw, &u, "u_weights", "u"}, std::tuple{&vw, &v, "v_weights", "v"}}) {
    if (w->has_value()) {
      check_same_shape(**w, *x, name, xname);
      check_same_dtype(**w, *x, name, xname);
      check_same_device(**w, *x, name, xname);
    }
  }
}

// The check of the weights' values, as the op alignops::wasserstein_1d_check_values: the CPU kernel calls it, and the
// public function before the reference backend on the CPU (on a GPU it is skipped: it would wait for the device).
void check_weight_values(const std::optional<at::Tensor>& uw, const std::optional<at::Tensor>& vw) {
  for (const auto& [w, name] : {std::pair{&uw, "u_weights"}, std::pair{&vw, "v_weights"}}) {
    if (w->has_value() && (*w)->numel() > 0) {
      TORCH_CHECK_VALUE(((**w >= 0) & (**w).isfinite()).all().item<bool>(), name, " must be finite and >= 0");
      TORCH_CHECK_VALUE(((**w).sum(-1) > 0).all().item<bool>(), name, " must have a positive sum in every problem");
    }
  }
}

// The checks of the backward (alignops::wasserstein_1d_backward_check).
void check_backward(const at::Tensor& grad, const at::Tensor& u, const at::Tensor& v,
                    const std::optional<at::Tensor>& uw, const std::optional<at::Tensor>& vw, double p,
                    bool /*weights_grad*/) {
  check_inputs(u, v, uw, vw, p);
  TORCH_CHECK_VALUE(grad.dim() == 1 && grad.sym_size(0) == u.sym_size(0), "grad must have shape [B] = [", u.sym_size(0),
                    "], got ", grad.sym_sizes());
  check_same_device(grad, u, "grad", "u");
}

int64_t grain(int64_t n, int64_t m) { return std::max<int64_t>(1, 32768 / (n + m)); }

at::Tensor wasserstein_1d_cpu(const at::Tensor& u, const at::Tensor& v, const std::optional<at::Tensor>& u_weights,
                              const std::optional<at::Tensor>& v_weights, double p) {
  check_inputs(u, v, u_weights, v_weights, p);
  check_device(u, c10::DeviceType::CPU, "u");
  check_weight_values(u_weights, v_weights);
  const int64_t B = u.size(0), n = u.size(1), m = v.size(1);
  const auto uc = u.contiguous(), vc = v.contiguous();
  const auto uwc = u_weights.has_value() ? u_weights->contiguous() : at::Tensor();
  const auto vwc = v_weights.has_value() ? v_weights->contiguous() : at::Tensor();
  auto out = at::empty({B}, u.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "wasserstein_1d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pu = uc.const_data_ptr<scalar_t>();
    const scalar_t* pv = vc.const_data_ptr<scalar_t>();
    const scalar_t* pwu = uwc.defined() ? uwc.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pwv = vwc.defined() ? vwc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(n, m), [&](int64_t begin, int64_t end) {
      Sorted<acc_t> su, sv;
      for (int64_t b = begin; b < end; ++b) {
        if (has_nan(pu + b * n, n) || has_nan(pv + b * m, m)) {
          po[b] = std::numeric_limits<scalar_t>::quiet_NaN();
          continue;
        }
        sort_sample(pu + b * n, pwu ? pwu + b * n : nullptr, n, false, su);
        sort_sample(pv + b * m, pwv ? pwv + b * m : nullptr, m, false, sv);
        po[b] = static_cast<scalar_t>(merge_cost(su, sv, p));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> wasserstein_1d_backward_cpu(
    const at::Tensor& grad, const at::Tensor& u, const at::Tensor& v, const std::optional<at::Tensor>& u_weights,
    const std::optional<at::Tensor>& v_weights, double p, bool weights_grad) {
  check_backward(grad, u, v, u_weights, v_weights, p, weights_grad);
  check_device(u, c10::DeviceType::CPU, "u");
  check_weight_values(u_weights, v_weights);
  const int64_t B = u.size(0), n = u.size(1), m = v.size(1);
  const auto uc = u.contiguous(), vc = v.contiguous();
  const auto gc = grad.contiguous().to(at::kDouble);
  const auto uwc = u_weights.has_value() ? u_weights->contiguous() : at::Tensor();
  const auto vwc = v_weights.has_value() ? v_weights->contiguous() : at::Tensor();
  auto gu = at::empty_like(uc), gv = at::empty_like(vc);
  const bool gwu_on = weights_grad && uwc.defined(), gwv_on = weights_grad && vwc.defined();
  auto gwu = at::empty({gwu_on ? B : 0, gwu_on ? n : 0}, u.options());
  auto gwv = at::empty({gwv_on ? B : 0, gwv_on ? m : 0}, u.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "wasserstein_1d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pu = uc.const_data_ptr<scalar_t>();
    const scalar_t* pv = vc.const_data_ptr<scalar_t>();
    const scalar_t* pwu = uwc.defined() ? uwc.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pwv = vwc.defined() ? vwc.const_data_ptr<scalar_t>() : nullptr;
    const double* pg = gc.const_data_ptr<double>();
    scalar_t* pgu = gu.mutable_data_ptr<scalar_t>();
    scalar_t* pgv = gv.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(n, m), [&](int64_t begin, int64_t end) {
      Sorted<acc_t> su, sv;
      std::vector<double> gxu, gxv, gcu, gcv;
      for (int64_t b = begin; b < end; ++b) {
        if (has_nan(pu + b * n, n) || has_nan(pv + b * m, m)) {
          const auto nan = std::numeric_limits<scalar_t>::quiet_NaN();
          std::fill(pgu + b * n, pgu + (b + 1) * n, nan);
          std::fill(pgv + b * m, pgv + (b + 1) * m, nan);
          if (gwu_on) {
            std::fill(gwu.mutable_data_ptr<scalar_t>() + b * n, gwu.mutable_data_ptr<scalar_t>() + (b + 1) * n, nan);
          }
          if (gwv_on) {
            std::fill(gwv.mutable_data_ptr<scalar_t>() + b * m, gwv.mutable_data_ptr<scalar_t>() + (b + 1) * m, nan);
          }
          continue;
        }
        sort_sample(pu + b * n, pwu ? pwu + b * n : nullptr, n, true, su);
        sort_sample(pv + b * m, pwv ? pwv + b * m : nullptr, m, true, sv);
        merge_grad(su, sv, p, pg[b], gwu_on || gwv_on, gxu, gxv, gcu, gcv);
        for (int64_t i = 0; i < n; ++i) {
          pgu[b * n + su.order[i]] = static_cast<scalar_t>(gxu[i]);
        }
        for (int64_t j = 0; j < m; ++j) {
          pgv[b * m + sv.order[j]] = static_cast<scalar_t>(gxv[j]);
        }
        if (gwu_on) {
          weight_grad(su, gcu, gwu.mutable_data_ptr<scalar_t>() + b * n);
        }
        if (gwv_on) {
          weight_grad(sv, gcv, gwv.mutable_data_ptr<scalar_t>() + b * m);
        }
      }
    });
  });
  return {gu, gv, gwu, gwv};
}

}  // namespace

// The schemas of this file's ops, defined here and nowhere else.
TORCH_LIBRARY_FRAGMENT(alignops, m) {
  // ---- wasserstein: 1-D optimal transport between empirical measures, batched over rows -------------
  // u [B, n], v [B, m], weights of their shapes (None: uniform; normalised per row). Returns W_p^p [B] in u's
  // dtype (POT's ot.wasserstein_1d convention; scipy.stats.wasserstein_distance for p = 1), fp64 sums.
  // The backward returns (grad_u [B, n], grad_v [B, m], grad_u_weights, grad_v_weights); the weight
  // gradients are [B, n] / [B, m] when weights_grad and the weights are given, else empty.
  def_checked(m, "wasserstein_1d(Tensor u, Tensor v, Tensor? u_weights, Tensor? v_weights, float p) -> Tensor");

  def_checked(m,
              "wasserstein_1d_backward(Tensor grad, Tensor u, Tensor v, Tensor? u_weights, Tensor? v_weights, float p, "
              "bool weights_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // The check that reads the weights' values (finite, >= 0, a positive sum per row; ATen reductions, a host sync).
  m.def("wasserstein_1d_check_values(Tensor? u_weights, Tensor? v_weights) -> ()");
}

TORCH_LIBRARY_IMPL(alignops, CompositeImplicitAutograd, m) {
  m.impl("wasserstein_1d_check", &check_inputs);
  m.impl("wasserstein_1d_backward_check", &check_backward);
  m.impl("wasserstein_1d_check_values", &check_weight_values);
}

TORCH_LIBRARY_IMPL(alignops, CPU, m) {
  m.impl("wasserstein_1d", &wasserstein_1d_cpu);
  m.impl("wasserstein_1d_backward", &wasserstein_1d_backward_cpu);
}

}  // namespace alignops::wasserstein
