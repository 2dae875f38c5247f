// Device code of soft_couple_ (the __global__ body and its helpers), kept apart from the launcher so that
// two builds execute it: soft_couple_kernel.cu (nvcc, the GPU) and csrc/emulation (the CPU tests, under
// the CUDA shim of csrc/emulation/cuda_shim.h, one fiber per CUDA thread).
//
// This file is a fragment: it includes nothing and opens no namespace. Its includer provides ATen's
// OpMathType.h and soft_couple_launch.h (kThreads, kPerThread, the descriptor fields, the modes) and
// includes it inside the op's namespace.
//
// Block b handles work item b: (group, chunk begin). Thread x of it takes the per_thread (1 .. kPerThread)
// consecutive elements from begin + x * per_thread; the chunk is kThreads * per_thread elements, chosen
// by the launcher so that small models still give every SM blocks (soft_couple_launch.h). Per group mode:
//   uniform:   g_t <- a g_t + b sum_u g_u. 2 .. kRegisterMembers members: every member's elements in
//              registers (loaded once, all loads before any store: no load-store-load chain through
//              memory the compiler must assume aliased); more: a sum pass, then a rewrite pass;
//   staged:    g_t <- sum_u M[t, u] g_u for n <= kMaxN (the launch's bucket) members: the coefficient
//              matrix staged in shared memory (as acc_t, converted once on the host), each element's n
//              values in registers;
//   scratch:   the same for any n: the launcher copied the members to a scratch buffer (pointers after the
//              members' in the table), so inputs and outputs no longer alias; outputs in register tiles
//              of kTile, inputs read once per tile.
// A group whose members are all aligned to kPerThread elements moves them in vector accesses (one of 16
// bytes for float, two for double, one of 8 bytes for half and bfloat16) per load and store.
// Every mix uses __fmul_rn / __fadd_rn (no FMA), in the reference's order: bit-exact.

__device__ __forceinline__ float mul_rn(float x, float y) { return __fmul_rn(x, y); }
__device__ __forceinline__ float add_rn(float x, float y) { return __fadd_rn(x, y); }
__device__ __forceinline__ double mul_rn(double x, double y) { return __dmul_rn(x, y); }
__device__ __forceinline__ double add_rn(double x, double y) { return __dadd_rn(x, y); }

#ifndef ITCONV_DYNAMIC_SMEM
// The launch's dynamic shared memory as an array of `type` (the shim defines its own).
#define ITCONV_DYNAMIC_SMEM(type, name)                             \
  extern __shared__ __align__(16) unsigned char itconv_smem_raw[]; \
  type* name = reinterpret_cast<type*>(itconv_smem_raw)
#endif

// One vector access: 16 bytes (4 floats, 2 doubles) or, for 2-byte types, 8 bytes (4 halves). A thread's
// kPerThread elements take kPerThread / kAccess of them (a 32-byte struct of 4 doubles went through a
// stack frame: ptxas, benchmarks/NOTES.md).
template <typename scalar_t>
struct VectorAccess {
  static constexpr int kElements = 16 / static_cast<int>(sizeof(scalar_t)) < kPerThread
                                       ? 16 / static_cast<int>(sizeof(scalar_t)) : kPerThread;
  struct alignas(sizeof(scalar_t) * kElements) Pack {
    scalar_t v[kElements];
  };
};

// This thread's `count` elements of one member, as acc_t (0 past count); vector accesses when aligned and
// whole.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_elements(const scalar_t* p, int count, bool whole_pack, acc_t* out) {
  using Access = VectorAccess<scalar_t>;
  if (whole_pack) {
#pragma unroll
    for (int s = 0; s < kPerThread; s += Access::kElements) {
      const typename Access::Pack pack = *reinterpret_cast<const typename Access::Pack*>(p + s);
#pragma unroll
      for (int e = 0; e < Access::kElements; ++e) out[s + e] = static_cast<acc_t>(pack.v[e]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) out[e] = e < count ? static_cast<acc_t>(p[e]) : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_elements(scalar_t* p, int count, bool whole_pack, const acc_t* values) {
  using Access = VectorAccess<scalar_t>;
  if (whole_pack) {
#pragma unroll
    for (int s = 0; s < kPerThread; s += Access::kElements) {
      typename Access::Pack pack;
#pragma unroll
      for (int e = 0; e < Access::kElements; ++e) pack.v[e] = static_cast<scalar_t>(values[s + e]);
      *reinterpret_cast<typename Access::Pack*>(p + s) = pack;
    }
  } else {
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {  // unrolled with a guard: values[] stays in registers
      if (e < count) p[e] = static_cast<scalar_t>(values[e]);
    }
  }
}

// Uniform mix of N (compile-time) members, all their elements in registers.
template <typename scalar_t, typename acc_t, int N>
__device__ __forceinline__ void uniform_in_registers(scalar_t* const* ptrs, int64_t first, int count, bool whole,
                                                     acc_t a, acc_t b) {
  acc_t v[N][kPerThread];
#pragma unroll
  for (int u = 0; u < N; ++u) load_elements<scalar_t, acc_t>(ptrs[u] + first, count, whole, v[u]);
  acc_t shared[kPerThread];
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    acc_t sum = v[0][e];
#pragma unroll
    for (int u = 1; u < N; ++u) sum = add_rn(sum, v[u][e]);
    shared[e] = mul_rn(b, sum);
  }
#pragma unroll
  for (int t = 0; t < N; ++t) {
    acc_t out[kPerThread];
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) out[e] = add_rn(mul_rn(a, v[t][e]), shared[e]);
    store_elements<scalar_t, acc_t>(ptrs[t] + first, count, whole, out);
  }
}

// Uniform mix of any n: a sum pass, then a rewrite pass (which re-reads each member, from cache).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void uniform_two_passes(scalar_t* const* ptrs, int64_t n, int64_t first, int count,
                                                   bool whole, acc_t a, acc_t b) {
  acc_t shared[kPerThread], v[kPerThread];
  load_elements<scalar_t, acc_t>(ptrs[0] + first, count, whole, shared);
  for (int64_t u = 1; u < n; ++u) {
    load_elements<scalar_t, acc_t>(ptrs[u] + first, count, whole, v);
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) shared[e] = add_rn(shared[e], v[e]);
  }
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) shared[e] = mul_rn(b, shared[e]);
  for (int64_t t = 0; t < n; ++t) {
    load_elements<scalar_t, acc_t>(ptrs[t] + first, count, whole, v);
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) v[e] = add_rn(mul_rn(a, v[e]), shared[e]);
    store_elements<scalar_t, acc_t>(ptrs[t] + first, count, whole, v);
  }
}

// kMaxN: 0 for a launch of uniform groups; else the largest staged group of a launch of non-uniform groups,
// rounded up to a bucket (16 or 64; the uniform code is not compiled into these). The values
// v[kMaxN] are indexed by unrolled, compile-time indices only, so they stay in registers (with a run-time
// bound ptxas put them in local memory; benchmarks/NOTES.md, "ptxas").
template <typename scalar_t, int kMaxN>
__global__ void soft_couple_kernel(const int64_t* __restrict__ groups, const int64_t* __restrict__ items,
                                   const int64_t* __restrict__ ptr_table,
                                   const at::opmath_type<scalar_t>* __restrict__ coeff_table, int per_thread) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t g = items[2 * blockIdx.x];
  const int64_t begin = items[2 * blockIdx.x + 1];
  const int64_t* desc = groups + g * kFields;
  scalar_t* const* ptrs = reinterpret_cast<scalar_t* const*>(ptr_table + desc[kPtrOffset]);
  const int64_t n = desc[kCount];
  const int64_t numel = desc[kNumel];
  const int64_t mode = desc[kMode];
  const acc_t* coeffs = coeff_table + desc[kCoeffOffset];

  if constexpr (kMaxN > 0) {
    if (mode == kModeStaged) {
      // Every thread helps stage M before any returns (a thread that returned counts as arrived).
      ITCONV_DYNAMIC_SMEM(acc_t, m);
      for (int64_t k = threadIdx.x; k < n * n; k += kThreads) m[k] = coeffs[k];
      __syncthreads();
      coeffs = m;
    }
  }
  const int64_t first = begin + static_cast<int64_t>(threadIdx.x) * per_thread;
  if (first >= numel) return;
  const int count = static_cast<int>(numel - first < per_thread ? numel - first : per_thread);
  const bool whole = desc[kAligned] && count == kPerThread;

  if constexpr (kMaxN == 0) {  // launches of uniform groups only (for_each_launch plans them apart)
    const acc_t a = coeffs[0], b = coeffs[1];
    switch (n) {
#define ITCONV_UNIFORM_CASE(N) \
  case N: uniform_in_registers<scalar_t, acc_t, N>(ptrs, first, count, whole, a, b); return;
      ITCONV_UNIFORM_CASE(2) ITCONV_UNIFORM_CASE(3) ITCONV_UNIFORM_CASE(4) ITCONV_UNIFORM_CASE(5)
      ITCONV_UNIFORM_CASE(6) ITCONV_UNIFORM_CASE(7) ITCONV_UNIFORM_CASE(8) ITCONV_UNIFORM_CASE(9)
      ITCONV_UNIFORM_CASE(10) ITCONV_UNIFORM_CASE(11) ITCONV_UNIFORM_CASE(12) ITCONV_UNIFORM_CASE(13)
      ITCONV_UNIFORM_CASE(14) ITCONV_UNIFORM_CASE(15) ITCONV_UNIFORM_CASE(16)
#undef ITCONV_UNIFORM_CASE
      default: uniform_two_passes<scalar_t, acc_t>(ptrs, n, first, count, whole, a, b); return;
    }
  } else {
    if (mode == kModeStaged) {
      // Every output needs every input: all n (<= kMaxN) values of an element first, then the n mixes,
      // each output's terms in order u = 0 .. n - 1.
      for (int e = 0; e < count; ++e) {
        const int64_t i = first + e;
        acc_t v[kMaxN > 0 ? kMaxN : 1];
#pragma unroll
        for (int u = 0; u < kMaxN; ++u) {
          if (u < n) v[u] = static_cast<acc_t>(ptrs[u][i]);
        }
#pragma unroll 1
        for (int64_t t = 0; t < n; ++t) {
          const acc_t* row = coeffs + t * n;
          acc_t out = mul_rn(row[0], v[0]);
#pragma unroll
          for (int u = 1; u < kMaxN; ++u) {
            if (u < n) out = add_rn(out, mul_rn(row[u], v[u]));
          }
          ptrs[t][i] = static_cast<scalar_t>(out);
        }
      }
      return;
    }
  }
  // Scratch (launches of non-uniform groups): inputs from the copy (pointers n .. 2n - 1), outputs kTile at a
  // time in registers.
  const scalar_t* const* inputs = ptrs + n;
  for (int e = 0; e < count; ++e) {
    const int64_t i = first + e;
    for (int64_t t0 = 0; t0 < n; t0 += kTile) {
      acc_t out[kTile];
      for (int64_t u = 0; u < n; ++u) {
        const acc_t x = static_cast<acc_t>(inputs[u][i]);
#pragma unroll
        for (int tt = 0; tt < kTile; ++tt) {
          if (t0 + tt < n) {
            const acc_t term = mul_rn(coeffs[(t0 + tt) * n + u], x);
            out[tt] = u == 0 ? term : add_rn(out[tt], term);
          }
        }
      }
#pragma unroll
      for (int tt = 0; tt < kTile; ++tt) {
        if (t0 + tt < n) ptrs[t0 + tt][i] = static_cast<scalar_t>(out[tt]);
      }
    }
  }
}
