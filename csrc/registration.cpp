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

// Defines the op of `schema` ("name(args) -> returns") and `name_check(args) -> ()`, the op's argument checks as
// an op of their own: the family's C++ file registers its check function for it (CompositeImplicitAutograd, so it
// runs on any device and on fake tensors), its CPU kernel calls the same function, and the Python side (the Triton
// twin, ops/_registration.py) calls the op. The arguments are written once, here, and the checks once, in C++.
void def_checked(torch::Library& m, const std::string& schema) {
  const size_t open = schema.find('(');
  const size_t close = schema.rfind(") -> ");
  TORCH_INTERNAL_ASSERT(open != std::string::npos && close != std::string::npos && open < close, schema);
  m.def(schema.c_str());
  std::string args = schema.substr(open, close + 1 - open);
  // The checks read, never write: an in-place op's "Tensor(a!) x" is a plain "Tensor x" for its check op.
  for (size_t at = args.find("(a!)"); at != std::string::npos; at = args.find("(a!)")) {
    args.erase(at, 4);
  }
  m.def((schema.substr(0, open) + "_check" + args + " -> ()").c_str());
}

}  // namespace

// An empty module: `import alignops._C` only has to load this library so the registrations above run.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(alignops, m) {
  // def_checked: ops that have a Triton twin or a Python fake that checks, so their checks are needed outside C++.
  m.def("cuda_archs() -> int[]", &cuda_archs);
  // The names (C++ enumerators without `k`) and values of one family of integer codes the kernels take:
  // loss_type, f_divergence, activation, criterion, ctc_segmentation_flag, policy_loss_type,
  // importance_sampling_level (python/alignops/_codes.py).
  m.def("codes(str family) -> (str[], int[])");

  // ---- preference: closed-form DPO-family losses on per-sequence log-probs -------------------------
  // Returns (loss [B], chosen_rewards [B], rejected_rewards [B], grad [4, B]): grad holds d loss_i /
  // d (policy_chosen, policy_rejected, ref_chosen, ref_rejected)_i when compute_grad, else it is empty.
  // loss_types are codes of csrc/preference/preference_loss_math.h, combined with loss_weights.
  def_checked(
      m,
      "preference_loss(Tensor policy_chosen_logps, Tensor policy_rejected_logps, Tensor ref_chosen_logps, "
      "Tensor ref_rejected_logps, Tensor? beta, Tensor? chosen_lengths, Tensor? rejected_lengths, "
      "int[] loss_types, float[] loss_weights, float beta_value, float label_smoothing, float gamma, "
      "float discopop_tau, int f_divergence, float f_alpha, bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor)");

  // ---- preference: log p(target) per row of a logits matrix, without materialising log_softmax -----
  // Returns (logp [N] fp32, lse [N] fp32); lse is the logsumexp of logits / temperature, kept for backward.
  def_checked(
      m, "selective_logprobs(Tensor logits, Tensor targets, int ignore_index, float temperature) -> (Tensor, Tensor)");
  def_checked(
      m,
      "selective_logprobs_backward(Tensor grad_logp, Tensor logits, Tensor targets, Tensor lse, int ignore_index, "
      "float temperature) -> Tensor");

  // ---- preference: LM head + log p(target) without materialising the [N, V] logits ----------------
  // z = logit_scale * (hidden @ weight^T + bias); z = softcap * tanh(z / softcap) when softcap > 0; z /= T.
  // Returns (logp [N] fp32, lse [N] fp32, entropy [N] fp32 (empty unless return_entropy)); rows whose
  // target is ignore_index give 0 and are dropped before any GEMM. The backward recomputes the logits
  // tile by tile and returns (grad_hidden [N, H], grad_weight [V, H], grad_bias [V] or empty); with grad_entropy
  // and the forward's entropy it adds the entropy's gradient (an entropy bonus) in the same pass.
  def_checked(m,
              "fused_linear_logprobs(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, int ignore_index, "
              "float temperature, float logit_scale, float softcap, bool return_entropy) -> (Tensor, Tensor, Tensor)");
  def_checked(
      m,
      "fused_linear_logprobs_backward(Tensor grad_logp, Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, "
      "Tensor lse, int ignore_index, float temperature, float logit_scale, float softcap, bool bias_grad, "
      "Tensor? grad_entropy=None, Tensor? entropy=None) -> (Tensor, Tensor, Tensor)");

  // ---- distillation: teacher-student divergence from both LM heads, no [N, V] logits ---------------
  // divergence: "jsd" (coef = beta; 0 forward KL, 1 reverse KL), "tv", "skew_kl" / "skew_reverse_kl"
  // (coef = skew). softcap <= 0 means none. Rows with weights == 0 are dropped before any GEMM. Returns
  // (loss = sum_n weights_n d_n [], per_token d [N], student entropy [N], and when compute_grad the
  // gradients of loss w.r.t. student_hidden [N, Hs], student_weight [V, Hs], student_bias [V] (else empty)).
  def_checked(
      m,
      "fused_linear_distillation(Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, "
      "Tensor teacher_weight, Tensor? student_bias, Tensor? teacher_bias, Tensor weights, str divergence, "
      "float coef, float temperature, float student_logit_scale, float teacher_logit_scale, float student_softcap, "
      "float teacher_softcap, bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- skip: FFN on the kept rows only, skipped rows bit-identical ----------------------------------
  // y = x + FFN(RMSNorm(x)) on rows with keep, y = x elsewhere. activation: 0 swiglu (w_gate_up [2I, H],
  // gate rows first), 1 gelu (erf), 2 gelu_tanh (w_gate_up [I, H]). Returns (y [N, H], index [N] int64
  // whose first `count` entries are the kept rows in ascending order, count [1] int64, rstd [N] (fp32; fp64 for fp64 x)
  // and pre_act [N, G] (first `count` rows valid, saved for backward; empty unless save_for_backward)); past `count`,
  // index holds -1 and rstd / pre_act hold 0. Capacity-sized outputs keep the shapes static: no host sync is needed to
  // size them.
  def_checked(
      m,
      "skip_ffn(Tensor x, Tensor keep, Tensor w_gate_up, Tensor w_down, Tensor? norm_weight, Tensor? b_gate_up, "
      "Tensor? b_down, int activation, float eps, bool save_for_backward) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // In place (inference): kept rows of x become x + FFN(RMSNorm(x)); skipped rows are never written.
  def_checked(
      m,
      "skip_ffn_(Tensor(a!) x, Tensor keep, Tensor w_gate_up, Tensor w_down, Tensor? norm_weight, Tensor? b_gate_up, "
      "Tensor? b_down, int activation, float eps) -> ()");
  // The residual add of a decoder layer with the skip criterion in the same pass: h = residual + delta and
  // score [N] (fp32; fp64 for fp64) = 1 - cos(h, residual) (criterion 0) or |h - residual| / |residual| (1).
  def_checked(m, "skip_add_score(Tensor residual, Tensor delta, int criterion) -> (Tensor, Tensor)");
  // CPU inference: keep a oneDNN-prepacked copy of each weight (enable) or drop it (not enable); skip_ffn
  // and skip_ffn_ then multiply with the packed copy (csrc/skip/skip_ffn_packed.h). batch_size: the row
  // count oneDNN tunes the layout for (None: its default).
  m.def("skip_ffn_prepack(Tensor[] weights, bool enable, int? batch_size) -> ()");
  m.def("skip_ffn_is_prepacked(Tensor w) -> bool");

  // ---- ctc: batched CTC forced alignment (Viterbi over the 2L+1 trellis) ----------------------------
  // log_probs [B, T, C] (any float dtype; fp32 accumulation, fp64 for fp64), targets [B, L] padded,
  // lengths [B]. Targets equal to star_id take their per-frame score from star_scores [B, T] (a wildcard
  // state) when it is given. checkpoint = 0 keeps 1.5 bits of backpointers per state; K > 0 keeps every
  // K-th score row and recomputes K-frame segments on the way back. Returns (paths [B, T] int64,
  // scores [B, T] (log_probs dtype: the emission score of the aligned label per frame), feasible [B] bool);
  // frames past input_lengths hold -1 / 0, infeasible rows -1 / -inf.
  m.def(
      "forced_align(Tensor log_probs, Tensor targets, Tensor input_lengths, Tensor target_lengths, int blank, "
      "Tensor? star_scores, int star_id, int checkpoint) -> (Tensor, Tensor, Tensor)");

  // ---- wasserstein: 1-D optimal transport between empirical measures, batched over rows -------------
  // u [B, n], v [B, m], weights of their shapes (None: uniform; normalised per row). Returns W_p^p [B] in u's
  // dtype (POT's ot.wasserstein_1d convention; scipy.stats.wasserstein_distance for p = 1), fp64 sums.
  // The backward returns (grad_u [B, n], grad_v [B, m], grad_u_weights, grad_v_weights); the weight
  // gradients are [B, n] / [B, m] when weights_grad and the weights are given, else empty.
  def_checked(m, "wasserstein_1d(Tensor u, Tensor v, Tensor? u_weights, Tensor? v_weights, float p) -> Tensor");
  def_checked(m,
              "wasserstein_1d_backward(Tensor grad, Tensor u, Tensor v, Tensor? u_weights, Tensor? v_weights, float p, "
              "bool weights_grad) -> (Tensor, Tensor, Tensor, Tensor)");

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

  // ---- ot: batched log-domain Sinkhorn, no B x N x M temporaries ---------------------------------
  // Plan P_ij = exp((f_i + g_j - C_ij) / eps) (POT's sinkhorn_log convention: f = eps * log_u absorbs
  // log a), C = cost, or -cost when scores. Problem p uses the top-left n_sizes[p] x m_sizes[p] block;
  // a [B, N], b [B, M] are its marginals (padding ignored). Iteration t runs at eps_schedule[t] for
  // t < len(eps_schedule) (epsilon scaling, warm start), then at eps; each iteration updates g then f.
  // With tol >= 0, from the first iteration at eps on, a problem whose L1 column-marginal error is
  // <= tol stops. Returns (f [B, N], g [B, M], iterations [B] int64, err [B]); padding of f, g is 0.
  def_checked(
      m,
      "sinkhorn(Tensor cost, Tensor a, Tensor b, Tensor n_sizes, Tensor m_sizes, float[] eps_schedule, float eps, "
      "int n_iters, float tol, bool scores) -> (Tensor, Tensor, Tensor, Tensor)");
  // The same on point clouds, C_ij = |x_i - y_j|_2^p computed tile by tile, never stored: x [B, N, d],
  // y [B, M, d]. Returns (f [B, N], g [B, M], iterations [B] int64, err [B]).
  def_checked(m,
              "sinkhorn_points(Tensor x, Tensor y, Tensor a, Tensor b, Tensor n_sizes, Tensor m_sizes, float p, "
              "float[] eps_schedule, float eps, int n_iters, float tol) -> (Tensor, Tensor, Tensor, Tensor)");
  // One pass of the log-domain UCoFiA normalisation on sim [L, N, M]: when row_update,
  // row_bias_i = -logsumexp_j(scale * S_ij + col_bias_j) (else 0); then
  // col_lse_j = logsumexp_i(scale * S_ij + row_bias_i). Returns (row_bias [L, N], col_lse [L, M]).
  def_checked(m,
              "sinkhorn_normalize_pass(Tensor sim, Tensor col_bias, float scale, bool row_update) -> (Tensor, Tensor)");

  // ---- metrics: confusion matrices of rater pairs on the sample and on seeded bootstrap resamples ---
  // a [P, N], b [P, N] or [1, N] int labels in [0, num_classes). Returns int32 [P, R + 1, C, C]: entry r = 0 is
  // the full sample, r >= 1 the resample drawing items bounded(combine(combine(key_state(seed), r), j), N),
  // j < N (csrc/common/counter_hash.h), identical on every backend.
  def_checked(m, "bootstrap_confusion(Tensor a, Tensor b, int num_classes, int num_resamples, int seed) -> Tensor");

  // ---- watermark: fused over the vocabulary, per-entry words hashed on the fly from (key, context, v) ----
  // logits [B, V], context [B, h] int (the previous h tokens, oldest first). green[b, v] iff
  // combine(state_b, v) < floor(gamma * 2^32). kgw_logits -> logits + delta * green (dtype of logits);
  // kgw_argmax -> [B] int64; gumbel_argmax -> [B] int64 argmax of logits / T - log(-log u).
  def_checked(m, "kgw_logits(Tensor logits, Tensor context, int key, float gamma, float delta) -> Tensor");
  def_checked(m, "kgw_argmax(Tensor logits, Tensor context, int key, float gamma, float delta) -> Tensor");
  def_checked(m, "gumbel_argmax(Tensor logits, Tensor context, int key, float temperature) -> Tensor");

  // ---- ctc_segmentation: the ctc-segmentation package's algorithm, batched over problems ------------
  // lpz [B, T, V] (fp32 / fp64 log-probs), ground_truth [B, C, S] int64 (row 0 = start marker, -1 = no
  // symbol; S > 1 for multi-character spans), lengths [B]. flags: 1 blank_transition_cost_zero,
  // 2 preamble_transition_cost_zero. Returns (timings [B, C] int64 frame of each ground-truth position,
  // char_probs [B, T] fp64, states [B, T] int64 (token id, -1 stay, -2 not on the path), window [B] int64).
  // block_columns: -1 auto, 0 whole [W, C] table, k > 0 checkpointed every k columns (same results).
  m.def(
      "ctc_segmentation(Tensor lpz, Tensor lpz_lengths, Tensor ground_truth, Tensor gt_lengths, int blank, "
      "int min_window_size, int max_window_size, int flags, bool backtrack_from_max_t, int block_columns) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // One full-length trellis per problem (no re-centring), backtracked from each of end_columns [B, E]
  // (-1 = unused): the package's result for every ground-truth prefix ending there, without refilling.
  // previous_table [B, C, T'] (a table this op returned for the same ground truth on the first
  // previous_lengths [B] frames of lpz) is extended by the new rows only. Returns (timings [B, E, C],
  // char_probs [B, E, T], states [B, E, T], ok [B, E] bool, table [B, C, T] fp32 or [0, C, T]).
  m.def(
      "ctc_segmentation_prefixes(Tensor lpz, Tensor lpz_lengths, Tensor ground_truth, Tensor gt_lengths, "
      "Tensor end_columns, int blank, int flags, bool backtrack_from_max_t, Tensor? previous_table, "
      "Tensor? previous_lengths, bool return_table) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The package's utterance score over [start, end) frame spans: [B, T] x [B, U] -> [B, U] fp64.
  def_checked(
      m, "ctc_segmentation_utterance_score(Tensor frame_logprobs, Tensor starts, Tensor ends, int window) -> Tensor");

  // ---- ppo: generalised advantage estimation, one reverse scan per row -----------------------------
  // rewards, values [B, T] float, completion_mask [B, T] bool (a False position ends the episode),
  // last_values [B] (bootstrap after position T-1; None = 0). Returns (advantages, returns) [B, T] in the
  // dtype of rewards, 0 outside the mask. Not differentiable (PPO detaches advantages).
  def_checked(m,
              "gae_advantages(Tensor rewards, Tensor values, Tensor completion_mask, Tensor? last_values, float gamma, "
              "float lam) -> (Tensor, Tensor)");

  // ---- policy: the GRPO-family policy-gradient loss of TRL's GRPOTrainer._compute_loss ------------
  // per_token_logps [B, T] float (bf16/fp16/fp32/fp64); every other float tensor in the accumulation
  // dtype acc (fp64 for fp64 input, else fp32): advantages [B], [B, 1] or [B, T]; old / ref / sampling
  // log-probs [B, T] (old None = per_token_logps detached, sampling None = old); importance_sampling_ratio
  // [B], [B, 1] or [B, T]; entropy_mask [B, T]; completion_mask [B, T] bool or acc. loss_type and
  // importance_sampling_level are alignops._codes.PolicyLossType / ImportanceSamplingLevel; epsilon_high,
  // like TRL's, is already resolved (= epsilon_low when unset); delta None = no two-sided clip;
  // off_policy_mask_threshold None = no off-policy sequence mask; beta 0 = no KL term (ref unused).
  // Returns (loss_sum, grad, row_stats):
  //   loss_sum  0-dim acc: sum_b rs_b sum_t m_bt ptl_bt, ptl the per-token loss of TRL, rs_b = 1/max(M_b, 1)
  //             for grpo / sapo, else 1 (the global normaliser of the loss type is applied by the caller);
  //   grad      [B, T] in the dtype of per_token_logps: d loss_sum / d per_token_logps (empty [0] when
  //             compute_grad is false); row b's loss depends only on row b, so d row_stats[b, 7] / d lp_b
  //             is grad[b] too;
  //   row_stats [B, 8] acc, per row b (M_b = sum_t m_bt; "a token sum" is sum_t m_bt x_bt when TRL's tensor x
  //             is [B, T], its one value x_b when x is [B, 1], i.e. sequence level with advantages [B]/[B, 1]):
  //     0 M_b;  1 clip low  (coef_1 < 1 - eps_low  and A < 0), token sum;
  //     2 clip high (coef_1 > 1 + eps_high and A > 0; cispo: coef_1 > eps_high and A > 0), token sum;
  //     3 clip region (1 or 2), token sum;  4 sum_t m_bt kl_bt (k3 KL, times coef_1 when bias-corrected;
  //     0 when beta = 0);  5 coef_1 (after the delta clamp), token sum of coef_1's own shape ([B, 1] at
  //     sequence level whatever A's shape);  6 vespo's phi (0 for other loss types): phi_b when A is [B] /
  //     [B, 1] (at either level: TRL's gamma weights are a row value), its masked sum when A is [B, T];
  //     7 the row's loss rs_b sum_t m_bt ptl_bt.  Clip columns are 0 for sapo / vespo (and 1, 3 for cispo).
  def_checked(
      m,
      "policy_loss(Tensor per_token_logps, Tensor advantages, Tensor completion_mask, Tensor? old_per_token_logps, "
      "Tensor? ref_per_token_logps, Tensor? importance_sampling_ratio, Tensor? sampling_per_token_logps, "
      "Tensor? entropy_mask, int loss_type, int importance_sampling_level, float epsilon_low, float epsilon_high, "
      "float? delta, float beta, bool use_bias_correction_kl, float? off_policy_mask_threshold, "
      "float sapo_temperature_pos, float sapo_temperature_neg, float vespo_k_pos, float vespo_lambda_pos, "
      "float vespo_k_neg, float vespo_lambda_neg, bool compute_grad) -> (Tensor loss_sum, Tensor grad, "
      "Tensor row_stats)");
}
