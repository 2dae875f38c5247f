// CUDA launcher of the matrix-mode power iteration: one launch runs all n_iter steps for all B matrices,
// one thread block per matrix (v = W^T u with coalesced column sweeps, u = W v with one warp per row,
// norms by block reduction); large matrices take four tiled launches per step, several blocks per matrix.
// v lives in the returned tensor, u is updated in place. The device code is spectral_norm_device.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../spectral_norm.h"

namespace itconv_fast {
namespace spectral {
namespace {

#include "spectral_norm_device.cuh"

// Runs the power iteration on B contiguous [rows, cols] matrices whose addresses are in `ptrs` (a device
// tensor): one block per matrix, or the four tiled launches per step for large matrices (use_multi_block).
std::tuple<at::Tensor, at::Tensor> run_matrix_kernel(const at::Tensor& ptrs, const at::Tensor& like, at::Tensor& u,
                                                     int64_t B, int64_t rows, int64_t cols, int64_t n_iter) {
  at::Tensor uc = u.contiguous();
  at::Tensor v = at::empty({B, cols}, like.options());
  at::Tensor sigma = at::empty({B}, like.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "power_iteration_matrix_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* p = ptrs.data_ptr<int64_t>();
    scalar_t* ud = uc.data_ptr<scalar_t>();
    scalar_t* vd = v.data_ptr<scalar_t>();
    if (!use_multi_block(rows, cols)) {
      power_iteration_matrix_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
          p, ud, vd, sigma.data_ptr<scalar_t>(), rows, cols, n_iter);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
    const auto acc_options = like.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor partial = at::empty({B * tiles * cols}, acc_options);
    at::Tensor tile_sq = at::empty({B * tiles}, acc_options);
    const auto grid_tiles = static_cast<unsigned>(B * tiles), grid_b = static_cast<unsigned>(B);
    for (int64_t it = 0; it < n_iter; ++it) {
      matrix_tiles_wtu_kernel<scalar_t><<<grid_tiles, kThreads, 0, stream>>>(p, ud, partial.data_ptr<acc_t>(), rows,
                                                                            cols, tiles);
      matrix_finish_v_kernel<scalar_t><<<grid_b, kThreads, 0, stream>>>(partial.data_ptr<acc_t>(), vd, cols, tiles);
      matrix_tiles_wv_kernel<scalar_t><<<grid_tiles, kThreads, 0, stream>>>(p, vd, ud, tile_sq.data_ptr<acc_t>(), rows,
                                                                           cols, tiles);
      matrix_finish_u_kernel<scalar_t><<<grid_b, kThreads, 0, stream>>>(tile_sq.data_ptr<acc_t>(), ud,
                                                                       sigma.data_ptr<scalar_t>(), rows, tiles);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (!uc.is_same(u)) u.copy_(uc);
  return {v, sigma};
}

// The pointers of a stacked [B, ...] tensor's matrices, computed on the device (capturable: no host memory).
at::Tensor stacked_pointers(const at::Tensor& w, int64_t B, int64_t rows, int64_t cols) {
  const int64_t base = reinterpret_cast<int64_t>(w.data_ptr());
  return at::arange(B, w.options().dtype(at::kLong)).mul_(rows * cols * w.element_size()).add_(base);
}

std::tuple<at::Tensor, at::Tensor> power_iteration_matrix_cuda(const at::Tensor& weight, at::Tensor& u, int64_t n_iter) {
  const auto [B, rows, cols] = check_matrix(weight, u, n_iter);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  return run_matrix_kernel(stacked_pointers(w, B, rows, cols), w, u, B, rows, cols, n_iter);
}

// The list form reads every kernel where it lies, through a table of their addresses (one pinned buffer,
// one async copy) instead of stacking them (~25 us per call for a width-64 stage). Under CUDA graph capture
// a host buffer would be read again at every replay after this call freed it: there the kernels are stacked
// (a capturable device copy) and the table computed on the device.
std::tuple<at::Tensor, at::Tensor> power_iteration_matrix_list_cuda(at::TensorList weights, at::Tensor& u, int64_t n_iter) {
  const auto shape = check_kernel_list(weights, "power_iteration_matrix_");
  const int64_t B = shape[0], rows = shape[1], cols = shape[2] * shape[3] * shape[4];
  check_matrix(weights[0].unsqueeze(0).expand(shape), u, n_iter);
  const c10::cuda::CUDAGuard guard(weights[0].device());
  if (at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None) {
    const at::Tensor w = at::stack(weights);
    return run_matrix_kernel(stacked_pointers(w, B, rows, cols), w, u, B, rows, cols, n_iter);
  }
  std::vector<at::Tensor> kernels;  // contiguous views (copies only of non-contiguous kernels), kept alive
  kernels.reserve(B);
  auto host = at::empty({B}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* table = host.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    kernels.push_back(weights[b].contiguous());
    table[b] = reinterpret_cast<int64_t>(kernels.back().data_ptr());
  }
  const at::Tensor ptrs = host.to(weights[0].device(), /*non_blocking=*/true);
  return run_matrix_kernel(ptrs, weights[0], u, B, rows, cols, n_iter);
}

}  // namespace

TORCH_LIBRARY_IMPL(itconv_fast, CUDA, m) {
  m.impl("power_iteration_matrix_", &power_iteration_matrix_cuda);
  m.impl("power_iteration_matrix_.list", &power_iteration_matrix_list_cuda);
}

}  // namespace spectral
}  // namespace itconv_fast
