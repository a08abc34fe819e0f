// Row kernel of alignops::policy_loss (TRL GRPOTrainer._compute_loss's per-token loss, row sums and closed-form
// gradient). CMake compiles this file once per CPU capability (DEFAULT, AVX2) into its own namespace;
// policy_loss_cpu.cpp picks one.
//
// Every quantity TRL couples across a row (the mask count M_b, the sequence-level log ratio, VESPO's sequence
// log weight, the off-policy mask's mean KL) is a row sum, so one row is read twice: a pass for the sums, then a
// pass for the per-token loss, the metrics and the direct part of the gradient. At sequence level coef_1 is a row
// value, so the gradient through it is a row accumulator G_b = sum_t d loss / d coef_1, spread back in a third
// pass over the row (d coef_1 / d lp_t = coef_1 m_t / max(M_b, 1)). The second pass works in chunks whose
// exponentials (the token ratio exp(lp - old) and the KL's exp(ref - lp)) are computed first as vectors: they are
// most of the scalar loop's cost otherwise. Arithmetic runs in the accumulation type (fp32 for bf16 / fp16 / fp32
// input, fp64 for fp64). The expressions are TRL's, including where they produce NaN (a non-finite log-prob
// anywhere in a row, even under the mask, makes that row's loss NaN as in TRL). Gradient conventions are torch
// autograd's: torch.min at a tie splits the gradient in half, torch.clamp passes it only strictly inside its
// bounds.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

#include "policy/policy_codes.h"
#include "policy/policy_loss_cpu_kernel.h"

namespace alignops::policy {
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kChunk = 256;  // tokens whose exponentials are computed as one vector batch

// torch.clamp: NaN passes through (std::min / std::max would drop it on one side).
template <typename T>
inline T clamp_nan(T x, T lo, T hi) {
  return std::isnan(x) ? x : std::min(std::max(x, lo), hi);
}

// A [B], [B, 1] or [B, T] row-or-token operand: element (b, t) at b * row + t * col.
template <typename T>
struct Operand {
  const T* p = nullptr;
  int64_t row = 0, col = 0;
  T at(int64_t b, int64_t t) const { return p[b * row + t * col]; }
};

template <typename T>
Operand<T> operand(const std::optional<at::Tensor>& t, int64_t T_len) {
  Operand<T> o;
  if (!t.has_value()) return o;
  o.p = t->const_data_ptr<T>();
  const bool per_token = t->dim() == 2 && t->size(1) == T_len && T_len != 1;
  o.row = per_token ? T_len : 1;
  o.col = per_token ? 1 : 0;
  return o;
}

template <typename scalar_t, typename mask_t>
void policy_rows(const scalar_t* lp_p, const mask_t* m_p, Operand<at::opmath_type<scalar_t>> adv,
                 const at::opmath_type<scalar_t>* old_p, const at::opmath_type<scalar_t>* ref_p,
                 Operand<at::opmath_type<scalar_t>> isr, const at::opmath_type<scalar_t>* samp_p,
                 const at::opmath_type<scalar_t>* ent_p, scalar_t* grad_p, at::opmath_type<scalar_t>* stats, int64_t B,
                 int64_t T, const PolicyLossParams& P) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const bool seq = P.level == kSequence;
  const bool clip = P.loss_type == kGrpo || P.loss_type == kBnpo || P.loss_type == kDrGrpo || P.loss_type == kDapo ||
                    P.loss_type == kLuspo;
  const bool cispo = P.loss_type == kCispo, sapo = P.loss_type == kSapo, vespo = P.loss_type == kVespo;
  const bool per_row_rs = P.loss_type == kGrpo || P.loss_type == kSapo;
  const bool kl_on = P.beta != 0.0;
  const acc_t beta = static_cast<acc_t>(P.beta);
  const acc_t lo = static_cast<acc_t>(1.0 - P.eps_low), hi = static_cast<acc_t>(1.0 + P.eps_high);
  const acc_t eps_high = static_cast<acc_t>(P.eps_high);
  const bool has_delta = P.delta.has_value();
  const acc_t delta = has_delta ? static_cast<acc_t>(*P.delta) : acc_t(0);
  // TRL picks SAPO's temperatures and VESPO's k / lambda with torch.where on Python floats, which makes fp32
  // tensors (the default dtype): fp64 inputs see them rounded to fp32, so they are rounded here too.
  auto f32 = [](double v) { return static_cast<acc_t>(static_cast<float>(v)); };
  const acc_t t_pos = f32(P.sapo_pos), t_neg = f32(P.sapo_neg);
  // TRL clamps VESPO's lambda at 1e-4 (in fp32) and its log weights at log(1e-8).
  const acc_t k_pos = f32(P.k_pos), k_neg = f32(P.k_neg);
  const acc_t lam_pos = std::max(f32(P.lam_pos), f32(1e-4)), lam_neg = std::max(f32(P.lam_neg), f32(1e-4));
  const acc_t log_lower = static_cast<acc_t>(std::log(1e-8));
  const bool opm_on = P.opm_threshold.has_value();
  const acc_t opm_thr = opm_on ? static_cast<acc_t>(*P.opm_threshold) : acc_t(0);
  const acc_t big = std::numeric_limits<acc_t>::max();
  const bool adv_per_token = adv.col != 0;
  // TRL's metric tensors are [B, 1] (one value per row, averaged over B) only when coef_1 and the advantages
  // both are; otherwise they broadcast to [B, T] and are masked token sums.
  const bool row_metrics = seq && !adv_per_token;
  const bool isr_on = isr.p != nullptr && !vespo;

  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* lp = lp_p + b * T;
      const mask_t* mk = m_p + b * T;
      const acc_t* old = old_p ? old_p + b * T : nullptr;
      auto lpv = [&](int64_t t) { return static_cast<acc_t>(lp[t]); };
      // old None is lp.detach(): lp - lp, NaN where lp is infinite, as in TRL.
      auto oldv = [&](int64_t t) { return old ? old[t] : lpv(t); };

      // Pass 1: the row sums.
      acc_t M = 0, S = 0, V = 0, K = 0;
      for (int64_t t = 0; t < T; ++t) {
        const acc_t m = static_cast<acc_t>(mk[t]);
        const acc_t r = lpv(t) - oldv(t);
        M += m;
        if (seq) S += r * m;
        if (vespo) V += clamp_nan(r, acc_t(-20), acc_t(20)) * m;
        if (opm_on) {
          acc_t d = (samp_p ? samp_p[b * T + t] : oldv(t)) - lpv(t);
          // torch.nan_to_num(nan=0): infinities become the largest finite values.
          d = std::isnan(d) ? acc_t(0) : clamp_nan(d, -big, big);
          K += d * m;
        }
      }
      const acc_t Mc = std::max(M, acc_t(1));
      const acc_t rs = per_row_rs ? acc_t(1) / Mc : acc_t(1);
      const acc_t c_seq = seq ? std::exp(S / Mc) : acc_t(0);
      acc_t log_w = 0;
      if (vespo) {
        if (isr.p != nullptr) {
          // TRL sums the log IS ratio over the whole row, not over the mask.
          const int64_t n = isr.col != 0 ? T : 1;
          for (int64_t t = 0; t < n; ++t) V += clamp_nan(std::log(isr.at(b, t)), log_lower, acc_t(20));
        }
        log_w = clamp_nan(V, log_lower, acc_t(20));
      }
      const acc_t avg_kl = K / Mc;
      auto phi_of = [&](acc_t a) {
        const bool nonneg = a >= 0;
        const acc_t k = nonneg ? k_pos : k_neg, lam = nonneg ? lam_pos : lam_neg;
        const acc_t phi = std::exp(lam + k * log_w - lam * std::exp(log_w));
        return std::isfinite(phi) ? phi : acc_t(0);
      };

      // Pass 2: per-token loss, metrics and the direct part of the gradient (G: the part through a row coef_1).
      acc_t loss = 0, n_low = 0, n_high = 0, n_region = 0, kl_sum = 0, ratio_sum = 0, phi_sum = 0, G = 0;
      scalar_t* grad = grad_p ? grad_p + b * T : nullptr;
      acc_t ratio_buf[kChunk], kl_buf[kChunk];
      for (int64_t t = 0; t < T; ++t) {
        const int64_t j = t % kChunk;
        if (j == 0) {
          // The chunk's exponentials as vectors: exp(lp - old) (token level) and exp(ref - lp) (KL term).
          const int64_t n = std::min(kChunk, T - t);
          if (!seq) {
            for (int64_t i = 0; i < n; ++i) ratio_buf[i] = lpv(t + i) - oldv(t + i);
            at::vec::map([](Vec v) { return v.exp(); }, ratio_buf, ratio_buf, n);
          }
          if (kl_on) {
            const acc_t* rf = ref_p + b * T + t;
            for (int64_t i = 0; i < n; ++i) kl_buf[i] = rf[i] - lpv(t + i);
            at::vec::map([](Vec v) { return v.exp(); }, kl_buf, kl_buf, n);
          }
        }
        const acc_t m = static_cast<acc_t>(mk[t]);
        const acc_t a = adv.at(b, t);
        const acc_t x = lpv(t);
        const acc_t c = seq ? c_seq : ratio_buf[j];
        acc_t ptl, d_direct = 0, d_c = 0, ratio = c;
        bool low = false, high = false;
        if (cispo) {
          const acc_t cl = std::isnan(c) ? c : std::min(c, eps_high);
          ptl = -cl * a * x;
          d_direct = -cl * a;
          high = c > eps_high && a > 0;
        } else if (clip) {
          const acc_t c2 = clamp_nan(c, lo, hi);
          const acc_t g2 = (c > lo && c < hi) ? acc_t(1) : acc_t(0);
          acc_t c1 = c, g1 = 1;
          if (has_delta) {
            c1 = std::isnan(c) ? c : std::min(c, delta);
            g1 = c < delta ? acc_t(1) : acc_t(0);
          }
          const acc_t p1 = c1 * a, p2 = c2 * a;
          if (std::isnan(p1) || std::isnan(p2)) {
            ptl = std::numeric_limits<acc_t>::quiet_NaN();
            d_c = ptl;
          } else if (p1 < p2) {
            ptl = -p1;
            d_c = -a * g1;
          } else if (p2 < p1) {
            ptl = -p2;
            d_c = -a * g2;
          } else {
            ptl = -p1;
            d_c = acc_t(-0.5) * a * (g1 + g2);
          }
          ratio = c1;
          low = c1 < lo && a < 0;
          high = c1 > hi && a > 0;
        } else if (sapo) {
          const acc_t temp = a > 0 ? t_pos : t_neg;
          const acc_t s = acc_t(1) / (acc_t(1) + std::exp(-temp * (c - 1)));
          ptl = -s * 4 / temp * a;
          d_c = -4 * a * s * (1 - s);
        } else {  // vespo: phi is detached
          const acc_t phi = phi_of(a);
          ptl = -phi * a * x;
          d_direct = -phi * a;
          phi_sum += phi * m;
        }
        acc_t w = 1;
        if (opm_on) w *= (a >= 0 || avg_kl <= opm_thr) ? acc_t(1) : acc_t(0);
        if (ent_p) w *= ent_p[b * T + t];
        if (isr_on) w *= isr.at(b, t);
        ptl *= w;
        d_direct *= w;
        d_c *= w;
        if (kl_on) {
          const acc_t dref = ref_p[b * T + t] - x;
          const acc_t e = kl_buf[j];
          const acc_t kl0 = e - dref - 1;
          const acc_t kl = P.bias_kl ? kl0 * c : kl0;
          ptl += beta * kl;
          d_direct += beta * (1 - e) * (P.bias_kl ? c : acc_t(1));
          if (P.bias_kl) d_c += beta * kl0;
          kl_sum += kl * m;
        }
        loss += ptl * m;
        n_low += static_cast<acc_t>(low) * m;
        n_high += static_cast<acc_t>(high) * m;
        n_region += static_cast<acc_t>(low || high) * m;
        ratio_sum += ratio * m;
        if (grad) {
          const acc_t g = seq ? m * d_direct : m * (d_direct + d_c * c);
          grad[t] = static_cast<scalar_t>(rs * g);
        }
        if (seq) G += m * d_c;
      }
      if (grad && seq) {
        // d coef_1 / d lp_t = coef_1 m_t / max(M, 1); grad[t] was rounded once already, so add in acc_t.
        const acc_t spread = rs * G * c_seq / Mc;
        for (int64_t t = 0; t < T; ++t) {
          grad[t] = static_cast<scalar_t>(static_cast<acc_t>(grad[t]) + spread * static_cast<acc_t>(mk[t]));
        }
      }
      acc_t* st = stats + b * kNumRowStats;
      st[kMaskCount] = M;
      st[kKl] = kl_sum;
      st[kRowLoss] = rs * loss;
      if (row_metrics) {
        // One value per row: the metric of coef_1 and A_b themselves.
        const acc_t a = adv.at(b, 0);
        const acc_t c1 = (clip && has_delta) ? (std::isnan(c_seq) ? c_seq : std::min(c_seq, delta)) : c_seq;
        bool low = false, high = false;
        if (clip) {
          low = c1 < lo && a < 0;
          high = c1 > hi && a > 0;
        } else if (cispo) {
          high = c_seq > eps_high && a > 0;
        }
        st[kClipLow] = low;
        st[kClipHigh] = high;
        st[kClipRegion] = low || high;
        st[kRatio] = c1;
      } else {
        st[kClipLow] = n_low;
        st[kClipHigh] = n_high;
        st[kClipRegion] = n_region;
        // coef_1 itself is [B, 1] at sequence level whatever the advantages' shape.
        st[kRatio] =
            seq ? ((clip && has_delta) ? (std::isnan(c_seq) ? c_seq : std::min(c_seq, delta)) : c_seq) : ratio_sum;
      }
      // phi is [B, 1] whenever the advantages are (TRL's gamma weights are a row value at either level).
      st[kPhi] = !vespo ? acc_t(0) : adv_per_token ? phi_sum : phi_of(adv.at(b, 0));
    }
  });
}

void rows(const at::Tensor& lp, const at::Tensor& mask, const at::Tensor& adv, const std::optional<at::Tensor>& old,
          const std::optional<at::Tensor>& ref, const std::optional<at::Tensor>& isr,
          const std::optional<at::Tensor>& samp, const std::optional<at::Tensor>& ent, at::Tensor& grad,
          at::Tensor& row_stats, const PolicyLossParams& P) {
  const int64_t B = lp.size(0), T = lp.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lp.scalar_type(), "policy_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::optional<at::Tensor> adv_opt = adv;
    const auto a = operand<acc_t>(adv_opt, T);
    const auto r = operand<acc_t>(isr, T);
    auto ptr = [](const std::optional<at::Tensor>& t) { return t ? t->const_data_ptr<acc_t>() : nullptr; };
    scalar_t* g = grad.defined() ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* st = row_stats.mutable_data_ptr<acc_t>();
    if (mask.scalar_type() == at::kBool) {
      policy_rows<scalar_t, bool>(lp.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(), a, ptr(old), ptr(ref), r,
                                  ptr(samp), ptr(ent), g, st, B, T, P);
    } else {
      policy_rows<scalar_t, acc_t>(lp.const_data_ptr<scalar_t>(), mask.const_data_ptr<acc_t>(), a, ptr(old), ptr(ref),
                                   r, ptr(samp), ptr(ent), g, st, B, T, P);
    }
  });
}

}  // namespace

const PolicyLossKernels policy_loss_kernels{&rows};

}  // namespace CPU_CAPABILITY
}  // namespace alignops::policy
