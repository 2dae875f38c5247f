// CUDA kernel of soft_couple_: a multi-tensor kernel in the spirit of torch's _foreach ops and apex's
// multi_tensor_apply. One table (group descriptors, (group, chunk) work items, member pointers and
// mixing coefficients) travels to the device in a single asynchronous copy; one launch per dtype
// present then couples every group, one CUDA block per chunk.
//
// The mixes use __fmul_rn / __fadd_rn (no FMA contraction), in the same order as the CPU kernel and
// the pure-PyTorch reference, so the GPU result equals them bit for bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../soft_couple.h"

namespace itconv_fast {
namespace soft_couple {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;
constexpr int64_t kChunk = kThreads * kPerThread;

// Group descriptor fields in the table (int64 each).
constexpr int kPtrOffset = 0, kCount = 1, kNumel = 2, kCoeffOffset = 3, kUniform = 4, kFields = 5;

__device__ __forceinline__ float mul_rn(float x, float y) { return __fmul_rn(x, y); }
__device__ __forceinline__ float add_rn(float x, float y) { return __fadd_rn(x, y); }
__device__ __forceinline__ double mul_rn(double x, double y) { return __dmul_rn(x, y); }
__device__ __forceinline__ double add_rn(double x, double y) { return __dadd_rn(x, y); }

template <typename scalar_t>
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
    if (desc[kUniform]) {
      acc_t sum = static_cast<acc_t>(ptrs[0][i]);
      for (int64_t u = 1; u < n; ++u) sum = add_rn(sum, static_cast<acc_t>(ptrs[u][i]));
      const acc_t a = static_cast<acc_t>(coeffs[0]);
      const acc_t b = static_cast<acc_t>(coeffs[1]);
      const acc_t shared = mul_rn(b, sum);
      for (int64_t t = 0; t < n; ++t) {
        ptrs[t][i] = static_cast<scalar_t>(add_rn(mul_rn(a, static_cast<acc_t>(ptrs[t][i])), shared));
      }
    } else {
      // Every output needs every input: read all n first (they may be written below), then mix.
      // n is bounded by the launcher (kMaxGeneral) so the staging array stays in registers/local.
      constexpr int kMaxGeneral = 64;
      acc_t v[kMaxGeneral];
      for (int64_t u = 0; u < n; ++u) v[u] = static_cast<acc_t>(ptrs[u][i]);
      for (int64_t t = 0; t < n; ++t) {
        const double* row = coeffs + t * n;
        acc_t out = mul_rn(static_cast<acc_t>(row[0]), v[0]);
        for (int64_t u = 1; u < n; ++u) out = add_rn(out, mul_rn(static_cast<acc_t>(row[u]), v[u]));
        ptrs[t][i] = static_cast<scalar_t>(out);
      }
    }
  }
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
  const auto stream = at::cuda::getCurrentCUDAStream();

  // One launch per dtype present (at most four).
  for (const auto dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    std::vector<int64_t> descs, items, ptrs;
    std::vector<double> coeffs;
    int64_t n_groups = 0;
    for (const auto& group : groups) {
      if (group.members[0].scalar_type() != dtype) continue;
      const int64_t coeff_offset = static_cast<int64_t>(coeffs.size());
      if (group.coeffs.uniform) {
        coeffs.push_back(group.coeffs.a);
        coeffs.push_back(group.coeffs.b);
      } else {
        coeffs.insert(coeffs.end(), group.coeffs.matrix.begin(), group.coeffs.matrix.end());
      }
      descs.insert(descs.end(), {static_cast<int64_t>(ptrs.size()), static_cast<int64_t>(group.members.size()),
                                 group.numel, coeff_offset, group.coeffs.uniform ? 1 : 0});
      for (const auto& t : group.members) ptrs.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
      for (int64_t begin = 0; begin < group.numel; begin += kChunk) items.insert(items.end(), {n_groups, begin});
      ++n_groups;
    }
    if (n_groups == 0) continue;
    const int64_t n_items = static_cast<int64_t>(items.size()) / 2;
    TORCH_CHECK(n_items < (int64_t{1} << 31), "soft_couple_ (CUDA): too many chunks in one call");

    // Pack descs | items | ptrs | coeffs into one pinned buffer; one async copy moves it.
    const int64_t total = descs.size() + items.size() + ptrs.size() + coeffs.size();
    auto host = at::empty({total}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    int64_t* h = host.data_ptr<int64_t>();
    std::memcpy(h, descs.data(), descs.size() * sizeof(int64_t));
    std::memcpy(h + descs.size(), items.data(), items.size() * sizeof(int64_t));
    std::memcpy(h + descs.size() + items.size(), ptrs.data(), ptrs.size() * sizeof(int64_t));
    std::memcpy(h + descs.size() + items.size() + ptrs.size(), coeffs.data(), coeffs.size() * sizeof(double));
    auto table = host.to(device, /*non_blocking=*/true);
    const int64_t* d = table.data_ptr<int64_t>();

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "soft_couple_cuda", [&] {
      soft_couple_kernel<scalar_t><<<static_cast<unsigned>(n_items), kThreads, 0, stream>>>(
          d, d + descs.size(), d + descs.size() + items.size(),
          reinterpret_cast<const double*>(d + descs.size() + items.size() + ptrs.size()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  finish_write_back(write_back);
}

}  // namespace

TORCH_LIBRARY_IMPL(itconv_fast, CUDA, m) {
  m.impl("soft_couple_", &soft_couple_cuda);
}

}  // namespace soft_couple
}  // namespace itconv_fast
