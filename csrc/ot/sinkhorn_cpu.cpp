// CPU launcher of alignops::sinkhorn, sinkhorn_points and sinkhorn_normalize_pass: checks, allocation,
// capability choice.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_capability.h"
#include "common/registration.h"
#include "ot/sinkhorn_cpu_kernel.h"

namespace alignops::ot {
namespace {

const OtKernels& kernels() {
#if ALIGNOPS_X86
  return pick_cpu_kernels(DEFAULT::ot_kernels, &AVX2::ot_kernels);
#else
  return DEFAULT::ot_kernels;
#endif
}

void check_real(const at::Tensor& t, std::string_view name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                    " must be float32 or float64 (alignops.ot converts half types to float32), got ",
                    dtype_name(t.scalar_type()));
}

void check_sizes(const at::Tensor& sizes, const c10::SymInt& B, std::string_view name) {
  TORCH_CHECK_VALUE(sizes.scalar_type() == at::kLong && sizes.dim() == 1 && sizes.sym_size(0) == B, name,
                    " must be an int64 tensor of shape [B] = [", B, "], got ", dtype_name(sizes.scalar_type()), " ",
                    sizes.sym_sizes());
}

void check_eps(double eps, std::string_view name) {
  TORCH_CHECK_VALUE(eps > 0 && std::isfinite(eps), name, " must be a finite value > 0, got ", eps);
}

// Marginals, sizes and epsilons of a batch of B problems of size N x M (shared by both Sinkhorn ops).
void check_problem(const at::Tensor& like, const at::Tensor& a, const at::Tensor& b, const at::Tensor& n_sizes,
                   const at::Tensor& m_sizes, const c10::SymInt& B, const c10::SymInt& N, const c10::SymInt& M,
                   at::ArrayRef<double> eps_schedule, double eps, int64_t n_iters) {
  check_dim(a, 2, "a", "[B, N]");
  check_dim(b, 2, "b", "[B, M]");
  TORCH_CHECK_VALUE(a.sym_size(0) == B && a.sym_size(1) == N, "a must have shape [B, N] = [", B, ", ", N, "], got ",
                    a.sym_sizes());
  TORCH_CHECK_VALUE(b.sym_size(0) == B && b.sym_size(1) == M, "b must have shape [B, M] = [", B, ", ", M, "], got ",
                    b.sym_sizes());
  check_same_dtype(a, like, "a", "cost");
  check_same_dtype(b, like, "b", "cost");
  check_same_device(a, like, "a", "cost");
  check_same_device(b, like, "b", "cost");
  check_sizes(n_sizes, B, "n_sizes");
  check_sizes(m_sizes, B, "m_sizes");
  check_eps(eps, "eps");
  for (double e : eps_schedule) {
    check_eps(e, "eps_schedule entries");
  }
  TORCH_CHECK_VALUE(n_iters >= 0, "n_iters must be >= 0, got ", n_iters);
}

// The checks of each op (also its op alignops::<op>_check, which the Triton twins call); they read no data.
void check_sinkhorn(const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b, const at::Tensor& n_sizes,
                    const at::Tensor& m_sizes, at::ArrayRef<double> eps_schedule, double eps, int64_t n_iters,
                    double /*tol*/, bool /*scores*/) {
  check_dim(cost, 3, "cost", "[B, N, M]");
  check_real(cost, "cost");
  check_problem(cost, a, b, n_sizes, m_sizes, cost.sym_size(0), cost.sym_size(1), cost.sym_size(2), eps_schedule, eps,
                n_iters);
}

void check_sinkhorn_points(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a, const at::Tensor& b,
                           const at::Tensor& n_sizes, const at::Tensor& m_sizes, double p,
                           at::ArrayRef<double> eps_schedule, double eps, int64_t n_iters, double /*tol*/) {
  check_dim(x, 3, "x", "[B, N, d]");
  check_dim(y, 3, "y", "[B, M, d]");
  check_real(x, "x");
  check_same_dtype(y, x, "y", "x");
  check_same_device(y, x, "y", "x");
  const auto B = x.sym_size(0), D = x.sym_size(2);
  TORCH_CHECK_VALUE(y.sym_size(0) == B && y.sym_size(2) == D, "y must have shape [B, M, d] with B = ", B,
                    " and d = ", D, ", got ", y.sym_sizes());
  TORCH_CHECK_VALUE(p >= 1 && std::isfinite(p), "p must be a finite value >= 1, got ", p);
  check_problem(x, a, b, n_sizes, m_sizes, B, x.sym_size(1), y.sym_size(1), eps_schedule, eps, n_iters);
}

void check_normalize_pass(const at::Tensor& sim, const at::Tensor& col_bias, double scale, bool /*row_update*/) {
  check_dim(sim, 3, "sim", "[L, N, M]");
  check_real(sim, "sim");
  const auto L = sim.sym_size(0), M = sim.sym_size(2);
  TORCH_CHECK_VALUE(col_bias.dim() == 2 && col_bias.sym_size(0) == L && col_bias.sym_size(1) == M,
                    "col_bias must have shape [L, M] = [", L, ", ", M, "], got ", col_bias.sym_sizes());
  check_same_dtype(col_bias, sim, "col_bias", "sim");
  check_same_device(col_bias, sim, "col_bias", "sim");
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
}

// ---- The checks that read values: ATen reductions, so one function serves every device. Each CPU launcher calls
// its function, and the op alignops::<op>_check_values (the same function) serves the Python side before the Triton
// and torch backends: each message is written once. Each reads one min and max per tensor, brought to the host in
// one copy (one sync on a GPU).

constexpr double kInf = std::numeric_limits<double>::infinity();

// The min and max of each tensor, lo0, hi0, lo1, hi1, ...: NaN for one that holds a NaN (aminmax propagates it),
// 0 for an empty one.
std::vector<double> extremes(at::TensorList ts) {
  std::vector<at::Tensor> parts;
  for (const auto& t : ts) {
    const auto options = t.options().dtype(at::kDouble).device(ts[0].device());
    if (t.numel() == 0) {
      parts.push_back(at::zeros({2}, options));
    } else {
      const auto [lo, hi] = at::aminmax(t);
      parts.push_back(at::stack({lo, hi}).to(options));
    }
  }
  const auto host = at::cat(parts).cpu();
  const double* p = host.const_data_ptr<double>();
  return {p, p + host.numel()};
}

// Each size in [0, bound] (the kernels index with them), given the sizes' min and max; the message names the first
// one outside (read again: on the error path only).
void check_size_values(const at::Tensor& sizes, double lo, double hi, int64_t bound, std::string_view name) {
  if (lo < 0 || hi > static_cast<double>(bound)) {
    const int64_t i = ((sizes < 0) | (sizes > bound)).nonzero()[0][0].item<int64_t>();
    TORCH_CHECK_VALUE(false, name, "[", i, "] = ", sizes[i].item<int64_t>(), " must lie in [0, ", bound, "]");
  }
}

// The sizes and, with scan_cost, no NaN cost and no infinity of the wrong sign: +inf costs (-inf scores) are
// forbidden pairs (P_ij = 0), the opposite infinity a pair of infinite value, which no finite plan has. The native
// op scans the cost itself: before it, the Python side checks only the sizes (scan_cost=False).
void check_sinkhorn_values(const at::Tensor& cost, const at::Tensor& n_sizes, const at::Tensor& m_sizes, bool scores,
                           bool scan_cost) {
  const auto v = scan_cost ? extremes({n_sizes, m_sizes, cost}) : extremes({n_sizes, m_sizes});
  check_size_values(n_sizes, v[0], v[1], cost.size(1), "n_sizes");
  check_size_values(m_sizes, v[2], v[3], cost.size(2), "m_sizes");
  if (scan_cost) {
    const double lo = v[4], hi = v[5];
    TORCH_CHECK_VALUE(!std::isnan(lo) && !std::isnan(hi), "cost contains NaN");
    TORCH_CHECK_VALUE(scores ? hi != kInf : lo != -kInf, "cost contains ", scores ? "+inf scores" : "-inf costs",
                      ": no finite plan exists (", scores ? "-inf scores" : "+inf costs", " mark forbidden pairs)");
  }
}

// The sizes, and points that are all finite (an infinite point has infinite costs).
void check_sinkhorn_points_values(const at::Tensor& x, const at::Tensor& y, const at::Tensor& n_sizes,
                                  const at::Tensor& m_sizes) {
  const auto v = extremes({n_sizes, m_sizes, x, y});
  check_size_values(n_sizes, v[0], v[1], x.size(1), "n_sizes");
  check_size_values(m_sizes, v[2], v[3], y.size(1), "m_sizes");
  TORCH_CHECK_VALUE(std::all_of(v.begin() + 4, v.end(), [](double e) { return std::isfinite(e); }),
                    "x and y must not contain NaN or inf (an infinite point has infinite costs)");
}

// No NaN and no +inf similarity: -inf marks pairs that never match (a row or column of only -inf carries no mass);
// +inf has no finite bias.
void check_normalize_pass_values(const at::Tensor& sim) {
  const auto v = extremes(sim);
  TORCH_CHECK_VALUE(!std::isnan(v[0]) && !std::isnan(v[1]), "sim contains NaN");
  TORCH_CHECK_VALUE(v[1] != kInf, "sim contains +inf");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_cpu(const at::Tensor& cost, const at::Tensor& a,
                                                                        const at::Tensor& b, const at::Tensor& n_sizes,
                                                                        const at::Tensor& m_sizes,
                                                                        at::ArrayRef<double> eps_schedule, double eps,
                                                                        int64_t n_iters, double tol, bool scores) {
  check_sinkhorn(cost, a, b, n_sizes, m_sizes, eps_schedule, eps, n_iters, tol, scores);
  check_device(cost, c10::DeviceType::CPU, "cost");
  check_device(n_sizes, c10::DeviceType::CPU, "n_sizes");
  check_device(m_sizes, c10::DeviceType::CPU, "m_sizes");
  check_sinkhorn_values(cost, n_sizes, m_sizes, scores, true);
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  const auto x = cost.contiguous();
  auto f = at::zeros({B, N}, cost.options());
  auto g = at::zeros({B, M}, cost.options());
  auto iters = at::zeros({B}, cost.options().dtype(at::kLong));
  auto err = at::zeros({B}, cost.options());
  const std::vector<double> schedule(eps_schedule.begin(), eps_schedule.end());
  kernels().sinkhorn(x, a.contiguous(), b.contiguous(), n_sizes.contiguous(), m_sizes.contiguous(), schedule, eps,
                     n_iters, tol, scores, f, g, iters, err);
  return {f, g, iters, err};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_points_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& a, const at::Tensor& b, const at::Tensor& n_sizes,
    const at::Tensor& m_sizes, double p, at::ArrayRef<double> eps_schedule, double eps, int64_t n_iters, double tol) {
  check_sinkhorn_points(x, y, a, b, n_sizes, m_sizes, p, eps_schedule, eps, n_iters, tol);
  check_device(x, c10::DeviceType::CPU, "x");
  check_device(n_sizes, c10::DeviceType::CPU, "n_sizes");
  check_device(m_sizes, c10::DeviceType::CPU, "m_sizes");
  check_sinkhorn_points_values(x, y, n_sizes, m_sizes);
  const int64_t B = x.size(0), N = x.size(1), M = y.size(1);
  const auto xc = x.contiguous();
  const auto yt = y.transpose(1, 2).contiguous();  // [B, d, M]: each coordinate contiguous over the points
  auto f = at::zeros({B, N}, x.options());
  auto g = at::zeros({B, M}, x.options());
  auto iters = at::zeros({B}, x.options().dtype(at::kLong));
  auto err = at::zeros({B}, x.options());
  const std::vector<double> schedule(eps_schedule.begin(), eps_schedule.end());
  kernels().sinkhorn_points(xc, yt, a.contiguous(), b.contiguous(), n_sizes.contiguous(), m_sizes.contiguous(), p,
                            schedule, eps, n_iters, tol, f, g, iters, err);
  return {f, g, iters, err};
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_normalize_pass_cpu(const at::Tensor& sim, const at::Tensor& col_bias,
                                                               double scale, bool row_update) {
  check_normalize_pass(sim, col_bias, scale, row_update);
  check_device(sim, c10::DeviceType::CPU, "sim");
  check_normalize_pass_values(sim);
  const int64_t L = sim.size(0), N = sim.size(1), M = sim.size(2);
  const auto x = sim.contiguous();
  auto row_bias = at::zeros({L, N}, sim.options());
  auto col_lse = at::empty({L, M}, sim.options());
  kernels().normalize_pass(x, col_bias.contiguous(), scale, row_update, row_bias, col_lse);
  return {row_bias, col_lse};
}

}  // namespace

// The schemas of this file's ops, defined here and nowhere else.
TORCH_LIBRARY_FRAGMENT(alignops, m) {
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

  // The checks that read values (sizes in range, non-finite entries), each op's as an op (on any device: ATen
  // reductions and one host read). sinkhorn's scan_cost=False checks only the sizes: for the native op, which
  // scans the cost itself.
  m.def("sinkhorn_check_values(Tensor cost, Tensor n_sizes, Tensor m_sizes, bool scores, bool scan_cost) -> ()");
  m.def("sinkhorn_points_check_values(Tensor x, Tensor y, Tensor n_sizes, Tensor m_sizes) -> ()");
  m.def("sinkhorn_normalize_pass_check_values(Tensor sim) -> ()");
}

TORCH_LIBRARY_IMPL(alignops, CompositeImplicitAutograd, m) {
  m.impl("sinkhorn_check", &check_sinkhorn);
  m.impl("sinkhorn_points_check", &check_sinkhorn_points);
  m.impl("sinkhorn_normalize_pass_check", &check_normalize_pass);
  m.impl("sinkhorn_check_values", &check_sinkhorn_values);
  m.impl("sinkhorn_points_check_values", &check_sinkhorn_points_values);
  m.impl("sinkhorn_normalize_pass_check_values", &check_normalize_pass_values);
}

TORCH_LIBRARY_IMPL(alignops, CPU, m) {
  m.impl("sinkhorn", &sinkhorn_cpu);
  m.impl("sinkhorn_points", &sinkhorn_points_cpu);
  m.impl("sinkhorn_normalize_pass", &sinkhorn_normalize_pass_cpu);
}

}  // namespace alignops::ot
