// Vectorised pair loop of alignops::preference_loss: pair_loss (preference_loss_math.h) evaluated on
// Vectorized<float> (or <double>) lanes, so 8-16 pairs share every exp / log1p. CMake compiles this
// file once per CPU capability; preference_loss_cpu.cpp picks one at run time.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "preference/preference_loss_cpu_kernel.h"

namespace alignops::preference {

template <typename S>
struct MathOps<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  using Mask = V;
  static V exp(V x) { return x.exp(); }
  static V log(V x) { return x.log(); }
  static V log1p(V x) { return x.log1p(); }
  static V abs(V x) { return x.abs(); }
  static V min(V a, V b) { return at::vec::minimum(a, b); }
  static V max(V a, V b) { return at::vec::maximum(a, b); }
  static Mask gt(V a, V b) { return a > b; }
  static V select(Mask m, V a, V b) { return V::blendv(b, a, m); }
};

namespace CPU_CAPABILITY {
namespace {

template <typename acc_t, typename scalar_t>
at::vec::Vectorized<acc_t> load(const scalar_t* p, int64_t count) {
  using V = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return V::loadu(p, count);
  } else {
    acc_t buf[V::size()] = {};
    for (int64_t j = 0; j < count; ++j) {
      buf[j] = static_cast<acc_t>(p[j]);
    }
    return V::loadu(buf);
  }
}

void forward(PreferenceInputs& in, const Params<double>& params64, bool compute_grad) {
  const int64_t B = in.pc.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.pc.scalar_type(), "preference_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using V = at::vec::Vectorized<acc_t>;
    constexpr int64_t W = V::size();
    Params<acc_t> p;
    p.beta_value = acc_t(params64.beta_value);
    p.label_smoothing = acc_t(params64.label_smoothing);
    p.gamma = acc_t(params64.gamma);
    p.discopop_tau = acc_t(params64.discopop_tau);
    p.f_alpha = acc_t(params64.f_alpha);
    p.f_divergence = params64.f_divergence;
    p.terms = params64.terms;
    const scalar_t* pc = in.pc.const_data_ptr<scalar_t>();
    const scalar_t* pr = in.pr.const_data_ptr<scalar_t>();
    const scalar_t* rc = in.rc.const_data_ptr<scalar_t>();
    const scalar_t* rr = in.rr.const_data_ptr<scalar_t>();
    const acc_t* beta = in.beta.defined() ? in.beta.const_data_ptr<acc_t>() : nullptr;
    const acc_t* lc = in.lc.defined() ? in.lc.const_data_ptr<acc_t>() : nullptr;
    const acc_t* lr = in.lr.defined() ? in.lr.const_data_ptr<acc_t>() : nullptr;
    acc_t* loss = in.loss.mutable_data_ptr<acc_t>();
    acc_t* cr = in.chosen_rewards.mutable_data_ptr<acc_t>();
    acc_t* rj = in.rejected_rewards.mutable_data_ptr<acc_t>();
    acc_t* grad = compute_grad ? in.grad.mutable_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, (B + W - 1) / W, 2048 / W, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t i = blk * W;
        const int64_t n = std::min<int64_t>(W, B - i);
        const V c = load<acc_t>(pc + i, n), r = load<acc_t>(pr + i, n);
        const V c0 = load<acc_t>(rc + i, n), r0 = load<acc_t>(rr + i, n);
        // Lanes past the end hold zeros: their results (inf or NaN where beta = 0) are computed and dropped.
        const V b = beta ? V::loadu(beta + i, n) : V(p.beta_value);
        const V nc = lc ? V::loadu(lc + i, n) : V(1), nr = lr ? V::loadu(lr + i, n) : V(1);
        V g[4];
        const V l = pair_loss<V, acc_t>(c, r, c0, r0, b, nc, nr, p, g);
        l.store(loss + i, n);
        (b * (c - c0)).store(cr + i, n);
        (b * (r - r0)).store(rj + i, n);
        if (grad) {
          for (int k = 0; k < 4; ++k) {
            g[k].store(grad + k * B + i, n);
          }
        }
      }
    });
  });
}

}  // namespace

const PreferenceLossKernels preference_loss_kernels{&forward};

}  // namespace CPU_CAPABILITY
}  // namespace alignops::preference
