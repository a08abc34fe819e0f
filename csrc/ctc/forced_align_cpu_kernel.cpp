// Batched CTC Viterbi of alignops::forced_align. CMake compiles this file once per CPU capability
// (DEFAULT, AVX2) into its own namespace; forced_align_cpu.cpp picks one at run time.
//
// Trellis: the 2L+1 states of CTC, kept as two arrays indexed by target position j: blank j (state 2j)
// and token j (state 2j+1). Per frame t (max-plus, fp32 for half/bf16/fp32 inputs, fp64 for fp64):
//   blank_t[j] = max(blank_{t-1}[j], token_{t-1}[j-1]) + lp[t, blank]
//   token_t[j] = max(token_{t-1}[j], blank_{t-1}[j], token_{t-1}[j-1] if target[j] != target[j-1]) + lp[t, target[j]]
// Ties go to the earlier candidate in that order (stay, then one state back, then two): torchaudio's CPU
// rule, and the CUDA kernel's. The last frame ends on the final token unless the trailing blank is
// strictly better. Only the band of states that are reachable from frame 0 and can still reach the end
// is computed. The two arrays make the inner loop branch-free over contiguous memory, so it vectorises.
// The AVX2 copy runs eight positions per instruction with the comparison masks written straight into
// the bit planes; it starts at the band's lower edge rounded down to 8: the positions below the band it
// then computes hold garbage that no position in the band ever reads (see step()).
//
// Backpointers are three bit planes per frame over j (blank from token j-1; token from blank j; token
// from token j-1): 1.5 bits per state, T * 3 * ceil((L+9)/64) words (8 positions of padding). The checkpointed mode
// keeps only every K-th row of scores, then recomputes one K-frame segment at a time with its bit planes while it
// traces back: exact, about twice the work, memory O(S * (T/K + K)).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "ctc/forced_align_cpu_kernel.h"

namespace alignops::ctc {
namespace CPU_CAPABILITY {
namespace {

// Bytes b_0..b_7 each 0 or 1 (b_0 at the lowest address) -> the byte whose bit i is b_i.
inline uint64_t pack8(const uint8_t* codes) {
  uint64_t x;
  std::memcpy(&x, codes, 8);
  return (x * 0x0102040810204080ULL) >> 56;
}

inline void pack_words(const uint8_t* codes, int64_t w_begin, int64_t w_end, uint64_t* plane) {
  for (int64_t w = w_begin; w < w_end; ++w) {
    uint64_t word = 0;
    for (int k = 0; k < 8; ++k) {
      word |= pack8(codes + w * 64 + 8 * k) << (8 * k);
    }
    plane[w] = word;
  }
}

inline bool bit(const uint64_t* plane, int64_t j) { return (plane[j >> 6] >> (j & 63)) & 1; }

template <typename scalar_t, typename acc_t>
class Utterance {
 public:
  static constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  static constexpr int64_t kPad = 8;  // one vector past the last position, so loads never need a tail

  Utterance(const scalar_t* lp, int64_t T, int64_t C, const int64_t* targets, int64_t L, int64_t blank,
            const acc_t* star, int64_t star_id)
      : lp_(lp), T_(T), C_(C), L_(L), blank_(blank), star_id_(star_id), star_(star), W_((L + 1 + kPad + 63) / 64),
        tgt_(L), skip_(L + 1 + kPad, kNegInf), ek_(L + 1 + kPad, kNegInf), codes_(3 * (64 * W_ + 8), 0) {
    for (int64_t j = 0; j < L; ++j) {
      tgt_[j] = (star != nullptr && targets[j] == star_id) ? -1 : targets[j];
      if (j > 0 && targets[j] != targets[j - 1]) {
        skip_[j] = 0;
      }
    }
  }

  // False when no path fits (T < L + repeats, or every path scores -inf); paths/scores are then left alone.
  bool align(int64_t checkpoint, int64_t* path, scalar_t* score) {
    int64_t repeats = 0;
    for (int64_t j = 1; j < L_; ++j) {
      repeats += skip_[j] != 0;  // -inf: target j repeats target j - 1 and needs a blank in between
    }
    if (T_ < L_ + repeats || T_ == 0) {
      return T_ == 0 && L_ == 0;
    }
    return checkpoint > 0 && checkpoint < T_ ? align_checkpointed(checkpoint, path, score) : align_full(path, score);
  }

 private:
  // A row of scores: blank[j] and token[j] for j in [-1, L + kPad]; index -1 and token L hold -inf.
  struct Row {
    std::vector<acc_t> data;
    explicit Row(int64_t L) : data(2 * (L + 2 + kPad), kNegInf) {}
    acc_t* blank() { return data.data() + 1; }
    acc_t* token() { return data.data() + (data.size() / 2) + 1; }
  };

  int64_t S() const { return 2 * L_ + 1; }
  // The band of target positions computed at frame t: states s in [S - 2(T - t), 2t + 1] (reachable from
  // frame 0 and able to reach the last state), widened to whole j.
  int64_t band_lo(int64_t t) const { return std::max<int64_t>(0, (S() - 2 * (T_ - t) - 1) / 2); }
  int64_t band_end(int64_t t) const { return std::min<int64_t>(L_, (2 * t + 1) / 2) + 1; }

  acc_t emission(int64_t t, int64_t c) const { return c >= 0 ? static_cast<acc_t>(lp_[t * C_ + c]) : star_[t]; }

  void init(Row& row) {
    std::fill(row.data.begin(), row.data.end(), kNegInf);
    row.blank()[0] = emission(0, blank_);
    if (L_ > 0) {
      row.token()[0] = emission(0, tgt_[0]);
    }
  }

  // Frame t from `prev` into `cur`; with kCodes, the frame's bit planes into bits[3 * W].
  template <bool kCodes>
  void step(int64_t t, Row& prev, Row& cur, uint64_t* bits) {
    const int64_t lo = band_lo(t), end = band_end(t);
    const acc_t eb = emission(t, blank_);
    for (int64_t j = lo; j < std::min(end, L_); ++j) {
      ek_[j] = emission(t, tgt_[j]);
    }
    const acc_t* pb = prev.blank();
    const acc_t* pk = prev.token();
    acc_t* nb = cur.blank();
    acc_t* nk = cur.token();
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<acc_t, float>) {
      step_avx2<kCodes>(lo, end, pb, pk, nb, nk, eb, reinterpret_cast<uint8_t*>(bits));
    } else {
      step_scalar<kCodes>(lo, end, pb, pk, nb, nk, eb, bits);
    }
#else
    step_scalar<kCodes>(lo, end, pb, pk, nb, nk, eb, bits);
#endif
    // The next frame reads token[lo - 1]; below the band this row holds stale scores (or, from the AVX2
    // loop, garbage): -inf keeps every position in the band exact.
    nb[lo - 1] = kNegInf;
    nk[lo - 1] = kNegInf;
  }

  template <bool kCodes>
  void step_scalar(int64_t lo, int64_t end, const acc_t* pb, const acc_t* pk, acc_t* nb, acc_t* nk, acc_t eb,
                   uint64_t* bits) {
    const acc_t* ek = ek_.data();
    const acc_t* skip = skip_.data();
    uint8_t* cb = codes_.data();
    uint8_t* c1 = cb + 64 * W_ + 8;
    uint8_t* c2 = c1 + 64 * W_ + 8;
    for (int64_t j = lo; j < end; ++j) {
      const acc_t bs = pb[j], bt = pk[j - 1];
      const bool from_token = bt > bs;
      nb[j] = (from_token ? bt : bs) + eb;
      const acc_t ks = pk[j], kb = pb[j], kp = pk[j - 1] + skip[j];
      const bool from_blank = kb > ks;
      const acc_t m = from_blank ? kb : ks;
      const bool from_prev = kp > m;
      nk[j] = (from_prev ? kp : m) + ek[j];
      if constexpr (kCodes) {
        cb[j] = from_token;
        c1[j] = from_blank && !from_prev;
        c2[j] = from_prev;
      }
    }
    if constexpr (kCodes) {
      const int64_t w0 = lo / 64, w1 = (end - 1) / 64 + 1;
      pack_words(cb, w0, w1, bits);
      pack_words(c1, w0, w1, bits + W_);
      pack_words(c2, w0, w1, bits + 2 * W_);
    }
  }

#if defined(CPU_CAPABILITY_AVX2)
  // The scalar loop's comparisons, eight positions at a time from lo rounded down to 8. Positions in
  // [lo & ~7, lo) read stale scores below the band and produce garbage there; a position in the band
  // reads only positions >= lo - 1, and step() resets lo - 1 to -inf after each frame.
  template <bool kCodes>
  void step_avx2(int64_t lo, int64_t end, const float* pb, const float* pk, float* nb, float* nk, float eb,
                 uint8_t* planes) {
    const float* ek = ek_.data();
    const float* skip = skip_.data();
    const int64_t plane_bytes = 8 * W_;
    const __m256 veb = _mm256_set1_ps(eb);
    for (int64_t j = lo & ~int64_t{7}; j < end; j += 8) {
      const __m256 bs = _mm256_loadu_ps(pb + j);
      const __m256 bt = _mm256_loadu_ps(pk + j - 1);
      const __m256 ks = _mm256_loadu_ps(pk + j);
      const __m256 kp = _mm256_add_ps(bt, _mm256_loadu_ps(skip + j));
      const __m256 from_token = _mm256_cmp_ps(bt, bs, _CMP_GT_OQ);
      _mm256_storeu_ps(nb + j, _mm256_add_ps(_mm256_blendv_ps(bs, bt, from_token), veb));
      const __m256 from_blank = _mm256_cmp_ps(bs, ks, _CMP_GT_OQ);
      const __m256 m = _mm256_blendv_ps(ks, bs, from_blank);
      const __m256 from_prev = _mm256_cmp_ps(kp, m, _CMP_GT_OQ);
      _mm256_storeu_ps(nk + j, _mm256_add_ps(_mm256_blendv_ps(m, kp, from_prev), _mm256_loadu_ps(ek + j)));
      if constexpr (kCodes) {
        planes[j / 8] = static_cast<uint8_t>(_mm256_movemask_ps(from_token));
        planes[plane_bytes + j / 8] = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_andnot_ps(from_prev, from_blank)));
        planes[2 * plane_bytes + j / 8] = static_cast<uint8_t>(_mm256_movemask_ps(from_prev));
      }
    }
  }
#endif

  // The final state (j, is_blank) from the last row; false when it scores -inf.
  bool final_state(Row& last, int64_t& j, bool& is_blank) const {
    if (L_ == 0) {
      j = 0;
      is_blank = true;
      return last.blank()[0] > kNegInf;
    }
    const acc_t b = last.blank()[L_], k = last.token()[L_ - 1];
    is_blank = b > k;
    j = is_blank ? L_ : L_ - 1;
    return std::max(b, k) > kNegInf;
  }

  void emit(int64_t t, int64_t j, bool is_blank, int64_t* path, scalar_t* score) const {
    const int64_t c = is_blank ? blank_ : tgt_[j];
    path[t] = c >= 0 ? c : star_id_;
    score[t] = static_cast<scalar_t>(emission(t, c));
  }

  // Move (j, is_blank) from frame t to frame t - 1 along the bit planes of frame t.
  void back(const uint64_t* bits, int64_t& j, bool& is_blank) const {
    if (is_blank) {
      if (bit(bits, j)) {
        --j;
        is_blank = false;
      }
    } else if (bit(bits + 2 * W_, j)) {
      --j;
    } else if (bit(bits + W_, j)) {
      is_blank = true;
    }
  }

  bool align_full(int64_t* path, scalar_t* score) {
    const int64_t frame_words = 3 * W_;
    std::unique_ptr<uint64_t[]> bits(new uint64_t[static_cast<size_t>(T_ * frame_words)]);
    Row a(L_), b(L_);
    init(a);
    Row* prev = &a;
    Row* cur = &b;
    for (int64_t t = 1; t < T_; ++t) {
      step<true>(t, *prev, *cur, bits.get() + t * frame_words);
      std::swap(prev, cur);
    }
    int64_t j;
    bool is_blank;
    if (!final_state(*prev, j, is_blank)) {
      return false;
    }
    for (int64_t t = T_ - 1; t > 0; --t) {
      emit(t, j, is_blank, path, score);
      back(bits.get() + t * frame_words, j, is_blank);
    }
    emit(0, j, is_blank, path, score);
    return true;
  }

  bool align_checkpointed(int64_t K, int64_t* path, scalar_t* score) {
    const int64_t n_ckpt = (T_ - 1) / K + 1;  // rows after frames 0, K, 2K, ...
    const int64_t row_size = 2 * (L_ + 2 + kPad);
    std::vector<acc_t> ckpt(static_cast<size_t>(n_ckpt * row_size));
    Row a(L_), b(L_);
    init(a);
    Row* prev = &a;
    Row* cur = &b;
    std::copy(a.data.begin(), a.data.end(), ckpt.begin());
    for (int64_t t = 1; t < T_; ++t) {
      step<false>(t, *prev, *cur, nullptr);
      std::swap(prev, cur);
      if (t % K == 0) {
        std::copy(prev->data.begin(), prev->data.end(), ckpt.begin() + (t / K) * row_size);
      }
    }
    int64_t j;
    bool is_blank;
    if (!final_state(*prev, j, is_blank)) {
      return false;
    }
    const int64_t frame_words = 3 * W_;
    std::unique_ptr<uint64_t[]> bits(new uint64_t[static_cast<size_t>(K * frame_words)]);
    for (int64_t c = n_ckpt - 1; c >= 0; --c) {
      const int64_t first = c * K + 1, last = std::min(c * K + K, T_ - 1);
      if (first > last) {
        continue;
      }
      std::copy(ckpt.begin() + c * row_size, ckpt.begin() + (c + 1) * row_size, a.data.begin());
      std::fill(b.data.begin(), b.data.end(), kNegInf);
      prev = &a;
      cur = &b;
      for (int64_t t = first; t <= last; ++t) {
        step<true>(t, *prev, *cur, bits.get() + (t - first) * frame_words);
        std::swap(prev, cur);
      }
      for (int64_t t = last; t >= first; --t) {
        emit(t, j, is_blank, path, score);
        back(bits.get() + (t - first) * frame_words, j, is_blank);
      }
    }
    emit(0, j, is_blank, path, score);
    return true;
  }

  const scalar_t* lp_;
  int64_t T_, C_, L_, blank_, star_id_;
  const acc_t* star_;
  int64_t W_;
  std::vector<int64_t> tgt_;
  std::vector<acc_t> skip_, ek_;
  std::vector<uint8_t> codes_;
};

void forced_align_kernel(const at::Tensor& log_probs, const at::Tensor& targets, const at::Tensor& input_lengths,
                         const at::Tensor& target_lengths, int64_t blank, const at::Tensor& star_scores,
                         int64_t star_id, int64_t checkpoint, at::Tensor& paths, at::Tensor& scores,
                         at::Tensor& feasible) {
  const int64_t B = log_probs.size(0), Tmax = log_probs.size(1), C = log_probs.size(2), Lmax = targets.size(1);
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  const int64_t* in_len = input_lengths.const_data_ptr<int64_t>();
  const int64_t* tgt_len = target_lengths.const_data_ptr<int64_t>();
  int64_t* path_all = paths.mutable_data_ptr<int64_t>();
  bool* ok_all = feasible.mutable_data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, log_probs.scalar_type(), "forced_align", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* lp_all = log_probs.const_data_ptr<scalar_t>();
    scalar_t* score_all = scores.mutable_data_ptr<scalar_t>();
    const acc_t* star_all = star_scores.defined() ? star_scores.const_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t T = in_len[b], L = tgt_len[b];
        int64_t* path = path_all + b * Tmax;
        scalar_t* score = score_all + b * Tmax;
        Utterance<scalar_t, acc_t> utt(lp_all + b * Tmax * C, T, C, tgt + b * Lmax, L, blank,
                                       star_all != nullptr ? star_all + b * Tmax : nullptr, star_id);
        const bool ok = utt.align(checkpoint, path, score);
        ok_all[b] = ok;
        // Past input_lengths: path -1, score 0. An infeasible row: path -1, score -inf on its frames.
        const int64_t valid = ok ? T : 0;
        std::fill(path + valid, path + Tmax, int64_t{-1});
        std::fill(score + valid, score + T, -std::numeric_limits<scalar_t>::infinity());
        std::fill(score + T, score + Tmax, scalar_t(0));
      }
    });
  });
}

}  // namespace

const ForcedAlignKernels forced_align_kernels{&forced_align_kernel};

}  // namespace CPU_CAPABILITY
}  // namespace alignops::ctc
