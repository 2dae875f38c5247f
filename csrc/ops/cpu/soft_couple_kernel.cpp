// CPU kernel of soft_couple_: one parallel pass over (group, chunk) work items, split by cost. A group
// of 2-16 members goes one 64-byte vector at a time with every member's values in registers, so each
// element is loaded once and stored once, like an in-place scaling pass; other groups (more members,
// the triangular kernel, or members that crowd one L1 set) go in blocks of kBlock elements whose T
// copies are read once from memory and rewritten from L1. Mixing is in float (double for double).
//
// Compiled with -ffp-contract=off: the mixes use separate multiplies and adds, exactly as the
// pure-PyTorch reference does, so CPU results equal the reference bit for bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "../soft_couple.h"
#include "cpu_clones.h"
#include "cpu_features.h"

namespace itconv_fast {
namespace soft_couple {
namespace {

// Elements per work item (the unit the threads share out).
constexpr int64_t kChunk = 4096;
// Elements per block of the block path: the T members' blocks are summed into kBlock accumulators,
// then rewritten while they are still in L1 (T x 512 bytes for float).
constexpr int64_t kBlock = 128;

// One register block of the uniform mix: g_t[i] = a * g_t[i] + b * sum_u g_u[i] (u in order).
// `len` is kBlock for all but a chunk's tail; with the constant the loops vectorise fully. Every
// element's operations run in the reference's order, so vectorising changes no bits.
template <typename scalar_t, typename acc_t>
ITCONV_ALWAYS_INLINE void couple_uniform_block(scalar_t* const* ptrs, int64_t n, acc_t a, acc_t b, int64_t i0, int64_t len) {
  acc_t shared[kBlock];
  const scalar_t* g0 = ptrs[0] + i0;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) shared[i] = static_cast<acc_t>(g0[i]);
  for (int64_t u = 1; u < n; ++u) {
    const scalar_t* gu = ptrs[u] + i0;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) shared[i] = shared[i] + static_cast<acc_t>(gu[i]);
  }
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) shared[i] = b * shared[i];
  // Rewrite in reverse: the blocks read last are the likeliest still in L1 when members whose
  // addresses agree modulo 4 KiB share L1 sets (16 such members: 61.5 us against 63.4 us in order).
  for (int64_t t = n - 1; t >= 0; --t) {
    scalar_t* gt = ptrs[t] + i0;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const acc_t own = a * static_cast<acc_t>(gt[i]);
      gt[i] = static_cast<scalar_t>(own + shared[i]);
    }
  }
}

// The uniform mix for a compile-time group size N (2..16), kLanes elements (one 64-byte vector of
// accumulators) at a time: all N members' values stay in registers between the sum and the rewrite,
// so every element is loaded once and stored once. The generic block above re-reads each member
// from L1 and was bound by L1 loads (measured on the ResNet-101-16 gradients: the whole op 0.13 ms,
// now 0.11 ms).
template <typename scalar_t, typename acc_t, int N, int kLanes>
ITCONV_ALWAYS_INLINE void couple_uniform_regs(scalar_t* const* ptrs, acc_t a, acc_t b, int64_t i0) {
  acc_t vals[N][kLanes];
  acc_t shared[kLanes];
#pragma GCC unroll 16
  for (int u = 0; u < N; ++u) {
    const scalar_t* g = ptrs[u] + i0;
#pragma omp simd
    for (int i = 0; i < kLanes; ++i) vals[u][i] = static_cast<acc_t>(g[i]);
  }
#pragma omp simd
  for (int i = 0; i < kLanes; ++i) shared[i] = vals[0][i];
#pragma GCC unroll 16
  for (int u = 1; u < N; ++u) {
#pragma omp simd
    for (int i = 0; i < kLanes; ++i) shared[i] = shared[i] + vals[u][i];
  }
#pragma omp simd
  for (int i = 0; i < kLanes; ++i) shared[i] = b * shared[i];
#pragma GCC unroll 16
  for (int t = 0; t < N; ++t) {
    scalar_t* g = ptrs[t] + i0;
#pragma omp simd
    for (int i = 0; i < kLanes; ++i) {
      const acc_t own = a * vals[t][i];
      g[i] = static_cast<scalar_t>(own + shared[i]);
    }
  }
}

// Runs couple_uniform_regs over [i0, end) in whole 64-byte vectors; returns where it stopped.
template <typename scalar_t, typename acc_t, int N>
ITCONV_ALWAYS_INLINE int64_t couple_uniform_regs_run(scalar_t* const* ptrs, acc_t a, acc_t b, int64_t i0, int64_t end) {
  constexpr int kLanes = 64 / sizeof(acc_t);
  for (; i0 + kLanes <= end; i0 += kLanes) couple_uniform_regs<scalar_t, acc_t, N, kLanes>(ptrs, a, b, i0);
  return i0;
}

// One register block of the general mix: g_t[i] = sum_u M[t, u] g_u[i] (u in order). Every output
// needs every input, so the n blocks are staged in acc_t first (n x kBlock, in L1 for n <= 64).
template <typename scalar_t, typename acc_t>
ITCONV_ALWAYS_INLINE void couple_matrix_block(scalar_t* const* ptrs, int64_t n, const acc_t* m, acc_t* staged, int64_t i0,
                                int64_t len) {
  for (int64_t u = 0; u < n; ++u) {
    const scalar_t* gu = ptrs[u] + i0;
    acc_t* su = staged + u * kBlock;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) su[i] = static_cast<acc_t>(gu[i]);
  }
  for (int64_t t = 0; t < n; ++t) {
    const acc_t* row = m + t * n;
    acc_t out[kBlock];
    const acc_t m0 = row[0];
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) out[i] = m0 * staged[i];
    for (int64_t u = 1; u < n; ++u) {
      const acc_t mu = row[u];
      const acc_t* su = staged + u * kBlock;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) out[i] = out[i] + mu * su[i];
    }
    scalar_t* gt = ptrs[t] + i0;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) gt[i] = static_cast<scalar_t>(out[i]);
  }
}

template <typename scalar_t>
ITCONV_ALWAYS_INLINE void couple_chunk(
    scalar_t* const* ptrs, int64_t n, const Coefficients& coeffs, bool in_registers, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  if (coeffs.uniform) {
    const acc_t a = static_cast<acc_t>(coeffs.a);
    const acc_t b = static_cast<acc_t>(coeffs.b);
    int64_t i0 = begin;
    switch (in_registers ? n : 0) {  // groups of 2 .. register_limit() (<= 16) members not crowding L1
#define ITCONV_REGISTER_CASE(N) \
  case N:                      \
    i0 = couple_uniform_regs_run<scalar_t, acc_t, N>(ptrs, a, b, i0, end); \
    break;
      ITCONV_REGISTER_CASE(2) ITCONV_REGISTER_CASE(3) ITCONV_REGISTER_CASE(4) ITCONV_REGISTER_CASE(5)
      ITCONV_REGISTER_CASE(6) ITCONV_REGISTER_CASE(7) ITCONV_REGISTER_CASE(8) ITCONV_REGISTER_CASE(9)
      ITCONV_REGISTER_CASE(10) ITCONV_REGISTER_CASE(11) ITCONV_REGISTER_CASE(12) ITCONV_REGISTER_CASE(13)
      ITCONV_REGISTER_CASE(14) ITCONV_REGISTER_CASE(15) ITCONV_REGISTER_CASE(16)
#undef ITCONV_REGISTER_CASE
      default:
        break;
    }
    for (; i0 + kBlock <= end; i0 += kBlock) couple_uniform_block<scalar_t, acc_t>(ptrs, n, a, b, i0, kBlock);
    if (i0 < end) couple_uniform_block<scalar_t, acc_t>(ptrs, n, a, b, i0, end - i0);
    return;
  }
  std::vector<acc_t> m(coeffs.matrix.begin(), coeffs.matrix.end());
  std::vector<acc_t> staged(n * kBlock);
  int64_t i0 = begin;
  for (; i0 + kBlock <= end; i0 += kBlock) couple_matrix_block<scalar_t, acc_t>(ptrs, n, m.data(), staged.data(), i0, kBlock);
  if (i0 < end) couple_matrix_block<scalar_t, acc_t>(ptrs, n, m.data(), staged.data(), i0, end - i0);
}

// A dense group bound to its dtype: the chunk function and the raw member pointers.
struct BoundGroup {
  void (*run)(const BoundGroup&, int64_t, int64_t);
  std::vector<void*> ptrs;
  const Coefficients* coeffs;
  bool in_registers;
};

// One compiled clone per instruction set (cpu_features.h picks one at run time: the widest the CPU has,
// or a narrower one for an A/B measurement); couple_chunk is inlined into each.
#define ITCONV_RUN_BOUND(NAME, TARGET)                                                                     \
  template <typename scalar_t>                                                                             \
  TARGET void NAME(const BoundGroup& group, int64_t begin, int64_t end) {                                  \
    couple_chunk<scalar_t>(reinterpret_cast<scalar_t* const*>(group.ptrs.data()),                          \
                           static_cast<int64_t>(group.ptrs.size()), *group.coeffs, group.in_registers, begin, \
                           end);                                                                           \
  }
ITCONV_RUN_BOUND(run_bound_avx512, ITCONV_TARGET_AVX512)
ITCONV_RUN_BOUND(run_bound_avx2, ITCONV_TARGET_AVX2)
ITCONV_RUN_BOUND(run_bound_default, )
#undef ITCONV_RUN_BOUND

template <typename scalar_t>
auto run_bound_for(cpu::Isa isa) -> void (*)(const BoundGroup&, int64_t, int64_t) {
  switch (isa) {
    case cpu::Isa::Avx512: return &run_bound_avx512<scalar_t>;
    case cpu::Isa::Avx2: return &run_bound_avx2<scalar_t>;
    default: return &run_bound_default<scalar_t>;
  }
}

// Whether more members than an L1 set has ways start in the same set (their lines at every step then
// land in one set): page-aligned allocations, i.e. every large gradient, do whenever the L1 has a page's
// worth of sets or fewer. The register path must keep all T lines of a step in L1 until it stores them;
// for such groups it ran at half speed (16 congruent members of 36,864 floats, one thread: 103 us against
// 44 us spread out), while the block path, which reads one member's block at a time, takes 62 us. The
// geometry is this machine's (cpu_features.h): 32 KiB 8-way on the Zen 4 the figures come from; on a 48 KiB
// 12-way Ice Lake, issue 15 reports 84-106 us with 8 ways assumed against 60-74 us with 12 (10 congruent
// members). Here, pretending 12 ways costs 1.34x (benchmarks/NOTES.md).
bool crowds_an_l1_set(const std::vector<void*>& ptrs) {
  const cpu::L1Cache& l1 = cpu::l1_cache();
  // Counts per set on the stack (L1s have 64 sets, a page's worth, on every x86 we know of); the rare larger
  // geometry folds onto 256 counters, which can only over-report crowding (the safe direction).
  std::array<int32_t, 256> members_in_set{};
  const auto sets = static_cast<uintptr_t>(std::min<int64_t>(l1.sets(), members_in_set.size()));
  for (const void* p : ptrs) {
    if (++members_in_set[(reinterpret_cast<uintptr_t>(p) / l1.line) % sets] > l1.ways) return true;
  }
  return false;
}

void soft_couple_cpu(
    at::TensorList grads,
    at::IntArrayRef group_sizes,
    double lam,
    c10::string_view kernel,
    c10::optional<double> bandwidth,
    int64_t skip_first) {
  for (const auto& t : grads) {  // first, before anything reads a tensor
    TORCH_CHECK_VALUE(t.device().is_cpu(), "soft_couple_ (CPU): every gradient must be on the CPU, got ", t.device());
  }
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;
  const auto groups = prepare_groups(grads, group_sizes, lam, std::string(kernel), bandwidth, skip_first, write_back);
  if (groups.empty()) return;

  std::vector<BoundGroup> bound(groups.size());
  std::vector<std::pair<int64_t, int64_t>> items;  // (group, first element of the chunk)
  for (size_t g = 0; g < groups.size(); ++g) {
    const auto& group = groups[g];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.members[0].scalar_type(), "soft_couple_cpu", [&] {
      bound[g].run = run_bound_for<scalar_t>(cpu::selected_isa());
    });
    for (const auto& t : group.members) bound[g].ptrs.push_back(t.data_ptr());
    bound[g].coeffs = &group.coeffs;
    // Register path: 2 .. register_limit() members (what the clone's vector registers hold), not crowding L1.
    bound[g].in_registers = static_cast<int>(group.members.size()) <= cpu::register_limit() &&
                            !crowds_an_l1_set(bound[g].ptrs);
    for (int64_t begin = 0; begin < group.numel; begin += kChunk) items.emplace_back(g, begin);
  }
  // Items differ in cost (T x chunk length); at::parallel_for splits a range evenly, so split the
  // running total of the cost instead: each thread takes the items whose cost starts in its share.
  std::vector<int64_t> cost_before(items.size() + 1, 0);
  for (size_t k = 0; k < items.size(); ++k) {
    const auto& [g, begin] = items[k];
    const int64_t len = std::min(kChunk, groups[g].numel - begin);
    cost_before[k + 1] = cost_before[k] + len * static_cast<int64_t>(groups[g].members.size());
  }
  const int64_t total_cost = cost_before.back();
  const int64_t n_parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items.size()));
  at::parallel_for(0, n_parts, 1, [&](int64_t first_part, int64_t last_part) {
    const int64_t lo = total_cost * first_part / n_parts, hi = total_cost * last_part / n_parts;
    auto k = std::lower_bound(cost_before.begin(), cost_before.end() - 1, lo) - cost_before.begin();
    for (; k < static_cast<int64_t>(items.size()) && cost_before[k] < hi; ++k) {
      const auto& [g, begin] = items[k];
      const auto& group = bound[g];
      group.run(group, begin, std::min(begin + kChunk, groups[g].numel));
    }
  });
  finish_write_back(write_back);
}

}  // namespace

TORCH_LIBRARY_IMPL(itconv_fast, CPU, m) {
  m.impl("soft_couple_", &soft_couple_cpu);
}

}  // namespace soft_couple
}  // namespace itconv_fast
