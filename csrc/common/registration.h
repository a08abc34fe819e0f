// def_checked: how a family's C++ file defines an op whose argument checks are needed outside C++.
//
// Each op's schema is written once, in the TORCH_LIBRARY_FRAGMENT of the file that holds its CPU kernel (the
// library itself, with the build's cuda_archs(), is csrc/registration.cpp).
#pragma once

#include <torch/library.h>

#include <string>

namespace alignops {

// Defines the op of `schema` ("name(args) -> returns") and `name_check(args) -> ()`, the op's argument checks as
// an op of their own: the same file registers its check function for it (CompositeImplicitAutograd, so it runs on
// any device and on fake tensors), its CPU kernel calls the same function, and the Python side (the Triton twin,
// python/alignops/ops/_registration.py) calls the op. The arguments are written once, here, and the checks once,
// in C++. Use it for every op with a Triton twin or a Python caller that checks before choosing a backend.
inline void def_checked(torch::Library& m, const std::string& schema) {
  const size_t open = schema.find('(');
  const size_t close = schema.rfind(") -> ");
  TORCH_INTERNAL_ASSERT(open != std::string::npos && close != std::string::npos && open < close, schema);
  m.def(schema.c_str());
  std::string args = schema.substr(open, close + 1 - open);
  // The checks read, never write: an in-place op's "Tensor(a!) x" is a plain "Tensor x" for its check op.
  for (size_t at = args.find("(a!)"); at != std::string::npos; at = args.find("(a!)")) {
    args.erase(at, 4);
  }
  m.def((schema.substr(0, open) + "_check" + args + " -> ()").c_str());
}

}  // namespace alignops
