// Integer codes of alignops::policy_loss; python/alignops/_codes.py (PolicyLossType, ImportanceSamplingLevel)
// holds the same names and values, and tests/test_codes.py checks them through alignops::codes.
#pragma once

#include <cstdint>

namespace alignops::policy {

// TRL GRPOConfig.loss_type, in the order of alignops.reference.policy.LOSS_TYPES.
enum PolicyLossType : int64_t {
  kGrpo = 0,
  kBnpo = 1,
  kDrGrpo = 2,
  kDapo = 3,
  kCispo = 4,
  kSapo = 5,
  kLuspo = 6,
  kVespo = 7,
  kNumPolicyLossTypes = 8,
};

// TRL GRPOConfig.importance_sampling_level.
enum ImportanceSamplingLevel : int64_t {
  kToken = 0,
  kSequence = 1,
};

// Columns of row_stats (documented with the schema in csrc/policy/policy_loss_cpu.cpp; RowStat in
// python/alignops/_codes.py).
enum RowStat : int64_t {
  kMaskCount = 0,
  kClipLow = 1,
  kClipHigh = 2,
  kClipRegion = 3,
  kKl = 4,
  kRatio = 5,
  kPhi = 6,
  kRowLoss = 7,
  kNumRowStats = 8,
};

}  // namespace alignops::policy
