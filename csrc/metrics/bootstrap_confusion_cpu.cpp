// CPU kernel of alignops::bootstrap_confusion: the C x C confusion matrix of every rater pair (rows of a and b)
// on the full sample and on R bootstrap resamples, without any [R, N] index tensor.
//
// Resample r >= 1 draws N items i_{r,j} = bounded(combine(combine(seed_state, r), j), N), j < N (see
// common/counter_hash.h); r = 0 is the sample itself. A resample's confusion matrix depends only on how often
// each item was drawn, so each thread turns its current resample into a multiplicity vector w_r [N] (N
// hashes) and then, for a block of rater pairs, sums w_r over the items of each code a * C + b:
// - C <= 4 and N < 2^16 (binary / ternary / 4-way judges): uint8 codes, uint16 multiplicities, one vectorised
//   compare-select-add pass per code (bootstrap_confusion_cpu_kernel.cpp, portable or AVX2); the last code
//   is N minus the others, since the multiplicities of a resample sum to N.
// - otherwise a scalar histogram, hist[code[n]] += w[n] over uint16 codes, with four interleaved partial
//   histograms that break the store-to-load dependency of equal codes.
// Tasks (resample x pair block) are spread over threads with at::parallel_for; consecutive tasks share a
// resample, so one multiplicity vector serves a range of pair blocks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/counter_hash.h"
#include "common/cpu_capability.h"
#include "common/registration.h"
#include "metrics/bootstrap_confusion_cpu_kernel.h"

namespace alignops::metrics {
namespace {

constexpr int64_t kMaxClasses = 255;  // codes a * C + b fit uint16
constexpr int64_t kPairBlock = 32;    // pairs sharing one multiplicity vector per task

const BootstrapConfusionKernels& kernels() {
#if ALIGNOPS_X86
  return pick_cpu_kernels(DEFAULT::bootstrap_confusion_kernels, &AVX2::bootstrap_confusion_kernels);
#else
  return DEFAULT::bootstrap_confusion_kernels;
#endif
}

template <typename code_t>
void encode(const at::Tensor& a, const at::Tensor& b, int64_t C, code_t* codes) {
  const int64_t P = a.size(0), N = a.size(1);
  const bool shared_b = b.size(0) == 1 && P > 1;
  const int64_t* ap = a.const_data_ptr<int64_t>();
  const int64_t* bp = b.const_data_ptr<int64_t>();
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t* ar = ap + p * N;
      const int64_t* br = bp + (shared_b ? 0 : p * N);
      for (int64_t n = 0; n < N; ++n) {
        codes[p * N + n] = static_cast<code_t>(ar[n] * C + br[n]);
      }
    }
  });
}

// Labels in [0, num_classes), as the op alignops::bootstrap_confusion_check_values: the CPU kernel calls it, and the
// public function before the Triton kernel or the reference. ATen reductions and one host read for both tensors,
// so it serves any device.
void check_label_values(const at::Tensor& a, const at::Tensor& b, int64_t C) {
  std::vector<at::Tensor> ranges;
  std::vector<const char*> names;
  for (const auto& [t, name] : {std::pair{&a, "a"}, std::pair{&b, "b"}}) {
    if (t->numel() > 0) {
      const auto [lo, hi] = at::aminmax(*t);
      ranges.push_back(at::stack({lo, hi}).to(at::kLong));
      names.push_back(name);
    }
  }
  if (ranges.empty()) {
    return;
  }
  const auto values = at::stack(ranges).cpu();
  const int64_t* v = values.const_data_ptr<int64_t>();
  for (size_t i = 0; i < names.size(); ++i) {
    const int64_t l = v[2 * i], h = v[2 * i + 1];
    TORCH_CHECK_VALUE(l >= 0 && h < C, names[i], " must hold class labels in [0, num_classes) = [0, ", C,
                      "), got values in [", l, ", ", h, "]");
  }
}

template <typename code_t, typename w_t>
void accumulate(const std::vector<code_t>& codes, int64_t P, int64_t N, int64_t CC, int64_t R1, uint32_t state,
                int32_t* out) {
  constexpr bool kVectorised = std::is_same_v<code_t, uint8_t>;
  const auto& k = kernels();
  const int64_t blocks = (P + kPairBlock - 1) / kPairBlock;
  const int partials = CC <= 1024 ? 4 : 1;
  at::parallel_for(0, blocks * R1, 1, [&](int64_t begin, int64_t end) {
    std::vector<w_t> w(static_cast<size_t>(N));
    std::vector<int32_t> hist(kVectorised ? 0 : static_cast<size_t>(partials * CC));
    int64_t current_r = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / blocks, blk = task % blocks;
      if (r != current_r) {
        if (r == 0) {
          std::fill(w.begin(), w.end(), w_t(1));
        } else {
          std::fill(w.begin(), w.end(), w_t(0));
          const uint32_t hr = hash::combine(state, static_cast<uint32_t>(r));
          for (int64_t j = 0; j < N; ++j) {
            ++w[hash::bounded(hash::combine(hr, static_cast<uint32_t>(j)), static_cast<uint32_t>(N))];
          }
        }
        current_r = r;
      }
      const int64_t p_end = std::min(P, (blk + 1) * kPairBlock);
      for (int64_t p = blk * kPairBlock; p < p_end; ++p) {
        const code_t* c = codes.data() + p * N;
        int32_t* dst = out + (p * R1 + r) * CC;
        if constexpr (kVectorised) {
          k.code_sums(c, w.data(), N, CC - 1, dst);
          int64_t rest = N;
          for (int64_t q = 0; q < CC - 1; ++q) {
            rest -= dst[q];
          }
          dst[CC - 1] = static_cast<int32_t>(rest);
        } else {
          std::fill(hist.begin(), hist.end(), 0);
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
          for (int64_t q = 0; q < CC; ++q) {
            int32_t s = 0;
            for (int h = 0; h < partials; ++h) {
              s += hist[h * CC + q];
            }
            dst[q] = s;
          }
        }
      }
    }
  });
}

// The op's checks (also its op alignops::bootstrap_confusion_check, which the Triton twin calls); the labels'
// range is read by check_label_values (the CPU kernel; the op bootstrap_confusion_check_values elsewhere).
void check_args(const at::Tensor& a, const at::Tensor& b, int64_t num_classes, int64_t num_resamples,
                int64_t /*seed*/) {
  check_dim(a, 2, "a", "[P, N]");
  check_dim(b, 2, "b", "[P, N] or [1, N]");
  check_integer(a, "a");
  check_same_dtype(b, a, "b", "a");
  check_same_device(b, a, "b", "a");
  const auto P = a.sym_size(0), N = a.sym_size(1);
  TORCH_CHECK_VALUE(b.sym_size(1) == N && (b.sym_size(0) == P || b.sym_size(0) == 1), "b must have shape [P, N] = [", P,
                    ", ", N, "] or [1, N], got ", b.sym_sizes());
  TORCH_CHECK_VALUE(num_classes >= 1 && num_classes <= kMaxClasses, "num_classes must be in [1, ", kMaxClasses,
                    "], got ", num_classes);
  TORCH_CHECK_VALUE(num_resamples >= 0, "num_resamples must be >= 0, got ", num_resamples);
  TORCH_CHECK_VALUE(N < (int64_t(1) << 31), "the number of items N must be < 2^31, got ", N);
}

at::Tensor bootstrap_confusion_cpu(const at::Tensor& a, const at::Tensor& b, int64_t num_classes, int64_t num_resamples,
                                   int64_t seed) {
  check_args(a, b, num_classes, num_resamples, seed);
  check_device(a, c10::DeviceType::CPU, "a");
  const int64_t P = a.size(0), N = a.size(1);
  const int64_t C = num_classes, CC = C * C, R1 = num_resamples + 1;
  auto out = at::zeros({P, R1, C, C}, a.options().dtype(at::kInt));
  if (P == 0 || N == 0) {
    return out;
  }
  const auto ac = a.to(at::kLong).contiguous(), bc = b.to(at::kLong).contiguous();
  check_label_values(ac, bc, C);
  const uint32_t state = hash::key_state(hash::kSaltBootstrap, seed);
  int32_t* op = out.mutable_data_ptr<int32_t>();
  if (CC <= 16 && N < (int64_t(1) << 16)) {
    std::vector<uint8_t> codes(static_cast<size_t>(P * N));
    encode(ac, bc, C, codes.data());
    accumulate<uint8_t, uint16_t>(codes, P, N, CC, R1, state, op);
  } else {
    std::vector<uint16_t> codes(static_cast<size_t>(P * N));
    encode(ac, bc, C, codes.data());
    accumulate<uint16_t, int32_t>(codes, P, N, CC, R1, state, op);
  }
  return out;
}

}  // namespace

// The schemas of this file's ops, defined here and nowhere else.
TORCH_LIBRARY_FRAGMENT(alignops, m) {
  // ---- metrics: confusion matrices of rater pairs on the sample and on seeded bootstrap resamples ---
  // a [P, N], b [P, N] or [1, N] int labels in [0, num_classes). Returns int32 [P, R + 1, C, C]: entry r = 0 is
  // the full sample, r >= 1 the resample drawing items bounded(combine(combine(key_state(seed), r), j), N),
  // j < N (csrc/common/counter_hash.h), identical on every backend.
  def_checked(m, "bootstrap_confusion(Tensor a, Tensor b, int num_classes, int num_resamples, int seed) -> Tensor");
  // The labels' range (reads them: on any device, one host read).
  m.def("bootstrap_confusion_check_values(Tensor a, Tensor b, int num_classes) -> ()");
}

TORCH_LIBRARY_IMPL(alignops, CPU, m) { m.impl("bootstrap_confusion", &bootstrap_confusion_cpu); }

TORCH_LIBRARY_IMPL(alignops, CompositeImplicitAutograd, m) {
  m.impl("bootstrap_confusion_check", &check_args);
  m.impl("bootstrap_confusion_check_values", &check_label_values);
}

}  // namespace alignops::metrics
