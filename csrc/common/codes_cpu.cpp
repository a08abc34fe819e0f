// alignops::codes(family): the names and values of one family of the integer codes the kernels take, read
// from the C++ enums themselves, so that tests/test_codes.py can hold python/alignops/_codes.py (the Python
// and Triton side) to them. Names are the enumerators without their `k` prefix.
#include <torch/library.h>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/counter_hash.h"
#include "common/registration.h"
#include "ctc_segmentation/ctc_segmentation_cpu_kernel.h"
#include "distillation/fused_linear_distillation_cpu_kernel.h"
#include "policy/policy_codes.h"
#include "preference/preference_loss_math.h"
#include "skip/skip_ffn_cpu_kernel.h"

namespace {

using Codes = std::vector<std::pair<std::string, int64_t>>;

Codes family_codes(const std::string& family) {
  namespace pref = alignops::preference;
  namespace skip = alignops::skip;
  namespace seg = alignops::ctc_segmentation;
  if (family == "loss_type") {
    static_assert(pref::kCpo + 1 == pref::kNumLossTypes, "list every loss type below");
    return {{"Sigmoid", pref::kSigmoid},         {"Hinge", pref::kHinge},       {"Ipo", pref::kIpo},
            {"ExoPair", pref::kExoPair},         {"NcaPair", pref::kNcaPair},   {"Robust", pref::kRobust},
            {"BcoPair", pref::kBcoPair},         {"SppoHard", pref::kSppoHard}, {"Aot", pref::kAot},
            {"ApoZero", pref::kApoZero},         {"ApoDown", pref::kApoDown},   {"Discopop", pref::kDiscopop},
            {"SigmoidNorm", pref::kSigmoidNorm}, {"Simpo", pref::kSimpo},       {"Cpo", pref::kCpo}};
  }
  if (family == "f_divergence") {
    return {{"ReverseKl", pref::kReverseKl},
            {"ForwardKl", pref::kForwardKl},
            {"JsDivergence", pref::kJsDivergence},
            {"AlphaDivergence", pref::kAlphaDivergence}};
  }
  if (family == "activation") {
    return {{"Swiglu", skip::kSwiglu}, {"Gelu", skip::kGelu}, {"GeluTanh", skip::kGeluTanh}};
  }
  if (family == "criterion") {
    return {{"Cosine", skip::kCosine}, {"NormRatio", skip::kNormRatio}};
  }
  if (family == "ctc_segmentation_flag") {
    return {{"BlankTransitionCostZero", seg::kBlankTransitionCostZero},
            {"PreambleTransitionCostZero", seg::kPreambleTransitionCostZero}};
  }
  if (family == "policy_loss_type") {
    namespace pol = alignops::policy;
    static_assert(pol::kVespo + 1 == pol::kNumPolicyLossTypes, "list every policy loss type below");
    return {{"Grpo", pol::kGrpo},   {"Bnpo", pol::kBnpo}, {"DrGrpo", pol::kDrGrpo}, {"Dapo", pol::kDapo},
            {"Cispo", pol::kCispo}, {"Sapo", pol::kSapo}, {"Luspo", pol::kLuspo},   {"Vespo", pol::kVespo}};
  }
  if (family == "importance_sampling_level") {
    return {{"Token", alignops::policy::kToken}, {"Sequence", alignops::policy::kSequence}};
  }
  if (family == "row_stat") {
    namespace pol = alignops::policy;
    return {{"MaskCount", pol::kMaskCount},
            {"ClipLow", pol::kClipLow},
            {"ClipHigh", pol::kClipHigh},
            {"ClipRegion", pol::kClipRegion},
            {"Kl", pol::kKl},
            {"Ratio", pol::kRatio},
            {"Phi", pol::kPhi},
            {"RowLoss", pol::kRowLoss},
            {"NumRowStats", pol::kNumRowStats}};
  }
  if (family == "distillation_mode") {
    using alignops::distillation::Mode;
    static_assert(static_cast<int>(Mode::SkewReverseKL) == 5, "list every mode below");
    return {{"ForwardKl", static_cast<int64_t>(Mode::ForwardKL)},
            {"ReverseKl", static_cast<int64_t>(Mode::ReverseKL)},
            {"Jsd", static_cast<int64_t>(Mode::JSD)},
            {"Tv", static_cast<int64_t>(Mode::TV)},
            {"SkewKl", static_cast<int64_t>(Mode::SkewKL)},
            {"SkewReverseKl", static_cast<int64_t>(Mode::SkewReverseKL)}};
  }
  if (family == "hash_salt") {
    namespace hash = alignops::hash;
    return {{"Bootstrap", hash::kSaltBootstrap}, {"Kgw", hash::kSaltKgw}, {"Gumbel", hash::kSaltGumbel}};
  }
  TORCH_CHECK_VALUE(false,
                    "family must be one of loss_type, f_divergence, activation, criterion, "
                    "ctc_segmentation_flag, policy_loss_type, importance_sampling_level, row_stat, "
                    "distillation_mode, hash_salt, got '",
                    family, "'");
}

std::tuple<std::vector<std::string>, std::vector<int64_t>> codes(const std::string& family) {
  std::vector<std::string> names;
  std::vector<int64_t> values;
  for (const auto& [name, value] : family_codes(family)) {
    names.push_back(name);
    values.push_back(value);
  }
  return {names, values};
}

}  // namespace

// No tensor argument, so no backend key: the CompositeExplicitAutograd kernel also serves calls without one.
// The schemas of this file's ops, defined here and nowhere else.
TORCH_LIBRARY_FRAGMENT(alignops, m) {
  // The names (C++ enumerators without `k`) and values of one family of integer codes the kernels take:
  // loss_type, f_divergence, activation, criterion, ctc_segmentation_flag, policy_loss_type,
  // importance_sampling_level, row_stat, distillation_mode, hash_salt (python/alignops/_codes.py).
  m.def("codes(str family) -> (str[], int[])");
}

TORCH_LIBRARY_IMPL(alignops, CompositeExplicitAutograd, m) { m.impl("codes", &codes); }
