// Every alignops schema, in one place. Backends register their kernels from their own files with
// TORCH_LIBRARY_IMPL; autograd, fake kernels and the Triton ops live in python/alignops/ops/.
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace {

// The SM architectures this build holds CUDA code for (empty for a CPU-only build), e.g. {90}.
std::vector<int64_t> cuda_archs() {
  std::vector<int64_t> archs;
  const std::string list = ALIGNOPS_CUDA_ARCHS;  // CMake's form: "80-real;90-real;90-virtual"
  size_t pos = 0;
  while (pos < list.size()) {
    size_t end = list.find(';', pos);
    end = end == std::string::npos ? list.size() : end;
    const std::string item = list.substr(pos, end - pos);
    if (!item.empty() && item.find("virtual") == std::string::npos) {
      archs.push_back(std::stoll(item));
    }
    pos = end + 1;
  }
  return archs;
}

}  // namespace

// An empty module: `import alignops._C` only has to load this library so the registrations above run.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(alignops, m) {
  m.def("cuda_archs() -> int[]", &cuda_archs);

  // ---- preference: closed-form DPO-family losses on per-sequence log-probs -------------------------
  // Returns (loss [B], chosen_rewards [B], rejected_rewards [B], grad [4, B]): grad holds d loss_i /
  // d (policy_chosen, policy_rejected, ref_chosen, ref_rejected)_i when compute_grad, else it is empty.
  // loss_types are codes of csrc/preference/preference_loss_math.h, combined with loss_weights.
  m.def(
      "preference_loss(Tensor policy_chosen_logps, Tensor policy_rejected_logps, Tensor ref_chosen_logps, "
      "Tensor ref_rejected_logps, Tensor? beta, Tensor? chosen_lengths, Tensor? rejected_lengths, "
      "int[] loss_types, float[] loss_weights, float beta_value, float label_smoothing, float gamma, "
      "float discopop_tau, int f_divergence, float f_alpha, bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor)");

  // ---- preference: log p(target) per row of a logits matrix, without materialising log_softmax -----
  // Returns (logp [N] fp32, lse [N] fp32); lse is the logsumexp of logits / temperature, kept for backward.
  m.def("selective_logprobs(Tensor logits, Tensor targets, int ignore_index, float temperature) -> (Tensor, Tensor)");
  m.def(
      "selective_logprobs_backward(Tensor grad_logp, Tensor logits, Tensor targets, Tensor lse, int ignore_index, "
      "float temperature) -> Tensor");

  // ---- preference: LM head + log p(target) without materialising the [N, V] logits ----------------
  // z = logit_scale * (hidden @ weight^T + bias); z = softcap * tanh(z / softcap) when softcap > 0; z /= T.
  // Returns (logp [N] fp32, lse [N] fp32, entropy [N] fp32 (empty unless return_entropy)); rows whose
  // target is ignore_index give 0 and are dropped before any GEMM. The backward recomputes the logits
  // tile by tile and returns (grad_hidden [N, H], grad_weight [V, H], grad_bias [V] or empty).
  m.def(
      "fused_linear_logprobs(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, int ignore_index, "
      "float temperature, float logit_scale, float softcap, bool return_entropy) -> (Tensor, Tensor, Tensor)");
  m.def(
      "fused_linear_logprobs_backward(Tensor grad_logp, Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, "
      "Tensor lse, int ignore_index, float temperature, float logit_scale, float softcap, bool bias_grad) "
      "-> (Tensor, Tensor, Tensor)");

  // ---- skip: FFN on the kept rows only, skipped rows bit-identical ----------------------------------
  // y = x + FFN(RMSNorm(x)) on rows with keep, y = x elsewhere. activation: 0 swiglu (w_gate_up [2I, H],
  // gate rows first), 1 gelu (erf), 2 gelu_tanh (w_gate_up [I, H]). Returns (y [N, H], index [N] int64
  // whose first `count` entries are the kept rows in ascending order, count [1] int64, rstd [N] (fp32; fp64 for fp64 x) and
  // pre_act [N, G] (first `count` rows valid, saved for backward; empty unless save_for_backward)); past
  // `count`, index holds -1 and rstd / pre_act hold 0.
  // Capacity-sized outputs keep the shapes static: no host sync is needed to size them.
  m.def(
      "skip_ffn(Tensor x, Tensor keep, Tensor w_gate_up, Tensor w_down, Tensor? norm_weight, Tensor? b_gate_up, "
      "Tensor? b_down, int activation, float eps, bool save_for_backward) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- ot: batched log-domain Sinkhorn, no B x N x M temporaries ---------------------------------
  // Plan P_ij = exp((f_i + g_j - C_ij) / eps) (POT's sinkhorn_log convention: f = eps * log_u absorbs
  // log a), C = cost, or -cost when scores. Problem p uses the top-left n_sizes[p] x m_sizes[p] block;
  // a [B, N], b [B, M] are its marginals (padding ignored). Iteration t runs at eps_schedule[t] for
  // t < len(eps_schedule) (epsilon scaling, warm start), then at eps; each iteration updates g then f.
  // With tol >= 0, from the first iteration at eps on, a problem whose L1 column-marginal error is
  // <= tol stops. Returns (f [B, N], g [B, M], iterations [B] int64, err [B]); padding of f, g is 0.
  m.def(
      "sinkhorn(Tensor cost, Tensor a, Tensor b, Tensor n_sizes, Tensor m_sizes, float[] eps_schedule, float eps, "
      "int n_iters, float tol, bool scores) -> (Tensor, Tensor, Tensor, Tensor)");
  // The same on point clouds, C_ij = |x_i - y_j|_2^p computed tile by tile, never stored: x [B, N, d],
  // y [B, M, d]. Returns (f [B, N], g [B, M], iterations [B] int64, err [B]).
  m.def(
      "sinkhorn_points(Tensor x, Tensor y, Tensor a, Tensor b, Tensor n_sizes, Tensor m_sizes, float p, "
      "float[] eps_schedule, float eps, int n_iters, float tol) -> (Tensor, Tensor, Tensor, Tensor)");
  // One pass of the log-domain UCoFiA normalisation on sim [L, N, M]: when row_update,
  // row_bias_i = -logsumexp_j(scale * S_ij + col_bias_j) (else 0); then
  // col_lse_j = logsumexp_i(scale * S_ij + row_bias_i). Returns (row_bias [L, N], col_lse [L, M]).
  m.def("sinkhorn_normalize_pass(Tensor sim, Tensor col_bias, float scale, bool row_update) -> (Tensor, Tensor)");
}
