// CPU kernel of alignops::bootstrap_confusion: the C x C confusion matrix of every rater pair (rows of a and b)
// on the full sample and on R bootstrap resamples, without any [R, N] index tensor.
//
// Resample r >= 1 draws N items i_{r,j} = bounded(combine(combine(seed_state, r), j), N), j < N (see
// common/counter_hash.h); r = 0 is the sample itself. A resample's confusion matrix depends only on how often
// each item was drawn, so each thread turns its current resample into a multiplicity vector w_r [N] (int32, N hashes)
// and then, for a block of rater pairs, accumulates hist[code[p, n]] += w_r[n] with code = a * C + b: a
// sequential pass over a uint16 code row per pair and resample. The scatter into the histogram does not
// vectorise; four interleaved partial histograms break the store-to-load dependency of equal codes.
// Tasks (pair block x resample) are spread over threads with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/checks.h"
#include "common/counter_hash.h"

namespace alignops::metrics {
namespace {

constexpr int64_t kMaxClasses = 255;  // codes a * C + b fit uint16
constexpr int64_t kPairBlock = 32;    // pairs sharing one multiplicity vector (amortises its N hashes)

template <typename index_t>
void encode(const at::Tensor& a, const at::Tensor& b, int64_t C, uint16_t* codes) {
  const int64_t P = a.size(0), N = a.size(1);
  const bool shared_b = b.size(0) == 1 && P > 1;
  const index_t* ap = a.const_data_ptr<index_t>();
  const index_t* bp = b.const_data_ptr<index_t>();
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const index_t* ar = ap + p * N;
      const index_t* br = bp + (shared_b ? 0 : p * N);
      for (int64_t n = 0; n < N; ++n) {
        codes[p * N + n] = static_cast<uint16_t>(ar[n] * C + br[n]);
      }
    }
  });
}

template <typename index_t>
void check_labels(const at::Tensor& t, int64_t C, const char* name) {
  if (t.numel() == 0) {
    return;
  }
  const auto [lo, hi] = at::aminmax(t);
  const int64_t l = lo.item<int64_t>(), h = hi.item<int64_t>();
  TORCH_CHECK_VALUE(l >= 0 && h < C, name, " must hold class labels in [0, num_classes) = [0, ", C,
                    "), got values in [", l, ", ", h, "]");
}

at::Tensor bootstrap_confusion_cpu(const at::Tensor& a, const at::Tensor& b, int64_t num_classes,
                                   int64_t num_resamples, int64_t seed) {
  check_dim(a, 2, "a", "[P, N]");
  check_dim(b, 2, "b", "[P, N] or [1, N]");
  check_integer(a, "a");
  check_same_dtype(b, a, "b", "a");
  check_device(a, c10::DeviceType::CPU, "a");
  check_same_device(b, a, "b", "a");
  const int64_t P = a.size(0), N = a.size(1);
  TORCH_CHECK_VALUE(b.size(1) == N && (b.size(0) == P || b.size(0) == 1),
                    "b must have shape [P, N] = [", P, ", ", N, "] or [1, N], got ", b.sizes());
  TORCH_CHECK_VALUE(num_classes >= 1 && num_classes <= kMaxClasses, "num_classes must be in [1, ", kMaxClasses,
                    "], got ", num_classes);
  TORCH_CHECK_VALUE(num_resamples >= 0, "num_resamples must be >= 0, got ", num_resamples);
  TORCH_CHECK_VALUE(N < (int64_t(1) << 31), "the number of items N must be < 2^31, got ", N);
  const int64_t C = num_classes, CC = C * C, R1 = num_resamples + 1;
  auto out = at::zeros({P, R1, C, C}, a.options().dtype(at::kInt));
  if (P == 0 || N == 0) {
    return out;
  }
  const auto ac = a.contiguous(), bc = b.contiguous();
  std::vector<uint16_t> codes(static_cast<size_t>(P * N));
  AT_DISPATCH_INDEX_TYPES(a.scalar_type(), "bootstrap_confusion_cpu", [&] {
    check_labels<index_t>(ac, C, "a");
    check_labels<index_t>(bc, C, "b");
    encode<index_t>(ac, bc, C, codes.data());
  });

  const uint32_t state = hash::key_state(hash::kSaltBootstrap, seed);
  const int64_t blocks = (P + kPairBlock - 1) / kPairBlock;
  int32_t* op = out.mutable_data_ptr<int32_t>();
  const int partials = CC <= 1024 ? 4 : 1;
  at::parallel_for(0, blocks * R1, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> w(static_cast<size_t>(N));
    std::vector<int32_t> hist(static_cast<size_t>(partials * CC));
    int64_t current_r = -1;
    for (int64_t task = begin; task < end; ++task) {
      // Consecutive tasks share a resample: one multiplicity vector serves a whole range of pair blocks.
      const int64_t r = task / blocks, blk = task % blocks;
      if (r != current_r) {
        if (r == 0) {
          std::fill(w.begin(), w.end(), 1);
        } else {
          std::fill(w.begin(), w.end(), 0);
          const uint32_t hr = hash::combine(state, static_cast<uint32_t>(r));
          for (int64_t j = 0; j < N; ++j) {
            ++w[hash::bounded(hash::combine(hr, static_cast<uint32_t>(j)), static_cast<uint32_t>(N))];
          }
        }
        current_r = r;
      }
      const int64_t p_end = std::min(P, (blk + 1) * kPairBlock);
      for (int64_t p = blk * kPairBlock; p < p_end; ++p) {
        std::fill(hist.begin(), hist.end(), 0);
        const uint16_t* c = codes.data() + p * N;
        int64_t n = 0;
        if (partials == 4) {
          int32_t* h0 = hist.data();
          int32_t* h1 = h0 + CC;
          int32_t* h2 = h1 + CC;
          int32_t* h3 = h2 + CC;
          for (; n + 4 <= N; n += 4) {
            h0[c[n]] += w[n];
            h1[c[n + 1]] += w[n + 1];
            h2[c[n + 2]] += w[n + 2];
            h3[c[n + 3]] += w[n + 3];
          }
        }
        for (; n < N; ++n) {
          hist[c[n]] += w[n];
        }
        int32_t* dst = op + (p * R1 + r) * CC;
        for (int64_t k = 0; k < CC; ++k) {
          int32_t s = 0;
          for (int q = 0; q < partials; ++q) {
            s += hist[q * CC + k];
          }
          dst[k] = s;
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(alignops, CPU, m) { m.impl("bootstrap_confusion", &bootstrap_confusion_cpu); }

}  // namespace alignops::metrics
