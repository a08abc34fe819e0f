// The schemas of preference_loss and selective_logprobs (+ its backward), written once for the two libraries that
// register them: alignops._C (preference_loss_cpu.cpp, selective_logprobs_cpu.cpp: def_checked, namespace alignops)
// and the LibTorch stable-ABI library (csrc/stable/: namespace alignops_stable). Plain C strings: the stable build
// includes no ATen. Every other op keeps its schema in the file of its CPU kernel (CONTRIBUTING.md).
#pragma once

namespace alignops::preference::schemas {

// Returns (loss [B], chosen_rewards [B], rejected_rewards [B], grad [4, B]): grad holds d loss_i /
// d (policy_chosen, policy_rejected, ref_chosen, ref_rejected)_i when compute_grad, else it is empty.
// loss_types are codes of csrc/preference/preference_loss_math.h, combined with loss_weights.
inline constexpr char kPreferenceLoss[] =
    "preference_loss(Tensor policy_chosen_logps, Tensor policy_rejected_logps, Tensor ref_chosen_logps, "
    "Tensor ref_rejected_logps, Tensor? beta, Tensor? chosen_lengths, Tensor? rejected_lengths, "
    "int[] loss_types, float[] loss_weights, float beta_value, float label_smoothing, float gamma, "
    "float discopop_tau, int f_divergence, float f_alpha, bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor)";

// Returns (logp [N] fp32, lse [N] fp32); lse is the logsumexp of logits / temperature, kept for backward.
inline constexpr char kSelectiveLogprobs[] =
    "selective_logprobs(Tensor logits, Tensor targets, int ignore_index, float temperature) -> (Tensor, Tensor)";

inline constexpr char kSelectiveLogprobsBackward[] =
    "selective_logprobs_backward(Tensor grad_logp, Tensor logits, Tensor targets, Tensor lse, int ignore_index, "
    "float temperature) -> Tensor";

}  // namespace alignops::preference::schemas
