// CPU kernel of soft_couple_: one parallel pass over (group, chunk) work items. Each item reads the
// T gradients of one chunk of its group once from memory (the second touch hits cache), mixes them
// in float (double for double tensors) and writes them back, so the op streams like a copy.
//
// Compiled with -ffp-contract=off: the mixes use separate multiplies and adds, exactly as the
// pure-PyTorch reference does, so CPU results equal the reference bit for bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../soft_couple.h"
#include "cpu_clones.h"

namespace itconv_fast {
namespace soft_couple {
namespace {

// Elements per work item: T chunks of this size (256 KiB for 16 float gradients) stay in L2
// between the read and the write sweep.
constexpr int64_t kChunk = 4096;


template <typename scalar_t>
ITCONV_CPU_CLONES void couple_chunk(
    scalar_t* const* ptrs, int64_t n, const Coefficients& coeffs, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t len = end - begin;
  if (coeffs.uniform) {
    // shared[i] = b * sum_u g_u[i], then g_t[i] = a * g_t[i] + shared[i].
    alignas(64) acc_t shared[kChunk];
    const scalar_t* __restrict__ g0 = ptrs[0] + begin;
    for (int64_t i = 0; i < len; ++i) shared[i] = static_cast<acc_t>(g0[i]);
    for (int64_t u = 1; u < n; ++u) {
      const scalar_t* __restrict__ gu = ptrs[u] + begin;
      for (int64_t i = 0; i < len; ++i) shared[i] = shared[i] + static_cast<acc_t>(gu[i]);
    }
    const acc_t a = static_cast<acc_t>(coeffs.a);
    const acc_t b = static_cast<acc_t>(coeffs.b);
    for (int64_t i = 0; i < len; ++i) shared[i] = b * shared[i];
    for (int64_t t = 0; t < n; ++t) {
      scalar_t* __restrict__ gt = ptrs[t] + begin;
      for (int64_t i = 0; i < len; ++i) {
        const acc_t own = a * static_cast<acc_t>(gt[i]);
        gt[i] = static_cast<scalar_t>(own + shared[i]);
      }
    }
    return;
  }
  // General mixing matrix: stage all n chunks in acc_t first (every output needs every input).
  std::vector<acc_t> staged(n * len);
  for (int64_t u = 0; u < n; ++u) {
    const scalar_t* gu = ptrs[u] + begin;
    acc_t* su = staged.data() + u * len;
    for (int64_t i = 0; i < len; ++i) su[i] = static_cast<acc_t>(gu[i]);
  }
  std::vector<acc_t> m(coeffs.matrix.begin(), coeffs.matrix.end());
  acc_t out[kChunk];
  for (int64_t t = 0; t < n; ++t) {
    const acc_t* row = m.data() + t * n;
    const acc_t m0 = row[0];
    for (int64_t i = 0; i < len; ++i) out[i] = m0 * staged[i];
    for (int64_t u = 1; u < n; ++u) {
      const acc_t mu = row[u];
      const acc_t* su = staged.data() + u * len;
      for (int64_t i = 0; i < len; ++i) {
        const acc_t term = mu * su[i];
        out[i] = out[i] + term;
      }
    }
    scalar_t* gt = ptrs[t] + begin;
    for (int64_t i = 0; i < len; ++i) gt[i] = static_cast<scalar_t>(out[i]);
  }
}

// A dense group bound to its dtype: the chunk function and the raw member pointers.
struct BoundGroup {
  void (*run)(const BoundGroup&, int64_t, int64_t);
  std::vector<void*> ptrs;
  const Coefficients* coeffs;
};

template <typename scalar_t>
void run_bound(const BoundGroup& group, int64_t begin, int64_t end) {
  couple_chunk<scalar_t>(reinterpret_cast<scalar_t* const*>(group.ptrs.data()),
                         static_cast<int64_t>(group.ptrs.size()), *group.coeffs, begin, end);
}

void soft_couple_cpu(
    at::TensorList grads,
    at::IntArrayRef group_sizes,
    double lam,
    c10::string_view kernel,
    c10::optional<double> bandwidth,
    int64_t skip_first) {
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;
  const auto groups = prepare_groups(grads, group_sizes, lam, std::string(kernel), bandwidth, skip_first, write_back);
  for (const auto& t : grads) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), "soft_couple_ (CPU): every gradient must be on the CPU, got ", t.device());
  }
  if (groups.empty()) return;

  std::vector<BoundGroup> bound(groups.size());
  std::vector<std::pair<int64_t, int64_t>> items;  // (group, first element of the chunk)
  for (size_t g = 0; g < groups.size(); ++g) {
    const auto& group = groups[g];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.members[0].scalar_type(), "soft_couple_cpu", [&] {
      bound[g].run = &run_bound<scalar_t>;
    });
    for (const auto& t : group.members) bound[g].ptrs.push_back(t.data_ptr());
    bound[g].coeffs = &group.coeffs;
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
