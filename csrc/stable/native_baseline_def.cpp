// Only for bench/stable_abi_overhead.py under a torch that has no alignops build (2.13 in .ci/stable_abi.sh):
// today's registration of the CPU preference_loss and selective_logprobs (TORCH_LIBRARY +
// csrc/preference/preference_loss_cpu*.cpp, selective_logprobs_cpu*.cpp),
// compiled against that torch, as the baseline of the stable-ABI op's per-call overhead. The schema is
// csrc/registration.cpp's; never linked into the package.
#include <torch/library.h>

TORCH_LIBRARY(alignops, m) {
  m.def(
      "preference_loss(Tensor policy_chosen_logps, Tensor policy_rejected_logps, Tensor ref_chosen_logps, "
      "Tensor ref_rejected_logps, Tensor? beta, Tensor? chosen_lengths, Tensor? rejected_lengths, "
      "int[] loss_types, float[] loss_weights, float beta_value, float label_smoothing, float gamma, "
      "float discopop_tau, int f_divergence, float f_alpha, bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("selective_logprobs(Tensor logits, Tensor targets, int ignore_index, float temperature) -> (Tensor, Tensor)");
  m.def(
      "selective_logprobs_backward(Tensor grad_logp, Tensor logits, Tensor targets, Tensor lse, int ignore_index, "
      "float temperature) -> Tensor");
}
