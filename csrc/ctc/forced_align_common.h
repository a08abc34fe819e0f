// Argument checks and output allocation of alignops::forced_align, shared by the CPU and CUDA launchers.
#pragma once

#include <ATen/ATen.h>

#include "common/checks.h"

namespace alignops::ctc {

// Checks that need no data: ranks, dtypes, devices and sizes (as SymInts: also the op alignops::forced_align_check,
// run on fake tensors). Values (target ids, lengths) are alignops::forced_align_check_values (forced_align_cpu.cpp).
inline void check_forced_align_args(const at::Tensor& log_probs, const at::Tensor& targets,
                                    const at::Tensor& input_lengths, const at::Tensor& target_lengths, int64_t blank,
                                    const c10::optional<at::Tensor>& star_scores, int64_t star_id, int64_t checkpoint) {
  check_dim(log_probs, 3, "log_probs", "[B, T, C]");
  check_floating(log_probs, "log_probs");
  check_dim(targets, 2, "targets", "[B, L]");
  check_integer(targets, "targets");
  check_dim(input_lengths, 1, "input_lengths", "[B]");
  check_integer(input_lengths, "input_lengths");
  check_dim(target_lengths, 1, "target_lengths", "[B]");
  check_integer(target_lengths, "target_lengths");
  const auto B = log_probs.sym_size(0);
  TORCH_CHECK_VALUE(targets.sym_size(0) == B, "targets must have the batch size of log_probs (", B, "), got shape ",
                    targets.sym_sizes());
  TORCH_CHECK_VALUE(input_lengths.sym_size(0) == B, "input_lengths must have shape [", B, "], got ",
                    input_lengths.sym_sizes());
  TORCH_CHECK_VALUE(target_lengths.sym_size(0) == B, "target_lengths must have shape [", B, "], got ",
                    target_lengths.sym_sizes());
  check_same_device(targets, log_probs, "targets", "log_probs");
  check_same_device(input_lengths, log_probs, "input_lengths", "log_probs");
  check_same_device(target_lengths, log_probs, "target_lengths", "log_probs");
  TORCH_CHECK_VALUE(log_probs.sym_size(2) > 0, "log_probs must have at least one class, got shape ",
                    log_probs.sym_sizes());
  TORCH_CHECK_VALUE(blank >= 0 && blank < log_probs.sym_size(2), "blank must be in [0, ", log_probs.sym_size(2),
                    "), got ", blank);
  TORCH_CHECK_VALUE(checkpoint >= 0, "checkpoint must be >= 0 (0: full backpointers), got ", checkpoint);
  if (star_scores.has_value()) {
    const auto& s = *star_scores;
    check_dim(s, 2, "star_scores", "[B, T]");
    TORCH_CHECK_VALUE(s.sym_size(0) == B && s.sym_size(1) == log_probs.sym_size(1), "star_scores must have shape [", B,
                      ", ", log_probs.sym_size(1), "], got ", s.sym_sizes());
    TORCH_CHECK_VALUE(s.scalar_type() == acc_type_of(log_probs), "star_scores must be ",
                      dtype_name(acc_type_of(log_probs)), " for log_probs of dtype ",
                      dtype_name(log_probs.scalar_type()), ", got ", dtype_name(s.scalar_type()));
    check_same_device(s, log_probs, "star_scores", "log_probs");
    TORCH_CHECK_VALUE(star_id != blank, "star_id must differ from blank (", blank, ")");
  }
}

struct ForcedAlignOutputs {
  at::Tensor paths, scores, feasible;
};

// paths [B, T] int64 (-1 past input_lengths and for infeasible rows), scores [B, T] in the dtype of
// log_probs (0 past input_lengths, -inf for infeasible rows), feasible [B] bool.
inline ForcedAlignOutputs empty_forced_align_outputs(const at::Tensor& log_probs) {
  const auto B = log_probs.size(0), T = log_probs.size(1);
  return {at::empty({B, T}, log_probs.options().dtype(at::kLong)), at::empty({B, T}, log_probs.options()),
          at::empty({B}, log_probs.options().dtype(at::kBool))};
}

}  // namespace alignops::ctc
