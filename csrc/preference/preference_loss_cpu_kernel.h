// The pair loop of preference_loss, compiled once per CPU capability (see CMakeLists.txt).
#pragma once

#include "preference/preference_loss_common.h"

namespace alignops::preference {

struct PreferenceLossKernels {
  // Fills in.loss, the rewards and (when defined and non-empty) in.grad.
  void (*forward)(PreferenceInputs& in, const Params<double>& params, bool compute_grad);
};

namespace DEFAULT {
extern const PreferenceLossKernels preference_loss_kernels;
}
#if ALIGNOPS_X86
namespace AVX2 {
extern const PreferenceLossKernels preference_loss_kernels;
}
#endif

}  // namespace alignops::preference
