// The alignops library and the _C module. Each op's schema is defined once, by the TORCH_LIBRARY_FRAGMENT of the
// file that holds its CPU kernel; backends register their kernels from their own files with TORCH_LIBRARY_IMPL;
// autograd, fake kernels and the Triton ops live in python/alignops/ops/.
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace {

// The SM architectures this build holds CUDA code for (empty for a CPU-only build), e.g. {90}.
std::vector<int64_t> cuda_archs() {
  std::vector<int64_t> archs;
  const std::string list = ALIGNOPS_CUDA_ARCHS;  // CMake's form: "80-real;90-real;90-virtual"
  size_t pos = 0;
  while (pos < list.size()) {
    size_t end = list.find(';', pos);
    end = end == std::string::npos ? list.size() : end;
    const std::string item = list.substr(pos, end - pos);
    if (!item.empty() && item.find("virtual") == std::string::npos) {
      archs.push_back(std::stoll(item));
    }
    pos = end + 1;
  }
  return archs;
}

}  // namespace

// An empty module: `import alignops._C` only has to load this library so that the registrations of every file run.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(alignops, m) {
  // Every other schema is in the TORCH_LIBRARY_FRAGMENT of the file that holds its op's CPU kernel
  // (csrc/<family>/<op>_cpu.cpp), next to its checks, with def_checked (csrc/common/registration.h).
  m.def("cuda_archs() -> int[]", &cuda_archs);
}
