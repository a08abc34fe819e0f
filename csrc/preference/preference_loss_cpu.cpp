// CPU kernel of alignops::preference_loss: one pass over the pairs, threaded, closed-form gradient.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "preference/preference_loss_common.h"

namespace alignops::preference {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> preference_loss_cpu(
    const at::Tensor& pc, const at::Tensor& pr, const at::Tensor& rc, const at::Tensor& rr,
    const std::optional<at::Tensor>& beta, const std::optional<at::Tensor>& chosen_lengths,
    const std::optional<at::Tensor>& rejected_lengths, c10::IntArrayRef loss_types, c10::ArrayRef<double> loss_weights,
    double beta_value, double label_smoothing, double gamma, double discopop_tau, int64_t f_divergence, double f_alpha,
    bool compute_grad) {
  check_device(pc, c10::DeviceType::CPU, "policy_chosen_logps");
  auto in = prepare_preference_inputs(pc, pr, rc, rr, beta, chosen_lengths, rejected_lengths, compute_grad);
  const int64_t B = pc.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pc.scalar_type(), "preference_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = make_params<acc_t>(loss_types, loss_weights, beta_value, label_smoothing, gamma, discopop_tau,
                                      f_divergence, f_alpha);
    const scalar_t* pc_p = in.pc.const_data_ptr<scalar_t>();
    const scalar_t* pr_p = in.pr.const_data_ptr<scalar_t>();
    const scalar_t* rc_p = in.rc.const_data_ptr<scalar_t>();
    const scalar_t* rr_p = in.rr.const_data_ptr<scalar_t>();
    const acc_t* beta_p = in.beta.defined() ? in.beta.const_data_ptr<acc_t>() : nullptr;
    const acc_t* lc_p = in.lc.defined() ? in.lc.const_data_ptr<acc_t>() : nullptr;
    const acc_t* lr_p = in.lr.defined() ? in.lr.const_data_ptr<acc_t>() : nullptr;
    acc_t* loss_p = in.loss.mutable_data_ptr<acc_t>();
    acc_t* cr_p = in.chosen_rewards.mutable_data_ptr<acc_t>();
    acc_t* rj_p = in.rejected_rewards.mutable_data_ptr<acc_t>();
    acc_t* g_p = compute_grad ? in.grad.mutable_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, B, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t b = beta_p ? beta_p[i] : p.beta_value;
        const acc_t c = acc_t(pc_p[i]), r = acc_t(pr_p[i]), c0 = acc_t(rc_p[i]), r0 = acc_t(rr_p[i]);
        acc_t g[4];
        loss_p[i] = pair_loss<acc_t>(c, r, c0, r0, b, lc_p ? lc_p[i] : acc_t(1), lr_p ? lr_p[i] : acc_t(1), p, g);
        cr_p[i] = b * (c - c0);
        rj_p[i] = b * (r - r0);
        if (g_p) {
          for (int k = 0; k < 4; ++k) {
            g_p[k * B + i] = g[k];
          }
        }
      }
    });
  });
  return {in.loss, in.chosen_rewards, in.rejected_rewards, in.grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(alignops, CPU, m) { m.impl("preference_loss", &preference_loss_cpu); }

}  // namespace alignops::preference
