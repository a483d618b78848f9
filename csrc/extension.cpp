// The Python module meta_kernels._C: importing it loads the op library (registering the ops)
// and exposes build_info(). Kept apart from ops.cpp so CMake can build the ops without Python.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <string>

// Set by setup.py / CMake so build_info() can say what this binary was built with.
#ifndef META_KERNELS_CUDA_ARCHS
#define META_KERNELS_CUDA_ARCHS ""
#endif
#ifndef META_KERNELS_TORCH_VERSION
#define META_KERNELS_TORCH_VERSION "unknown"
#endif

namespace {
pybind11::dict build_info() {
  pybind11::dict info;
  info["cpu"] = true;
#ifdef META_KERNELS_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = std::string(META_KERNELS_CUDA_ARCHS);
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["num_threads"] = at::get_num_threads();
  info["torch_version_built"] = std::string(META_KERNELS_TORCH_VERSION);
  return info;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "meta_kernels compiled ops; importing this module registers them with torch";
  m.def("build_info", &build_info, "What this build of meta_kernels._C contains");
}
