// The extension module `itconv_fast._C`. Importing it loads this library, whose static initialisers
// register every op with the PyTorch dispatcher. The module's one Python function is a faster door
// to the same dispatcher op for the call with hundreds of tensors (see soft_couple_groups below).
#include <torch/extension.h>
#include <torch/library.h>

#include "ops/cpu/cpu_features.h"

#include <string>
#include <vector>

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
#ifdef ITCONV_CUDA_ARCH_LIST
  info += std::string(";cuda_arch_list=") + ITCONV_CUDA_ARCH_LIST;
#endif
#else
  info += ";cuda=0";
#endif
  return info;
}

TORCH_LIBRARY(itconv_fast, m) {
  m.def("_build_info() -> str", &build_info);
  m.def("_cpu_info() -> str", [] { return itconv_fast::cpu::describe(); });
}

// torch.ops.itconv_fast.soft_couple_ with a ResNet-101's 288 gradients spends ~30 us boxing the
// list into IValues and back, a fifth of the whole op at width 16. This calls the same op through
// the dispatcher's typed (unboxed) interface instead: same kernels, same dispatch keys (modes,
// autograd and fake tensors still apply), a plain list conversion, and the flattening of the groups
// done here rather than in Python. Returns false, having done nothing, when the members are not all
// on one device (the Python wrapper then makes one call per device). It keeps the GIL: releasing it
// would make every tensor's release at the end re-acquire it, 288 times.
bool soft_couple_groups(const std::vector<std::vector<at::Tensor>>& groups, double lam, const std::string& kernel,
                        std::optional<double> bandwidth, int64_t skip_first) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("itconv_fast::soft_couple_", "")
                             .typed<void(at::TensorList, at::IntArrayRef, double, c10::string_view,
                                         std::optional<double>, int64_t)>();
  std::vector<at::Tensor> flat;
  std::vector<int64_t> sizes;
  sizes.reserve(groups.size());
  for (const auto& group : groups) {
    sizes.push_back(static_cast<int64_t>(group.size()));
    for (const auto& t : group) {
      if (!flat.empty() && t.device() != flat.front().device()) return false;
      flat.push_back(t);
    }
  }
  if (!flat.empty()) op.call(flat, sizes, lam, kernel, bandwidth, skip_first);
  return true;
}

}  // namespace itconv_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("soft_couple_groups", &itconv_fast::soft_couple_groups,
        "torch.ops.itconv_fast.soft_couple_ on a list of groups, unboxed; False if the groups span devices",
        pybind11::arg("groups"), pybind11::arg("lam"), pybind11::arg("kernel"), pybind11::arg("bandwidth"),
        pybind11::arg("skip_first"));
}
