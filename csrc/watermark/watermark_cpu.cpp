// CPU launchers of the watermark ops: argument checks, the per-row hash state from (key, context tokens),
// and the fused vocabulary kernels of watermark_cpu_kernel.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/counter_hash.h"
#include "common/cpu_capability.h"
#include "common/registration.h"
#include "watermark/watermark_cpu_kernel.h"

namespace alignops::watermark {
namespace {

const WatermarkKernels& kernels() {
#if ALIGNOPS_X86
  return pick_cpu_kernels(DEFAULT::watermark_kernels, &AVX2::watermark_kernels);
#else
  return DEFAULT::watermark_kernels;
#endif
}

void check_logits_context(const at::Tensor& logits, const at::Tensor& context) {
  check_dim(logits, 2, "logits", "[B, V]");
  check_floating(logits, "logits");
  check_dim(context, 2, "context", "[B, h]");
  check_integer(context, "context");
  check_same_device(context, logits, "context", "logits");
  TORCH_CHECK_VALUE(context.sym_size(0) == logits.sym_size(0),
                    "context must have one row per row of logits [B = ", logits.sym_size(0), "], got shape ",
                    context.sym_sizes());
  TORCH_CHECK_VALUE(logits.sym_size(0) == 0 || logits.sym_size(1) >= 1,
                    "logits must have a vocabulary of V >= 1 entries");
  TORCH_CHECK_VALUE(logits.sym_size(1) <= (int64_t(1) << 32), "the vocabulary V must be <= 2^32, got ",
                    logits.sym_size(1));
}

void check_green(double gamma, double delta) {
  TORCH_CHECK_VALUE(gamma >= 0.0 && gamma <= 1.0, "gamma (the green fraction) must be in [0, 1], got ", gamma);
  TORCH_CHECK_VALUE(std::isfinite(delta), "delta must be finite, got ", delta);
}

// The checks of kgw_logits and kgw_argmax (their op alignops::kgw_*_check, which the Triton twins call).
void check_kgw(const at::Tensor& logits, const at::Tensor& context, int64_t /*key*/, double gamma, double delta) {
  check_logits_context(logits, context);
  check_green(gamma, delta);
}

void check_gumbel(const at::Tensor& logits, const at::Tensor& context, int64_t /*key*/, double temperature) {
  check_logits_context(logits, context);
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature), "temperature must be a finite value > 0, got ",
                    temperature);
}

// state[b] = fold of combine over the context tokens (oldest first), starting from key_state(salt, key).
std::vector<uint32_t> row_states(const at::Tensor& context, uint32_t salt, int64_t key) {
  const int64_t B = context.size(0), h = context.size(1);
  const auto c = context.to(at::kLong).contiguous();
  const int64_t* cp = c.const_data_ptr<int64_t>();
  const uint32_t base = hash::key_state(salt, key);
  std::vector<uint32_t> state(static_cast<size_t>(B), base);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < h; ++j) {
      state[b] = hash::combine(state[b], static_cast<uint32_t>(cp[b * h + j]));
    }
  }
  return state;
}

uint64_t green_threshold(double gamma) { return static_cast<uint64_t>(std::floor(gamma * 4294967296.0)); }

at::Tensor kgw_logits_cpu(const at::Tensor& logits, const at::Tensor& context, int64_t key, double gamma,
                          double delta) {
  check_kgw(logits, context, key, gamma, delta);
  check_device(logits, c10::DeviceType::CPU, "logits");
  const uint64_t threshold = green_threshold(gamma);
  const auto x = logits.contiguous();
  auto out = at::empty_like(x);
  if (x.numel() == 0) {
    return out;
  }
  const auto state = row_states(context, hash::kSaltKgw, key);
  kernels().kgw_logits(x, state.data(), threshold, static_cast<float>(delta), out);
  return out;
}

at::Tensor kgw_argmax_cpu(const at::Tensor& logits, const at::Tensor& context, int64_t key, double gamma,
                          double delta) {
  check_kgw(logits, context, key, gamma, delta);
  check_device(logits, c10::DeviceType::CPU, "logits");
  const uint64_t threshold = green_threshold(gamma);
  auto out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  if (logits.size(0) == 0) {
    return out;
  }
  const auto state = row_states(context, hash::kSaltKgw, key);
  kernels().kgw_argmax(logits.contiguous(), state.data(), threshold, static_cast<float>(delta),
                       out.mutable_data_ptr<int64_t>());
  return out;
}

at::Tensor gumbel_argmax_cpu(const at::Tensor& logits, const at::Tensor& context, int64_t key, double temperature) {
  check_gumbel(logits, context, key, temperature);
  check_device(logits, c10::DeviceType::CPU, "logits");
  auto out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  if (logits.size(0) == 0) {
    return out;
  }
  const auto state = row_states(context, hash::kSaltGumbel, key);
  kernels().gumbel_argmax(logits.contiguous(), state.data(), static_cast<float>(1.0 / temperature),
                          out.mutable_data_ptr<int64_t>());
  return out;
}

}  // namespace

// The schemas of this file's ops, defined here and nowhere else.
TORCH_LIBRARY_FRAGMENT(alignops, m) {
  // ---- watermark: fused over the vocabulary, per-entry words hashed on the fly from (key, context, v) ----
  // logits [B, V], context [B, h] int (the previous h tokens, oldest first). green[b, v] iff
  // combine(state_b, v) < floor(gamma * 2^32). kgw_logits -> logits + delta * green (dtype of logits);
  // kgw_argmax -> [B] int64; gumbel_argmax -> [B] int64 argmax of logits / T - log(-log u).
  def_checked(m, "kgw_logits(Tensor logits, Tensor context, int key, float gamma, float delta) -> Tensor");

  def_checked(m, "kgw_argmax(Tensor logits, Tensor context, int key, float gamma, float delta) -> Tensor");

  def_checked(m, "gumbel_argmax(Tensor logits, Tensor context, int key, float temperature) -> Tensor");
}

TORCH_LIBRARY_IMPL(alignops, CPU, m) {
  m.impl("kgw_logits", &kgw_logits_cpu);
  m.impl("kgw_argmax", &kgw_argmax_cpu);
  m.impl("gumbel_argmax", &gumbel_argmax_cpu);
}

TORCH_LIBRARY_IMPL(alignops, CompositeImplicitAutograd, m) {
  m.impl("kgw_logits_check", &check_kgw);
  m.impl("kgw_argmax_check", &check_kgw);
  m.impl("gumbel_argmax_check", &check_gumbel);
}

}  // namespace alignops::watermark
