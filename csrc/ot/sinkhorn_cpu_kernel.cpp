// Vectorised kernels of the ot family, compiled once per CPU capability (DEFAULT, AVX2).
//
// Both Sinkhorn half-steps are logsumexps of z_ij = s_i + coef * C_ij, along a row (f update) or down a
// column (g update), read straight from the cost matrix: nothing of size N x M is ever written.
//   row:    one pass per row, an online logsumexp over blocks of 4 vectors (1.25 exp per element);
//   column: rows are streamed in blocks of 4 while per-column running maxima and sums live in two
//           M-sized buffers, so the matrix is read row-major (1.25 exp per element, no transpose); a
//           large matrix splits its rows into chunks over the threads, merged at the end.
// Running maxima start at the lowest finite value, not -inf, so that +inf costs (forbidden pairs) never
// form -inf - -inf.
// sinkhorn_points computes the costs |x_i - y_j|^p of each row segment into a thread-local buffer instead
// of reading them: the cost matrix never exists.
// Threads: many problems run one per thread; a batch smaller than the thread count runs its problems
// one after the other, each with its rows (f update) or column stripes (g update) spread over threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <vector>

#include "ot/sinkhorn_cpu_kernel.h"

namespace alignops::ot {
namespace CPU_CAPABILITY {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
inline Vec<T> vexp(const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

template <typename T>
constexpr T lowest() {
  return std::numeric_limits<T>::lowest();
}

// logsumexp_j (s[j] + coef * c[j]) over j < m.
template <typename T>
T row_lse(const T* c, const T* s, int64_t m, T coef) {
  constexpr int64_t W = Vec<T>::size();
  constexpr int64_t U = 4;
  const Vec<T> k(coef);
  Vec<T> mx(lowest<T>()), sum(T(0));
  int64_t j = 0;
  for (; j + U * W <= m; j += U * W) {
    Vec<T> z[U];
    Vec<T> bm = mx;
    for (int64_t u = 0; u < U; ++u) {
      z[u] = at::vec::fmadd(k, Vec<T>::loadu(c + j + u * W), Vec<T>::loadu(s + j + u * W));
      bm = at::vec::maximum(bm, z[u]);
    }
    sum = sum * vexp(mx - bm);
    for (int64_t u = 0; u < U; ++u) {
      sum = sum + vexp(z[u] - bm);
    }
    mx = bm;
  }
  T lm[W], ls[W];
  mx.store(lm);
  sum.store(ls);
  T M = lowest<T>();
  for (int64_t w = 0; w < W; ++w) {
    M = std::max(M, lm[w]);
  }
  for (int64_t t = j; t < m; ++t) {
    M = std::max(M, s[t] + coef * c[t]);
  }
  T S = T(0);
  for (int64_t w = 0; w < W; ++w) {
    S += ls[w] * std::exp(lm[w] - M);
  }
  for (int64_t t = j; t < m; ++t) {
    S += std::exp(s[t] + coef * c[t] - M);
  }
  return M + std::log(S);
}

// Where the costs come from: a row-major matrix (read in place) or two point clouds (computed per row
// segment into a thread-local buffer, so that nothing N x M exists).
template <typename T>
struct MatrixSource {
  const T* C;
  int64_t ld;
  static constexpr bool kComputes = false;
  const T* row(int64_t i, int64_t j0, int64_t j1, T* buf) const { return C + i * ld + j0; }
};

// C_ij = |x_i - y_j|_2^p from x [n, d] and y stored transposed, yt [d, M] (contiguous over j: vectorised).
template <typename T>
struct PointSource {
  const T* x;
  const T* yt;
  int64_t d, ld;
  T p;
  static constexpr bool kComputes = true;
  const T* row(int64_t i, int64_t j0, int64_t j1, T* buf) const {
    constexpr int64_t W = Vec<T>::size();
    const int64_t w = j1 - j0;
    std::fill(buf, buf + w, T(0));
    for (int64_t k = 0; k < d; ++k) {
      const Vec<T> xv(x[i * d + k]);
      const T* yk = yt + k * ld + j0;
      int64_t j = 0;
      for (; j + W <= w; j += W) {
        const Vec<T> diff = xv - Vec<T>::loadu(yk + j);
        at::vec::fmadd(diff, diff, Vec<T>::loadu(buf + j)).store(buf + j);
      }
      for (; j < w; ++j) {
        const T diff = x[i * d + k] - yk[j];
        buf[j] += diff * diff;
      }
    }
    if (p != T(2)) {
      for (int64_t j = 0; j < w; ++j) {
        buf[j] = std::pow(buf[j], p / 2);
      }
    }
    return buf;
  }
};

// Folds rows [i0, i1) into the running column logsumexps of s[i] + coef * C[i, j], j in [j0, j1): mx and
// sum (length j1 - j0) hold the running maxima and the sums relative to them. buf holds 4 (j1 - j0) costs
// when the source computes them.
template <typename T, typename Source>
void col_accumulate(const Source& src, int64_t i0, int64_t i1, int64_t j0, int64_t j1, const T* s, T coef, T* mx,
                    T* sum, T* buf) {
  constexpr int64_t W = Vec<T>::size();
  constexpr int64_t R = 4;
  const int64_t w = j1 - j0;
  const Vec<T> k(coef);
  int64_t i = i0;
  for (; i + R <= i1; i += R) {
    const T* rows[R];
    Vec<T> sv[R];
    for (int64_t r = 0; r < R; ++r) {
      rows[r] = src.row(i + r, j0, j1, buf + r * w);
      sv[r] = Vec<T>(s[i + r]);
    }
    int64_t j = 0;
    for (; j + W <= w; j += W) {
      Vec<T> z[R];
      Vec<T> m0 = Vec<T>::loadu(mx + j);
      Vec<T> bm = m0;
      for (int64_t r = 0; r < R; ++r) {
        z[r] = at::vec::fmadd(k, Vec<T>::loadu(rows[r] + j), sv[r]);
        bm = at::vec::maximum(bm, z[r]);
      }
      Vec<T> acc = Vec<T>::loadu(sum + j) * vexp(m0 - bm);
      for (int64_t r = 0; r < R; ++r) {
        acc = acc + vexp(z[r] - bm);
      }
      bm.store(mx + j);
      acc.store(sum + j);
    }
    for (; j < w; ++j) {
      T z[R];
      T bm = mx[j];
      for (int64_t r = 0; r < R; ++r) {
        z[r] = s[i + r] + coef * rows[r][j];
        bm = std::max(bm, z[r]);
      }
      T acc = sum[j] * std::exp(mx[j] - bm);
      for (int64_t r = 0; r < R; ++r) {
        acc += std::exp(z[r] - bm);
      }
      mx[j] = bm;
      sum[j] = acc;
    }
  }
  for (; i < i1; ++i) {
    const T* row = src.row(i, j0, j1, buf);
    for (int64_t j = 0; j < w; ++j) {
      const T z = s[i] + coef * row[j];
      const T bm = std::max(mx[j], z);
      sum[j] = sum[j] * std::exp(mx[j] - bm) + std::exp(z - bm);
      mx[j] = bm;
    }
  }
}

// Row chunks of the column pass: each (level, chunk) task folds its rows into its own column buffers, read
// row-major; the chunks are merged at the end. (Column stripes instead would read each row in short
// segments a page apart, which costs a TLB miss per row and stripe.)
constexpr int64_t kRowChunk = 256;

// out[j] = logsumexp over the chunks' partial (mx, sum) pairs, part holding chunks x 2 x m values.
template <typename T>
void merge_chunks(const T* part, int64_t chunks, int64_t m, T* out) {
  for (int64_t j = 0; j < m; ++j) {
    T M = lowest<T>();
    for (int64_t c = 0; c < chunks; ++c) {
      M = std::max(M, part[(2 * c) * m + j]);
    }
    T S = T(0);
    for (int64_t c = 0; c < chunks; ++c) {
      S += part[(2 * c + 1) * m + j] * std::exp(part[(2 * c) * m + j] - M);
    }
    out[j] = M + std::log(S);
  }
}

// out[j] = logsumexp_i (s[i] + coef * C[i, j]) for j < m, i < n: row chunks spread over the threads (one
// chunk, inline, when called from a parallel region or for a small matrix).
template <typename T, typename Source>
void col_lse_threaded(const Source& src, int64_t n, int64_t m, const T* s, T coef, T* out) {
  const bool split = !at::in_parallel_region() && at::get_num_threads() > 1 && n * m >= (1 << 16);
  const int64_t chunks = split ? std::min<int64_t>((n + kRowChunk - 1) / kRowChunk, 4 * at::get_num_threads()) : 1;
  std::vector<T> part(2 * chunks * m);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> buf(Source::kComputes ? 4 * m : 0);
    for (int64_t c = c0; c < c1; ++c) {
      T* mx = part.data() + 2 * c * m;
      T* sum = mx + m;
      std::fill(mx, mx + m, lowest<T>());
      std::fill(sum, sum + m, T(0));
      col_accumulate(src, c * n / chunks, (c + 1) * n / chunks, 0, m, s, coef, mx, sum, buf.data());
    }
  });
  merge_chunks(part.data(), chunks, m, out);
}

template <typename T, typename Source>
void row_lse_threaded(const Source& src, int64_t n, int64_t m, const T* s, T coef, T* out) {
  at::parallel_for(0, n, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(m, 1)), [&](int64_t i0, int64_t i1) {
    std::vector<T> buf(Source::kComputes ? m : 0);
    for (int64_t i = i0; i < i1; ++i) {
      out[i] = row_lse(src.row(i, 0, m, buf.data()), s, m, coef);
    }
  });
}

// sum_j |exp(g_j / eps + L_j) - b_j|: the L1 violation of the column marginal by the current plan.
template <typename T>
T column_error(const T* g, const T* L, const T* b, int64_t m, T inv_eps) {
  T e = T(0);
  for (int64_t j = 0; j < m; ++j) {
    e += std::abs(std::exp(g[j] * inv_eps + L[j]) - b[j]);
  }
  return e;
}

template <typename T, typename Source>
void solve_one(const Source& src, int64_t n, int64_t m, const T* a, const T* b, const std::vector<double>& schedule,
               double eps, int64_t n_iters, double tol, bool scores, T* f, T* g, int64_t& iters, T& err) {
  iters = 0;
  err = T(0);
  if (n == 0 || m == 0) {
    return;
  }
  std::vector<T> buf(2 * n + 3 * m);
  T* log_a = buf.data();
  T* fs = log_a + n;
  T* log_b = fs + n;
  T* gs = log_b + m;
  T* L = gs + m;
  for (int64_t i = 0; i < n; ++i) {
    log_a[i] = std::log(a[i]);
  }
  for (int64_t j = 0; j < m; ++j) {
    log_b[j] = std::log(b[j]);
  }
  const int64_t K = static_cast<int64_t>(schedule.size());
  const T sign = scores ? T(-1) : T(1);
  const T inv_final = T(1) / T(eps);
  bool converged = false;
  for (int64_t t = 0; t < n_iters; ++t) {
    const T e = t < K ? T(schedule[t]) : T(eps);
    const T inv = T(1) / e;
    for (int64_t i = 0; i < n; ++i) {
      fs[i] = f[i] * inv;
    }
    col_lse_threaded(src, n, m, fs, -sign * inv, L);
    if (t > K && tol >= 0) {
      // The column sums of the plan of the previous iteration come for free with this pass. Only after a full
      // (g, f) update at eps: the starting potentials (0, or the last scaling step's) may fit the columns while
      // the rows were never fitted.
      err = column_error(g, L, b, m, inv);
      if (err <= T(tol)) {
        converged = true;
        break;
      }
    }
    for (int64_t j = 0; j < m; ++j) {
      g[j] = e * (log_b[j] - L[j]);
      gs[j] = g[j] * inv;
    }
    row_lse_threaded(src, n, m, gs, -sign * inv, fs);
    for (int64_t i = 0; i < n; ++i) {
      f[i] = e * (log_a[i] - fs[i]);
    }
    ++iters;
  }
  if (!converged) {
    for (int64_t i = 0; i < n; ++i) {
      fs[i] = f[i] * inv_final;
    }
    col_lse_threaded(src, n, m, fs, -sign * inv_final, L);
    err = column_error(g, L, b, m, inv_final);
  }
}

// One problem per thread when the batch fills the threads; otherwise one problem after the other, each
// spreading its rows / column stripes over the threads.
template <typename Fn>
void for_each_problem(int64_t B, const Fn& solve) {
  if (B >= at::get_num_threads()) {
    at::parallel_for(0, B, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        solve(p);
      }
    });
  } else {
    for (int64_t p = 0; p < B; ++p) {
      solve(p);
    }
  }
}

void sinkhorn(const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b, const at::Tensor& n_sizes,
              const at::Tensor& m_sizes, const std::vector<double>& eps_schedule, double eps, int64_t n_iters,
              double tol, bool scores, at::Tensor& f, at::Tensor& g, at::Tensor& iters, at::Tensor& err) {
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  const int64_t* ns = n_sizes.const_data_ptr<int64_t>();
  const int64_t* ms = m_sizes.const_data_ptr<int64_t>();
  int64_t* it = iters.mutable_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "sinkhorn_cpu", [&] {
    const scalar_t* C = cost.const_data_ptr<scalar_t>();
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    scalar_t* fp = f.mutable_data_ptr<scalar_t>();
    scalar_t* gp = g.mutable_data_ptr<scalar_t>();
    scalar_t* ep = err.mutable_data_ptr<scalar_t>();
    for_each_problem(B, [&](int64_t p) {
      const MatrixSource<scalar_t> src{C + p * N * M, M};
      solve_one(src, ns[p], ms[p], ap + p * N, bp + p * M, eps_schedule, eps, n_iters, tol, scores, fp + p * N,
                gp + p * M, it[p], ep[p]);
    });
  });
}

void sinkhorn_points(const at::Tensor& x, const at::Tensor& yt, const at::Tensor& a, const at::Tensor& b,
                     const at::Tensor& n_sizes, const at::Tensor& m_sizes, double p,
                     const std::vector<double>& eps_schedule, double eps, int64_t n_iters, double tol, at::Tensor& f,
                     at::Tensor& g, at::Tensor& iters, at::Tensor& err) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), M = yt.size(2);
  const int64_t* ns = n_sizes.const_data_ptr<int64_t>();
  const int64_t* ms = m_sizes.const_data_ptr<int64_t>();
  int64_t* it = iters.mutable_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sinkhorn_points_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = yt.const_data_ptr<scalar_t>();
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    scalar_t* fp = f.mutable_data_ptr<scalar_t>();
    scalar_t* gp = g.mutable_data_ptr<scalar_t>();
    scalar_t* ep = err.mutable_data_ptr<scalar_t>();
    for_each_problem(B, [&](int64_t q) {
      const PointSource<scalar_t> src{xp + q * N * D, yp + q * D * M, D, M, scalar_t(p)};
      solve_one(src, ns[q], ms[q], ap + q * N, bp + q * M, eps_schedule, eps, n_iters, tol, false, fp + q * N,
                gp + q * M, it[q], ep[q]);
    });
  });
}

// One row of the fused normalisation pass: x_j = k s_j + lb_j, e_j = exp(x_j - max x), returns the new row
// bias -(max x + log sum e) and adds e_j / sum e = exp(k s_j + la + lb_j) to acc[j]. One exp per element.
template <typename T>
T fused_row(const T* srow, const T* lb, int64_t m, T k, T* buf, T* acc) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> kv(k);
  Vec<T> mv(lowest<T>());
  int64_t j = 0;
  for (; j + W <= m; j += W) {
    const Vec<T> x = at::vec::fmadd(kv, Vec<T>::loadu(srow + j), Vec<T>::loadu(lb + j));
    x.store(buf + j);
    mv = at::vec::maximum(mv, x);
  }
  T lanes[W];
  mv.store(lanes);
  T mx = lowest<T>();
  for (int64_t w = 0; w < W; ++w) {
    mx = std::max(mx, lanes[w]);
  }
  for (; j < m; ++j) {
    buf[j] = k * srow[j] + lb[j];
    mx = std::max(mx, buf[j]);
  }
  const Vec<T> mxv(mx);
  Vec<T> sv(T(0));
  j = 0;
  for (; j + W <= m; j += W) {
    const Vec<T> e = vexp(Vec<T>::loadu(buf + j) - mxv);
    e.store(buf + j);
    sv = sv + e;
  }
  sv.store(lanes);
  T sum = T(0);
  for (int64_t w = 0; w < W; ++w) {
    sum += lanes[w];
  }
  for (; j < m; ++j) {
    buf[j] = std::exp(buf[j] - mx);
    sum += buf[j];
  }
  if (!(sum > T(0))) {
    // every x_j = -inf: the row carries no mass, nothing to add; a bias of -inf (not +inf) keeps the column
    // pass's terms k S_ij + la_i at -inf instead of -inf + inf = NaN
    return -std::numeric_limits<T>::infinity();
  }
  const Vec<T> r(T(1) / sum);
  j = 0;
  for (; j + W <= m; j += W) {
    at::vec::fmadd(Vec<T>::loadu(buf + j), r, Vec<T>::loadu(acc + j)).store(acc + j);
  }
  for (; j < m; ++j) {
    acc[j] += buf[j] / sum;
  }
  return -(mx + std::log(sum));
}

// Below this a fused column sum may have lost its terms to underflow: the level is redone in the log domain.
template <typename T>
constexpr T kFusedFloor = std::is_same_v<T, float> ? T(1e-30) : T(1e-290);

void normalize_pass(const at::Tensor& sim, const at::Tensor& col_bias, double scale, bool row_update,
                    at::Tensor& row_bias, at::Tensor& col_lse_out) {
  const int64_t L = sim.size(0), N = sim.size(1), M = sim.size(2);
  AT_DISPATCH_FLOATING_TYPES(sim.scalar_type(), "sinkhorn_normalize_pass_cpu", [&] {
    const scalar_t* S = sim.const_data_ptr<scalar_t>();
    const scalar_t* lb = col_bias.const_data_ptr<scalar_t>();
    scalar_t* la = row_bias.mutable_data_ptr<scalar_t>();
    scalar_t* out = col_lse_out.mutable_data_ptr<scalar_t>();
    const scalar_t k = scalar_t(scale);
    const int64_t chunks =
        std::max<int64_t>(1, std::min<int64_t>((N + kRowChunk - 1) / kRowChunk, 4 * at::get_num_threads()));
    std::vector<char> redo(L, row_update ? 0 : 1);
    if (row_update) {
      // Fused sweep: la_i = -logsumexp_j (k S_ij + lb_j) and, from the same exps, the column sums
      // acc_j = sum_i exp(k S_ij + la_i + lb_j), so col_lse_j = log acc_j - lb_j. After a column step of the
      // same iteration every term is <= 1 and acc_j >= 1 / M, so nothing overflows or underflows; a column
      // bias from elsewhere may break that, which the floor check below catches.
      std::vector<scalar_t> acc(L * chunks * M, scalar_t(0));
      at::parallel_for(0, L * chunks, 1, [&](int64_t t0, int64_t t1) {
        std::vector<scalar_t> buf(M);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t l = t / chunks, c = t % chunks;
          for (int64_t i = c * N / chunks; i < (c + 1) * N / chunks; ++i) {
            la[l * N + i] = fused_row(S + (l * N + i) * M, lb + l * M, M, k, buf.data(), acc.data() + t * M);
          }
        }
      });
      for (int64_t l = 0; l < L; ++l) {
        for (int64_t j = 0; j < M; ++j) {
          scalar_t total = scalar_t(0);
          for (int64_t c = 0; c < chunks; ++c) {
            total += acc[(l * chunks + c) * M + j];
          }
          if (!(total >= kFusedFloor<scalar_t>) || !std::isfinite(total)) {
            redo[l] = 1;
          }
          out[l * M + j] = std::log(total) - lb[l * M + j];
        }
      }
    }
    // col_lse_j = logsumexp_i (k S_ij + la_i) in the log domain, for the levels not done above: row chunks of
    // every level spread over threads, then merged.
    std::vector<int64_t> levels;
    for (int64_t l = 0; l < L; ++l) {
      if (redo[l]) {
        levels.push_back(l);
      }
    }
    const int64_t R = static_cast<int64_t>(levels.size());
    std::vector<scalar_t> part(2 * R * chunks * M);
    at::parallel_for(0, R * chunks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t l = levels[t / chunks], c = t % chunks;
        scalar_t* mx = part.data() + 2 * t * M;
        scalar_t* sum = mx + M;
        std::fill(mx, mx + M, lowest<scalar_t>());
        std::fill(sum, sum + M, scalar_t(0));
        const MatrixSource<scalar_t> src{S + l * N * M, M};
        col_accumulate(src, c * N / chunks, (c + 1) * N / chunks, int64_t(0), M, la + l * N, k, mx, sum,
                       static_cast<scalar_t*>(nullptr));
      }
    });
    at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        merge_chunks(part.data() + 2 * r * chunks * M, chunks, M, out + levels[r] * M);
      }
    });
  });
}

}  // namespace

const OtKernels ot_kernels{&sinkhorn, &sinkhorn_points, &normalize_pass};

}  // namespace CPU_CAPABILITY
}  // namespace alignops::ot
