// Loads and stores of two float vectors from / to fp32, bf16 or fp16 memory, for the vectorised CPU
// kernels (*_cpu_kernel.cpp). Included into each capability's copy, so the helpers live in a namespace
// named by CPU_CAPABILITY, like the Vectorized types they use.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

namespace alignops::vec {
namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

// Loads 2 * kW elements as two float vectors.
template <typename scalar_t>
inline void load2_float(const scalar_t* p, Vec& a, Vec& b) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + kW);
  } else {
    at::vec::load_to_float<scalar_t>(p, a, b);
  }
}

// Stores 2 * kW values from two float vectors, rounding once to scalar_t.
template <typename scalar_t>
inline void store2_float(scalar_t* p, const Vec& a, const Vec& b) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    a.store(p);
    b.store(p + kW);
  } else {
    at::vec::convert_from_float<scalar_t>(a, b).store(p);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace alignops::vec
