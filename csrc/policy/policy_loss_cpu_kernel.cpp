// Row kernel of alignops::policy_loss (TRL GRPOTrainer._compute_loss's per-token loss, row sums and closed-form
// gradient). CMake compiles this file once per CPU capability (DEFAULT, AVX2) into its own namespace;
// policy_loss_cpu.cpp picks one.
//
// Every quantity TRL couples across a row (the mask count M_b, the sequence-level log ratio, VESPO's sequence
// log weight, the off-policy mask's mean KL) is a row sum, so one row is read twice: a pass for the sums, then a
// pass for the per-token loss, the metrics and the direct part of the gradient. At sequence level coef_1 is a row
// value, so the gradient through it is a row accumulator G_b = sum_t d loss / d coef_1, spread back in a third
// pass over the row (d coef_1 / d lp_t = coef_1 m_t / max(M_b, 1)). The second pass, where the work is, runs on
// at::vec vectors (branches as blends), its sums in vector accumulators added up at the row's end. Arithmetic runs in
// the accumulation type (fp32 for bf16 / fp16 / fp32 input, fp64 for fp64). The expressions are TRL's, including where
// they produce NaN (a non-finite log-prob anywhere in a row, even under the mask, makes that row's loss NaN as in TRL).
// Gradient conventions are torch autograd's: torch.min at a tie splits the gradient in half, torch.clamp passes it only
// strictly inside its bounds.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>

#include "policy/policy_codes.h"
#include "policy/policy_loss_cpu_kernel.h"

namespace alignops::policy {
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kChunk = 256;  // tokens converted to acc_t per chunk (a multiple of every vector width)

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
  constexpr int64_t W = Vec::size();
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

      // Pass 1: the row sums, in vectors over the same zero-padded chunk buffers as pass 2.
      alignas(64) acc_t xb[kChunk], mb[kChunk], gb[W];
      auto fill = [&](int64_t t0, int64_t n, int64_t nv) {
        for (int64_t i = 0; i < n; ++i) {
          xb[i] = static_cast<acc_t>(lp[t0 + i]);
          mb[i] = static_cast<acc_t>(mk[t0 + i]);
        }
        for (int64_t i = n; i < nv; ++i) xb[i] = mb[i] = 0;
      };
      auto hsum = [&](const Vec& v) {
        v.store(gb);
        acc_t total = 0;
        for (int64_t k = 0; k < W; ++k) total += gb[k];
        return total;
      };
      const Vec big_v(big), twenty(20);
      Vec M_v(0), S_v(0), V_v(0), K_v(0);
      for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
        const int64_t n = std::min(kChunk, T - t0), nv = (n + W - 1) / W * W;
        fill(t0, n, nv);
        for (int64_t i = 0; i < nv; i += W) {
          const int64_t t = t0 + i, cnt = std::min(W, n - i);
          auto ld = [&](const acc_t* q) { return cnt == W ? Vec::loadu(q) : Vec::loadu(q, cnt); };
          const Vec x = Vec::loadu(xb + i), m = Vec::loadu(mb + i);
          const Vec o = old ? ld(old + t) : x;
          const Vec r = x - o;
          M_v = M_v + m;
          if (seq) S_v = S_v + r * m;
          if (vespo) V_v = V_v + at::vec::minimum(at::vec::maximum(r, twenty.neg()), twenty) * m;
          if (opm_on) {
            Vec d = (samp_p ? ld(samp_p + b * T + t) : o) - x;
            // torch.nan_to_num(nan=0): infinities become the largest finite values.
            d = at::vec::minimum(at::vec::maximum(Vec::blendv(d, Vec(0), d.isnan()), big_v.neg()), big_v);
            K_v = K_v + d * m;
          }
        }
      }
      const acc_t M = hsum(M_v), S = hsum(S_v), K = hsum(K_v);
      acc_t V = hsum(V_v);
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

      // Pass 2, in vectors of W tokens: per-token loss, metrics and the direct part of the gradient (G: the part
      // through a row coef_1). Log-probs and mask are first converted to acc_t chunk buffers zero-padded to
      // whole vectors; padded lanes (m = 0, every operand 0) add exactly 0 to every sum and are not stored.
      const acc_t a_row = adv_per_token ? acc_t(0) : adv.at(b, 0);
      const Vec zero(0), one(1), half(0.5), four(4), nan(std::numeric_limits<acc_t>::quiet_NaN());
      const Vec v_lo(lo), v_hi(hi), v_eps_high(eps_high), v_delta(delta), v_beta(beta), v_tpos(t_pos), v_tneg(t_neg);
      // VESPO's phi depends on the token only through the sign of its advantage.
      const Vec v_phi_pos(vespo ? phi_of(acc_t(1)) : acc_t(0)), v_phi_neg(vespo ? phi_of(acc_t(-1)) : acc_t(0));
      const Vec opm_row_keep = Vec(opm_on && avg_kl <= opm_thr ? acc_t(1) : acc_t(0)) > zero;
      const bool w_on = opm_on || ent_p != nullptr || isr_on;
      Vec loss_v(0), low_v(0), high_v(0), region_v(0), kl_v(0), ratio_v(0), phi_v(0), G_v(0);
      scalar_t* grad = grad_p ? grad_p + b * T : nullptr;
      for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
        const int64_t n = std::min(kChunk, T - t0), nv = (n + W - 1) / W * W;
        fill(t0, n, nv);
        for (int64_t i = 0; i < nv; i += W) {
          const int64_t t = t0 + i, cnt = std::min(W, n - i);
          auto ld = [&](const acc_t* q) { return cnt == W ? Vec::loadu(q) : Vec::loadu(q, cnt); };
          const Vec x = Vec::loadu(xb + i), m = Vec::loadu(mb + i);
          const Vec a = adv_per_token ? ld(adv.p + b * T + t) : Vec(a_row);
          // old None is lp.detach(): lp - lp, NaN where lp is infinite, as in TRL.
          const Vec c = seq ? Vec(c_seq) : (x - (old ? ld(old + t) : x)).exp();
          Vec ptl, d_direct = zero, d_c = zero, ratio = c, low = zero, high = zero;
          if (cispo) {
            const Vec cl = at::vec::minimum(c, v_eps_high);  // NaN-propagating, as torch.clamp
            ptl = cl.neg() * a * x;
            d_direct = cl.neg() * a;
            high = Vec::blendv(zero, one, (c > v_eps_high) & (a > zero));
          } else if (clip) {
            const Vec c2 = at::vec::minimum(at::vec::maximum(c, v_lo), v_hi);
            const Vec g2 = Vec::blendv(zero, one, (c > v_lo) & (c < v_hi));
            Vec c1 = c, g1 = one;
            if (has_delta) {
              c1 = at::vec::minimum(c, v_delta);
              g1 = Vec::blendv(zero, one, c < v_delta);
            }
            const Vec p1 = c1 * a, p2 = c2 * a;
            const Vec lt = p1 < p2, gt = p2 < p1;
            const Vec bad = p1.isnan() | p2.isnan();
            ptl = Vec::blendv(Vec::blendv(p1, p2, gt).neg(), nan, bad);
            // torch.min's gradient: all to the smaller branch, half to each at a tie.
            const Vec g = Vec::blendv(Vec::blendv(half * (g1 + g2), g2, gt), g1, lt);
            d_c = Vec::blendv(a.neg() * g, nan, bad);
            ratio = c1;
            low = Vec::blendv(zero, one, (c1 < v_lo) & (a < zero));
            high = Vec::blendv(zero, one, (c1 > v_hi) & (a > zero));
          } else if (sapo) {
            const Vec temp = Vec::blendv(v_tneg, v_tpos, a > zero);
            const Vec sg = one / (one + (temp.neg() * (c - one)).exp());
            ptl = sg.neg() * four / temp * a;
            d_c = four.neg() * a * sg * (one - sg);
          } else {  // vespo: phi is detached
            const Vec phi = Vec::blendv(v_phi_neg, v_phi_pos, a >= zero);
            ptl = phi.neg() * a * x;
            d_direct = phi.neg() * a;
            phi_v = phi_v + phi * m;
          }
          if (w_on) {
            Vec w = one;
            if (opm_on) w = Vec::blendv(zero, one, (a >= zero) | opm_row_keep);
            if (ent_p) w = w * ld(ent_p + b * T + t);
            if (isr_on) w = w * (isr.col != 0 ? ld(isr.p + b * T + t) : Vec(isr.at(b, 0)));
            ptl = ptl * w;
            d_direct = d_direct * w;
            d_c = d_c * w;
          }
          if (kl_on) {
            const Vec dref = ld(ref_p + b * T + t) - x;
            const Vec e = dref.exp();
            const Vec kl0 = e - dref - one;
            const Vec kl = P.bias_kl ? kl0 * c : kl0;
            ptl = ptl + v_beta * kl;
            d_direct = d_direct + v_beta * (one - e) * (P.bias_kl ? c : one);
            if (P.bias_kl) d_c = d_c + v_beta * kl0;
            kl_v = kl_v + kl * m;
          }
          loss_v = loss_v + ptl * m;
          low_v = low_v + low * m;
          high_v = high_v + high * m;
          region_v = region_v + at::vec::maximum(low, high) * m;
          ratio_v = ratio_v + ratio * m;
          if (seq) G_v = G_v + m * d_c;
          if (grad) {
            const Vec gv = Vec(rs) * (seq ? m * d_direct : m * (d_direct + d_c * c));
            if constexpr (std::is_same_v<scalar_t, acc_t>) {
              gv.store(grad + t, cnt);
            } else {
              gv.store(gb);
              for (int64_t k = 0; k < cnt; ++k) grad[t + k] = static_cast<scalar_t>(gb[k]);
            }
          }
        }
      }
      const acc_t loss = hsum(loss_v), n_low = hsum(low_v), n_high = hsum(high_v), n_region = hsum(region_v);
      const acc_t kl_sum = hsum(kl_v), ratio_sum = hsum(ratio_v), phi_sum = hsum(phi_v), G = hsum(G_v);
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
