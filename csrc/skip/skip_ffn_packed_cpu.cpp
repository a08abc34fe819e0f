// The prepacked-weight registry of alignops::skip_ffn on the CPU (see skip_ffn_packed.h) and the ops that
// fill and query it: skip_ffn_prepack(weights, enable, batch_size), skip_ffn_is_prepacked(w).
//
// Entries hold a weak reference to the weight's TensorImpl, its data pointer and version, and the packed
// oneDNN tensor. A lookup matches the live TensorImpl; a changed data pointer or version (the weight was
// updated in place) repacks; entries whose weight died are dropped on the next registration. The packed
// copy costs the weight's memory once more: registration is explicit (alignops.skip.prepack, or
// patch_ffn_skipping(..., prepack=True)), never automatic.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

#include "common/checks.h"
#include "skip/skip_ffn_packed.h"

namespace alignops::skip {
namespace {

struct Entry {
  c10::weak_intrusive_ptr<c10::TensorImpl> weight;
  const void* data;
  int64_t version;
  std::optional<int64_t> batch_size;
  at::Tensor packed;
};

std::mutex registry_mutex;
std::vector<Entry> registry;

int64_t version_of(const at::Tensor& w) {
  return w.is_inference() ? 0 : static_cast<int64_t>(w._version());  // inference tensors keep no counter
}

// Boxed calls: the mkldnn ops' unboxed C++ signatures are internal to PyTorch.
at::Tensor call(const char* name, const char* overload, torch::jit::Stack stack) {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, overload);
  op.callBoxed(&stack);
  return stack.at(0).toTensor();
}

at::Tensor pack(const at::Tensor& w, std::optional<int64_t> batch_size) {
  at::NoGradGuard no_grad;
  return call("mkldnn::_reorder_linear_weight", "", {w.detach().contiguous(), batch_size});
}

bool matches(const Entry& e, const at::Tensor& w) {
  return !e.weight.expired() && e.weight._unsafe_get_target() == w.unsafeGetTensorImpl();
}

void check_packable(const at::Tensor& w) {
  check_device(w, c10::DeviceType::CPU, "each weight");
  check_dim(w, 2, "each weight", "[out_features, in_features]");
  TORCH_CHECK_VALUE(w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat,
                    "prepacked weights must be bfloat16 or float32, got ", dtype_name(w.scalar_type()));
  TORCH_CHECK_VALUE(at::hasMKLDNN(), "prepacked weights need PyTorch built with oneDNN (MKLDNN)");
}

void skip_ffn_prepack_cpu(at::TensorList weights, bool enable, std::optional<int64_t> batch_size) {
  TORCH_CHECK_VALUE(!batch_size.has_value() || *batch_size > 0, "batch_size must be > 0, got ",
                    batch_size.value_or(0));
  if (enable) {
    for (const auto& w : weights) {
      check_packable(w);
    }
  }
  std::lock_guard<std::mutex> lock(registry_mutex);
  std::erase_if(registry, [&](const Entry& e) {
    if (e.weight.expired()) {
      return true;
    }
    for (const auto& w : weights) {
      if (matches(e, w)) {
        return true;  // re-registered (fresh pack below) or removed
      }
    }
    return false;
  });
  if (!enable) {
    return;
  }
  for (const auto& w : weights) {
    registry.push_back(Entry{c10::weak_intrusive_ptr<c10::TensorImpl>(w.getIntrusivePtr()), w.data_ptr(),
                             version_of(w), batch_size, pack(w, batch_size)});
  }
}

bool skip_ffn_is_prepacked_cpu(const at::Tensor& w) { return prepacked(w).has_value(); }

}  // namespace

std::optional<at::Tensor> prepacked(const at::Tensor& w) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  if (registry.empty()) {
    return std::nullopt;
  }
  for (auto& e : registry) {
    if (!matches(e, w)) {
      continue;
    }
    if (e.data != w.data_ptr() || e.version != version_of(w)) {
      e.packed = pack(w, e.batch_size);  // updated in place since it was packed
      e.data = w.data_ptr();
      e.version = version_of(w);
    }
    return e.packed;
  }
  return std::nullopt;
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  return call("mkldnn::_linear_pointwise", "",
              {x, packed, bias.has_value() ? c10::IValue(*bias) : c10::IValue(), std::string("none"),
               c10::List<std::optional<at::Scalar>>(), c10::IValue()});
}

at::Tensor packed_linear_add(const at::Tensor& x, const at::Tensor& other, const at::Tensor& packed,
                             const std::optional<at::Tensor>& bias) {
  return call("mkldnn::_linear_pointwise", "binary",
              {x, other, packed, bias.has_value() ? c10::IValue(*bias) : c10::IValue(), std::string("add")});
}

TORCH_LIBRARY_IMPL(alignops, CPU, m) {
  m.impl("skip_ffn_prepack", &skip_ffn_prepack_cpu);
  m.impl("skip_ffn_is_prepacked", &skip_ffn_is_prepacked_cpu);
}

}  // namespace alignops::skip
