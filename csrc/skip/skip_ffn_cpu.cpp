// CPU launchers of alignops::skip_ffn (and skip_ffn_, in place; skip_add_score): compaction of the kept rows,
// fused gather + RMSNorm, GEMM (ATen/BLAS), fused activation, GEMM accumulated into the gathered residual
// rows, scatter into a copy of x (or into x itself).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "common/checks.h"
#include "common/cpu_capability.h"
#include "common/registration.h"
#include "skip/skip_ffn_cpu_kernel.h"
#include "skip/skip_ffn_packed.h"

namespace alignops::skip {
namespace {

const SkipFfnKernels& kernels() {
#if ALIGNOPS_X86
  return pick_cpu_kernels(DEFAULT::skip_ffn_kernels, &AVX2::skip_ffn_kernels);
#else
  return DEFAULT::skip_ffn_kernels;
#endif
}

void check_weight(const std::optional<at::Tensor>& t, std::initializer_list<c10::SymInt> shape, const at::Tensor& x,
                  const char* name, const char* shape_name) {
  if (!t.has_value()) {
    return;
  }
  const c10::SymIntArrayRef expected(shape.begin(), shape.size());
  TORCH_CHECK_VALUE(t->sym_sizes() == expected, name, " must have shape ", shape_name, " = ", expected, ", got ",
                    t->sym_sizes());
  check_same_dtype(*t, x, name, "x");
  check_same_device(*t, x, name, "x");
}

// The checks of skip_ffn (also its op alignops::skip_ffn_check, which the Triton twins call).
void check_skip_ffn(const at::Tensor& x, const at::Tensor& keep, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                    const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& b_gate_up,
                    const std::optional<at::Tensor>& b_down, int64_t activation, double eps,
                    bool /*save_for_backward*/ = false) {
  check_dim(x, 2, "x", "[N, H]");
  check_floating(x, "x");
  TORCH_CHECK_VALUE(activation >= kSwiglu && activation <= kGeluTanh,
                    "activation code must be 0 (swiglu), 1 (gelu) or 2 (gelu_tanh), got ", activation);
  TORCH_CHECK_VALUE(eps > 0.0 && std::isfinite(eps), "eps must be a finite value > 0, got ", eps);
  const auto N = x.sym_size(0), H = x.sym_size(1);
  TORCH_CHECK_VALUE(keep.scalar_type() == at::kBool && keep.dim() == 1 && keep.sym_size(0) == N,
                    "keep must be a bool tensor of shape [N] = [", N, "], got ", dtype_name(keep.scalar_type()), " ",
                    keep.sym_sizes());
  check_same_device(keep, x, "keep", "x");
  check_dim(w_down, 2, "w_down", "[H, I]");
  TORCH_CHECK_VALUE(w_down.sym_size(0) == H, "w_down must have shape [H, I] with H = ", H, ", got ",
                    w_down.sym_sizes());
  const auto I = w_down.sym_size(1);
  const auto G = activation == kSwiglu ? 2 * I : I;
  check_weight(w_gate_up, {G, H}, x, "w_gate_up", activation == kSwiglu ? "[2I, H]" : "[I, H]");
  check_weight(w_down, {H, I}, x, "w_down", "[H, I]");
  check_weight(norm_weight, {H}, x, "norm_weight", "[H]");
  check_weight(b_gate_up, {G}, x, "b_gate_up", activation == kSwiglu ? "[2I]" : "[I]");
  check_weight(b_down, {H}, x, "b_down", "[H]");
}

// The checks of skip_ffn_ (alignops::skip_ffn__check): skip_ffn's, and x contiguous.
void check_skip_ffn_inplace(const at::Tensor& x, const at::Tensor& keep, const at::Tensor& w_gate_up,
                            const at::Tensor& w_down, const std::optional<at::Tensor>& norm_weight,
                            const std::optional<at::Tensor>& b_gate_up, const std::optional<at::Tensor>& b_down,
                            int64_t activation, double eps) {
  check_skip_ffn(x, keep, w_gate_up, w_down, norm_weight, b_gate_up, b_down, activation, eps);
  TORCH_CHECK_VALUE(x.is_contiguous(), "x must be contiguous to be updated in place");
}

// The checks of skip_add_score (alignops::skip_add_score_check).
void check_add_score(const at::Tensor& residual, const at::Tensor& delta, int64_t criterion) {
  check_dim(residual, 2, "residual", "[N, H]");
  check_floating(residual, "residual");
  check_same_shape(delta, residual, "delta", "residual");
  check_same_dtype(delta, residual, "delta", "residual");
  check_same_device(delta, residual, "delta", "residual");
  TORCH_CHECK_VALUE(criterion == kCosine || criterion == kNormRatio,
                    "criterion code must be 0 (cosine) or 1 (norm_ratio), got ", criterion);
}

// Inference with prepacked weights (skip_ffn_packed.h). Measured here (H = 2048, I = 5632, 2 threads, the
// two GEMMs of one FFN): oneDNN's packed BF16 GEMM costs 0.028 ms per row at 192-224 rows but 0.035-0.037
// at 325-650 and 0.047 at 64 (torch.mm: 0.034-0.039 at 192-650, 0.086 at 64). So BF16 rows go through in
// balanced blocks of at most kPackedRows, each block norm -> GEMM -> activation -> GEMM + residual ->
// scatter (its intermediates stay in cache). Packed FP32 wins only below about 256 rows (0.20-0.28 ms per
// row against MKL's 0.20-0.44; at 325-650 rows it loses to MKL's 0.196-0.217): FP32 takes one block when
// K <= kPackedRows and MKL's plain GEMMs above that.
constexpr int64_t kPackedRows = 224;

bool use_packed(at::ScalarType dtype, int64_t K) {
  return dtype == at::kBFloat16 || (dtype == at::kFloat && K <= kPackedRows);
}

// y = x + FFN(RMSNorm(x)) on the kept rows index[start, start + n) (of K kept, N rows): gather + RMSNorm,
// GEMM (packed when packed_gate_up is given; into `pre` when it is defined, the buffer saved for backward),
// activation, GEMM accumulated into the residual rows, scatter. rstd, when defined, receives the rows'
// 1 / RMS. y holds x on entry (y may be x itself: in place).
void ffn_rows(const at::Tensor& x, at::Tensor& y, const at::Tensor& index, int64_t start, int64_t n, int64_t K,
              const at::Tensor& w_gate_up, const at::Tensor& w_down, const at::Tensor& norm,
              const std::optional<at::Tensor>& b_gate_up, const std::optional<at::Tensor>& b_down,
              const std::optional<at::Tensor>& packed_gate_up, const std::optional<at::Tensor>& packed_down,
              at::Tensor pre, at::Tensor rstd, int64_t I, int64_t activation, double eps) {
  const auto& k = kernels();
  auto normed = at::empty({n, x.size(1)}, x.options());
  k.gather_rms_norm(x, index.const_data_ptr<int64_t>() + start, n, norm, eps, normed, rstd);
  if (packed_gate_up.has_value()) {
    pre = packed_linear(normed, *packed_gate_up, b_gate_up);
  } else {
    if (!pre.defined()) {
      pre = at::empty({n, w_gate_up.size(0)}, x.options());
    }
    if (b_gate_up.has_value()) {
      at::addmm_out(pre, *b_gate_up, normed, w_gate_up.t());
    } else {
      at::mm_out(pre, normed, w_gate_up.t());
    }
  }
  auto act = at::empty({n, I}, x.options());
  k.activate(pre, activation, act);

  // The residual rows receive the second GEMM directly (beta = 1): one rounding. When every row is kept
  // they are a slice of y itself: no gather and no scatter.
  const bool all_kept = K == x.size(0);
  const auto kept = index.narrow(0, start, n);
  auto rows = all_kept ? y.narrow(0, start, n) : x.index_select(0, kept);
  if (packed_down.has_value()) {
    // oneDNN's sum post-op: rows + act @ w_down^T + b_down, one rounding, into a new buffer
    const auto out = packed_linear_add(act, rows, *packed_down, b_down);
    if (all_kept) {
      rows.copy_(out);
    } else {
      y.index_copy_(0, kept, out);
    }
    return;
  }
  if (b_down.has_value()) {
    rows.add_(*b_down);
  }
  rows.addmm_(act, w_down.t());
  if (!all_kept) {
    y.index_copy_(0, kept, rows);
  }
}

// y = x + FFN(RMSNorm(x)) on the kept rows of y, which holds x on entry (y may be x itself: in place).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_skip_ffn(
    const at::Tensor& x, at::Tensor& y, const at::Tensor& keep, const at::Tensor& w_gate_up, const at::Tensor& w_down,
    const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& b_gate_up,
    const std::optional<at::Tensor>& b_down, int64_t I, int64_t activation, double eps, bool save_for_backward) {
  const int64_t N = x.size(0);
  const int64_t G = w_gate_up.size(0);
  const auto keep_c = keep.contiguous();
  auto index = at::empty({N}, x.options().dtype(at::kLong));
  auto count = at::empty({1}, x.options().dtype(at::kLong));
  const auto acc = acc_type_of(x);
  auto rstd = at::empty({save_for_backward && norm_weight.has_value() ? N : 0}, x.options().dtype(acc));
  auto pre_act = at::empty({save_for_backward ? N : 0, G}, x.options());

  int64_t* idx = index.mutable_data_ptr<int64_t>();
  const bool* kp = keep_c.const_data_ptr<bool>();
  int64_t K = 0;
  for (int64_t n = 0; n < N; ++n) {
    if (kp[n]) {
      idx[K++] = n;
    }
  }
  // Past `count`, index is -1 and the saved buffers are 0: the outputs are fully defined (deterministic).
  std::fill(idx + K, idx + N, int64_t(-1));
  if (rstd.numel() > 0) {
    rstd.narrow(0, K, N - K).zero_();
  }
  if (pre_act.numel() > 0) {
    pre_act.narrow(0, K, N - K).zero_();
  }
  count.fill_(K);
  if (K == 0) {
    return {y, index, count, rstd, pre_act};
  }

  const auto norm = norm_weight.has_value() ? norm_weight->contiguous() : at::Tensor();
  if (!save_for_backward && use_packed(x.scalar_type(), K)) {
    const auto packed_gate_up = prepacked(w_gate_up);
    const auto packed_down = prepacked(w_down);
    if (packed_gate_up.has_value() || packed_down.has_value()) {
      const int64_t blocks = (K + kPackedRows - 1) / kPackedRows;  // balanced
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t start = K * b / blocks;
        ffn_rows(x, y, index, start, K * (b + 1) / blocks - start, K, w_gate_up, w_down, norm, b_gate_up, b_down,
                 packed_gate_up, packed_down, at::Tensor(), at::Tensor(), I, activation, eps);
      }
      return {y, index, count, rstd, pre_act};
    }
  }
  ffn_rows(x, y, index, 0, K, K, w_gate_up, w_down, norm, b_gate_up, b_down, std::nullopt, std::nullopt,
           save_for_backward ? pre_act.narrow(0, 0, K) : at::Tensor(),
           rstd.numel() > 0 ? rstd.narrow(0, 0, K) : at::Tensor(), I, activation, eps);
  return {y, index, count, rstd, pre_act};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> skip_ffn_cpu(
    const at::Tensor& x, const at::Tensor& keep, const at::Tensor& w_gate_up, const at::Tensor& w_down,
    const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& b_gate_up,
    const std::optional<at::Tensor>& b_down, int64_t activation, double eps, bool save_for_backward) {
  check_skip_ffn(x, keep, w_gate_up, w_down, norm_weight, b_gate_up, b_down, activation, eps);
  check_device(x, c10::DeviceType::CPU, "x");
  const int64_t I = w_down.size(1);
  const auto xc = x.contiguous();
  auto y = xc.clone();
  return run_skip_ffn(xc, y, keep, w_gate_up, w_down, norm_weight, b_gate_up, b_down, I, activation, eps,
                      save_for_backward);
}

// In place: skipped rows of x are never written, kept rows become x + FFN(RMSNorm(x)).
void skip_ffn_inplace_cpu(at::Tensor& x, const at::Tensor& keep, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                          const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& b_gate_up,
                          const std::optional<at::Tensor>& b_down, int64_t activation, double eps) {
  check_skip_ffn_inplace(x, keep, w_gate_up, w_down, norm_weight, b_gate_up, b_down, activation, eps);
  check_device(x, c10::DeviceType::CPU, "x");
  const int64_t I = w_down.size(1);
  run_skip_ffn(x, x, keep, w_gate_up, w_down, norm_weight, b_gate_up, b_down, I, activation, eps, false);
}

std::tuple<at::Tensor, at::Tensor> skip_add_score_cpu(const at::Tensor& residual, const at::Tensor& delta,
                                                      int64_t criterion) {
  check_add_score(residual, delta, criterion);
  check_device(residual, c10::DeviceType::CPU, "residual");
  const auto r = residual.contiguous();
  const auto d = delta.contiguous();
  auto h = at::empty_like(r);
  auto score = at::empty({r.size(0)}, r.options().dtype(acc_type_of(r)));
  kernels().add_score(r, d, criterion, h, score);
  return {h, score};
}

}  // namespace

// The schemas of this file's ops, defined here and nowhere else.
TORCH_LIBRARY_FRAGMENT(alignops, m) {
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
}

TORCH_LIBRARY_IMPL(alignops, CompositeImplicitAutograd, m) {
  m.impl("skip_ffn_check", &check_skip_ffn);
  m.impl("skip_ffn__check", &check_skip_ffn_inplace);
  m.impl("skip_add_score_check", &check_add_score);
}

TORCH_LIBRARY_IMPL(alignops, CPU, m) {
  m.impl("skip_ffn", &skip_ffn_cpu);
  m.impl("skip_ffn_", &skip_ffn_inplace_cpu);
  m.impl("skip_add_score", &skip_add_score_cpu);
}

}  // namespace alignops::skip
