// itconv_fast._device_emulation: the CUDA kernels' device code (csrc/ops/cuda/*_device.cuh), compiled for
// the CPU under the CUDA shim (cuda_shim.h) and launched over the real launch plan, so that the CPU tests
// execute every __global__ body against the references. A test build, not a backend: one fiber per CUDA
// thread is slow by design.
//
// The device files are included by macro so that a test can compile mutated copies of them (a planted
// off-by-one, a removed barrier) and show that the harness catches the mutants (tests/test_device_emulation.py).
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <string>
#include <tuple>
#include <vector>

#include "cuda_shim.h"

#include "../ops/soft_couple.h"
#include "../ops/soft_couple_launch.h"
#include "../ops/spectral_norm.h"

#ifndef ITCONV_SOFT_COUPLE_DEVICE
#define ITCONV_SOFT_COUPLE_DEVICE "../ops/cuda/soft_couple_device.cuh"
#endif
#ifndef ITCONV_SPECTRAL_NORM_DEVICE
#define ITCONV_SPECTRAL_NORM_DEVICE "../ops/cuda/spectral_norm_device.cuh"
#endif

namespace itconv_fast {
namespace soft_couple {
namespace emulated {
#include ITCONV_SOFT_COUPLE_DEVICE
}  // namespace emulated

// soft_couple_ as the CUDA launcher runs it (same checks, groups, plan and buckets), each launch emulated.
// max_items: blocks per launch (the CUDA launcher uses 2^31 - 1; small values force split launches).
void soft_couple_emulated(std::vector<at::Tensor> grads, std::vector<int64_t> group_sizes, double lam,
                          const std::string& kernel, c10::optional<double> bandwidth, int64_t skip_first,
                          int64_t max_items) {
  for (const auto& t : grads) TORCH_CHECK_VALUE(t.is_cpu(), "the emulation runs on CPU tensors");
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;
  const auto groups = prepare_groups(grads, group_sizes, lam, kernel, bandwidth, skip_first, write_back);
  if (groups.empty()) return;
  for_each_launch(groups, max_items, [&](at::ScalarType dtype, const LaunchTable& table, int bucket) {
    const std::vector<int64_t> packed = table.packed();
    const int64_t* d = packed.data();
    const int64_t* items = d + table.items_offset();
    const int64_t* ptrs = d + table.ptrs_offset();
    const auto* coeffs = reinterpret_cast<const double*>(d + table.coeffs_offset());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "soft_couple_emulated", [&] {
      itconv_emulation::emulate_launch(static_cast<unsigned>(table.n_items()), kThreads, [&] {
        switch (bucket) {
          case 0: emulated::soft_couple_kernel<scalar_t, 0>(d, items, ptrs, coeffs); break;
          case 16: emulated::soft_couple_kernel<scalar_t, 16>(d, items, ptrs, coeffs); break;
          default: emulated::soft_couple_kernel<scalar_t, 64>(d, items, ptrs, coeffs); break;
        }
      });
    });
  });
  finish_write_back(write_back);
}

}  // namespace soft_couple

namespace spectral {
namespace emulated {
#include ITCONV_SPECTRAL_NORM_DEVICE
}  // namespace emulated

// power_iteration_matrix_ as the CUDA launcher runs it: one block of kThreads per matrix.
std::tuple<at::Tensor, at::Tensor> power_iteration_matrix_emulated(const at::Tensor& weight, at::Tensor u,
                                                                   int64_t n_iter) {
  const auto [B, rows, cols] = check_matrix(weight, u, n_iter);
  const at::Tensor w = weight.contiguous();
  at::Tensor uc = u.contiguous();
  at::Tensor v = at::empty({B, cols}, weight.options());
  at::Tensor sigma = at::empty({B}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "power_iteration_matrix_emulated", [&] {
    itconv_emulation::emulate_launch(static_cast<unsigned>(B), emulated::kThreads, [&] {
      emulated::power_iteration_matrix_kernel<scalar_t>(w.data_ptr<scalar_t>(), uc.data_ptr<scalar_t>(),
                                                        v.data_ptr<scalar_t>(), sigma.data_ptr<scalar_t>(), rows, cols,
                                                        n_iter);
    });
  });
  if (!uc.is_same(u)) u.copy_(uc);
  return {v, sigma};
}

}  // namespace spectral
}  // namespace itconv_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "The CUDA kernels' device code run on the CPU under an emulation shim (tests only).";
  m.def("soft_couple_", &itconv_fast::soft_couple::soft_couple_emulated, "soft_couple_ through the emulated CUDA kernel",
        pybind11::arg("grads"), pybind11::arg("group_sizes"), pybind11::arg("lam"), pybind11::arg("kernel") = "uniform",
        pybind11::arg("bandwidth") = c10::optional<double>(), pybind11::arg("skip_first") = 0,
        pybind11::arg("max_items") = itconv_fast::soft_couple::kMaxGridX);
  m.def("power_iteration_matrix_", &itconv_fast::spectral::power_iteration_matrix_emulated,
        "power_iteration_matrix_ through the emulated CUDA kernel", pybind11::arg("weight"), pybind11::arg("u"),
        pybind11::arg("n_iter"));
  m.def("emulate_syncthreads_deadlock", [] {
    // A barrier reached by half the block only: the shim must report it, not hang.
    itconv_emulation::emulate_launch(1, 64, [] {
      if (threadIdx.x < 16) __syncthreads();  // half of warp 0 here, the other half at a shuffle
      else __shfl_down_sync(0xffffffffu, 1.0f, 1);
    });
  });
}
