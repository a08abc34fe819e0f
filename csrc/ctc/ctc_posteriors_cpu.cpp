// CPU launcher of alignops::ctc_posteriors: argument checks (shapes, dtypes, lengths and target ids, each
// raising ValueError), allocation of the requested outputs, choice of the CPU capability.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "common/checks.h"
#include "common/cpu_capability.h"
#include "ctc/ctc_posteriors_cpu_kernel.h"

namespace alignops::ctc {
namespace {

const CtcPosteriorsKernels& kernels() {
#if ALIGNOPS_X86
  return pick_cpu_kernels(DEFAULT::ctc_posteriors_kernels, &AVX2::ctc_posteriors_kernels);
#else
  return DEFAULT::ctc_posteriors_kernels;
#endif
}

void check_lengths(const at::Tensor& lengths, int64_t B, std::string_view name, int64_t max, std::string_view dim) {
  check_dim(lengths, 1, name, "[B]");
  check_integer(lengths, name);
  TORCH_CHECK_VALUE(lengths.size(0) == B, name, " must have one entry per utterance (B = ", B, "), got ",
                    lengths.size(0));
  check_device(lengths, c10::DeviceType::CPU, name);
  const auto v = lengths.to(at::kLong).contiguous();
  const int64_t* p = v.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(p[b] >= 0 && p[b] <= max, name, " must lie in [0, ", dim, " = ", max, "], got ", p[b],
                      " for utterance ", b);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ctc_posteriors_cpu(
    const at::Tensor& log_probs, const at::Tensor& targets, const at::Tensor& input_lengths,
    const at::Tensor& target_lengths, int64_t blank, bool return_states, bool return_tokens, bool compute_grad) {
  check_dim(log_probs, 3, "log_probs", "[B, T, C]");
  check_floating(log_probs, "log_probs");
  check_device(log_probs, c10::DeviceType::CPU, "log_probs");
  check_dim(targets, 2, "targets", "[B, L] (padded)");
  check_integer(targets, "targets");
  check_device(targets, c10::DeviceType::CPU, "targets");
  const int64_t B = log_probs.size(0), T = log_probs.size(1), C = log_probs.size(2), L = targets.size(1);
  TORCH_CHECK_VALUE(targets.size(0) == B, "targets must have one row per utterance (B = ", B, "), got ",
                    targets.size(0));
  TORCH_CHECK_VALUE(blank >= 0 && blank < C, "blank must lie in [0, C = ", C, "), got ", blank);
  check_lengths(input_lengths, B, "input_lengths", T, "T");
  check_lengths(target_lengths, B, "target_lengths", L, "L");
  const auto y = targets.to(at::kLong).contiguous();
  const auto il = input_lengths.to(at::kLong).contiguous();
  const auto tl = target_lengths.to(at::kLong).contiguous();
  const int64_t* yp = y.const_data_ptr<int64_t>();
  const int64_t* tlp = tl.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < tlp[b]; ++j) {
      const int64_t c = yp[b * L + j];
      TORCH_CHECK_VALUE(c >= 0 && c < C && c != blank, "targets must be class ids in [0, C = ", C,
                        ") other than blank = ", blank, ", got ", c, " at targets[", b, ", ", j, "]");
    }
  }
  const auto x = log_probs.contiguous();
  const auto acc = log_probs.options().dtype(acc_type_of(log_probs));
  auto loss = at::empty({B}, acc);
  auto states = return_states ? at::zeros({B, T, 2 * L + 1}, acc) : at::empty({0}, acc);
  auto tokens = return_tokens ? at::zeros({B, T, L}, acc) : at::empty({0}, acc);
  auto grad = compute_grad ? at::zeros({B, T, C}, log_probs.options()) : at::empty({0}, log_probs.options());
  kernels().run(x, y, il, tl, blank, loss, states, tokens, grad);
  return {loss, states, tokens, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(alignops, CPU, m) { m.impl("ctc_posteriors", &ctc_posteriors_cpu); }

}  // namespace alignops::ctc
