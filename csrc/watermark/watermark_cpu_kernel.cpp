// Fused watermark kernels over the vocabulary (CPU): the per-token pseudo-random word of every vocabulary
// entry is hashed on the fly, chunk by chunk, next to the logits it modifies; nothing V-sized but the logits
// (and, for kgw_logits, the output) is touched. The hash loop is plain uint32 arithmetic that the compiler
// vectorises (8 lanes with AVX2); the Gumbel noise uses ATen's vectorised log. CMake compiles this file once
// per CPU capability; watermark_cpu.cpp picks one at run time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "common/counter_hash.h"
#include "watermark/watermark_cpu_kernel.h"

namespace alignops::watermark {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 512;
// -log(-log u) for the largest u = 1 - 2^-25 is 25 ln 2 = 17.33; 18 leaves room for the logs' rounding.
constexpr float kMaxNoise = 18.f;

// u[j] = combine(state, v0 + j): the per-entry word, vectorised by the compiler.
inline void hash_chunk(uint32_t state, int64_t v0, int64_t len, uint32_t* u) {
  for (int64_t j = 0; j < len; ++j) {
    u[j] = hash::combine(state, static_cast<uint32_t>(v0 + j));
  }
}

// green iff word < threshold (threshold <= 2^32) as a 32-bit compare, word <= limit, with the bias zeroed
// when nothing is green: a uint64 compare (or a delta read through a captured reference, which may alias
// the output) keeps the compiler from vectorising the add.
struct Green {
  uint32_t limit;
  float bias;
  Green(uint64_t threshold, float delta)
      : limit(threshold == 0 ? 0u : static_cast<uint32_t>(threshold - 1)), bias(threshold == 0 ? 0.f : delta) {}
};

template <typename scalar_t>
inline void load_chunk(const scalar_t* x, int64_t len, float* xf) {
  for (int64_t j = 0; j < len; ++j) {
    xf[j] = static_cast<float>(x[j]);
  }
}

// Folds a chunk into the running (best value, first index). As in torch.argmax the first NaN wins: maximum
// propagates NaN, so a chunk holding one has m = NaN and its first NaN becomes the best (the callers stop
// scanning once best is NaN).
inline void argmax_chunk(const float* val, int64_t len, int64_t v0, float& best, int64_t& best_idx) {
  const float m = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, val, len);
  if (m > best || (std::isnan(m) && !std::isnan(best))) {
    for (int64_t j = 0; j < len; ++j) {
      if (val[j] == m || std::isnan(val[j])) {
        best = val[j];
        best_idx = v0 + j;
        break;
      }
    }
  }
}

template <typename scalar_t>
void kgw_logits_impl(const at::Tensor& logits, const uint32_t* state, uint64_t threshold, float delta,
                     at::Tensor& out) {
  // One rounding of x + delta: in fp32 for fp32 / bf16 / fp16, in fp64 for fp64.
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = logits.size(0), V = logits.size(1);
  const scalar_t* xp = logits.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const Green green(threshold, delta);
  at::parallel_for(0, B * ((V + kChunk - 1) / kChunk), 16, [&](int64_t begin, int64_t end) {
    alignas(64) uint32_t u[kChunk];
    const uint32_t limit = green.limit;
    const acc_t bias = static_cast<acc_t>(green.bias);
    const int64_t chunks = (V + kChunk - 1) / kChunk;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / chunks, v0 = (t % chunks) * kChunk, len = std::min(kChunk, V - v0);
      hash_chunk(state[b], v0, len, u);
      const scalar_t* x = xp + b * V + v0;
      scalar_t* o = op + b * V + v0;
      for (int64_t j = 0; j < len; ++j) {
        o[j] = static_cast<scalar_t>(static_cast<acc_t>(x[j]) + (u[j] <= limit ? bias : acc_t(0)));
      }
    }
  });
}

template <typename scalar_t>
void kgw_argmax_impl(const at::Tensor& logits, const uint32_t* state, uint64_t threshold, float delta, int64_t* out) {
  const int64_t B = logits.size(0), V = logits.size(1);
  const scalar_t* xp = logits.const_data_ptr<scalar_t>();
  const Green green(threshold, delta);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    alignas(64) uint32_t u[kChunk];
    alignas(64) float val[kChunk];
    const uint32_t limit = green.limit;
    const float bias = green.bias;
    for (int64_t b = begin; b < end; ++b) {
      float best = -std::numeric_limits<float>::infinity();
      int64_t best_idx = 0;
      bool seen = false;
      for (int64_t v0 = 0; v0 < V; v0 += kChunk) {
        const int64_t len = std::min(kChunk, V - v0);
        hash_chunk(state[b], v0, len, u);
        load_chunk(xp + b * V + v0, len, val);
        for (int64_t j = 0; j < len; ++j) {
          val[j] += u[j] <= limit ? bias : 0.f;
        }
        if (!seen) {  // a row of -inf still has an argmax: its first entry
          best = val[0];
          seen = true;
        }
        argmax_chunk(val, len, v0, best, best_idx);
        if (std::isnan(best)) {
          break;
        }
      }
      out[b] = best_idx;
    }
  });
}

template <typename scalar_t>
void gumbel_argmax_impl(const at::Tensor& logits, const uint32_t* state, float inv_temperature, int64_t* out) {
  const int64_t B = logits.size(0), V = logits.size(1);
  const scalar_t* xp = logits.const_data_ptr<scalar_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    alignas(64) uint32_t u[kChunk];
    alignas(64) float g[kChunk];
    alignas(64) float val[kChunk];
    const float inv_t = inv_temperature;
    const Vec vt(inv_t);
    for (int64_t b = begin; b < end; ++b) {
      float best = 0.f;
      int64_t best_idx = 0;
      bool seen = false;
      for (int64_t v0 = 0; v0 < V; v0 += kChunk) {
        const int64_t len = std::min(kChunk, V - v0);
        load_chunk(xp + b * V + v0, len, val);
        int64_t j = 0;
        for (; j + Vec::size() <= len; j += Vec::size()) {
          (Vec::loadu(val + j) * vt).store(val + j);
        }
        for (; j < len; ++j) {
          val[j] *= inv_t;
        }
        // The noise never exceeds kMaxNoise: a chunk whose best scaled logit trails the running best by more
        // cannot hold the argmax (later chunks only replace on >), so its hashes and logs are skipped -- most
        // of the vocabulary for a peaked LLM distribution. The relative slack covers the rounding of the sum.
        if (seen) {
          const float m = at::vec::reduce_all<float>([](Vec& a, Vec& c) { return at::vec::maximum(a, c); }, val, len);
          if (m + kMaxNoise + std::fabs(m) * 1e-6f < best) {
            continue;
          }
        }
        hash_chunk(state[b], v0, len, u);
        for (j = 0; j < len; ++j) {
          g[j] = hash::unit_float(u[j]);
        }
        for (j = 0; j + Vec::size() <= len; j += Vec::size()) {
          // Gumbel(0, 1) noise -log(-log u): argmax(logit / T + noise) = argmax u^(1 / p), see watermark.py.
          const Vec noise = Vec(0.f) - (Vec(0.f) - Vec::loadu(g + j).log()).log();
          (Vec::loadu(val + j) + noise).store(val + j);
        }
        for (; j < len; ++j) {
          val[j] += -std::log(-std::log(g[j]));
        }
        if (!seen) {
          best = val[0];
          seen = true;
        }
        argmax_chunk(val, len, v0, best, best_idx);
        if (std::isnan(best)) {
          break;
        }
      }
      out[b] = best_idx;
    }
  });
}

void kgw_logits(const at::Tensor& logits, const uint32_t* state, uint64_t threshold, float delta, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "kgw_logits_cpu",
                                  [&] { kgw_logits_impl<scalar_t>(logits, state, threshold, delta, out); });
}

void kgw_argmax(const at::Tensor& logits, const uint32_t* state, uint64_t threshold, float delta, int64_t* out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "kgw_argmax_cpu",
                                  [&] { kgw_argmax_impl<scalar_t>(logits, state, threshold, delta, out); });
}

void gumbel_argmax(const at::Tensor& logits, const uint32_t* state, float inv_temperature, int64_t* out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "gumbel_argmax_cpu",
                                  [&] { gumbel_argmax_impl<scalar_t>(logits, state, inv_temperature, out); });
}

}  // namespace

const WatermarkKernels watermark_kernels{kgw_logits, kgw_argmax, gumbel_argmax};

}  // namespace CPU_CAPABILITY
}  // namespace alignops::watermark
