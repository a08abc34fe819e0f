// Checks that read tensor values (ids in range). Unlike checks.h they read data, so they run where the values are:
// written with ATen reductions, one function serves the CPU launchers and, through an op `<op>_check_values`, the
// Python side before a GPU or reference backend (one host sync there).
#pragma once

#include <ATen/ATen.h>

namespace alignops {

// Every target either ignore_index or in [0, vocab); the message names the first one that is not.
inline void check_target_values(const at::Tensor& targets, int64_t vocab, int64_t ignore_index) {
  const auto bad = (((targets < 0) | (targets >= vocab)) & (targets != ignore_index)).nonzero();
  if (bad.numel() > 0) {
    const int64_t n = bad[0][0].item<int64_t>();
    TORCH_CHECK_VALUE(false, "targets[", n, "] = ", targets[n].item<int64_t>(),
                      " is out of range: targets must lie in [0, ", vocab, ") or equal ignore_index");
  }
}

}  // namespace alignops
