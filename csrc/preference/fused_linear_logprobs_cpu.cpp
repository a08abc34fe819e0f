// CPU launcher of alignops::fused_linear_logprobs(_backward): the LM head and log p(target) without the
// [N, V] logits. Ignored rows are dropped before any GEMM (long runs of kept rows are read in place, scattered
// ones gathered once); the vocabulary is walked in tiles of Vt columns (one ATen/BLAS GEMM per tile and run of
// kept rows) with an online logsumexp, so the extra memory is one [K, Vt] tile (about 8 MB) whatever V is.
// Backward recomputes each tile, turns it into dz in place, and writes grad_weight[v0:v1] once from it
// (deterministic, fp32 accumulation inside the GEMM).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_capability.h"
#include "common/registration.h"
#include "common/value_checks.h"
#include "preference/fused_linear_logprobs_cpu_kernel.h"

namespace alignops::preference {
namespace {

const FusedLinearKernels& kernels() {
#if ALIGNOPS_X86
  return pick_cpu_kernels(DEFAULT::fused_linear_kernels, &AVX2::fused_linear_kernels);
#else
  return DEFAULT::fused_linear_kernels;
#endif
}

// Columns per vocabulary tile: a [K, Vt] tile of about 2M elements (8 MB in fp32), at least 64 columns. The tile is
// the extra memory next to grad_weight (and, for scattered rows or bf16 / fp16 hidden, the [K, H] gather of the kept
// rows); at K = 1792 rows (the GRPO bench step) a 4M-element tile took 0.53x Liger's peak memory and this one about
// 0.5x with the gather, 0.44-0.47x without it (bench/results), for ~10% more CPU time than 4M (the GEMMs repack hidden
// once per tile). ALIGNOPS_FUSED_LINEAR_TILE overrides it (the tests use it to cover several tiles on small shapes).
int64_t vocab_tile(int64_t K, int64_t V) {
  if (const char* forced = std::getenv("ALIGNOPS_FUSED_LINEAR_TILE")) {
    return std::min(V, std::max<int64_t>(1, std::atoll(forced)));
  }
  const int64_t budget = int64_t(1) << 21;
  const int64_t vt = std::max<int64_t>(64, budget / std::max<int64_t>(K, 1));
  return std::min(V, (vt + 15) / 16 * 16);
}

// The checks of fused_linear_logprobs (also its op alignops::fused_linear_logprobs_check, which the Triton twin
// calls). An empty vocabulary is refused: every row's log-probability would be log(0 / 0).
void check_args(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                const std::optional<at::Tensor>& bias, int64_t /*ignore_index*/, double temperature, double logit_scale,
                double /*softcap*/, bool /*return_entropy*/ = false) {
  check_lm_head(hidden, weight, bias, "hidden", "weight", "bias");
  TORCH_CHECK_VALUE(weight.sym_size(0) >= 1, "weight must have at least one row (V >= 1), got shape ",
                    weight.sym_sizes());
  check_dim(targets, 1, "targets", "[N]");
  check_integer(targets, "targets");
  check_same_device(targets, hidden, "targets", "hidden");
  TORCH_CHECK_VALUE(targets.sym_size(0) == hidden.sym_size(0),
                    "targets must have one entry per row of hidden [N=", hidden.sym_size(0), "], got ",
                    targets.sym_size(0));
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature), "temperature must be a finite value > 0, got ",
                    temperature);
  TORCH_CHECK_VALUE(std::isfinite(logit_scale), "logit_scale must be finite, got ", logit_scale);
}

// The checks of the backward (its op alignops::fused_linear_logprobs_backward_check).
void check_backward_args(const at::Tensor& grad_logp, const at::Tensor& hidden, const at::Tensor& weight,
                         const at::Tensor& targets, const std::optional<at::Tensor>& bias, const at::Tensor& lse,
                         int64_t ignore_index, double temperature, double logit_scale, double softcap,
                         bool /*bias_grad*/, const std::optional<at::Tensor>& grad_entropy,
                         const std::optional<at::Tensor>& entropy) {
  check_args(hidden, weight, targets, bias, ignore_index, temperature, logit_scale, softcap);
  TORCH_CHECK_VALUE(grad_entropy.has_value() == entropy.has_value(),
                    "grad_entropy and entropy go together: give both or neither");
  const auto acc = acc_type_of(hidden);
  std::vector<std::pair<const at::Tensor*, const char*>> vectors{{&grad_logp, "grad_logp"}, {&lse, "lse"}};
  if (grad_entropy.has_value()) {
    vectors.insert(vectors.end(), {{&*grad_entropy, "grad_entropy"}, {&*entropy, "entropy"}});
  }
  for (const auto& [t, name] : vectors) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->sym_size(0) == hidden.sym_size(0) && t->scalar_type() == acc, name,
                      " must be a ", dtype_name(acc), " tensor of shape [N] = [", hidden.sym_size(0), "], got ",
                      dtype_name(t->scalar_type()), " ", t->sym_sizes());
    check_same_device(*t, hidden, name, "hidden");
  }
}

// Kept rows (target != ignore_index) and their targets, checked against [0, V).
std::pair<at::Tensor, at::Tensor> kept_rows(const at::Tensor& targets, int64_t ignore_index, int64_t V) {
  check_target_values(targets, V, ignore_index);
  const auto t = targets.to(at::kLong).contiguous();
  const int64_t* tp = t.const_data_ptr<int64_t>();
  std::vector<int64_t> rows;
  rows.reserve(t.numel());
  for (int64_t n = 0; n < t.numel(); ++n) {
    if (tp[n] != ignore_index) {
      rows.push_back(n);
    }
  }
  auto index = at::tensor(rows, t.options());
  return {index, t.index_select(0, index)};
}

// The kept rows of hidden as the GEMMs read them. A right-padded or packed batch keeps one run of consecutive rows
// per sequence: when hidden is already in the accumulation dtype with unit column stride and the runs are long, the
// GEMMs read each run in place (one GEMM per run and tile) and no [K, H] copy exists; otherwise (scattered rows,
// bf16 / fp16 hidden) the kept rows are gathered once into a contiguous [K, H] copy, read as a single run.
struct KeptHidden {
  struct Run {
    int64_t offset, first, length;  // rows [offset, offset + length) of the kept order = hidden[first, first + length)
  };
  at::Tensor source;  // hidden itself (in place) or the [K, H] copy
  std::vector<Run> runs;
  bool in_place = false;

  at::Tensor rows(const Run& r) const { return source.narrow(0, r.first, r.length); }
};

// Runs shorter than this on average make per-run GEMMs too small: the rows are gathered instead.
constexpr int64_t kMinMeanRun = 64;

KeptHidden kept_hidden(const at::Tensor& hidden, const at::Tensor& index, at::ScalarType acc) {
  const int64_t K = index.numel();
  const int64_t* ip = index.const_data_ptr<int64_t>();
  KeptHidden kept;
  for (int64_t k = 0; k < K; ++k) {
    if (!kept.runs.empty() && ip[k] == ip[k - 1] + 1) {
      ++kept.runs.back().length;
    } else {
      kept.runs.push_back({k, ip[k], 1});
    }
  }
  const bool long_runs = int64_t(kept.runs.size()) * kMinMeanRun <= K;
  if (hidden.scalar_type() == acc && hidden.stride(1) == 1 && long_runs) {
    kept.source = hidden;
    kept.in_place = true;
  } else {
    kept.source = hidden.index_select(0, index).to(acc).contiguous();
    kept.runs = {{0, 0, K}};
  }
  return kept;
}

// u = h @ w[v0:v0+vt]^T (+ bias) for the K kept rows into the first K * vt elements of `buffer`, as a contiguous
// [K, vt] (one GEMM per run of kept rows).
at::Tensor gemm_tile(const KeptHidden& h, int64_t K, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     int64_t v0, int64_t vt, at::Tensor& buffer, at::ScalarType acc) {
  auto tile = buffer.narrow(0, 0, K * vt).view({K, vt});
  const auto w = weight.narrow(0, v0, vt).to(acc);
  const auto b = bias.has_value() ? bias->narrow(0, v0, vt).to(acc) : at::Tensor();
  for (const auto& run : h.runs) {
    auto out = tile.narrow(0, run.offset, run.length);
    if (b.defined()) {
      at::addmm_out(out, b, h.rows(run), w.t());
    } else {
      at::mm_out(out, h.rows(run), w.t());
    }
  }
  return tile;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_logprobs_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, double temperature, double logit_scale, double softcap,
    bool return_entropy) {
  check_args(hidden, weight, targets, bias, ignore_index, temperature, logit_scale, softcap);
  check_device(hidden, c10::DeviceType::CPU, "hidden");
  const int64_t N = hidden.size(0), V = weight.size(0);
  const auto acc = acc_type_of(hidden);
  const auto opts = hidden.options().dtype(acc);
  auto logp = at::zeros({N}, opts);
  auto lse = at::zeros({N}, opts);
  auto entropy = return_entropy ? at::zeros({N}, opts) : at::empty({0}, opts);
  const auto [index, y] = kept_rows(targets, ignore_index, V);
  const int64_t K = index.numel();
  if (K == 0) {
    return {logp, lse, entropy};
  }
  const auto h = kept_hidden(hidden, index, acc);
  // The running max starts at the lowest finite value, not -inf: masked (-inf) logits never form -inf - -inf.
  auto m = at::full(
      {K}, acc == at::kDouble ? std::numeric_limits<double>::lowest() : double(std::numeric_limits<float>::lowest()),
      opts);
  auto s = at::zeros({K}, opts);
  auto zt = at::zeros({K}, opts);
  auto ez = return_entropy ? at::zeros({K}, opts) : at::Tensor();
  const LogitTransform f{logit_scale, softcap, 1.0 / temperature};
  const int64_t Vt = vocab_tile(K, V);
  auto buffer = at::empty({K * Vt}, opts);
  const auto& k = kernels();
  for (int64_t v0 = 0; v0 < V; v0 += Vt) {
    const int64_t vt = std::min(Vt, V - v0);
    const auto tile = gemm_tile(h, K, weight, bias, v0, vt, buffer, acc);
    k.forward_tile(tile, v0, y, f, m, s, zt, ez);
  }
  const auto lse_k = m + s.log();
  logp.index_copy_(0, index, zt - lse_k);
  lse.index_copy_(0, index, lse_k);
  if (return_entropy) {
    entropy.index_copy_(0, index, lse_k - ez / s);
  }
  return {logp, lse, entropy};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_logprobs_backward_cpu(
    const at::Tensor& grad_logp, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, const at::Tensor& lse, int64_t ignore_index, double temperature,
    double logit_scale, double softcap, bool bias_grad, const std::optional<at::Tensor>& grad_entropy,
    const std::optional<at::Tensor>& entropy) {
  check_backward_args(grad_logp, hidden, weight, targets, bias, lse, ignore_index, temperature, logit_scale, softcap,
                      bias_grad, grad_entropy, entropy);
  check_device(hidden, c10::DeviceType::CPU, "hidden");
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto acc = acc_type_of(hidden);
  auto grad_hidden = at::zeros_like(hidden, at::MemoryFormat::Contiguous);
  auto grad_weight = at::zeros_like(weight, at::MemoryFormat::Contiguous);
  auto grad_bias = bias_grad ? at::zeros({V}, hidden.options()) : at::empty({0}, hidden.options());
  const auto [index, y] = kept_rows(targets, ignore_index, V);
  const int64_t K = index.numel();
  if (K == 0) {
    return {grad_hidden, grad_weight, grad_bias};
  }
  const auto h = kept_hidden(hidden, index, acc);
  const auto g = grad_logp.index_select(0, index).contiguous();
  const auto lse_k = lse.index_select(0, index).contiguous();
  // The entropy's gradient (an entropy bonus) rides in the same pass over the recomputed tiles.
  const auto ge = grad_entropy.has_value() ? grad_entropy->index_select(0, index).contiguous() : at::Tensor();
  const auto ent = entropy.has_value() ? entropy->index_select(0, index).contiguous() : at::Tensor();
  // Where grad_hidden's kept rows accumulate dz @ W: in place when hidden's runs are read in place; else, for fp32 /
  // fp64 inputs, the first K rows of grad_hidden (zeros), moved into place at the end, so the backward allocates no
  // second [K, H] buffer (the tile and the gathered rows of hidden are then its only extra memory beside
  // grad_weight); else (bf16 / fp16) a [K, H] accumulator in the accumulation dtype.
  const bool front = !h.in_place && hidden.scalar_type() == acc;
  auto gh = h.in_place ? grad_hidden
            : front    ? grad_hidden.narrow(0, 0, K)
                       : at::zeros({K, H}, hidden.options().dtype(acc));
  const LogitTransform f{logit_scale, softcap, 1.0 / temperature};
  const int64_t Vt = vocab_tile(K, V);
  auto buffer = at::empty({K * Vt}, hidden.options().dtype(acc));
  const bool direct = weight.scalar_type() == acc;  // grad_weight rows can take the GEMM output in place
  const auto& k = kernels();
  for (int64_t v0 = 0; v0 < V; v0 += Vt) {
    const int64_t vt = std::min(Vt, V - v0);
    auto tile = gemm_tile(h, K, weight, bias, v0, vt, buffer, acc);
    k.backward_tile(tile, v0, y, g, lse_k, ge, ent, f);
    const auto w = weight.narrow(0, v0, vt).to(acc);
    auto gw = grad_weight.narrow(0, v0, vt);
    auto gw_acc = direct ? gw : at::empty({vt, H}, hidden.options().dtype(acc));  // runs[0].offset == 0: mm_out sets it
    for (const auto& run : h.runs) {
      const auto dz = tile.narrow(0, run.offset, run.length);
      const int64_t gh_row = h.in_place ? run.first : run.offset;  // gh is grad_hidden itself, or [K, H]-ordered
      gh.narrow(0, gh_row, run.length).addmm_(dz, w);
      if (run.offset == 0) {
        at::mm_out(gw_acc, dz.t(), h.rows(run));
      } else {
        gw_acc.addmm_(dz.t(), h.rows(run));
      }
    }
    if (!direct) {
      gw.copy_(gw_acc);
    }
    if (bias_grad) {
      grad_bias.narrow(0, v0, vt).copy_(tile.sum(0));
    }
  }
  if (!h.in_place && !front) {
    grad_hidden.index_copy_(0, index, gh.to(hidden.scalar_type()));
  } else if (front && K < N) {
    // Row k goes to index[k] >= k (index ascends): from the last row down, every destination lies at or above
    // the rows still to move, so no source is overwritten before it moves; a vacated row is zeroed (it is
    // written again if it is a later destination).
    const int64_t* ip = index.const_data_ptr<int64_t>();
    const int64_t row_bytes = H * grad_hidden.element_size();
    char* base = static_cast<char*>(grad_hidden.data_ptr());
    for (int64_t k = K - 1; k >= 0; --k) {
      if (ip[k] != k) {
        std::memcpy(base + ip[k] * row_bytes, base + k * row_bytes, row_bytes);
        std::memset(base + k * row_bytes, 0, row_bytes);
      }
    }
  }
  return {grad_hidden, grad_weight, grad_bias};
}

}  // namespace

// The schemas of this file's ops, defined here and nowhere else.
TORCH_LIBRARY_FRAGMENT(alignops, m) {
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
  // An LM head's checks (hidden [N, H], weight [V, H], bias [V]; csrc/common/checks.h) under the caller's argument
  // names, for the Python-defined fused-linear ops (adpa) that take heads: it reads no data.
  m.def(
      "check_lm_head(Tensor hidden, Tensor weight, Tensor? bias, str hidden_name, str weight_name, str bias_name) -> "
      "()");
}

TORCH_LIBRARY_IMPL(alignops, CompositeImplicitAutograd, m) {
  m.impl("fused_linear_logprobs_check",
         [](const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
            const std::optional<at::Tensor>& bias, int64_t ignore_index, double temperature, double logit_scale,
            double softcap, bool return_entropy) {
           check_args(hidden, weight, targets, bias, ignore_index, temperature, logit_scale, softcap, return_entropy);
         });
  m.impl("fused_linear_logprobs_backward_check", &check_backward_args);
  m.impl("check_lm_head", [](const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             c10::string_view h, c10::string_view w,
                             c10::string_view b) { check_lm_head(hidden, weight, bias, h, w, b); });
}

TORCH_LIBRARY_IMPL(alignops, CPU, m) {
  m.impl("fused_linear_logprobs", &fused_linear_logprobs_cpu);
  m.impl("fused_linear_logprobs_backward", &fused_linear_logprobs_backward_cpu);
}

}  // namespace alignops::preference
