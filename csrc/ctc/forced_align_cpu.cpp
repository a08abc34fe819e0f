// CPU launcher of alignops::forced_align: checks (shapes and values), int64 index copies, capability choice.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/cpu_capability.h"
#include "ctc/forced_align_common.h"
#include "ctc/forced_align_cpu_kernel.h"

namespace alignops::ctc {
namespace {

const ForcedAlignKernels& kernels() {
#if ALIGNOPS_X86
  return pick_cpu_kernels(DEFAULT::forced_align_kernels, &AVX2::forced_align_kernels);
#else
  return DEFAULT::forced_align_kernels;
#endif
}

// Lengths within the padded sizes, target ids in [0, C) and not blank (or the star id).
void check_values(const at::Tensor& targets, const at::Tensor& input_lengths, const at::Tensor& target_lengths,
                  int64_t T, int64_t C, int64_t blank, bool has_star, int64_t star_id) {
  const int64_t B = targets.size(0), Lmax = targets.size(1);
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  const int64_t* in_len = input_lengths.const_data_ptr<int64_t>();
  const int64_t* tgt_len = target_lengths.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(in_len[b] >= 0 && in_len[b] <= T, "input_lengths[", b, "] must be in [0, ", T,
                      "] (the time size of log_probs), got ", in_len[b]);
    TORCH_CHECK_VALUE(tgt_len[b] >= 0 && tgt_len[b] <= Lmax, "target_lengths[", b, "] must be in [0, ", Lmax,
                      "] (the size of targets), got ", tgt_len[b]);
    for (int64_t j = 0; j < tgt_len[b]; ++j) {
      const int64_t y = tgt[b * Lmax + j];
      if (has_star && y == star_id) {
        continue;
      }
      TORCH_CHECK_VALUE(y != blank, "targets[", b, ", ", j, "] is the blank id ", blank,
                        "; targets must not contain blank");
      TORCH_CHECK_VALUE(y >= 0 && y < C, "targets[", b, ", ", j, "] = ", y, " is outside [0, ", C,
                        ") (the classes of log_probs)");
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forced_align_cpu(const at::Tensor& log_probs, const at::Tensor& targets,
                                                                const at::Tensor& input_lengths,
                                                                const at::Tensor& target_lengths, int64_t blank,
                                                                const c10::optional<at::Tensor>& star_scores,
                                                                int64_t star_id, int64_t checkpoint) {
  check_forced_align_args(log_probs, targets, input_lengths, target_lengths, blank, star_scores, star_id, checkpoint);
  check_device(log_probs, c10::DeviceType::CPU, "log_probs");
  const auto lp = log_probs.contiguous();
  const auto tgt = targets.to(at::kLong).contiguous();
  const auto in_len = input_lengths.to(at::kLong).contiguous();
  const auto tgt_len = target_lengths.to(at::kLong).contiguous();
  check_values(tgt, in_len, tgt_len, lp.size(1), lp.size(2), blank, star_scores.has_value(), star_id);
  const auto star = star_scores.has_value() ? star_scores->contiguous() : at::Tensor();
  auto out = empty_forced_align_outputs(lp);
  kernels().align(lp, tgt, in_len, tgt_len, blank, star, star_id, checkpoint, out.paths, out.scores, out.feasible);
  return {out.paths, out.scores, out.feasible};
}

}  // namespace

TORCH_LIBRARY_IMPL(alignops, CPU, m) { m.impl("forced_align", &forced_align_cpu); }

}  // namespace alignops::ctc
