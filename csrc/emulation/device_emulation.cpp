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

#include "../ops/batch_norm_relu.h"
#include "../ops/soft_couple.h"
#include "../ops/soft_couple_launch.h"
#include "../ops/spectral_norm.h"

#ifndef ITCONV_SOFT_COUPLE_DEVICE
#define ITCONV_SOFT_COUPLE_DEVICE "../ops/cuda/soft_couple_device.cuh"
#endif
#ifndef ITCONV_BATCH_NORM_RELU_DEVICE
#define ITCONV_BATCH_NORM_RELU_DEVICE "../ops/cuda/batch_norm_relu_device.cuh"
#endif
#ifndef ITCONV_SPECTRAL_NORM_DEVICE
#define ITCONV_SPECTRAL_NORM_DEVICE "../ops/cuda/spectral_norm_device.cuh"
#endif

namespace itconv_fast {
namespace soft_couple {
namespace emulated {
#include ITCONV_SOFT_COUPLE_DEVICE
}  // namespace emulated

// soft_couple_ as the CUDA launcher runs it (same checks, groups, plan, modes and buckets), each launch
// emulated. max_items: blocks per launch (the CUDA launcher uses 2^31 - 1; small values force split
// launches); per_thread: elements per thread (the CUDA launcher picks 1, 2 or 4 by the SM count).
void soft_couple_emulated(std::vector<at::Tensor> grads, std::vector<int64_t> group_sizes, double lam,
                          const std::string& kernel, c10::optional<double> bandwidth, int64_t skip_first,
                          int64_t max_items, int64_t per_thread) {
  for (const auto& t : grads) TORCH_CHECK_VALUE(t.is_cpu(), "the emulation runs on CPU tensors");
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;
  const auto groups = prepare_groups(grads, group_sizes, lam, kernel, bandwidth, skip_first, write_back);
  if (groups.empty()) return;
  for_each_launch(groups, max_items, static_cast<int>(per_thread), [&](at::ScalarType dtype, const LaunchTable& table,
                                                                       int bucket) {
    const std::vector<int64_t> packed = table.packed(/*float_coeffs=*/dtype != at::kDouble);
    const int64_t* d = packed.data();
    const int64_t* items = d + table.items_offset();
    const int64_t* ptrs = d + table.ptrs_offset();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "soft_couple_emulated", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto* coeffs = reinterpret_cast<const acc_t*>(d + table.coeffs_offset());
      const size_t smem = static_cast<size_t>(bucket) * bucket * sizeof(acc_t);
      const int per = static_cast<int>(per_thread);
      itconv_emulation::emulate_launch(static_cast<unsigned>(table.n_items()), kThreads, smem, [&] {
        switch (bucket) {
          case 0: emulated::soft_couple_kernel<scalar_t, 0>(d, items, ptrs, coeffs, per); break;
          case 16: emulated::soft_couple_kernel<scalar_t, 16>(d, items, ptrs, coeffs, per); break;
          default: emulated::soft_couple_kernel<scalar_t, 64>(d, items, ptrs, coeffs, per); break;
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

// power_iteration_matrix_ as the CUDA launcher runs it: one block of kThreads per matrix, matrix b read
// through the pointer table (here built on the host from the stacked tensor or, for the list form, from
// each kernel where it lies).
std::tuple<at::Tensor, at::Tensor> run_emulated(const std::vector<int64_t>& table, const at::Tensor& like, at::Tensor u,
                                                int64_t B, int64_t rows, int64_t cols, int64_t n_iter, bool multi_block) {
  at::Tensor uc = u.contiguous();
  at::Tensor v = at::empty({B, cols}, like.options());
  at::Tensor sigma = at::empty({B}, like.options());
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "power_iteration_matrix_emulated", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* p = table.data();
    scalar_t* ud = uc.data_ptr<scalar_t>();
    scalar_t* vd = v.data_ptr<scalar_t>();
    scalar_t* sd = sigma.data_ptr<scalar_t>();
    if (!multi_block) {
      itconv_emulation::emulate_launch(static_cast<unsigned>(B), emulated::kThreads, 0, [&] {
        emulated::power_iteration_matrix_kernel<scalar_t>(p, ud, vd, sd, rows, cols, n_iter);
      });
      return;
    }
    const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
    std::vector<acc_t> partial(B * tiles * cols), tile_sq(B * tiles);
    const auto grid_tiles = static_cast<unsigned>(B * tiles), grid_b = static_cast<unsigned>(B);
    for (int64_t it = 0; it < n_iter; ++it) {  // the launcher's four launches per step, in order
      itconv_emulation::emulate_launch(grid_tiles, emulated::kThreads, 0, [&] {
        emulated::matrix_tiles_wtu_kernel<scalar_t>(p, ud, partial.data(), rows, cols, tiles);
      });
      itconv_emulation::emulate_launch(grid_b, emulated::kThreads, 0, [&] {
        emulated::matrix_finish_v_kernel<scalar_t>(partial.data(), vd, cols, tiles);
      });
      itconv_emulation::emulate_launch(grid_tiles, emulated::kThreads, 0, [&] {
        emulated::matrix_tiles_wv_kernel<scalar_t>(p, vd, ud, tile_sq.data(), rows, cols, tiles);
      });
      itconv_emulation::emulate_launch(grid_b, emulated::kThreads, 0, [&] {
        emulated::matrix_finish_u_kernel<scalar_t>(tile_sq.data(), ud, sd, rows, tiles);
      });
    }
  });
  if (!uc.is_same(u)) u.copy_(uc);
  return {v, sigma};
}

// multi_block: None follows the CUDA launcher's choice (use_multi_block), True / False forces a path.
std::tuple<at::Tensor, at::Tensor> power_iteration_matrix_emulated(const at::Tensor& weight, at::Tensor u,
                                                                   int64_t n_iter, c10::optional<bool> multi_block) {
  const auto [B, rows, cols] = check_matrix(weight, u, n_iter);
  const at::Tensor w = weight.contiguous();
  std::vector<int64_t> table(B);
  for (int64_t b = 0; b < B; ++b) {
    table[b] = reinterpret_cast<int64_t>(w.data_ptr()) + b * rows * cols * static_cast<int64_t>(w.element_size());
  }
  return run_emulated(table, w, u, B, rows, cols, n_iter, multi_block.value_or(use_multi_block(rows, cols)));
}

std::tuple<at::Tensor, at::Tensor> power_iteration_matrix_list_emulated(std::vector<at::Tensor> weights, at::Tensor u,
                                                                        int64_t n_iter, c10::optional<bool> multi_block) {
  const auto shape = check_kernel_list(weights, "power_iteration_matrix_");
  const int64_t B = shape[0], rows = shape[1], cols = shape[2] * shape[3] * shape[4];
  check_matrix(weights[0].unsqueeze(0).expand(shape), u, n_iter);
  std::vector<at::Tensor> kernels;
  std::vector<int64_t> table;
  for (const auto& w : weights) {
    kernels.push_back(w.contiguous());
    table.push_back(reinterpret_cast<int64_t>(kernels.back().data_ptr()));
  }
  return run_emulated(table, weights[0], u, B, rows, cols, n_iter, multi_block.value_or(use_multi_block(rows, cols)));
}

}  // namespace spectral

namespace batch_norm_relu {
namespace emulated {
#define ITCONV_BN_LAUNCH(kernel, grid, block, ...) \
  itconv_emulation::emulate_launch((grid), (block), 0, [&] {    \
    auto kernel_fn = kernel;                                   \
    kernel_fn(__VA_ARGS__);                                    \
  })
#include ITCONV_BATCH_NORM_RELU_DEVICE
#undef ITCONV_BN_LAUNCH
}  // namespace emulated

// batch_norm_relu as the CUDA launcher runs it (the same checks, layouts and launch sequence: bn_forward and
// bn_backward of the device file), on CPU tensors; max_blocks caps the elementwise grid (the launcher: 8 blocks
// per SM), small values exercise the grid-stride loops.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_emulated(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, double momentum, double eps, int64_t max_blocks) {
  return emulated::bn_forward(input, weight, bias, running_mean, running_var, momentum, eps, max_blocks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_emulated(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, int64_t max_blocks) {
  return emulated::bn_backward(grad_out, input, weight, bias, save_mean, save_invstd, max_blocks);
}

}  // namespace batch_norm_relu
}  // namespace itconv_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "The CUDA kernels' device code run on the CPU under an emulation shim (tests only).";
  m.def("soft_couple_", &itconv_fast::soft_couple::soft_couple_emulated, "soft_couple_ through the emulated CUDA kernel",
        pybind11::arg("grads"), pybind11::arg("group_sizes"), pybind11::arg("lam"), pybind11::arg("kernel") = "uniform",
        pybind11::arg("bandwidth") = c10::optional<double>(), pybind11::arg("skip_first") = 0,
        pybind11::arg("max_items") = itconv_fast::soft_couple::kMaxGridX,
        pybind11::arg("per_thread") = itconv_fast::soft_couple::kPerThread);
  m.def("power_iteration_matrix_", &itconv_fast::spectral::power_iteration_matrix_emulated,
        "power_iteration_matrix_ through the emulated CUDA kernel", pybind11::arg("weight"), pybind11::arg("u"),
        pybind11::arg("n_iter"), pybind11::arg("multi_block") = c10::optional<bool>());
  m.def("power_iteration_matrix_list_", &itconv_fast::spectral::power_iteration_matrix_list_emulated,
        "power_iteration_matrix_.list through the emulated CUDA kernel (read through the pointer table)",
        pybind11::arg("weights"), pybind11::arg("u"), pybind11::arg("n_iter"),
        pybind11::arg("multi_block") = c10::optional<bool>());
  m.def("batch_norm_relu", &itconv_fast::batch_norm_relu::batch_norm_relu_emulated,
        "batch_norm_relu through the emulated CUDA kernels", pybind11::arg("input"), pybind11::arg("weight"),
        pybind11::arg("bias"), pybind11::arg("running_mean"), pybind11::arg("running_var"), pybind11::arg("momentum"),
        pybind11::arg("eps"), pybind11::arg("max_blocks") = 1 << 20);
  m.def("batch_norm_relu_backward", &itconv_fast::batch_norm_relu::batch_norm_relu_backward_emulated,
        "batch_norm_relu_backward through the emulated CUDA kernels", pybind11::arg("grad_out"), pybind11::arg("input"),
        pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("save_mean"), pybind11::arg("save_invstd"),
        pybind11::arg("max_blocks") = 1 << 20);
  m.def("emulate_syncthreads_deadlock", [] {
    // A barrier reached by half the block only: the shim must report it, not hang.
    itconv_emulation::emulate_launch(1, 64, 0, [] {
      if (threadIdx.x < 16) __syncthreads();  // half of warp 0 here, the other half at a shuffle
      else __shfl_down_sync(0xffffffffu, 1.0f, 1);
    });
  });
}
