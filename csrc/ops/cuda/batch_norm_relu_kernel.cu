// CUDA launcher of the fused BatchNorm + ReLU (training mode): forward five launches (sum, mean, centered
// squares, invstd with the coefficients and running statistics, normalisation + ReLU), backward four
// (coefficients, gradient sums, per-channel terms, input gradient), all on the current stream with no host
// synchronisation and no host memory (capturable in a CUDA graph). The device code, the sequence of launches
// and the op's tensor-level bodies are batch_norm_relu_device.cuh, which the CPU tests also run under the
// emulation; this file adds the device guard and the grid cap.
//
// No measurement on a GPU yet (benchmarks/NOTES.md): the layouts and the block shapes are chosen for
// coalesced reads, not tuned.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../batch_norm_relu.h"

#define ITCONV_BN_LAUNCH(kernel, grid, block, ...)                                                 \
  do {                                                                                             \
    auto kernel_fn = kernel;                                                                       \
    kernel_fn<<<(grid), (block), 0, at::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__);              \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                \
  } while (0)

namespace itconv_fast {
namespace batch_norm_relu {
namespace {

#include "batch_norm_relu_device.cuh"

// Enough elementwise blocks to fill the GPU several times over; the kernels loop past that.
int64_t max_elementwise_blocks() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_cuda(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, double momentum, double eps) {
  const c10::cuda::CUDAGuard guard(input.device());
  return bn_forward(input, weight, bias, running_mean, running_var, momentum, eps, max_elementwise_blocks());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_cuda(const at::Tensor& grad_out,
                                                                             const at::Tensor& input,
                                                                             const at::Tensor& weight,
                                                                             const at::Tensor& bias,
                                                                             const at::Tensor& save_mean,
                                                                             const at::Tensor& save_invstd) {
  const c10::cuda::CUDAGuard guard(input.device());
  return bn_backward(grad_out, input, weight, bias, save_mean, save_invstd, max_elementwise_blocks());
}

}  // namespace

TORCH_LIBRARY_IMPL(itconv_fast, CUDA, m) {
  m.impl("batch_norm_relu", &batch_norm_relu_cuda);
  m.impl("batch_norm_relu_backward", &batch_norm_relu_backward_cuda);
}

}  // namespace batch_norm_relu
}  // namespace itconv_fast
