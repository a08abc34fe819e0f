// CUDA kernels of alignops::selective_logprobs(_backward); same math, outputs and edge cases as the CPU
// kernels in selective_logprobs_cpu_kernel.cpp.
//
// Forward: one thread block per row. Each thread runs an online logsumexp over its strided share of the
// row (16-byte loads, one exp per element plus at most one rescale per load), then the block combines
// the (max, sum) pairs with warp shuffles and shared memory. lse = logsumexp(z / T), logp = z_y / T - lse.
// Backward: dz_v = g / T * (1[v = y] - exp(z_v / T - lse)), every element written once.
//
// Targets are validated by the Python wrapper before a CUDA launch (a device-side check could only raise
// asynchronously); a target outside [0, V) that reaches these kernels reads nothing out of bounds and
// gives NaN (logp and lse in forward, the whole row in backward).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "preference/selective_logprobs_common.h"

namespace alignops::preference {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxForwardThreads = 512;
constexpr int kBackwardThreads = 256;
// Backward: 16-byte packs per block and per row chunk (4 per thread).
constexpr int64_t kBackwardPacksPerChunk = 4 * kBackwardThreads;
// Rows beyond the largest grid x-dimension are covered by a block-stride loop over rows.
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();

template <typename T>
using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// 16 bytes of a row: 4 fp32, 8 bf16/fp16 or 2 fp64 (the layout of ATen's aligned_vector).
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t val[kSize];
};

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
// z / T, rounded on its own (never fused into an FMA with what follows), so z_y / T in logp is the very
// value that entered the logsumexp: a row whose mass is all on y gives logp = 0 exactly, as on the CPU.
__device__ __forceinline__ float scale(float z, float inv_t) { return __fmul_rn(z, inv_t); }
__device__ __forceinline__ double scale(double z, double inv_t) { return __dmul_rn(z, inv_t); }

// A row [0, V) split into a scalar head up to the first 16-byte boundary, `packs` aligned 16-byte packs,
// and a scalar tail [tail, V). Rows start wherever n * V puts them, so each row computes its own head.
struct RowSplit {
  int64_t head, packs, tail;
};

template <typename scalar_t>
__device__ __forceinline__ RowSplit split_row(const scalar_t* row, int64_t V) {
  constexpr int64_t kSize = Pack<scalar_t>::kSize;
  // Tensors are element-aligned, so the offset is a whole number of elements.
  const int64_t misaligned = static_cast<int64_t>((reinterpret_cast<uintptr_t>(row) % 16) / sizeof(scalar_t));
  const int64_t head = std::min((kSize - misaligned) % kSize, V);
  const int64_t packs = (V - head) / kSize;
  return {head, packs, head + packs * kSize};
}

// Online logsumexp state (m, s): the sum of exp(z - m) over the elements seen. m starts at the lowest
// finite value, not -inf, so that -inf logits (a masked vocabulary) give exp(-inf - m) = 0 and never
// -inf - -inf. m is never NaN (a NaN logit fails `> m` and turns s into NaN instead).
template <typename acc_t, int kN>
__device__ __forceinline__ void lse_update(acc_t& m, acc_t& s, const acc_t (&z)[kN]) {
  acc_t bm = z[0];
#pragma unroll
  for (int i = 1; i < kN; ++i) {
    bm = bm > z[i] ? bm : z[i];
  }
  if (bm > m) {
    s *= acc_exp(m - bm);
    m = bm;
  }
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    s += acc_exp(z[i] - m);
  }
}

template <typename acc_t>
__device__ __forceinline__ void lse_combine(acc_t& m, acc_t& s, acc_t m2, acc_t s2) {
  const acc_t M = m > m2 ? m : m2;
  s = s * acc_exp(m - M) + s2 * acc_exp(m2 - M);
  m = M;
}

template <typename acc_t>
__device__ __forceinline__ void lse_warp_reduce(acc_t& m, acc_t& s) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const acc_t m2 = __shfl_xor_sync(0xffffffffu, m, offset);
    const acc_t s2 = __shfl_xor_sync(0xffffffffu, s, offset);
    lse_combine(m, s, m2, s2);
  }
}

// blockDim.x is a multiple of 32 and at most kMaxForwardThreads.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kMaxForwardThreads)
    selective_logprobs_forward_kernel(const scalar_t* __restrict__ x, const index_t* __restrict__ y,
                                      acc_t* __restrict__ logp, acc_t* __restrict__ lse, int64_t N, int64_t V,
                                      int64_t ignore_index, acc_t inv_t) {
  constexpr int kSize = Pack<scalar_t>::kSize;
  constexpr acc_t kLowest = std::numeric_limits<acc_t>::lowest();
  __shared__ acc_t warp_m[kMaxForwardThreads / kWarp];
  __shared__ acc_t warp_s[kMaxForwardThreads / kWarp];
  const int tid = threadIdx.x;
  const int lane = tid % kWarp, warp = tid / kWarp, warps = blockDim.x / kWarp;

  // Every branch below depends on the row only, so the whole block takes it (needed for __syncthreads).
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const int64_t t = static_cast<int64_t>(y[n]);
    if (t == ignore_index) {
      if (tid == 0) {
        logp[n] = acc_t(0);
        lse[n] = acc_t(0);
      }
      continue;
    }
    if (t < 0 || t >= V) {
      if (tid == 0) {
        logp[n] = std::numeric_limits<acc_t>::quiet_NaN();
        lse[n] = std::numeric_limits<acc_t>::quiet_NaN();
      }
      continue;
    }
    const scalar_t* row = x + n * V;
    const RowSplit split = split_row(row, V);
    acc_t m = kLowest, s = acc_t(0);
    if (tid < split.head) {
      const acc_t z[1] = {scale(static_cast<acc_t>(row[tid]), inv_t)};
      lse_update(m, s, z);
    }
    const Pack<scalar_t>* packs = reinterpret_cast<const Pack<scalar_t>*>(row + split.head);
    for (int64_t i = tid; i < split.packs; i += blockDim.x) {
      const Pack<scalar_t> pack = packs[i];
      acc_t z[kSize];
#pragma unroll
      for (int k = 0; k < kSize; ++k) {
        z[k] = scale(static_cast<acc_t>(pack.val[k]), inv_t);
      }
      lse_update(m, s, z);
    }
    if (split.tail + tid < V) {
      const acc_t z[1] = {scale(static_cast<acc_t>(row[split.tail + tid]), inv_t)};
      lse_update(m, s, z);
    }

    lse_warp_reduce(m, s);
    if (lane == 0) {
      warp_m[warp] = m;
      warp_s[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
      m = lane < warps ? warp_m[lane] : kLowest;
      s = lane < warps ? warp_s[lane] : acc_t(0);
      lse_warp_reduce(m, s);
      if (lane == 0) {
        // All -inf: m stays kLowest, s = 0, lse = -inf (and logp NaN), as on the CPU.
        const acc_t l = m + acc_log(s);
        lse[n] = l;
        logp[n] = scale(static_cast<acc_t>(row[t]), inv_t) - l;
      }
    }
    // warp_m / warp_s are written again for the next row.
    __syncthreads();
  }
}

// Grid: x over rows, y over chunks of packs_per_chunk packs of a row (kBackwardPacksPerChunk, more only
// for a vocabulary too large for grid.y). With no reduction in backward, splitting a row over blocks
// costs only three per-row loads per block, and it keeps the GPU busy when there are few rows with a
// large vocabulary (one block per row would leave SMs idle).
// Chunk 0 also writes the row's scalar head and tail.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kBackwardThreads)
    selective_logprobs_backward_kernel(const acc_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                       const index_t* __restrict__ y, const acc_t* __restrict__ lse,
                                       scalar_t* __restrict__ out, int64_t N, int64_t V, int64_t ignore_index,
                                       acc_t inv_t, int64_t packs_per_chunk, bool out_coaligned) {
  constexpr int kSize = Pack<scalar_t>::kSize;
  const int tid = threadIdx.x;
  const int64_t chunk = blockIdx.y;
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const int64_t t = static_cast<int64_t>(y[n]);
    const acc_t g = grad[n];
    // Ignored rows and g == 0 give exact zeros (as on the CPU, even where softmax would be NaN); an
    // out-of-range target gives NaN. Neither reads the logits.
    const bool zero = t == ignore_index || g == acc_t(0);
    const bool compute = !zero && t >= 0 && t < V;
    const scalar_t fill = zero ? scalar_t(0) : scalar_t(std::numeric_limits<acc_t>::quiet_NaN());
    const acc_t l = compute ? lse[n] : acc_t(0);
    const acc_t g_inv_t = g * inv_t;
    const acc_t coef = -g_inv_t;
    const auto value = [&](int64_t v, scalar_t zv) -> scalar_t {
      acc_t d = coef * acc_exp(scale(static_cast<acc_t>(zv), inv_t) - l);
      if (v == t) {
        d += g_inv_t;
      }
      return static_cast<scalar_t>(d);
    };

    const scalar_t* row = x + n * V;
    scalar_t* out_row = out + n * V;
    const RowSplit split = split_row(row, V);
    if (chunk == 0) {
      if (tid < split.head) {
        out_row[tid] = compute ? value(tid, row[tid]) : fill;
      }
      const int64_t v = split.tail + tid;
      if (v < V) {
        out_row[v] = compute ? value(v, row[v]) : fill;
      }
    }
    const Pack<scalar_t>* packs = reinterpret_cast<const Pack<scalar_t>*>(row + split.head);
    const int64_t end = std::min((chunk + 1) * packs_per_chunk, split.packs);
    for (int64_t i = chunk * packs_per_chunk + tid; i < end; i += blockDim.x) {
      const int64_t v0 = split.head + i * kSize;
      Pack<scalar_t> o;
      if (compute) {
        const Pack<scalar_t> in = packs[i];
#pragma unroll
        for (int k = 0; k < kSize; ++k) {
          o.val[k] = value(v0 + k, in.val[k]);
        }
      } else {
#pragma unroll
        for (int k = 0; k < kSize; ++k) {
          o.val[k] = fill;
        }
      }
      // out is freshly allocated (256-byte aligned) but logits may start at any element, so the output
      // row is 16-byte aligned where the input row is only when both base pointers agree modulo 16.
      if (out_coaligned) {
        *reinterpret_cast<Pack<scalar_t>*>(out_row + v0) = o;
      } else {
#pragma unroll
        for (int k = 0; k < kSize; ++k) {
          out_row[v0 + k] = o.val[k];
        }
      }
    }
  }
}

int forward_threads(int64_t V, int64_t pack_size) {
  // About one pack per thread for short rows, capped for long ones: no idle warps on small vocabularies.
  const int64_t packs = (V + pack_size - 1) / pack_size;
  int threads = kWarp;
  while (threads < kMaxForwardThreads && threads < packs) {
    threads *= 2;
  }
  return threads;
}

std::tuple<at::Tensor, at::Tensor> selective_logprobs_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                                           int64_t ignore_index, double temperature) {
  check_selective_logprobs_args(logits, targets, temperature);
  check_device(logits, c10::DeviceType::CUDA, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto x = logits.contiguous();
  const auto y = targets.contiguous();
  const auto opts = logits.options().dtype(acc_type_of(logits));
  const int64_t N = logits.size(0), V = logits.size(1);
  auto logp = at::empty({N}, opts);
  auto lse = at::empty({N}, opts);
  if (N == 0) {
    return {logp, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "selective_logprobs_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(y.scalar_type(), "selective_logprobs_cuda_targets", [&] {
      const int threads = forward_threads(V, Pack<scalar_t>::kSize);
      const auto blocks = static_cast<unsigned int>(std::min(N, kMaxGridX));
      selective_logprobs_forward_kernel<scalar_t, acc_t, index_t>
          <<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              x.const_data_ptr<scalar_t>(), y.const_data_ptr<index_t>(), logp.mutable_data_ptr<acc_t>(),
              lse.mutable_data_ptr<acc_t>(), N, V, ignore_index, acc_t(1) / acc_t(temperature));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {logp, lse};
}

at::Tensor selective_logprobs_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& targets,
                                            const at::Tensor& lse, int64_t ignore_index, double temperature) {
  check_selective_logprobs_backward_args(grad, logits, targets, lse, temperature);
  check_device(logits, c10::DeviceType::CUDA, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto x = logits.contiguous();
  const auto y = targets.contiguous();
  const auto g = grad.contiguous();
  const auto l = lse.contiguous();
  auto grad_logits = at::empty_like(x);
  const int64_t N = x.size(0), V = x.size(1);
  if (N == 0 || V == 0) {
    return grad_logits;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "selective_logprobs_backward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(y.scalar_type(), "selective_logprobs_backward_cuda_targets", [&] {
      constexpr int64_t kSize = Pack<scalar_t>::kSize;
      // Upper bound on any row's pack count; the chunk is widened if a huge V would exceed grid.y.
      const int64_t packs = (V + kSize - 1) / kSize;
      constexpr int64_t kMaxGridY = 65535;
      const int64_t packs_per_chunk = std::max(kBackwardPacksPerChunk, (packs + kMaxGridY - 1) / kMaxGridY);
      const int64_t chunks = std::max<int64_t>(1, (packs + packs_per_chunk - 1) / packs_per_chunk);
      const dim3 blocks(static_cast<unsigned int>(std::min(N, kMaxGridX)), static_cast<unsigned int>(chunks));
      const scalar_t* x_p = x.const_data_ptr<scalar_t>();
      scalar_t* out_p = grad_logits.mutable_data_ptr<scalar_t>();
      const bool out_coaligned = reinterpret_cast<uintptr_t>(x_p) % 16 == reinterpret_cast<uintptr_t>(out_p) % 16;
      selective_logprobs_backward_kernel<scalar_t, acc_t, index_t>
          <<<blocks, kBackwardThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              g.const_data_ptr<acc_t>(), x_p, y.const_data_ptr<index_t>(), l.const_data_ptr<acc_t>(), out_p, N, V,
              ignore_index, acc_t(1) / acc_t(temperature), packs_per_chunk, out_coaligned);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(alignops, CUDA, m) {
  m.impl("selective_logprobs", &selective_logprobs_cuda);
  m.impl("selective_logprobs_backward", &selective_logprobs_backward_cuda);
}

}  // namespace alignops::preference
