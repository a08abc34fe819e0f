// CPU kernel of alignops::gae_advantages: one reverse scan per row, rows in parallel.
//
// The scan over T is sequential by nature (A_t needs A_{t+1}); the parallelism is over the B rows. A row is
// read backwards once, so the memory traffic is the 3 inputs and 2 outputs once each; the running values
// are held in the accumulation type (fp32 for fp32 / bf16 / fp16 inputs, fp64 for fp64) and rounded once
// per output element.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/registration.h"

namespace alignops::ppo {
namespace {

// The op's checks, also its op alignops::gae_advantages_check (the public function, the fake and the Triton twin).
void check_gae_inputs(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                      const std::optional<at::Tensor>& last_values, double gamma, double lam) {
  check_dim(rewards, 2, "rewards", "[B, T]");
  check_floating(rewards, "rewards");
  check_same_shape(values, rewards, "values", "rewards");
  check_same_dtype(values, rewards, "values", "rewards");
  check_same_device(values, rewards, "values", "rewards");
  check_same_shape(mask, rewards, "completion_mask", "rewards");
  check_same_device(mask, rewards, "completion_mask", "rewards");
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool, "completion_mask must be a bool tensor, got ",
                    dtype_name(mask.scalar_type()));
  if (last_values.has_value()) {
    const auto& lv = *last_values;
    TORCH_CHECK_VALUE(lv.dim() == 1 && lv.sym_size(0) == rewards.sym_size(0), "last_values must have shape [B] = [",
                      rewards.sym_size(0), "], got ", lv.sym_sizes());
    check_same_dtype(lv, rewards, "last_values", "rewards");
    check_same_device(lv, rewards, "last_values", "rewards");
  }
  // !(x >= 0 && x <= 1) also refuses NaN.
  TORCH_CHECK_VALUE(gamma >= 0.0 && gamma <= 1.0, "gamma must be a float in [0, 1], got ", gamma);
  TORCH_CHECK_VALUE(lam >= 0.0 && lam <= 1.0, "lam must be a float in [0, 1], got ", lam);
}

template <typename scalar_t>
void gae_rows(const scalar_t* r, const scalar_t* v, const bool* m, const scalar_t* last, scalar_t* adv, scalar_t* ret,
              int64_t B, int64_t T, double gamma_d, double lam_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t gamma = static_cast<acc_t>(gamma_d);
  const acc_t gamma_lam = static_cast<acc_t>(gamma_d * lam_d);
  // About 32k elements per task: short rows are batched so that a task is not dominated by its scheduling.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(T, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t base = b * T;
      acc_t next_value = last != nullptr ? static_cast<acc_t>(last[b]) : acc_t(0);
      acc_t gae = 0;
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t i = base + t;
        if (!m[i]) {
          // A position outside the mask ends the episode: it contributes nothing and the scan restarts
          // before it with no bootstrap value, as TRL's loop does over zero-filled padding.
          adv[i] = scalar_t(0);
          ret[i] = scalar_t(0);
          gae = 0;
          next_value = 0;
          continue;
        }
        const acc_t value = static_cast<acc_t>(v[i]);
        gae = static_cast<acc_t>(r[i]) + gamma * next_value - value + gamma_lam * gae;
        adv[i] = static_cast<scalar_t>(gae);
        ret[i] = static_cast<scalar_t>(gae + value);
        next_value = value;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gae_advantages_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                                      const at::Tensor& completion_mask,
                                                      const std::optional<at::Tensor>& last_values, double gamma,
                                                      double lam) {
  check_gae_inputs(rewards, values, completion_mask, last_values, gamma, lam);
  check_device(rewards, c10::DeviceType::CPU, "rewards");
  const auto r = rewards.contiguous();
  const auto v = values.contiguous();
  const auto m = completion_mask.contiguous();
  std::optional<at::Tensor> lv;
  if (last_values.has_value()) lv = last_values->contiguous();
  auto adv = at::empty_like(r, at::MemoryFormat::Contiguous);
  auto ret = at::empty_like(r, at::MemoryFormat::Contiguous);
  const int64_t B = r.size(0), T = r.size(1);
  if (r.numel() == 0) return {adv, ret};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.scalar_type(), "gae_advantages_cpu", [&] {
    gae_rows<scalar_t>(r.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), m.const_data_ptr<bool>(),
                       lv.has_value() ? lv->const_data_ptr<scalar_t>() : nullptr, adv.mutable_data_ptr<scalar_t>(),
                       ret.mutable_data_ptr<scalar_t>(), B, T, gamma, lam);
  });
  return {adv, ret};
}

}  // namespace

// The schemas of this file's ops, defined here and nowhere else.
TORCH_LIBRARY_FRAGMENT(alignops, m) {
  // ---- ppo: generalised advantage estimation, one reverse scan per row -----------------------------
  // rewards, values [B, T] float, completion_mask [B, T] bool (a False position ends the episode),
  // last_values [B] (bootstrap after position T-1; None = 0). Returns (advantages, returns) [B, T] in the
  // dtype of rewards, 0 outside the mask. Not differentiable (PPO detaches advantages).
  def_checked(m,
              "gae_advantages(Tensor rewards, Tensor values, Tensor completion_mask, Tensor? last_values, float gamma, "
              "float lam) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(alignops, CPU, m) { m.impl("gae_advantages", &gae_advantages_cpu); }

TORCH_LIBRARY_IMPL(alignops, CompositeImplicitAutograd, m) { m.impl("gae_advantages_check", &check_gae_inputs); }

}  // namespace alignops::ppo
