// CUDA kernel of soft_couple_: a multi-tensor kernel in the spirit of torch's _foreach ops and apex's
// multi_tensor_apply. One table (group descriptors, (group, chunk) work items, member pointers and
// mixing coefficients; built by soft_couple_launch.h, which the CPU tests walk and run the device code over)
// travels to the device in a single asynchronous copy; one launch per dtype present (and per family,
// uniform or not, which one call never mixes) then couples every group, one CUDA block per chunk (more
// launches only past 2^31 - 1 chunks). The device code is soft_couple_device.cuh.
//
// Under CUDA graph capture the table path is not safe: the captured copy would read the pinned host
// buffer at every replay, after this call has released it. So while the current stream is capturing,
// the op runs couple_with_aten_ops instead (the same mix as a few ATen operations per group, bit-equal).
//
// The mixes use __fmul_rn / __fadd_rn (no FMA contraction), in the same order as the CPU kernel and
// the pure-PyTorch reference, so the GPU result equals them bit for bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../soft_couple.h"
#include "../soft_couple_launch.h"

namespace itconv_fast {
namespace soft_couple {
namespace {

#include "soft_couple_device.cuh"

template <typename scalar_t>
void launch(const LaunchTable& table, const int64_t* d, int bucket, int per_thread, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto grid = static_cast<unsigned>(table.n_items());
  const int64_t* items = d + table.items_offset();
  const int64_t* ptrs = d + table.ptrs_offset();
  const auto* coeffs = reinterpret_cast<const acc_t*>(d + table.coeffs_offset());
  const size_t smem = static_cast<size_t>(bucket) * bucket * sizeof(acc_t);  // the staged coefficient matrix
  switch (bucket) {
    case 0: soft_couple_kernel<scalar_t, 0><<<grid, kThreads, 0, stream>>>(d, items, ptrs, coeffs, per_thread); break;
    case 16: soft_couple_kernel<scalar_t, 16><<<grid, kThreads, smem, stream>>>(d, items, ptrs, coeffs, per_thread); break;
    default: soft_couple_kernel<scalar_t, 64><<<grid, kThreads, smem, stream>>>(d, items, ptrs, coeffs, per_thread); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void soft_couple_cuda(
    at::TensorList grads,
    at::IntArrayRef group_sizes,
    double lam,
    c10::string_view kernel,
    c10::optional<double> bandwidth,
    int64_t skip_first) {
  // Every tensor on one CUDA device, checked first, before anything reads a tensor: a list mixing devices is
  // dispatched here when one of them is CUDA, and crashed the process on an H200 (cause not established).
  if (grads.empty()) return;
  const auto device = grads[0].device();
  for (const auto& t : grads) {
    TORCH_CHECK_VALUE(t.is_cuda() && t.device() == device, "soft_couple_ (CUDA): every gradient must be on one CUDA ",
                      "device; got ", t.device(), " and ", device);
  }
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;
  const auto groups = prepare_groups(grads, group_sizes, lam, std::string(kernel), bandwidth, skip_first, write_back);
  if (groups.empty()) return;
  const c10::cuda::CUDAGuard guard(device);
  if (at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None) {
    couple_with_aten_ops(groups);
    finish_write_back(write_back);
    return;
  }
  const auto stream = at::cuda::getCurrentCUDAStream();

  // Enough blocks for every SM twice over, where the model allows (small models: fewer elements per thread).
  const int per_thread = choose_per_thread(groups, 2 * int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount});
  // Every member's pointer in one table; one launch per dtype present (at most four).
  for_each_launch(groups, kMaxGridX, per_thread, [&](at::ScalarType dtype, const LaunchTable& launch_table, int bucket) {
    // One pinned buffer, one async copy (the caching host allocator keeps the buffer until the copy ran).
    const std::vector<int64_t> packed = launch_table.packed(/*float_coeffs=*/dtype != at::kDouble);
    auto host = at::empty({static_cast<int64_t>(packed.size())}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::memcpy(host.data_ptr<int64_t>(), packed.data(), packed.size() * sizeof(int64_t));
    auto table = host.to(device, /*non_blocking=*/true);
    const int64_t* d = table.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "soft_couple_cuda",
                                    [&] { launch<scalar_t>(launch_table, d, bucket, per_thread, stream); });
  });
  finish_write_back(write_back);
}

}  // namespace

TORCH_LIBRARY_IMPL(itconv_fast, CUDA, m) {
  m.impl("soft_couple_", &soft_couple_cuda);
}

}  // namespace soft_couple
}  // namespace itconv_fast
