// alignops::token_entropy(_backward): the entropy of each row's softmax(logits / T), read from the logits in two
// passes per row, never materialising log_softmax: its schema, its checks and its CPU kernel.
//
// With m = max logits, u = (logits - m) / T (the difference first: a tiny T then scales an exact difference),
// s = sum exp(u) and w = sum exp(u) u:
//   log p = u - log s,  H = -sum p log p = log s - w / s,  dH / dz_v = -p_v (log p_v + H)  (z = logits / T),
// and dH / dlogits = dH / dz / T. The forward keeps (m, log s) per row, so that the backward forms log p from the
// same difference u and never cancels two large numbers (logits / T - logsumexp would, on confident rows). An entry
// with exp(u) = 0 (a -inf logit, or one that underflows) adds nothing to w (0 * -inf would be NaN) and gets a zero
// gradient. NaN logits give NaN, +inf ones NaN, as log_softmax does. Accumulation in fp32 over 16 lanes (fp64 for fp64
// logits), so the sums over V run in 16 shorter chains.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

#include "common/checks.h"
#include "common/cpu_capability.h"
#include "common/registration.h"

namespace alignops::policy {
namespace {

// The checks of both ops: sizes, dtypes and devices only (they also run on fake tensors, see checks.h).
void token_entropy_check(const at::Tensor& logits, double temperature) {
  check_dim(logits, 2, "logits", "[N, V]");
  check_floating(logits, "logits");
  TORCH_CHECK_VALUE(logits.sym_size(1) > 0, "logits must have a non-empty vocabulary (V > 0), got shape ",
                    logits.sym_sizes());
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature), "temperature must be a finite value > 0, got ",
                    temperature);
  // The kernels multiply by 1 / T in fp32: beyond these bounds it is 0 or inf, and a row would come out NaN.
  TORCH_CHECK_VALUE(temperature >= 1e-30 && temperature <= 1e30, "temperature must lie in [1e-30, 1e30], got ",
                    temperature);
}

void token_entropy_backward_check(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& entropy,
                                  const at::Tensor& stats, double temperature) {
  token_entropy_check(logits, temperature);
  const auto acc = acc_type_of(logits);
  check_dim(stats, 2, "stats", "[N, 2] (the forward's row max and log-sum)");
  TORCH_CHECK_VALUE(stats.sym_size(0) == logits.sym_size(0) && stats.sym_size(1) == 2,
                    "stats must have shape [N, 2] with N = ", logits.sym_size(0), ", got ", stats.sym_sizes());
  check_same_device(stats, logits, "stats", "logits");
  TORCH_CHECK_VALUE(stats.scalar_type() == acc, "stats must be ", dtype_name(acc), " for ",
                    dtype_name(logits.scalar_type()), " logits, got ", dtype_name(stats.scalar_type()));
  for (const auto& [t, name] : {std::pair{&grad, "grad"}, std::pair{&entropy, "entropy"}}) {
    check_dim(*t, 1, name, "[N]");
    TORCH_CHECK_VALUE(t->sym_size(0) == logits.sym_size(0), name,
                      " must have one entry per row of logits [N=", logits.sym_size(0), "], got ", t->sym_size(0));
    check_same_device(*t, logits, name, "logits");
    TORCH_CHECK_VALUE(t->scalar_type() == acc, name, " must be ", dtype_name(acc), " for ",
                      dtype_name(logits.scalar_type()), " logits, got ", dtype_name(t->scalar_type()));
  }
}

// ---- fp64: plain loops (std::exp, full precision) -----------------------------------------------------------------

void entropy_rows_f64(const double* x, const double* row_max, double* entropy, double* stats, int64_t begin,
                      int64_t end, int64_t V, double inv_t) {
  for (int64_t n = begin; n < end; ++n) {
    const double* row = x + n * V;
    const double m = row_max[n];
    if (!std::isfinite(m)) {  // a NaN, a +inf logit, or an all -inf row
      entropy[n] = stats[2 * n] = stats[2 * n + 1] = std::numeric_limits<double>::quiet_NaN();
      continue;
    }
    // u = (z - m) / T: the difference first, so a tiny T scales an exact difference (see kernels/policy.py).
    double s = 0, w = 0;
    for (int64_t v = 0; v < V; ++v) {
      const double u = (row[v] - m) * inv_t;
      const double e = std::exp(u);
      s += e;
      w += e > 0 ? e * u : 0.0;
    }
    entropy[n] = std::log(s) - w / s;
    stats[2 * n] = m;
    stats[2 * n + 1] = std::log(s);
  }
}

void entropy_grad_rows_f64(const double* grad, const double* x, const double* entropy, const double* stats, double* out,
                           int64_t begin, int64_t end, int64_t V, double inv_t) {
  for (int64_t n = begin; n < end; ++n) {
    const double g = -grad[n] * inv_t, h = entropy[n], m = stats[2 * n], log_s = stats[2 * n + 1];
    if (std::isnan(h)) {  // the forward's NaN rows: NaN, as autograd through log_softmax gives
      std::fill(out + n * V, out + (n + 1) * V, std::numeric_limits<double>::quiet_NaN());
      continue;
    }
    for (int64_t v = 0; v < V; ++v) {
      const double log_p = (x[n * V + v] - m) * inv_t - log_s;
      const double p = std::exp(log_p);
      out[n * V + v] = p > 0 ? g * p * (log_p + h) : 0.0;
    }
  }
}

// ---- fp32 / bf16 / fp16: fp32 arithmetic in loops the compiler vectorises ------------------------------------------
// The row max comes from ATen (amax: vectorised, and NaN when the row holds one); a row whose max is NaN or infinite
// gives NaN, as log_softmax does, before any exp. The loops below call fast_exp, arithmetic and bit moves only, and
// are compiled without trapping math and with reassociation (the region's pragma), which lets GCC vectorise the
// sums; x86 builds also compile them for AVX2 + FMA, chosen at run time like the *_cpu_kernel.cpp files.

#pragma GCC push_options
#pragma GCC optimize("no-trapping-math", "associative-math", "no-signed-zeros")

// exp(x) within ~2 ulp for -88 <= x <= 88, and 0 below -87.3 (where fp32's exp is denormal or 0): Cody-Waite
// reduction x = k ln2 + r, |r| <= ln2 / 2, a degree-7 Taylor polynomial in r (truncation < 6e-9 relative), and 2^k
// built from its bits. The caller clamps x to >= -88 (a -inf logit gives -inf, and inf - inf below would be NaN).
__attribute__((always_inline)) inline float fast_exp(float x) {
  // round(x / ln2) by truncation after +-0.5 (float <-> int conversions vectorise; a magic-number rounding would
  // be folded away by the region's reassociation)
  const float t = x * 1.44269504f;
  const int32_t k = static_cast<int32_t>(t < 0.0f ? t - 0.5f : t + 0.5f);
  const float kf = static_cast<float>(k);
  const float r = (x - kf * 0.693145751953125f) - kf * 1.428606765330187e-06f;  // ln2 split in two parts
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (k + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.3f ? 0.0f : p * scale;
}

__attribute__((always_inline)) inline float from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// bf16 / fp16 -> fp32 (exact) by bit moves and selects that vectorise (c10's conversions branch, or call a scalar
// F16C instruction); fp32 -> bf16 / fp16 round to nearest even, overflow to inf and keep NaN a NaN.
template <typename scalar_t>
__attribute__((always_inline)) inline float load(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return from_bits(static_cast<uint32_t>(p->x) << 16);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    // The half's exponent and mantissa shifted into place: normal numbers rebias the exponent by a product with
    // 2^-112 (exact), subnormals come from a float with the mantissa bits minus 0.5; inf and NaN keep exponent 0xFF.
    const uint32_t w = static_cast<uint32_t>(p->x) << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normal = from_bits((two_w >> 4) + (0xE0u << 23)) * from_bits(0x07800000u);  // 2^-112
    const float subnormal = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    float magnitude = two_w < (1u << 27) ? subnormal : normal;
    uint32_t bits;
    std::memcpy(&bits, &magnitude, sizeof bits);
    return from_bits(sign | bits);
  } else {
    return static_cast<float>(*p);
  }
}

template <typename scalar_t>
__attribute__((always_inline)) inline scalar_t narrow(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return c10::BFloat16(static_cast<uint16_t>(f != f ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    // Round to nearest even: normal halves by integer rounding of the fp32 bits (a carry into the exponent is the
    // right result, up to inf at 65520); subnormal ones (below 2^-14) by the fp32 adder itself: |f| + 0.5 rounds |f|
    // to a multiple of 2^-24, the half's subnormal step, and the sum's low bits are the half's mantissa.
    const uint32_t abs = bits & 0x7FFFFFFFu, sign = (bits >> 16) & 0x8000u;
    const uint32_t normal = (abs + 0xFFFu + ((abs >> 13) & 1u) - (112u << 23)) >> 13;
    const float small = from_bits(abs < 0x38800000u ? abs : 0u) + 0.5f;
    uint32_t subnormal;
    std::memcpy(&subnormal, &small, sizeof subnormal);
    uint32_t magnitude = abs < 0x38800000u ? subnormal - 0x3F000000u : normal;
    magnitude = abs >= 0x47800000u ? 0x7C00u : magnitude;
    magnitude = abs > 0x7F800000u ? 0x7E00u : magnitude;
    return c10::Half(static_cast<uint16_t>(sign | magnitude), c10::Half::from_bits());
  } else {
    return static_cast<scalar_t>(f);
  }
}

template <typename scalar_t>
__attribute__((always_inline)) inline void entropy_rows_fast(const scalar_t* x, const float* row_max, float* entropy,
                                                             float* stats, int64_t begin, int64_t end, int64_t V,
                                                             float inv_t) {
  for (int64_t n = begin; n < end; ++n) {
    const float m = row_max[n];
    if (!std::isfinite(m)) {  // a NaN, a +inf logit, or an all -inf row
      entropy[n] = stats[2 * n] = stats[2 * n + 1] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const scalar_t* row = x + n * V;
    float s = 0, w = 0;
    for (int64_t v = 0; v < V; ++v) {
      // u = (z - m) / T: the difference first, so a tiny T scales an exact difference. Clamped at -88, where exp
      // is already 0: a -inf logit then adds 0 * -88 to w, not 0 * -inf.
      float u = (load(row + v) - m) * inv_t;
      u = u < -88.0f ? -88.0f : u;
      const float e = fast_exp(u);
      s += e;
      w += e * u;
    }
    entropy[n] = std::log(s) - w / s;
    stats[2 * n] = m;
    stats[2 * n + 1] = std::log(s);
  }
}

template <typename scalar_t>
__attribute__((always_inline)) inline void entropy_grad_rows_fast(const float* grad, const scalar_t* x,
                                                                  const float* entropy, const float* stats,
                                                                  scalar_t* out, int64_t begin, int64_t end, int64_t V,
                                                                  float inv_t) {
  for (int64_t n = begin; n < end; ++n) {
    const float g = -grad[n] * inv_t, h = entropy[n], m = stats[2 * n], log_s = stats[2 * n + 1];
    const scalar_t* row = x + n * V;
    scalar_t* out_row = out + n * V;
    if (std::isnan(h)) {  // the forward's NaN rows: NaN, as autograd through log_softmax gives
      std::fill(out_row, out_row + V, static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN()));
      continue;
    }
    for (int64_t v = 0; v < V; ++v) {
      float log_p = (load(row + v) - m) * inv_t - log_s;
      log_p = log_p < -88.0f ? -88.0f : log_p;  // p = 0 there, and the product below 0 (not 0 * -inf)
      const float p = fast_exp(log_p);
      out_row[v] = narrow<scalar_t>(g * p * (log_p + h));
    }
  }
}

template <typename scalar_t>
void entropy_rows_default(const scalar_t* x, const float* row_max, float* entropy, float* stats, int64_t begin,
                          int64_t end, int64_t V, float inv_t) {
  entropy_rows_fast(x, row_max, entropy, stats, begin, end, V, inv_t);
}

template <typename scalar_t>
void entropy_grad_rows_default(const float* grad, const scalar_t* x, const float* entropy, const float* stats,
                               scalar_t* out, int64_t begin, int64_t end, int64_t V, float inv_t) {
  entropy_grad_rows_fast(grad, x, entropy, stats, out, begin, end, V, inv_t);
}

#if ALIGNOPS_X86
template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) void entropy_rows_avx2(const scalar_t* x, const float* row_max, float* entropy,
                                                                float* stats, int64_t begin, int64_t end, int64_t V,
                                                                float inv_t) {
  entropy_rows_fast(x, row_max, entropy, stats, begin, end, V, inv_t);
}

template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) void entropy_grad_rows_avx2(const float* grad, const scalar_t* x,
                                                                     const float* entropy, const float* stats,
                                                                     scalar_t* out, int64_t begin, int64_t end,
                                                                     int64_t V, float inv_t) {
  entropy_grad_rows_fast(grad, x, entropy, stats, out, begin, end, V, inv_t);
}
#endif

#pragma GCC pop_options

// Rows in parallel, about 32k entries per task.
template <typename F>
void for_rows(int64_t N, int64_t V, const F& f) {
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / V), f);
}

template <typename scalar_t>
void forward_rows(const scalar_t* x, const at::Tensor& row_max, at::Tensor& entropy, at::Tensor& stats, int64_t N,
                  int64_t V, double inv_t) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    double *h = entropy.mutable_data_ptr<double>(), *l = stats.mutable_data_ptr<double>();
    const double* m = row_max.const_data_ptr<double>();
    for_rows(N, V, [&](int64_t b, int64_t e) { entropy_rows_f64(x, m, h, l, b, e, V, inv_t); });
  } else {
    float *h = entropy.mutable_data_ptr<float>(), *l = stats.mutable_data_ptr<float>();
    const float* m = row_max.const_data_ptr<float>();
    auto rows = &entropy_rows_default<scalar_t>;
#if ALIGNOPS_X86
    if (cpu_has_avx2()) rows = &entropy_rows_avx2<scalar_t>;
#endif
    for_rows(N, V, [&](int64_t b, int64_t e) { rows(x, m, h, l, b, e, V, static_cast<float>(inv_t)); });
  }
}

template <typename scalar_t>
void backward_rows(const at::Tensor& grad, const scalar_t* x, const at::Tensor& entropy, const at::Tensor& stats,
                   scalar_t* out, int64_t N, int64_t V, double inv_t) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    const double *g = grad.const_data_ptr<double>(), *h = entropy.const_data_ptr<double>(),
                 *l = stats.const_data_ptr<double>();
    for_rows(N, V, [&](int64_t b, int64_t e) { entropy_grad_rows_f64(g, x, h, l, out, b, e, V, inv_t); });
  } else {
    const float *g = grad.const_data_ptr<float>(), *h = entropy.const_data_ptr<float>(),
                *l = stats.const_data_ptr<float>();
    auto rows = &entropy_grad_rows_default<scalar_t>;
#if ALIGNOPS_X86
    if (cpu_has_avx2()) rows = &entropy_grad_rows_avx2<scalar_t>;
#endif
    for_rows(N, V, [&](int64_t b, int64_t e) { rows(g, x, h, l, out, b, e, V, static_cast<float>(inv_t)); });
  }
}

std::tuple<at::Tensor, at::Tensor> token_entropy_cpu(const at::Tensor& logits, double temperature) {
  token_entropy_check(logits, temperature);
  check_device(logits, c10::DeviceType::CPU, "logits");
  const auto x = logits.contiguous();
  const auto opts = logits.options().dtype(acc_type_of(logits));
  auto entropy = at::empty({x.size(0)}, opts);
  auto stats = at::empty({x.size(0), 2}, opts);
  if (x.size(0) == 0) {
    return {entropy, stats};
  }
  // Each row's max from ATen's vectorised amax, in the accumulation dtype (exact: a widening; NaN for a row with a
  // NaN, which the row loops then return as NaN without an exp).
  const auto row_max = x.amax(1).to(acc_type_of(x));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "token_entropy_cpu", [&] {
    forward_rows<scalar_t>(x.const_data_ptr<scalar_t>(), row_max, entropy, stats, x.size(0), x.size(1),
                           1 / temperature);
  });
  return {entropy, stats};
}

at::Tensor token_entropy_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& entropy,
                                      const at::Tensor& stats, double temperature) {
  token_entropy_backward_check(grad, logits, entropy, stats, temperature);
  check_device(logits, c10::DeviceType::CPU, "logits");
  const auto x = logits.contiguous();
  auto grad_logits = at::empty_like(x);
  const auto g = grad.contiguous(), h = entropy.contiguous(), l = stats.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "token_entropy_backward_cpu", [&] {
    backward_rows<scalar_t>(g, x.const_data_ptr<scalar_t>(), h, l, grad_logits.mutable_data_ptr<scalar_t>(), x.size(0),
                            x.size(1), 1 / temperature);
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(alignops, m) {
  // ---- policy: per-token entropy of softmax(logits / temperature) ------------------------------------
  // logits [N, V] (any float dtype, V > 0). Returns (entropy [N], stats [N, 2]) in the accumulation dtype (fp32;
  // fp64 for fp64 logits); stats holds each row's max logit m and log s, s = sum exp((logits - m) / T) (so
  // logsumexp(logits / T) = m / T + log s), kept for the backward. The backward returns
  // d (sum_n grad_n entropy_n) / d logits [N, V] in the logits' dtype; it is not differentiable again.
  def_checked(m, "token_entropy(Tensor logits, float temperature) -> (Tensor, Tensor)");
  def_checked(m,
              "token_entropy_backward(Tensor grad, Tensor logits, Tensor entropy, Tensor stats, float temperature) "
              "-> Tensor");
}

TORCH_LIBRARY_IMPL(alignops, CPU, m) {
  m.impl("token_entropy", &token_entropy_cpu);
  m.impl("token_entropy_backward", &token_entropy_backward_cpu);
}

TORCH_LIBRARY_IMPL(alignops, CompositeImplicitAutograd, m) {
  m.impl("token_entropy_check", &token_entropy_check);
  m.impl("token_entropy_backward_check", &token_entropy_backward_check);
}

}  // namespace alignops::policy
