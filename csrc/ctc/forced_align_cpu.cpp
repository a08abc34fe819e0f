// CPU launcher of alignops::forced_align: checks (shapes and values), int64 index copies, capability choice.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/cpu_capability.h"
#include "common/registration.h"
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

// The checks that read values, as the op alignops::forced_align_check_values: lengths within the padded sizes,
// target ids in [0, C) and not blank (the star id excepted when star_scores is given). ATen reductions, so the same
// function serves the CPU launcher and, through the op, the public function on a GPU and for the reference.
void check_values(const at::Tensor& log_probs, const at::Tensor& targets, const at::Tensor& input_lengths,
                  const at::Tensor& target_lengths, int64_t blank, const c10::optional<at::Tensor>& star_scores,
                  int64_t star_id) {
  const int64_t T = log_probs.size(1), C = log_probs.size(2), L = targets.size(1);
  auto bad = ((input_lengths < 0) | (input_lengths > T)).nonzero();
  if (bad.numel() > 0) {
    const int64_t b = bad[0][0].item<int64_t>();
    TORCH_CHECK_VALUE(false, "input_lengths[", b, "] must be in [0, ", T, "] (the time size of log_probs), got ",
                      input_lengths[b].item<int64_t>());
  }
  bad = ((target_lengths < 0) | (target_lengths > L)).nonzero();
  if (bad.numel() > 0) {
    const int64_t b = bad[0][0].item<int64_t>();
    TORCH_CHECK_VALUE(false, "target_lengths[", b, "] must be in [0, ", L, "] (the size of targets), got ",
                      target_lengths[b].item<int64_t>());
  }
  auto used = at::arange(L, targets.options().dtype(at::kLong)).unsqueeze(0) < target_lengths.unsqueeze(1);
  if (star_scores.has_value()) {
    used = used & (targets != star_id);
  }
  bad = (used & ((targets == blank) | (targets < 0) | (targets >= C))).nonzero();
  if (bad.numel() > 0) {
    const int64_t b = bad[0][0].item<int64_t>(), j = bad[0][1].item<int64_t>();
    const int64_t y = targets[b][j].item<int64_t>();
    TORCH_CHECK_VALUE(y != blank, "targets[", b, ", ", j, "] is the blank id ", blank,
                      "; targets must not contain blank");
    TORCH_CHECK_VALUE(false, "targets[", b, ", ", j, "] = ", y, " is outside [0, ", C, ") (the classes of log_probs)");
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
  check_values(log_probs, tgt, in_len, tgt_len, blank, star_scores, star_id);
  const auto star = star_scores.has_value() ? star_scores->contiguous() : at::Tensor();
  auto out = empty_forced_align_outputs(lp);
  kernels().align(lp, tgt, in_len, tgt_len, blank, star, star_id, checkpoint, out.paths, out.scores, out.feasible);
  return {out.paths, out.scores, out.feasible};
}

}  // namespace

// The schemas of this file's ops, defined here and nowhere else.
TORCH_LIBRARY_FRAGMENT(alignops, m) {
  // ---- ctc: batched CTC forced alignment (Viterbi over the 2L+1 trellis) ----------------------------
  // log_probs [B, T, C] (any float dtype; fp32 accumulation, fp64 for fp64), targets [B, L] padded,
  // lengths [B]. Targets equal to star_id take their per-frame score from star_scores [B, T] (a wildcard
  // state) when it is given. checkpoint = 0 keeps 1.5 bits of backpointers per state; K > 0 keeps every
  // K-th score row and recomputes K-frame segments on the way back. Returns (paths [B, T] int64,
  // scores [B, T] (log_probs dtype: the emission score of the aligned label per frame), feasible [B] bool);
  // frames past input_lengths hold -1 / 0, infeasible rows -1 / -inf.
  def_checked(m,
              "forced_align(Tensor log_probs, Tensor targets, Tensor input_lengths, Tensor target_lengths, int blank, "
              "Tensor? star_scores, int star_id, int checkpoint) -> (Tensor, Tensor, Tensor)");
  // The checks that read the lengths and target ids (on any device: ATen reductions and one host sync).
  m.def(
      "forced_align_check_values(Tensor log_probs, Tensor targets, Tensor input_lengths, Tensor target_lengths, "
      "int blank, Tensor? star_scores, int star_id) -> ()");
}

TORCH_LIBRARY_IMPL(alignops, CPU, m) { m.impl("forced_align", &forced_align_cpu); }

TORCH_LIBRARY_IMPL(alignops, CompositeImplicitAutograd, m) {
  m.impl("forced_align_check", &check_forced_align_args);
  m.impl("forced_align_check_values", &check_values);
}

}  // namespace alignops::ctc
