// alignops_stable::preference_loss, ::selective_logprobs and ::selective_logprobs_backward: the CPU kernels of
// the preference family written against the LibTorch stable ABI only
// (torch/csrc/stable/*, torch/headeronly/*), so one .so built against torch 2.14 headers with
// -DTORCH_TARGET_VERSION=<2.10> loads into every torch >= 2.10. Not part of the package build: see
// .ci/stable_abi.sh (build + tests under two torches) and docs/stable-abi.md (what it took, what blocks the rest).
//
// The per-pair math is the shared, ATen-free preference_loss_math.h, evaluated on scalars (MathOps<T>): the
// main kernel's at::vec::Vectorized specialisation has no stable counterpart (torch/headeronly/cpu/vec has
// only vec_half.h and intrinsics.h in 2.14). Checks mirror csrc/common/checks.h word for word, but raise
// RuntimeError: STD_TORCH_CHECK (torch/headeronly/util/Exception.h) throws std::runtime_error and the stable
// headers have no TORCH_CHECK_VALUE counterpart.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "preference/preference_checks.h"
#include "preference/preference_loss_math.h"
#include "preference/preference_schemas.h"

namespace alignops_stable {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using namespace alignops::preference;  // LossType / FDivergence codes, Params, pair_loss

// "torch.float32", as Python prints a dtype and as csrc/common/checks.h words it (c10::getDtypeNames is not
// header-only).
std::string dtype_name(ScalarType s) {
  switch (s) {
    case ScalarType::Float:
      return "torch.float32";
    case ScalarType::Double:
      return "torch.float64";
    case ScalarType::Half:
      return "torch.float16";
    case ScalarType::BFloat16:
      return "torch.bfloat16";
    case ScalarType::Long:
      return "torch.int64";
    case ScalarType::Int:
      return "torch.int32";
    case ScalarType::Bool:
      return "torch.bool";
    default:
      return std::string("torch.") + torch::headeronly::toString(s);
  }
}

std::string shape_str(const Tensor& t) {
  std::ostringstream os;
  os << "[";
  for (int64_t d = 0; d < t.dim(); ++d) {
    os << (d ? ", " : "") << t.size(d);
  }
  os << "]";
  return os.str();
}

bool same_shape(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) {
    return false;
  }
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != b.size(d)) {
      return false;
    }
  }
  return true;
}

// The first tensor of each op must be a CPU one (this library has only a CPU kernel); the shared checks then hold
// every other tensor to its device.
void check_cpu(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.is_cpu(), name, " must be a CPU tensor (alignops_stable has only a CPU kernel)");
}

// The torch::stable::Tensor operations of the checks shared with alignops._C (csrc/common/checks_portable.h,
// csrc/preference/preference_checks.h).
// Every device compared here is matched against a CPU tensor, so "same device" is "both on the CPU or neither".
struct StableOps {
  static int64_t dim(const Tensor& t) { return t.dim(); }
  static int64_t size(const Tensor& t, int64_t d) { return t.size(d); }
  static ScalarType dtype(const Tensor& t) { return t.scalar_type(); }
  static std::string dtype_name(ScalarType s) { return alignops_stable::dtype_name(s); }
  static std::string sizes(const Tensor& t) { return shape_str(t); }
  static bool same_shape(const Tensor& a, const Tensor& b) { return alignops_stable::same_shape(a, b); }
  static bool same_device(const Tensor& a, const Tensor& b) { return a.is_cpu() == b.is_cpu(); }
  static const char* device(const Tensor& t) { return t.is_cpu() ? "cpu" : "not the CPU"; }
  template <typename... Args>
  static void fail(const Args&... args) {
    STD_TORCH_CHECK(false, args...);
  }
};

Tensor as_contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

// A contiguous CPU tensor of the given dtype, from the AOTI shim's aoti_torch_empty_strided: a direct C
// call into at::empty_strided, ABI-stable like the rest of the shim. torch::stable::empty (ops.h) is a boxed
// dispatcher call (torch_call_dispatcher "aten::empty.memory_format"): 2.2-2.8 us more per call for the four
// outputs on a quiet machine, 5-7 us on a loaded one (bench/stable_abi_overhead.py, docs/stable-abi.md).
// -DALIGNOPS_STABLE_DISPATCHER_EMPTY builds that variant for the comparison.
Tensor new_empty_cpu(const std::vector<int64_t>& sizes, ScalarType acc) {
#ifdef ALIGNOPS_STABLE_DISPATCHER_EMPTY
  return torch::stable::empty(sizes, acc);
#else
  std::vector<int64_t> strides(sizes.size(), 1);
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 2; d >= 0; --d) {
    strides[d] = strides[d + 1] * std::max<int64_t>(sizes[d + 1], 1);
  }
  int32_t dtype = aoti_torch_dtype_float32();
  switch (acc) {
    case ScalarType::Double:
      dtype = aoti_torch_dtype_float64();
      break;
    case ScalarType::Half:
      dtype = aoti_torch_dtype_float16();
      break;
    case ScalarType::BFloat16:
      dtype = aoti_torch_dtype_bfloat16();
      break;
    default:
      break;
  }
  AtenTensorHandle handle = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(static_cast<int64_t>(sizes.size()), sizes.data(),
                                                         strides.data(), dtype, aoti_torch_device_type_cpu(), 0,
                                                         &handle));
  return Tensor(handle);
#endif
}

// beta / chosen_lengths / rejected_lengths: [B], any real dtype, read in the accumulation dtype.
std::optional<Tensor> optional_per_pair(const std::optional<Tensor>& t, ScalarType acc) {
  if (!t.has_value()) {
    return std::nullopt;
  }
  const auto s = t->scalar_type();  // checked: checks::preference_loss
  return as_contiguous(s == acc ? *t : torch::stable::to(*t, acc));
}

template <typename acc_t, typename scalar_t>
void pair_loop(const Tensor& pc_t, const Tensor& pr_t, const Tensor& rc_t, const Tensor& rr_t,
               const std::optional<Tensor>& beta_t, const std::optional<Tensor>& lc_t,
               const std::optional<Tensor>& lr_t, const Params<double>& p64, Tensor& loss_t, Tensor& cr_t, Tensor& rj_t,
               Tensor& grad_t, bool compute_grad) {
  const int64_t B = pc_t.size(0);
  Params<acc_t> p;
  p.beta_value = acc_t(p64.beta_value);
  p.label_smoothing = acc_t(p64.label_smoothing);
  p.gamma = acc_t(p64.gamma);
  p.discopop_tau = acc_t(p64.discopop_tau);
  p.f_alpha = acc_t(p64.f_alpha);
  p.f_divergence = p64.f_divergence;
  p.terms = p64.terms;
  // Untyped pointers: the typed const_data_ptr<T>() of tensor_inl.h checks the dtype on each call, and
  // has no specialisation for the headeronly Half / BFloat16 spelling on every torch we target.
  const auto* pc = static_cast<const scalar_t*>(pc_t.const_data_ptr());
  const auto* pr = static_cast<const scalar_t*>(pr_t.const_data_ptr());
  const auto* rc = static_cast<const scalar_t*>(rc_t.const_data_ptr());
  const auto* rr = static_cast<const scalar_t*>(rr_t.const_data_ptr());
  const auto* beta = beta_t ? static_cast<const acc_t*>(beta_t->const_data_ptr()) : nullptr;
  const auto* lc = lc_t ? static_cast<const acc_t*>(lc_t->const_data_ptr()) : nullptr;
  const auto* lr = lr_t ? static_cast<const acc_t*>(lr_t->const_data_ptr()) : nullptr;
  auto* loss = static_cast<acc_t*>(loss_t.mutable_data_ptr());
  auto* cr = static_cast<acc_t*>(cr_t.mutable_data_ptr());
  auto* rj = static_cast<acc_t*>(rj_t.mutable_data_ptr());
  auto* grad = compute_grad ? static_cast<acc_t*>(grad_t.mutable_data_ptr()) : nullptr;
  // torch::stable::parallel_for (ops.h, >= 2.10) calls at::parallel_for through the C shim: same thread
  // pool and the same grain (2048 pairs) as the main kernel.
  torch::stable::parallel_for(0, B, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t c = static_cast<acc_t>(pc[i]), r = static_cast<acc_t>(pr[i]);
      const acc_t c0 = static_cast<acc_t>(rc[i]), r0 = static_cast<acc_t>(rr[i]);
      const acc_t b = beta ? beta[i] : p.beta_value;
      const acc_t nc = lc ? lc[i] : acc_t(1), nr = lr ? lr[i] : acc_t(1);
      acc_t g[4];
      loss[i] = pair_loss<acc_t, acc_t>(c, r, c0, r0, b, nc, nr, p, g);
      cr[i] = b * (c - c0);
      rj[i] = b * (r - r0);
      if (grad) {
        for (int k = 0; k < 4; ++k) {
          grad[k * B + i] = g[k];
        }
      }
    }
  });
}

// The schema and semantics of alignops::preference_loss (csrc/registration.cpp); loss_types are codes of
// preference_loss_math.h.
std::tuple<Tensor, Tensor, Tensor, Tensor> preference_loss(
    Tensor pc, Tensor pr, Tensor rc, Tensor rr, std::optional<Tensor> beta, std::optional<Tensor> chosen_lengths,
    std::optional<Tensor> rejected_lengths, torch::headeronly::HeaderOnlyArrayRef<int64_t> loss_types,
    torch::headeronly::HeaderOnlyArrayRef<double> loss_weights, double beta_value, double label_smoothing, double gamma,
    double discopop_tau, int64_t f_divergence, double f_alpha, bool compute_grad) {
  check_cpu(pc, "policy_chosen_logps");
  checks::preference_loss<StableOps>(pc, pr, rc, rr, beta, chosen_lengths, rejected_lengths, loss_types, loss_weights,
                                     f_divergence);
  const auto dt = pc.scalar_type();
  Params<double> params;
  params.beta_value = beta_value;
  params.label_smoothing = label_smoothing;
  params.gamma = gamma;
  params.discopop_tau = discopop_tau;
  params.f_alpha = f_alpha;
  params.f_divergence = static_cast<int>(f_divergence);
  params.terms.n = static_cast<int>(loss_types.size());
  for (size_t k = 0; k < loss_types.size(); ++k) {
    params.terms.type[k] = static_cast<int>(loss_types[k]);
    params.terms.weight[k] = loss_weights[k];
  }

  const ScalarType acc = alignops::portable::acc_type(dt);
  const Tensor pcc = as_contiguous(pc), prc = as_contiguous(pr), rcc = as_contiguous(rc), rrc = as_contiguous(rr);
  const auto beta_c = optional_per_pair(beta, acc);
  const auto lc_c = optional_per_pair(chosen_lengths, acc);
  const auto lr_c = optional_per_pair(rejected_lengths, acc);
  const int64_t B = pc.size(0);
  const std::vector<int64_t> b_shape{B};
  const std::vector<int64_t> g_shape = compute_grad ? std::vector<int64_t>{4, B} : std::vector<int64_t>{0};
  Tensor loss = new_empty_cpu(b_shape, acc);
  Tensor cr = new_empty_cpu(b_shape, acc);
  Tensor rj = new_empty_cpu(b_shape, acc);
  Tensor grad = new_empty_cpu(g_shape, acc);

  switch (dt) {
    case ScalarType::Float:
      pair_loop<float, float>(pcc, prc, rcc, rrc, beta_c, lc_c, lr_c, params, loss, cr, rj, grad, compute_grad);
      break;
    case ScalarType::Double:
      pair_loop<double, double>(pcc, prc, rcc, rrc, beta_c, lc_c, lr_c, params, loss, cr, rj, grad, compute_grad);
      break;
    case ScalarType::Half:
      pair_loop<float, torch::headeronly::Half>(pcc, prc, rcc, rrc, beta_c, lc_c, lr_c, params, loss, cr, rj, grad,
                                                compute_grad);
      break;
    case ScalarType::BFloat16:
      pair_loop<float, torch::headeronly::BFloat16>(pcc, prc, rcc, rrc, beta_c, lc_c, lr_c, params, loss, cr, rj, grad,
                                                    compute_grad);
      break;
    default:
      STD_TORCH_CHECK(false, "unreachable dtype ", dtype_name(dt));
  }
  return {loss, cr, rj, grad};
}

// ---- selective_logprobs: log softmax(logits / T)[target] per row, and its backward -----------------------
// Scalar two-pass rows (max, then sum of exp((x - max) / T)) in place of the main kernel's one-pass Vectorized
// online logsumexp; the backward always anchors the exponent at the row max, which the main kernel does only
// for |lse| > 2^17 (the two differ by rounding). Formulas and checks: csrc/preference/selective_logprobs_*.

void check_selective_args(const Tensor& logits, const Tensor& targets, double temperature) {
  check_cpu(logits, "logits");
  checks::selective_logprobs<StableOps>(logits, targets, temperature);
}

// Read once, serially, before the parallel rows: an exception thrown inside torch::stable::parallel_for's callback
// would have to cross the C shim.
std::vector<int64_t> read_targets(const Tensor& targets, int64_t V, int64_t ignore_index) {
  const int64_t N = targets.size(0);
  std::vector<int64_t> y(N);
  for (int64_t n = 0; n < N; ++n) {
    y[n] = targets.scalar_type() == ScalarType::Long ? static_cast<const int64_t*>(targets.const_data_ptr())[n]
                                                     : static_cast<const int32_t*>(targets.const_data_ptr())[n];
    STD_TORCH_CHECK(y[n] == ignore_index || (y[n] >= 0 && y[n] < V), "targets[", n, "] = ", y[n],
                    " is out of range: targets must lie in [0, ", V, ") or equal ignore_index");
  }
  return y;
}

int64_t rows_per_task(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

// max / T rounded once, as in the main kernel: lse = scaled_max + log_sum, and the backward recovers log_sum.
template <typename acc_t>
acc_t scaled_max(acc_t max, acc_t inv_t) {
  volatile acc_t r = max * inv_t;
  return r;
}

template <typename acc_t, typename scalar_t>
acc_t row_max(const scalar_t* x, int64_t V) {
  acc_t m = std::numeric_limits<acc_t>::lowest();  // not -inf: a row of -inf never forms -inf - -inf
  for (int64_t v = 0; v < V; ++v) {
    m = std::max(m, static_cast<acc_t>(x[v]));
  }
  return m;
}

template <typename acc_t, typename scalar_t>
void selective_forward_rows(const Tensor& logits, const std::vector<int64_t>& y, int64_t ignore_index, acc_t inv_t,
                            Tensor& logp, Tensor& lse) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto* x = static_cast<const scalar_t*>(logits.const_data_ptr());
  auto* out = static_cast<acc_t*>(logp.mutable_data_ptr());
  auto* lse_p = static_cast<acc_t*>(lse.mutable_data_ptr());
  torch::stable::parallel_for(0, N, rows_per_task(V), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      if (y[n] == ignore_index) {
        out[n] = lse_p[n] = acc_t(0);
        continue;
      }
      const scalar_t* row = x + n * V;
      const acc_t m = row_max<acc_t>(row, V);
      acc_t s = acc_t(0);
      for (int64_t v = 0; v < V; ++v) {
        s += std::exp((static_cast<acc_t>(row[v]) - m) * inv_t);
      }
      const acc_t log_sum = std::log(s);
      lse_p[n] = scaled_max(m, inv_t) + log_sum;
      out[n] = (static_cast<acc_t>(row[y[n]]) - m) * inv_t - log_sum;
    }
  });
}

template <typename acc_t, typename scalar_t>
void selective_backward_rows(const Tensor& grad, const Tensor& logits, const std::vector<int64_t>& y, const Tensor& lse,
                             int64_t ignore_index, acc_t inv_t, Tensor& grad_logits) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto* x = static_cast<const scalar_t*>(logits.const_data_ptr());
  const auto* g = static_cast<const acc_t*>(grad.const_data_ptr());
  const auto* lse_p = static_cast<const acc_t*>(lse.const_data_ptr());
  auto* out = static_cast<scalar_t*>(grad_logits.mutable_data_ptr());
  torch::stable::parallel_for(0, N, rows_per_task(V), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      scalar_t* row_out = out + n * V;
      if (y[n] == ignore_index || g[n] == acc_t(0)) {
        std::fill(row_out, row_out + V, scalar_t(0));
        continue;
      }
      const scalar_t* row = x + n * V;
      const acc_t c = row_max<acc_t>(row, V), r = lse_p[n] - scaled_max(c, inv_t), gn = g[n];
      for (int64_t v = 0; v < V; ++v) {
        row_out[v] = static_cast<scalar_t>(-gn * inv_t * std::exp((static_cast<acc_t>(row[v]) - c) * inv_t - r));
      }
      // In the accumulation type: adding g/T to an already-rounded bf16 value would lose it.
      row_out[y[n]] =
          static_cast<scalar_t>(gn * inv_t * (acc_t(1) - std::exp((static_cast<acc_t>(row[y[n]]) - c) * inv_t - r)));
    }
  });
}

// Calls f<acc_t, scalar_t>() for the logits dtype (the four checked by is_floating).
template <typename F>
void dispatch_floating(ScalarType dt, F&& f) {
  switch (dt) {
    case ScalarType::Float:
      f(float{}, float{});
      break;
    case ScalarType::Double:
      f(double{}, double{});
      break;
    case ScalarType::Half:
      f(float{}, torch::headeronly::Half{});
      break;
    case ScalarType::BFloat16:
      f(float{}, torch::headeronly::BFloat16{});
      break;
    default:
      STD_TORCH_CHECK(false, "unreachable dtype ", dtype_name(dt));
  }
}

std::tuple<Tensor, Tensor> selective_logprobs(Tensor logits, Tensor targets, int64_t ignore_index, double temperature) {
  check_selective_args(logits, targets, temperature);
  const Tensor x = as_contiguous(logits), t = as_contiguous(targets);
  const auto y = read_targets(t, x.size(1), ignore_index);
  const ScalarType acc = alignops::portable::acc_type(x.scalar_type());
  const std::vector<int64_t> shape{x.size(0)};
  Tensor logp = new_empty_cpu(shape, acc), lse = new_empty_cpu(shape, acc);
  dispatch_floating(x.scalar_type(), [&](auto acc_v, auto scalar_v) {
    using acc_t = decltype(acc_v);
    selective_forward_rows<acc_t, decltype(scalar_v)>(x, y, ignore_index, acc_t(1) / acc_t(temperature), logp, lse);
  });
  return {logp, lse};
}

Tensor selective_logprobs_backward(Tensor grad, Tensor logits, Tensor targets, Tensor lse, int64_t ignore_index,
                                   double temperature) {
  check_cpu(logits, "logits");
  checks::selective_logprobs_backward<StableOps>(grad, logits, targets, lse, temperature);
  const Tensor x = as_contiguous(logits), t = as_contiguous(targets);
  const Tensor g = as_contiguous(grad), l = as_contiguous(lse);
  const auto y = read_targets(t, x.size(1), ignore_index);
  Tensor grad_logits = new_empty_cpu({x.size(0), x.size(1)}, x.scalar_type());
  dispatch_floating(x.scalar_type(), [&](auto acc_v, auto scalar_v) {
    using acc_t = decltype(acc_v);
    selective_backward_rows<acc_t, decltype(scalar_v)>(g, x, y, l, ignore_index, acc_t(1) / acc_t(temperature),
                                                       grad_logits);
  });
  return grad_logits;
}

}  // namespace
}  // namespace alignops_stable

STABLE_TORCH_LIBRARY(alignops_stable, m) {
  // The schemas of the alignops:: ops (preference_schemas.h), in a namespace of its own so this .so and the main
  // _C never register the same name.
  namespace schemas = alignops::preference::schemas;
  m.def(schemas::kPreferenceLoss);
  m.def(schemas::kSelectiveLogprobs);
  m.def(schemas::kSelectiveLogprobsBackward);
}

STABLE_TORCH_LIBRARY_IMPL(alignops_stable, CPU, m) {
  m.impl("preference_loss", TORCH_BOX(&alignops_stable::preference_loss));
  m.impl("selective_logprobs", TORCH_BOX(&alignops_stable::selective_logprobs));
  m.impl("selective_logprobs_backward", TORCH_BOX(&alignops_stable::selective_logprobs_backward));
}
