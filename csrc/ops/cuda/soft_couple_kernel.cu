// CUDA kernel of soft_couple_: a multi-tensor kernel in the spirit of torch's _foreach ops and apex's
// multi_tensor_apply. One table (group descriptors, (group, chunk) work items, member pointers and
// mixing coefficients; built by soft_couple_launch.h, which the CPU tests walk) travels to the device in
// a single asynchronous copy; one launch per dtype present then couples every group, one CUDA block per
// chunk (more launches only past 2^31 - 1 chunks).
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

__device__ __forceinline__ float mul_rn(float x, float y) { return __fmul_rn(x, y); }
__device__ __forceinline__ float add_rn(float x, float y) { return __fadd_rn(x, y); }
__device__ __forceinline__ double mul_rn(double x, double y) { return __dmul_rn(x, y); }
__device__ __forceinline__ double add_rn(double x, double y) { return __dadd_rn(x, y); }

// kMaxN: the largest non-uniform group of the launch, rounded up to a bucket (0 when every group is
// uniform). The staging array v[kMaxN] is indexed only by unrolled, compile-time indices, so it lives in
// registers: with a run-time bound (the first version, v[64]) ptxas put it on a 256-byte (float) / 512-byte
// (double) stack frame in local memory (benchmarks/NOTES.md, "ptxas").
template <typename scalar_t, int kMaxN>
__global__ void soft_couple_kernel(
    const int64_t* __restrict__ groups,
    const int64_t* __restrict__ items,
    const int64_t* __restrict__ ptr_table,
    const double* __restrict__ coeff_table) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t g = items[2 * blockIdx.x];
  const int64_t begin = items[2 * blockIdx.x + 1];
  const int64_t* desc = groups + g * kFields;
  scalar_t* const* ptrs = reinterpret_cast<scalar_t* const*>(ptr_table + desc[kPtrOffset]);
  const int64_t n = desc[kCount];
  const int64_t numel = desc[kNumel];
  const double* coeffs = coeff_table + desc[kCoeffOffset];

  for (int k = 0; k < kPerThread; ++k) {
    const int64_t i = begin + threadIdx.x + static_cast<int64_t>(k) * kThreads;
    if (i >= numel) return;
    if (kMaxN == 0 || desc[kUniform]) {
      acc_t sum = static_cast<acc_t>(ptrs[0][i]);
      for (int64_t u = 1; u < n; ++u) sum = add_rn(sum, static_cast<acc_t>(ptrs[u][i]));
      const acc_t a = static_cast<acc_t>(coeffs[0]);
      const acc_t b = static_cast<acc_t>(coeffs[1]);
      const acc_t shared = mul_rn(b, sum);
      for (int64_t t = 0; t < n; ++t) {
        ptrs[t][i] = static_cast<scalar_t>(add_rn(mul_rn(a, static_cast<acc_t>(ptrs[t][i])), shared));
      }
    } else {
      // Every output needs every input: read all n (<= kMaxN, checked by the launcher) first, since they
      // are overwritten below, then mix, each output's terms in order u = 0 .. n - 1.
      acc_t v[kMaxN > 0 ? kMaxN : 1];
#pragma unroll
      for (int u = 0; u < kMaxN; ++u) {
        if (u < n) v[u] = static_cast<acc_t>(ptrs[u][i]);
      }
#pragma unroll 1
      for (int64_t t = 0; t < n; ++t) {
        const double* row = coeffs + t * n;
        acc_t out = mul_rn(static_cast<acc_t>(row[0]), v[0]);
#pragma unroll
        for (int u = 1; u < kMaxN; ++u) {
          if (u < n) out = add_rn(out, mul_rn(static_cast<acc_t>(row[u]), v[u]));
        }
        ptrs[t][i] = static_cast<scalar_t>(out);
      }
    }
  }
}

// The staging bucket for a launch whose largest non-uniform group has n members (0: none).
int staging_bucket(int64_t n) {
  if (n == 0) return 0;
  if (n <= 16) return 16;
  return 64;
}

template <typename scalar_t>
void launch(const LaunchTable& table, const int64_t* d, int bucket, cudaStream_t stream) {
  const auto grid = static_cast<unsigned>(table.n_items());
  const int64_t* items = d + table.items_offset();
  const int64_t* ptrs = d + table.ptrs_offset();
  const auto* coeffs = reinterpret_cast<const double*>(d + table.coeffs_offset());
  switch (bucket) {
    case 0: soft_couple_kernel<scalar_t, 0><<<grid, kThreads, 0, stream>>>(d, items, ptrs, coeffs); break;
    case 16: soft_couple_kernel<scalar_t, 16><<<grid, kThreads, 0, stream>>>(d, items, ptrs, coeffs); break;
    default: soft_couple_kernel<scalar_t, 64><<<grid, kThreads, 0, stream>>>(d, items, ptrs, coeffs); break;
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
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;
  const auto groups = prepare_groups(grads, group_sizes, lam, std::string(kernel), bandwidth, skip_first, write_back);
  if (groups.empty()) return;
  const auto device = grads[0].device();
  for (const auto& t : grads) {
    TORCH_CHECK_VALUE(t.device() == device, "soft_couple_ (CUDA): every gradient must be on ", device, ", got ",
                      t.device());
  }
  for (const auto& group : groups) {
    TORCH_CHECK_VALUE(group.coeffs.uniform || group.members.size() <= 64,
                      "soft_couple_ (CUDA): non-uniform kernels support at most 64 coupled blocks, got ",
                      group.members.size());
  }
  const c10::cuda::CUDAGuard guard(device);
  if (at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None) {
    couple_with_aten_ops(groups);
    finish_write_back(write_back);
    return;
  }
  const auto stream = at::cuda::getCurrentCUDAStream();

  // One launch per dtype present (at most four).
  for (const auto dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    std::vector<GroupSpec> specs;
    int64_t largest_general = 0;
    for (const auto& group : groups) {
      if (group.members[0].scalar_type() != dtype) continue;
      if (!group.coeffs.uniform) largest_general = std::max(largest_general, static_cast<int64_t>(group.members.size()));
      GroupSpec spec;
      spec.numel = group.numel;
      spec.coeffs = &group.coeffs;
      for (const auto& t : group.members) spec.pointers.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
      specs.push_back(std::move(spec));
    }
    const int bucket = staging_bucket(largest_general);
    for (const auto& launch_table : plan_launches(specs)) {
      // One pinned buffer, one async copy (the caching host allocator keeps the buffer until the copy ran).
      const std::vector<int64_t> packed = launch_table.packed();
      auto host = at::empty({static_cast<int64_t>(packed.size())}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
      std::memcpy(host.data_ptr<int64_t>(), packed.data(), packed.size() * sizeof(int64_t));
      auto table = host.to(device, /*non_blocking=*/true);
      const int64_t* d = table.data_ptr<int64_t>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "soft_couple_cuda",
                                      [&] { launch<scalar_t>(launch_table, d, bucket, stream); });
    }
  }
  finish_write_back(write_back);
}

}  // namespace

TORCH_LIBRARY_IMPL(itconv_fast, CUDA, m) {
  m.impl("soft_couple_", &soft_couple_cuda);
}

}  // namespace soft_couple
}  // namespace itconv_fast
