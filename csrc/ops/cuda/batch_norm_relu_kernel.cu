// CUDA launcher of the fused BatchNorm + ReLU (training mode): forward five launches (sum, mean, centered
// squares, invstd with the coefficients and running statistics, normalisation + ReLU), backward four
// (coefficients, gradient sums, per-channel terms, input gradient), all on the current stream with no host
// synchronisation and no host memory (capturable in a CUDA graph). The device code and the sequence of
// launches are batch_norm_relu_device.cuh, which the CPU tests also run under the emulation.
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

BnGeometry geometry_of(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t S = (N == 0 || C == 0) ? 0 : x.numel() / (N * C);
  return {N, C, S, N * S, is_channels_last(x)};
}

// Enough elementwise blocks to fill the GPU several times over; the kernels loop past that.
int64_t max_elementwise_blocks() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs batch_norm_relu_cuda(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                             const at::Tensor& running_mean, const at::Tensor& running_var, double momentum, double eps) {
  check_forward(input, weight, bias, running_mean, running_var, momentum, eps);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = in_kernel_layout(input);
  const BnGeometry g = geometry_of(x);
  const auto stat_dtype = param_dtype_for(x.scalar_type());
  const auto stat_options = x.options().dtype(stat_dtype);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(layout_of(x)));
  at::Tensor save_mean = at::empty({g.C}, stat_options), save_invstd = at::empty({g.C}, stat_options);
  at::Tensor new_mean = at::empty({g.C}, stat_options), new_var = at::empty({g.C}, stat_options);
  if (g.C > 0) {
    const at::Tensor w = weight.contiguous().to(stat_dtype), b = bias.contiguous().to(stat_dtype);
    const at::Tensor rm = running_mean.contiguous().to(stat_dtype), rv = running_var.contiguous().to(stat_dtype);
    at::Tensor workspace = at::empty({bn_workspace_size(g)}, stat_options);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_relu_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      bn_forward_launches<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                    w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), rm.const_data_ptr<acc_t>(),
                                    rv.const_data_ptr<acc_t>(), save_mean.mutable_data_ptr<acc_t>(),
                                    save_invstd.mutable_data_ptr<acc_t>(), new_mean.mutable_data_ptr<acc_t>(),
                                    new_var.mutable_data_ptr<acc_t>(), workspace.mutable_data_ptr<acc_t>(), momentum,
                                    eps, g, max_elementwise_blocks());
    });
  }
  return {out, save_mean, save_invstd, new_mean.to(running_mean.scalar_type()), new_var.to(running_var.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_cuda(const at::Tensor& grad_out,
                                                                             const at::Tensor& input,
                                                                             const at::Tensor& weight,
                                                                             const at::Tensor& bias,
                                                                             const at::Tensor& save_mean,
                                                                             const at::Tensor& save_invstd) {
  check_backward(grad_out, input, weight, bias, save_mean, save_invstd);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = in_kernel_layout(input);
  const auto fmt = layout_of(x);
  const at::Tensor dy = grad_out.contiguous(fmt);
  const BnGeometry g = geometry_of(x);
  const auto stat_dtype = param_dtype_for(x.scalar_type());
  const auto stat_options = x.options().dtype(stat_dtype);
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor grad_weight = at::empty({g.C}, stat_options), grad_bias = at::empty({g.C}, stat_options);
  if (g.C > 0) {
    const at::Tensor w = weight.contiguous().to(stat_dtype), b = bias.contiguous().to(stat_dtype);
    const at::Tensor mean = save_mean.contiguous(), invstd = save_invstd.contiguous();
    at::Tensor workspace = at::empty({bn_workspace_size(g)}, stat_options);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_relu_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      bn_backward_launches<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                     dx.mutable_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
                                     b.const_data_ptr<acc_t>(), mean.const_data_ptr<acc_t>(),
                                     invstd.const_data_ptr<acc_t>(), grad_weight.mutable_data_ptr<acc_t>(),
                                     grad_bias.mutable_data_ptr<acc_t>(), workspace.mutable_data_ptr<acc_t>(), g,
                                     max_elementwise_blocks());
    });
  }
  return {dx, grad_weight.to(weight.scalar_type()), grad_bias.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(itconv_fast, CUDA, m) {
  m.impl("batch_norm_relu", &batch_norm_relu_cuda);
  m.impl("batch_norm_relu_backward", &batch_norm_relu_backward_cuda);
}

}  // namespace batch_norm_relu
}  // namespace itconv_fast
