// CUDA kernel of alignops::forced_align: the same trellis, band, tie rule and bit planes as the CPU
// kernel (forced_align_cpu_kernel.cpp), so both give the same paths and scores bit for bit.
//
// One thread block per utterance runs the whole time loop (one __syncthreads per frame, no per-frame
// launches) over two score rows in global memory (they stay in L2); each warp covers 32 consecutive
// target positions, so one ballot per bit plane writes a whole backpointer word. Thread 0 traces back
// on the device. Checkpointed mode: the forward pass stores every K-th row, then for each K-frame
// segment, last first, the block recomputes the segment with its bit planes and thread 0 traces it.
//
// Target values are checked by the Python wrapper (one host sync); a target outside [0, C) that still
// reaches the kernel makes its row infeasible instead of reading out of bounds.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "ctc/forced_align_common.h"

namespace alignops::ctc {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  if constexpr (std::is_same_v<acc_t, double>) {
    return __longlong_as_double(0xfff0000000000000ULL);
  } else {
    return __int_as_float(0xff800000);
  }
}

template <typename scalar_t, typename acc_t>
struct Utterance {
  const scalar_t* lp;  // [T, C] of this utterance
  const int64_t* tgt;  // [L]
  const acc_t* star;   // [T] or nullptr
  int64_t T, C, L, blank, star_id, W;  // W: 32-bit words per bit plane

  __device__ int64_t band_lo(int64_t t) const {
    const int64_t lo = (2 * L + 1 - 2 * (T - t) - 1) / 2;
    return lo > 0 ? lo : 0;
  }
  __device__ int64_t band_end(int64_t t) const { return (L < t ? L : t) + 1; }
  __device__ bool is_star(int64_t j) const { return star != nullptr && tgt[j] == star_id; }
  __device__ acc_t emission(int64_t t, int64_t j, bool blank_state) const {
    if (blank_state) {
      return static_cast<acc_t>(lp[t * C + blank]);
    }
    if (j >= L) {
      return neg_inf<acc_t>();
    }
    return is_star(j) ? star[t] : static_cast<acc_t>(lp[t * C + tgt[j]]);
  }
  __device__ bool skip_ok(int64_t j) const { return j > 0 && j < L && tgt[j] != tgt[j - 1]; }
};

// A score row: blank[j] at row[1 + j], token[j] at row[L + 3 + j], j in [-1, L]; sentinels hold -inf.
template <typename acc_t>
struct Row {
  acc_t* base;
  int64_t L;
  __device__ acc_t* blank() const { return base + 1; }
  __device__ acc_t* token() const { return base + L + 3; }
  __device__ int64_t size() const { return 2 * (L + 2); }
};

template <typename acc_t>
__device__ void fill_row(Row<acc_t> row, acc_t value) {
  for (int64_t i = threadIdx.x; i < row.size(); i += blockDim.x) {
    row.base[i] = value;
  }
}

template <typename acc_t>
__device__ void copy_row(const acc_t* src, Row<acc_t> dst) {
  for (int64_t i = threadIdx.x; i < dst.size(); i += blockDim.x) {
    dst.base[i] = src[i];
  }
}

// Frame t from prev into cur; bits (3 planes of u.W words) when non-null. Ends with a block barrier.
template <typename scalar_t, typename acc_t>
__device__ void step(const Utterance<scalar_t, acc_t>& u, int64_t t, Row<acc_t> prev, Row<acc_t> cur, uint32_t* bits) {
  const int64_t lo = u.band_lo(t), end = u.band_end(t);
  const acc_t* pb = prev.blank();
  const acc_t* pk = prev.token();
  acc_t* nb = cur.blank();
  acc_t* nk = cur.token();
  const acc_t eb = u.emission(t, 0, true);
  const int lane = threadIdx.x % kWarp;
  for (int64_t base = lo - lo % kWarp; base < end; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    const bool active = j >= lo && j < end;
    bool from_token = false, from_blank = false, from_prev = false;
    if (active) {
      const acc_t bs = pb[j], bt = pk[j - 1];
      from_token = bt > bs;
      nb[j] = (from_token ? bt : bs) + eb;
      const acc_t ks = pk[j], kb = pb[j];
      const acc_t kp = u.skip_ok(j) ? pk[j - 1] : neg_inf<acc_t>();
      from_blank = kb > ks;
      const acc_t m = from_blank ? kb : ks;
      from_prev = kp > m;
      nk[j] = (from_prev ? kp : m) + u.emission(t, j, false);
    }
    if (bits != nullptr) {
      const uint32_t w_cb = __ballot_sync(0xffffffffu, from_token);
      const uint32_t w_c1 = __ballot_sync(0xffffffffu, from_blank && !from_prev);
      const uint32_t w_c2 = __ballot_sync(0xffffffffu, from_prev);
      const int64_t w = (j - lane) / kWarp;
      if (lane == 0 && w * kWarp < end) {
        bits[w] = w_cb;
        bits[u.W + w] = w_c1;
        bits[2 * u.W + w] = w_c2;
      }
    }
  }
  if (threadIdx.x == 0) {
    // The next frame reads token[lo - 1]; below the band this row holds scores from two frames ago.
    nb[lo - 1] = neg_inf<acc_t>();
    nk[lo - 1] = neg_inf<acc_t>();
  }
  __syncthreads();
}

__device__ __forceinline__ bool bit(const uint32_t* plane, int64_t j) { return (plane[j >> 5] >> (j & 31)) & 1u; }

template <typename scalar_t, typename acc_t>
__device__ void emit(const Utterance<scalar_t, acc_t>& u, int64_t t, int64_t j, bool is_blank, int64_t* path,
                     scalar_t* score) {
  path[t] = is_blank ? u.blank : (u.is_star(j) ? u.star_id : u.tgt[j]);
  score[t] = static_cast<scalar_t>(u.emission(t, j, is_blank));
}

__device__ __forceinline__ void back(const uint32_t* bits, int64_t W, int64_t& j, bool& is_blank) {
  if (is_blank) {
    if (bit(bits, j)) {
      --j;
      is_blank = false;
    }
  } else if (bit(bits + 2 * W, j)) {
    --j;
  } else if (bit(bits + W, j)) {
    is_blank = true;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    forced_align_kernel(const scalar_t* __restrict__ log_probs, const int64_t* __restrict__ targets,
                        const int64_t* __restrict__ input_lengths, const int64_t* __restrict__ target_lengths,
                        const acc_t* __restrict__ star_scores, int64_t Tmax, int64_t C, int64_t Lmax, int64_t blank,
                        int64_t star_id, int64_t checkpoint, int64_t n_ckpt, acc_t* rows, acc_t* ckpt, uint32_t* bits,
                        int64_t bits_frames, int64_t* paths, scalar_t* scores, bool* feasible) {
  const int64_t b = blockIdx.x;
  // Lengths are checked by the Python wrapper; out-of-range ones that still arrive make the row infeasible
  // and are clamped so that nothing is read or written out of bounds.
  const bool lengths_ok =
      input_lengths[b] >= 0 && input_lengths[b] <= Tmax && target_lengths[b] >= 0 && target_lengths[b] <= Lmax;
  const int64_t T = lengths_ok ? input_lengths[b] : 0, L = lengths_ok ? target_lengths[b] : 0;
  Utterance<scalar_t, acc_t> u{log_probs + b * Tmax * C,
                               targets + b * Lmax,
                               star_scores != nullptr ? star_scores + b * Tmax : nullptr,
                               T,
                               C,
                               L,
                               blank,
                               star_id,
                               (Lmax + 1 + kWarp - 1) / kWarp};
  int64_t* path = paths + b * Tmax;
  scalar_t* score = scores + b * Tmax;
  const int64_t row_size = 2 * (Lmax + 2);
  Row<acc_t> ra{rows + b * 2 * row_size, L}, rb{rows + b * 2 * row_size + row_size, L};
  const int64_t frame_words = 3 * u.W;
  uint32_t* my_bits = bits + b * bits_frames * frame_words;
  acc_t* my_ckpt = ckpt != nullptr ? ckpt + b * n_ckpt * row_size : nullptr;

  __shared__ bool s_ok;
  if (threadIdx.x == 0) {
    int64_t repeats = 0;
    bool ids_ok = true;
    for (int64_t j = 0; j < L; ++j) {
      const bool star = u.is_star(j);
      ids_ok &= star || (u.tgt[j] >= 0 && u.tgt[j] < C && u.tgt[j] != blank);
      repeats += j > 0 && u.tgt[j] == u.tgt[j - 1];
    }
    s_ok = lengths_ok && ids_ok && T >= L + repeats && (T > 0 || L == 0);
  }
  for (int64_t t = threadIdx.x; t < Tmax; t += blockDim.x) {
    path[t] = -1;
    score[t] = t < T ? -std::numeric_limits<scalar_t>::infinity() : scalar_t(0);
  }
  __syncthreads();
  if (!s_ok || T == 0) {
    if (threadIdx.x == 0) {
      feasible[b] = s_ok;
    }
    return;
  }
  const bool full = checkpoint == 0 || checkpoint >= T;
  fill_row(ra, neg_inf<acc_t>());
  fill_row(rb, neg_inf<acc_t>());
  __syncthreads();
  if (threadIdx.x == 0) {
    ra.blank()[0] = u.emission(0, 0, true);
    if (L > 0) {
      ra.token()[0] = u.emission(0, 0, false);
    }
  }
  __syncthreads();
  if (!full) {
    copy_row(ra.base, Row<acc_t>{my_ckpt, L});
  }
  Row<acc_t> prev = ra, cur = rb;
  for (int64_t t = 1; t < T; ++t) {
    step(u, t, prev, cur, full ? my_bits + t * frame_words : nullptr);
    const Row<acc_t> tmp = prev;
    prev = cur;
    cur = tmp;
    if (!full && t % checkpoint == 0) {
      copy_row(prev.base, Row<acc_t>{my_ckpt + (t / checkpoint) * row_size, L});
    }
  }
  __shared__ int64_t s_j;
  __shared__ bool s_blank;
  if (threadIdx.x == 0) {
    bool is_blank;
    int64_t j;
    bool ok;
    if (L == 0) {
      j = 0;
      is_blank = true;
      ok = prev.blank()[0] > neg_inf<acc_t>();
    } else {
      const acc_t vb = prev.blank()[L], vk = prev.token()[L - 1];
      is_blank = vb > vk;
      j = is_blank ? L : L - 1;
      ok = (vb > vk ? vb : vk) > neg_inf<acc_t>();
    }
    s_ok = ok;
    s_j = j;
    s_blank = is_blank;
    if (ok && full) {
      for (int64_t t = T - 1; t > 0; --t) {
        emit(u, t, j, is_blank, path, score);
        back(my_bits + t * frame_words, u.W, j, is_blank);
      }
      emit(u, 0, j, is_blank, path, score);
    }
  }
  __syncthreads();
  if (!s_ok) {
    for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
      path[t] = -1;
      score[t] = -std::numeric_limits<scalar_t>::infinity();
    }
  }
  if (threadIdx.x == 0) {
    feasible[b] = s_ok;
  }
  if (!s_ok || full) {
    return;
  }
  const int64_t n_rows = (T - 1) / checkpoint + 1;
  for (int64_t c = n_rows - 1; c >= 0; --c) {
    const int64_t first = c * checkpoint + 1;
    const int64_t last = (c * checkpoint + checkpoint < T - 1) ? c * checkpoint + checkpoint : T - 1;
    if (first > last) {
      continue;
    }
    copy_row(my_ckpt + c * row_size, ra);
    fill_row(rb, neg_inf<acc_t>());
    __syncthreads();
    prev = ra;
    cur = rb;
    for (int64_t t = first; t <= last; ++t) {
      step(u, t, prev, cur, my_bits + (t - first) * frame_words);
      const Row<acc_t> tmp = prev;
      prev = cur;
      cur = tmp;
    }
    if (threadIdx.x == 0) {
      int64_t j = s_j;
      bool is_blank = s_blank;
      for (int64_t t = last; t >= first; --t) {
        emit(u, t, j, is_blank, path, score);
        back(my_bits + (t - first) * frame_words, u.W, j, is_blank);
      }
      s_j = j;
      s_blank = is_blank;
      if (c == 0) {
        emit(u, 0, j, is_blank, path, score);
      }
    }
    __syncthreads();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forced_align_cuda(const at::Tensor& log_probs, const at::Tensor& targets,
                                                                 const at::Tensor& input_lengths,
                                                                 const at::Tensor& target_lengths, int64_t blank,
                                                                 const c10::optional<at::Tensor>& star_scores,
                                                                 int64_t star_id, int64_t checkpoint) {
  check_device(log_probs, c10::DeviceType::CUDA, "log_probs");
  check_forced_align_args(log_probs, targets, input_lengths.to(log_probs.device()),
                          target_lengths.to(log_probs.device()), blank, star_scores, star_id, checkpoint);
  const c10::cuda::CUDAGuard guard(log_probs.device());
  const auto lp = log_probs.contiguous();
  const auto tgt = targets.to(at::kLong).contiguous();
  const auto in_len = input_lengths.to(lp.device(), at::kLong).contiguous();
  const auto tgt_len = target_lengths.to(lp.device(), at::kLong).contiguous();
  const auto star = star_scores.has_value() ? star_scores->contiguous() : at::Tensor();
  auto out = empty_forced_align_outputs(lp);
  const int64_t B = lp.size(0), T = lp.size(1), C = lp.size(2), L = tgt.size(1);
  if (B == 0 || T == 0) {
    out.paths.fill_(-1);
    out.scores.zero_();
    out.feasible.copy_(tgt_len == 0);
    return {out.paths, out.scores, out.feasible};
  }
  const bool full = checkpoint == 0 || checkpoint >= T;
  const int64_t n_ckpt = full ? 0 : (T - 1) / checkpoint + 1;
  const int64_t W = (L + 1 + kWarp - 1) / kWarp;
  const int64_t bits_frames = full ? T : checkpoint;
  const auto acc = acc_type_of(lp);
  auto rows = at::empty({B, 2, 2 * (L + 2)}, lp.options().dtype(acc));
  auto ckpt = at::empty({full ? 0 : B, n_ckpt, 2 * (L + 2)}, lp.options().dtype(acc));
  auto bits = at::empty({B, bits_frames, 3 * W}, lp.options().dtype(at::kInt));
  const int threads =
      static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(2 * kWarp, (L + kWarp) / kWarp * kWarp)));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lp.scalar_type(), "forced_align_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forced_align_kernel<scalar_t, acc_t><<<static_cast<unsigned>(B), threads, 0, stream>>>(
        lp.const_data_ptr<scalar_t>(), tgt.const_data_ptr<int64_t>(), in_len.const_data_ptr<int64_t>(),
        tgt_len.const_data_ptr<int64_t>(), star.defined() ? star.const_data_ptr<acc_t>() : nullptr, T, C, L, blank,
        star_id, full ? 0 : checkpoint, n_ckpt, rows.mutable_data_ptr<acc_t>(),
        full ? nullptr : ckpt.mutable_data_ptr<acc_t>(), reinterpret_cast<uint32_t*>(bits.mutable_data_ptr<int32_t>()),
        bits_frames, out.paths.mutable_data_ptr<int64_t>(), out.scores.mutable_data_ptr<scalar_t>(),
        out.feasible.mutable_data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out.paths, out.scores, out.feasible};
}

}  // namespace

TORCH_LIBRARY_IMPL(alignops, CUDA, m) { m.impl("forced_align", &forced_align_cuda); }

}  // namespace alignops::ctc
