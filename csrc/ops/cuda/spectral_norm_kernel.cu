// CUDA kernel of the matrix-mode power iteration: one launch runs all n_iter steps for all B
// matrices, one thread block per matrix (v = W^T u with coalesced column sweeps, u = W v with one
// warp per row, norms by block reduction). v lives in the returned tensor, u is updated in place.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../spectral_norm.h"

namespace itconv_fast {
namespace spectral {
namespace {

#include "spectral_norm_device.cuh"

std::tuple<at::Tensor, at::Tensor> power_iteration_matrix_cuda(const at::Tensor& weight, at::Tensor& u, int64_t n_iter) {
  const auto [B, rows, cols] = check_matrix(weight, u, n_iter);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  at::Tensor uc = u.contiguous();
  at::Tensor v = at::empty({B, cols}, weight.options());
  at::Tensor sigma = at::empty({B}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "power_iteration_matrix_cuda", [&] {
    power_iteration_matrix_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        w.data_ptr<scalar_t>(), uc.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), sigma.data_ptr<scalar_t>(), rows, cols,
        n_iter);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!uc.is_same(u)) u.copy_(uc);
  return {v, sigma};
}

// The list form: on the GPU stacking the kernels costs one device copy, small next to the launch
// overheads the list form saves on the CPU.
std::tuple<at::Tensor, at::Tensor> power_iteration_matrix_list_cuda(at::TensorList weights, at::Tensor& u, int64_t n_iter) {
  check_kernel_list(weights, "power_iteration_matrix_");
  return power_iteration_matrix_cuda(at::stack(weights), u, n_iter);
}

}  // namespace

TORCH_LIBRARY_IMPL(itconv_fast, CUDA, m) {
  m.impl("power_iteration_matrix_", &power_iteration_matrix_cuda);
  m.impl("power_iteration_matrix_.list", &power_iteration_matrix_list_cuda);
}

}  // namespace spectral
}  // namespace itconv_fast
