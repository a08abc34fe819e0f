// CPU kernel of alignops::fused_linear_distillation: a teacher-student divergence from both models' LM-head
// inputs without the [N, V] logits of either. Rows with weight 0 (prompt, padding) are dropped before any
// GEMM. The kept rows are walked in blocks of R rows; one GEMM per model gives the block's [R, V] logits
// (R chosen so that a block is about 16 MB per model), and the vectorised epilogue
// (fused_linear_distillation_cpu_kernel.cpp) turns them in place into both softmaxes, the divergence and, when
// asked, the closed-form d loss / d student logits; then grad_hidden[rows] = dz @ W_s, grad_weight += dz^T @ h_s.
// The extra memory is those two blocks (one per model) and the kept rows of hidden. Each logit is computed once
// per model (a vocabulary-tiled scheme would recompute both heads in a second forward pass, since the JSD's
// gradient needs the per-row sum sum_v p_s G only known after every tile, and again in the backward).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>

#include "common/checks.h"
#include "common/cpu_capability.h"
#include "common/registration.h"
#include "distillation/fused_linear_distillation_cpu_kernel.h"

namespace alignops::distillation {
namespace {

// The kernels' mode of a checked (divergence, coef): check_args has refused anything else.
Mode parse_mode(const std::string& divergence, double coef) {
  if (divergence == "jsd") {
    return coef == 0.0 ? Mode::ForwardKL : coef == 1.0 ? Mode::ReverseKL : Mode::JSD;
  }
  if (divergence == "tv") {
    return Mode::TV;
  }
  return divergence == "skew_kl" ? Mode::SkewKL : Mode::SkewReverseKL;
}

// Kept rows per block: an [R, V] block of about 4M elements per model, at least 16 rows.
// ALIGNOPS_DISTILLATION_ROWS overrides it (the tests use it to cover several blocks on small shapes).
int64_t block_rows(int64_t V) {
  if (const char* forced = std::getenv("ALIGNOPS_DISTILLATION_ROWS")) {
    return std::max<int64_t>(1, std::atoll(forced));
  }
  return std::max<int64_t>(16, (int64_t(1) << 22) / std::max<int64_t>(V, 1));
}

// Every check of the op (also its op alignops::fused_linear_distillation_check, which the Triton twin calls).
void check_args(const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& teacher_hidden,
                const at::Tensor& teacher_weight, const std::optional<at::Tensor>& student_bias,
                const std::optional<at::Tensor>& teacher_bias, const at::Tensor& weights, c10::string_view divergence,
                double coef, double temperature, double student_logit_scale, double teacher_logit_scale,
                double /*student_softcap*/, double /*teacher_softcap*/, bool /*compute_grad*/) {
  check_lm_head(student_hidden, student_weight, student_bias, "student_hidden", "student_weight", "student_bias");
  check_same_device(teacher_hidden, student_hidden, "teacher_hidden", "student_hidden");
  check_lm_head(teacher_hidden, teacher_weight, teacher_bias, "teacher_hidden", "teacher_weight", "teacher_bias");
  const auto N = student_hidden.sym_size(0), V = student_weight.sym_size(0);
  TORCH_CHECK_VALUE(teacher_hidden.sym_size(0) == N,
                    "teacher_hidden must have one row per row of student_hidden [N=", N, "], got ",
                    teacher_hidden.sym_size(0));
  TORCH_CHECK_VALUE(teacher_weight.sym_size(0) == V, "teacher_weight must have the vocabulary of student_weight [V=", V,
                    "], got ", teacher_weight.sym_size(0));
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.sym_size(0) == N, "weights must have shape [N] = [", N, "], got ",
                    weights.sym_sizes());
  check_same_device(weights, student_hidden, "weights", "student_hidden");
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature), "temperature must be a finite value > 0, got ",
                    temperature);
  TORCH_CHECK_VALUE(std::isfinite(student_logit_scale), "student_logit_scale must be finite, got ",
                    student_logit_scale);
  TORCH_CHECK_VALUE(std::isfinite(teacher_logit_scale), "teacher_logit_scale must be finite, got ",
                    teacher_logit_scale);
  if (divergence == "jsd") {
    TORCH_CHECK_VALUE(coef >= 0.0 && coef <= 1.0, "beta must lie in [0, 1], got ", coef);
  } else if (divergence == "skew_kl" || divergence == "skew_reverse_kl") {
    TORCH_CHECK_VALUE(coef >= 0.0 && coef <= 1.0, "skew must lie in [0, 1], got ", coef);
  } else {
    TORCH_CHECK_VALUE(divergence == "tv", "divergence must be one of 'jsd', 'tv', 'skew_kl', 'skew_reverse_kl', got '",
                      divergence, "'");
  }
}

const DistillationKernels& kernels() {
#if ALIGNOPS_X86
  return pick_cpu_kernels(DEFAULT::distillation_kernels, &AVX2::distillation_kernels);
#else
  return DEFAULT::distillation_kernels;
#endif
}

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Result fused_linear_distillation_cpu(const at::Tensor& student_hidden, const at::Tensor& student_weight,
                                     const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight,
                                     const std::optional<at::Tensor>& student_bias,
                                     const std::optional<at::Tensor>& teacher_bias, const at::Tensor& weights,
                                     std::string divergence, double coef, double temperature,
                                     double student_logit_scale, double teacher_logit_scale, double student_softcap,
                                     double teacher_softcap, bool compute_grad) {
  check_args(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias, weights,
             divergence, coef, temperature, student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap,
             compute_grad);
  check_device(student_hidden, c10::DeviceType::CPU, "student_hidden");
  const int64_t N = student_hidden.size(0), V = student_weight.size(0);
  const Mode mode = parse_mode(divergence, coef);
  const auto acc = acc_type_of(student_hidden);
  const auto opts = student_hidden.options().dtype(acc);
  const int64_t Hs = student_hidden.size(1);
  auto loss = at::zeros({}, opts);
  auto per_token = at::zeros({N}, opts);
  auto entropy = at::zeros({N}, opts);
  const bool bias_grad = compute_grad && student_bias.has_value();
  auto grad_hidden = compute_grad ? at::zeros({N, Hs}, opts) : at::empty({0}, opts);
  auto grad_weight = compute_grad ? at::zeros({V, Hs}, opts) : at::empty({0}, opts);
  auto grad_bias = bias_grad ? at::zeros({V}, opts) : at::empty({0}, opts);
  const auto w_all = weights.to(acc);
  const auto index = w_all.ne(0).nonzero().view(-1);
  const int64_t K = index.numel();
  if (K > 0 && V > 0) {
    const auto ws = student_weight.to(acc);
    const auto wt = teacher_weight.to(acc);
    const auto bs = student_bias.has_value() ? student_bias->to(acc) : at::Tensor();
    const auto bt = teacher_bias.has_value() ? teacher_bias->to(acc) : at::Tensor();
    const Transform fs{student_logit_scale, student_softcap, 1.0 / temperature};
    const Transform ft{teacher_logit_scale, teacher_softcap, 1.0 / temperature};
    const int64_t R = block_rows(V);
    const auto& k = kernels();
    for (int64_t r0 = 0; r0 < K; r0 += R) {
      const auto rows = index.narrow(0, r0, std::min(R, K - r0));
      const auto hs = student_hidden.index_select(0, rows).to(acc);
      const auto ht = teacher_hidden.index_select(0, rows).to(acc);
      const auto w = w_all.index_select(0, rows);
      auto zs = bs.defined() ? at::addmm(bs, hs, ws.t()) : at::mm(hs, ws.t());
      auto zt = bt.defined() ? at::addmm(bt, ht, wt.t()) : at::mm(ht, wt.t());
      auto d = at::empty({rows.numel()}, opts);
      auto ent = at::empty({rows.numel()}, opts);
      k.block(zs, zt, w, fs, ft, mode, coef, compute_grad, d, ent);  // zs is dz from here on
      per_token.index_copy_(0, rows, d);
      entropy.index_copy_(0, rows, ent);
      loss.add_((d * w).sum());
      if (!compute_grad) {
        continue;
      }
      grad_hidden.index_copy_(0, rows, at::mm(zs, ws));
      grad_weight.addmm_(zs.t(), hs);
      if (bias_grad) {
        grad_bias.add_(zs.sum(0));
      }
    }
  }
  if (compute_grad) {
    grad_hidden = grad_hidden.to(student_hidden.scalar_type());
    grad_weight = grad_weight.to(student_weight.scalar_type());
    if (bias_grad) {
      grad_bias = grad_bias.to(student_bias->scalar_type());
    }
  }
  return {loss, per_token, entropy, grad_hidden, grad_weight, grad_bias};
}

}  // namespace

// The schemas of this file's ops, defined here and nowhere else.
TORCH_LIBRARY_FRAGMENT(alignops, m) {
  // ---- distillation: teacher-student divergence from both LM heads, no [N, V] logits ---------------
  // divergence: "jsd" (coef = beta; 0 forward KL, 1 reverse KL), "tv", "skew_kl" / "skew_reverse_kl"
  // (coef = skew). softcap <= 0 means none. Rows with weights == 0 are dropped before any GEMM. Returns
  // (loss = sum_n weights_n d_n [], per_token d [N], student entropy [N], and when compute_grad the
  // gradients of loss w.r.t. student_hidden [N, Hs], student_weight [V, Hs], student_bias [V] (else empty)).
  def_checked(
      m,
      "fused_linear_distillation(Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, "
      "Tensor teacher_weight, Tensor? student_bias, Tensor? teacher_bias, Tensor weights, str divergence, "
      "float coef, float temperature, float student_logit_scale, float teacher_logit_scale, float student_softcap, "
      "float teacher_softcap, bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(alignops, CPU, m) { m.impl("fused_linear_distillation", &fused_linear_distillation_cpu); }

TORCH_LIBRARY_IMPL(alignops, CompositeImplicitAutograd, m) { m.impl("fused_linear_distillation_check", &check_args); }

}  // namespace alignops::distillation
