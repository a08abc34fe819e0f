// Run-time choice between the portable and the AVX2 copies of a vectorised CPU kernel.
// ALIGNOPS_CPU_CAPABILITY=default forces the portable copy (the tests run both).
#pragma once

#include <cstdlib>
#include <string_view>

namespace alignops {

inline bool cpu_has_avx2() {
#if ALIGNOPS_X86
  const char* forced = std::getenv("ALIGNOPS_CPU_CAPABILITY");
  if (forced != nullptr && std::string_view(forced) == "default") {
    return false;
  }
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

template <typename Table>
const Table& pick_cpu_kernels(const Table& portable, [[maybe_unused]] const Table* avx2) {
  return (avx2 != nullptr && cpu_has_avx2()) ? *avx2 : portable;
}

}  // namespace alignops
