// The prepacked-weight registry of alignops::skip_ffn on the CPU (see skip_ffn_packed.h) and the ops that
// fill and query it: skip_ffn_prepack(weights, enable, batch_size), skip_ffn_is_prepacked(w).
//
// Entries hold weak references to the weight's TensorImpl and StorageImpl (which keep those objects'
// addresses from being reused), its storage offset and version, and the packed oneDNN tensor. A lookup
// matches the live TensorImpl; a new storage (`param.data = other`), offset or version (an in-place update
// through the tensor) repacks; entries whose weight died are dropped on the next registration. Changes
// that bump no version counter (through `.data`) are not seen: register the weight again after them.
// Inference tensors keep no version counter and are refused. The packed copy costs the weight's memory
// once more: registration is explicit (alignops.skip.prepack, or patch_ffn_skipping(..., prepack=True)).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "common/checks.h"
#include "common/registration.h"
#include "skip/skip_ffn_packed.h"

namespace alignops::skip {
namespace {

struct Entry {
  c10::weak_intrusive_ptr<c10::TensorImpl> weight;
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  int64_t offset;
  int64_t version;
  std::optional<int64_t> batch_size;
  at::Tensor packed;
};

std::mutex registry_mutex;
std::vector<Entry> registry;

bool same_storage(const Entry& e, const at::Tensor& w) {
  return !e.storage.expired() && e.storage._unsafe_get_target() == w.storage().unsafeGetStorageImpl() &&
         e.offset == w.storage_offset();
}

Entry make_entry(const at::Tensor& w, std::optional<int64_t> batch_size, at::Tensor packed) {
  return Entry{c10::weak_intrusive_ptr<c10::TensorImpl>(w.getIntrusivePtr()),
               w.storage().getWeakStorageImpl(),
               w.storage_offset(),
               static_cast<int64_t>(w._version()),
               batch_size,
               std::move(packed)};
}

// Boxed calls: the mkldnn ops' unboxed C++ signatures are internal to PyTorch. The handles are looked up
// once (function-local statics): the GEMMs are on skip_ffn's hot path.
c10::OperatorHandle mkldnn_op(const char* name, const char* overload) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload);
}

at::Tensor call(const c10::OperatorHandle& op, torch::jit::Stack stack) {
  op.callBoxed(&stack);
  return stack.at(0).toTensor();
}

at::Tensor pack(const at::Tensor& w, std::optional<int64_t> batch_size) {
  static const auto reorder = mkldnn_op("mkldnn::_reorder_linear_weight", "");
  at::NoGradGuard no_grad;
  return call(reorder, {w.detach().contiguous(), batch_size});
}

bool matches(const Entry& e, const at::Tensor& w) {
  return !e.weight.expired() && e.weight._unsafe_get_target() == w.unsafeGetTensorImpl();
}

void check_packable(const at::Tensor& w) {
  check_device(w, c10::DeviceType::CPU, "each weight");
  check_dim(w, 2, "each weight", "[out_features, in_features]");
  TORCH_CHECK_VALUE(w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat,
                    "prepacked weights must be bfloat16 or float32, got ", dtype_name(w.scalar_type()));
  TORCH_CHECK_VALUE(!w.is_inference(),
                    "an inference tensor keeps no version counter, so an in-place update could not be seen: "
                    "prepack weights created outside torch.inference_mode()");
  TORCH_CHECK_VALUE(at::hasMKLDNN(), "prepacked weights need PyTorch built with oneDNN (MKLDNN)");
}

void skip_ffn_prepack_cpu(at::TensorList weights, bool enable, std::optional<int64_t> batch_size) {
  TORCH_CHECK_VALUE(!batch_size.has_value() || *batch_size > 0, "batch_size must be > 0, got ", batch_size.value_or(0));
  // Pack first (outside the lock, and so that a failure leaves the registry as it was).
  std::vector<Entry> fresh;
  if (enable) {
    for (const auto& w : weights) {
      check_packable(w);
      if (std::none_of(fresh.begin(), fresh.end(), [&](const Entry& e) { return matches(e, w); })) {
        fresh.push_back(make_entry(w, batch_size, pack(w, batch_size)));
      }
    }
  }
  std::lock_guard<std::mutex> lock(registry_mutex);
  std::erase_if(registry, [&](const Entry& e) {
    return e.weight.expired() ||
           std::any_of(weights.begin(), weights.end(), [&](const at::Tensor& w) { return matches(e, w); });
  });
  for (auto& e : fresh) {
    registry.push_back(std::move(e));
  }
}

// Registered (without repacking: a query has no side effect).
bool skip_ffn_is_prepacked_cpu(const at::Tensor& w) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  return std::any_of(registry.begin(), registry.end(), [&](const Entry& e) { return matches(e, w); });
}

}  // namespace

std::optional<at::Tensor> prepacked(const at::Tensor& w) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  for (auto& e : registry) {
    if (!matches(e, w)) {
      continue;
    }
    if (!same_storage(e, w) || e.version != static_cast<int64_t>(w._version())) {
      e = make_entry(w, e.batch_size, pack(w, e.batch_size));  // changed since it was packed
    }
    return e.packed;
  }
  return std::nullopt;
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  static const auto linear = mkldnn_op("mkldnn::_linear_pointwise", "");
  return call(linear, {x, packed, bias.has_value() ? c10::IValue(*bias) : c10::IValue(), std::string("none"),
                       c10::List<std::optional<at::Scalar>>(), c10::IValue()});
}

at::Tensor packed_linear_add(const at::Tensor& x, const at::Tensor& other, const at::Tensor& packed,
                             const std::optional<at::Tensor>& bias) {
  static const auto linear_add = mkldnn_op("mkldnn::_linear_pointwise", "binary");
  return call(linear_add,
              {x, other, packed, bias.has_value() ? c10::IValue(*bias) : c10::IValue(), std::string("add")});
}

// Any device: registering checks for CPU weights itself, while dropping an entry or asking must work for a
// weight that has since moved (module.to("cuda") keeps the tensor object and gives it a new storage).
// The schemas of this file's ops, defined here and nowhere else.
TORCH_LIBRARY_FRAGMENT(alignops, m) {
  // CPU inference: keep a oneDNN-prepacked copy of each weight (enable) or drop it (not enable); skip_ffn
  // and skip_ffn_ then multiply with the packed copy (csrc/skip/skip_ffn_packed.h). batch_size: the row
  // count oneDNN tunes the layout for (None: its default).
  m.def("skip_ffn_prepack(Tensor[] weights, bool enable, int? batch_size) -> ()");

  m.def("skip_ffn_is_prepacked(Tensor w) -> bool");
}

TORCH_LIBRARY_IMPL(alignops, CompositeExplicitAutograd, m) {
  m.impl("skip_ffn_prepack", &skip_ffn_prepack_cpu);
  m.impl("skip_ffn_is_prepacked", &skip_ffn_is_prepacked_cpu);
}

}  // namespace alignops::skip
