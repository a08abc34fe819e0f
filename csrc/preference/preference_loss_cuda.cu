// CUDA kernel of alignops::preference_loss: one thread per pair (grid-stride), the closed-form loss and
// gradient of preference_loss_math.h, the same outputs and layout as the CPU kernel.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "preference/preference_loss_common.h"

namespace alignops::preference {
namespace {

constexpr int kThreads = 256;
// Enough resident threads for any current GPU; larger batches are covered by the grid-stride loop.
constexpr int64_t kMaxBlocks = 4096;

// The optional per-pair tensors (beta, lengths) are nullptr when absent. Params is passed by value: it
// lives in kernel-parameter space, read-only and shared by every thread.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    preference_loss_kernel(const scalar_t* __restrict__ pc, const scalar_t* __restrict__ pr,
                           const scalar_t* __restrict__ rc, const scalar_t* __restrict__ rr,
                           const acc_t* __restrict__ beta, const acc_t* __restrict__ lc, const acc_t* __restrict__ lr,
                           acc_t* __restrict__ loss, acc_t* __restrict__ chosen_rewards,
                           acc_t* __restrict__ rejected_rewards, acc_t* __restrict__ grad, int64_t B,
                           const Params<acc_t> p) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < B; i += stride) {
    const acc_t b = beta != nullptr ? beta[i] : p.beta_value;
    const acc_t c = static_cast<acc_t>(pc[i]), r = static_cast<acc_t>(pr[i]);
    const acc_t c0 = static_cast<acc_t>(rc[i]), r0 = static_cast<acc_t>(rr[i]);
    acc_t g[4];
    loss[i] =
        pair_loss<acc_t>(c, r, c0, r0, b, lc != nullptr ? lc[i] : acc_t(1), lr != nullptr ? lr[i] : acc_t(1), p, g);
    chosen_rewards[i] = b * (c - c0);
    rejected_rewards[i] = b * (r - r0);
    if (grad != nullptr) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        grad[k * B + i] = g[k];
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> preference_loss_cuda(
    const at::Tensor& pc, const at::Tensor& pr, const at::Tensor& rc, const at::Tensor& rr,
    const std::optional<at::Tensor>& beta, const std::optional<at::Tensor>& chosen_lengths,
    const std::optional<at::Tensor>& rejected_lengths, c10::IntArrayRef loss_types, c10::ArrayRef<double> loss_weights,
    double beta_value, double label_smoothing, double gamma, double discopop_tau, int64_t f_divergence, double f_alpha,
    bool compute_grad) {
  check_preference_loss_args(pc, pr, rc, rr, beta, chosen_lengths, rejected_lengths, loss_types, loss_weights,
                             beta_value, label_smoothing, gamma, discopop_tau, f_divergence, f_alpha, compute_grad);
  check_device(pc, c10::DeviceType::CUDA, "policy_chosen_logps");
  const c10::cuda::CUDAGuard guard(pc.device());
  auto in = prepare_preference_inputs(pc, pr, rc, rr, beta, chosen_lengths, rejected_lengths, compute_grad);
  const int64_t B = pc.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pc.scalar_type(), "preference_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = make_params<acc_t>(loss_types, loss_weights, beta_value, label_smoothing, gamma, discopop_tau,
                                      f_divergence, f_alpha);
    if (B == 0) {
      return;
    }
    const int64_t blocks = std::min((B + kThreads - 1) / kThreads, kMaxBlocks);
    preference_loss_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned int>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            in.pc.const_data_ptr<scalar_t>(), in.pr.const_data_ptr<scalar_t>(), in.rc.const_data_ptr<scalar_t>(),
            in.rr.const_data_ptr<scalar_t>(), in.beta.defined() ? in.beta.const_data_ptr<acc_t>() : nullptr,
            in.lc.defined() ? in.lc.const_data_ptr<acc_t>() : nullptr,
            in.lr.defined() ? in.lr.const_data_ptr<acc_t>() : nullptr, in.loss.mutable_data_ptr<acc_t>(),
            in.chosen_rewards.mutable_data_ptr<acc_t>(), in.rejected_rewards.mutable_data_ptr<acc_t>(),
            compute_grad ? in.grad.mutable_data_ptr<acc_t>() : nullptr, B, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {in.loss, in.chosen_rewards, in.rejected_rewards, in.grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(alignops, CUDA, m) { m.impl("preference_loss", &preference_loss_cuda); }

}  // namespace alignops::preference
