// Device code of soft_couple_ (the __global__ body and its helpers), kept apart from the launcher so that
// two builds execute it: soft_couple_kernel.cu (nvcc, the GPU) and csrc/emulation (the CPU tests, under
// the CUDA shim of csrc/emulation/cuda_shim.h, one fiber per CUDA thread).
//
// This file is a fragment: it includes nothing and opens no namespace. Its includer provides ATen's
// OpMathType.h and soft_couple_launch.h (kThreads, kPerThread, the descriptor fields) and includes it inside
// the op's namespace.

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
