// CPU launcher of alignops::ctc_posteriors: argument checks (shapes, dtypes, lengths and target ids, each
// raising ValueError), allocation of the requested outputs, choice of the CPU capability.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "common/checks.h"
#include "common/cpu_capability.h"
#include "common/registration.h"
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

void check_lengths(const at::Tensor& lengths, const at::Tensor& log_probs, std::string_view name) {
  check_dim(lengths, 1, name, "[B]");
  check_integer(lengths, name);
  TORCH_CHECK_VALUE(lengths.sym_size(0) == log_probs.sym_size(0), name,
                    " must have one entry per utterance (B = ", log_probs.sym_size(0), "), got ", lengths.sym_size(0));
  check_same_device(lengths, log_probs, name, "log_probs");
}

// Each length in [0, max]: ATen reductions, so the same function serves every device (one host sync).
void check_length_values(const at::Tensor& lengths, std::string_view name, int64_t max, std::string_view dim) {
  const auto bad = ((lengths < 0) | (lengths > max)).nonzero();
  if (bad.numel() > 0) {
    const int64_t b = bad[0][0].item<int64_t>();
    TORCH_CHECK_VALUE(false, name, " must lie in [0, ", dim, " = ", max, "], got ", lengths[b].item<int64_t>(),
                      " for utterance ", b);
  }
}

// The checks that read values (lengths, target ids), as the op alignops::ctc_posteriors_check_values: the CPU
// kernel calls it, and the public function on a GPU, so there is one message whichever backend runs.
void check_ctc_posteriors_values(const at::Tensor& log_probs, const at::Tensor& targets,
                                 const at::Tensor& input_lengths, const at::Tensor& target_lengths, int64_t blank) {
  const int64_t T = log_probs.size(1), C = log_probs.size(2), L = targets.size(1);
  check_length_values(input_lengths, "input_lengths", T, "T");
  check_length_values(target_lengths, "target_lengths", L, "L");
  const auto used = at::arange(L, targets.options().dtype(at::kLong)).unsqueeze(0) < target_lengths.unsqueeze(1);
  const auto bad = (used & ((targets < 0) | (targets >= C) | (targets == blank))).nonzero();
  if (bad.numel() > 0) {
    const int64_t b = bad[0][0].item<int64_t>(), j = bad[0][1].item<int64_t>();
    TORCH_CHECK_VALUE(false, "targets must be class ids in [0, C = ", C, ") other than blank = ", blank, ", got ",
                      targets[b][j].item<int64_t>(), " at targets[", b, ", ", j, "]");
  }
}

// The op's checks (also its op alignops::ctc_posteriors_check: the public function, the Triton twin); they read
// no data. The CPU kernel then checks the values it reads (lengths, target ids).
void check_ctc_posteriors(const at::Tensor& log_probs, const at::Tensor& targets, const at::Tensor& input_lengths,
                          const at::Tensor& target_lengths, int64_t blank, bool /*return_states*/,
                          bool /*return_tokens*/, bool /*compute_grad*/) {
  check_dim(log_probs, 3, "log_probs", "[B, T, C]");
  check_floating(log_probs, "log_probs");
  check_dim(targets, 2, "targets", "[B, L] (padded)");
  check_integer(targets, "targets");
  check_same_device(targets, log_probs, "targets", "log_probs");
  TORCH_CHECK_VALUE(targets.sym_size(0) == log_probs.sym_size(0),
                    "targets must have one row per utterance (B = ", log_probs.sym_size(0), "), got ",
                    targets.sym_size(0));
  TORCH_CHECK_VALUE(blank >= 0 && blank < log_probs.sym_size(2), "blank must lie in [0, C = ", log_probs.sym_size(2),
                    "), got ", blank);
  check_lengths(input_lengths, log_probs, "input_lengths");
  check_lengths(target_lengths, log_probs, "target_lengths");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ctc_posteriors_cpu(
    const at::Tensor& log_probs, const at::Tensor& targets, const at::Tensor& input_lengths,
    const at::Tensor& target_lengths, int64_t blank, bool return_states, bool return_tokens, bool compute_grad) {
  check_ctc_posteriors(log_probs, targets, input_lengths, target_lengths, blank, return_states, return_tokens,
                       compute_grad);
  check_device(log_probs, c10::DeviceType::CPU, "log_probs");
  const int64_t B = log_probs.size(0), T = log_probs.size(1), C = log_probs.size(2), L = targets.size(1);
  check_ctc_posteriors_values(log_probs, targets, input_lengths, target_lengths, blank);
  const auto y = targets.to(at::kLong).contiguous();
  const auto il = input_lengths.to(at::kLong).contiguous();
  const auto tl = target_lengths.to(at::kLong).contiguous();
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

// The schemas of this file's ops, defined here and nowhere else.
TORCH_LIBRARY_FRAGMENT(alignops, m) {
  // ---- ctc_posteriors: CTC forward-backward (fp64 log-domain alpha/beta) ----------------------------
  // log_probs [B, T, C] (any scores, not necessarily normalised), targets [B, L] padded, lengths [B].
  // Returns (loss [B] = -log p(targets | scores), inf where no alignment exists; states [B, T, 2L+1]
  // occupancy gamma when return_states else [0]; tokens [B, T, L] occupancy of each token's state when
  // return_tokens else [0]; grad [B, T, C] = d loss_b / d log_probs = -sum of gamma over the states
  // labelled c, in log_probs' dtype, when compute_grad else [0]). loss / states / tokens are fp32 (fp64 for
  // fp64 log_probs). Frames past input_lengths and infeasible utterances get 0 occupancy and gradient.
  def_checked(
      m,
      "ctc_posteriors(Tensor log_probs, Tensor targets, Tensor input_lengths, Tensor target_lengths, int blank, "
      "bool return_states, bool return_tokens, bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // The checks that read the lengths and target ids (on any device: ATen reductions and one host sync).
  m.def(
      "ctc_posteriors_check_values(Tensor log_probs, Tensor targets, Tensor input_lengths, Tensor target_lengths, "
      "int blank) -> ()");
}

TORCH_LIBRARY_IMPL(alignops, CPU, m) { m.impl("ctc_posteriors", &ctc_posteriors_cpu); }

TORCH_LIBRARY_IMPL(alignops, CompositeImplicitAutograd, m) {
  m.impl("ctc_posteriors_check", &check_ctc_posteriors);
  m.impl("ctc_posteriors_check_values", &check_ctc_posteriors_values);
}

}  // namespace alignops::ctc
