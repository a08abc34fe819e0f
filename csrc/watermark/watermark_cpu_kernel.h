// Row kernels of the watermark ops, compiled once per CPU capability (see CMakeLists.txt).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace alignops::watermark {

struct WatermarkKernels {
  // out [B, V] = logits + delta * green, green[b, v] = combine(state[b], v) < threshold (threshold <= 2^32).
  void (*kgw_logits)(const at::Tensor& logits, const uint32_t* state, uint64_t threshold, float delta, at::Tensor& out);
  // out[b] = first argmax_v of logits[b, v] + delta * green[b, v] (the first NaN if any, as torch.argmax).
  void (*kgw_argmax)(const at::Tensor& logits, const uint32_t* state, uint64_t threshold, float delta, int64_t* out);
  // out[b] = first argmax_v of logits[b, v] / temperature - log(-log(unit_float(combine(state[b], v))))
  // (the first NaN if any).
  void (*gumbel_argmax)(const at::Tensor& logits, const uint32_t* state, float inv_temperature, int64_t* out);
};

namespace DEFAULT {
extern const WatermarkKernels watermark_kernels;
}
#if ALIGNOPS_X86
namespace AVX2 {
extern const WatermarkKernels watermark_kernels;
}
#endif

}  // namespace alignops::watermark
