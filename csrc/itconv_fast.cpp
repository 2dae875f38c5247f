// The extension module `itconv_fast._C`. Importing it loads this library, whose static initialisers
// register every op with the PyTorch dispatcher; the module itself holds no Python functions.
#include <Python.h>
#include <torch/library.h>

#include <string>

#ifndef ITCONV_TORCH_VERSION
#define ITCONV_TORCH_VERSION "unknown"
#endif

namespace itconv_fast {

// Which torch (and whether CUDA) this library was compiled against, so that the Python side can
// refuse a mismatched build with a clear message instead of crashing later.
std::string build_info() {
  std::string info = std::string("torch=") + ITCONV_TORCH_VERSION;
#ifdef ITCONV_WITH_CUDA
  info += ";cuda=1";
#else
  info += ";cuda=0";
#endif
  return info;
}

TORCH_LIBRARY(itconv_fast, m) {
  m.def("_build_info() -> str", &build_info);
}

}  // namespace itconv_fast

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
