// Helpers shared by the CPU and CUDA kernels of soft_couple_: argument checks, the mixing
// coefficients, and the reduction of arbitrary layouts to dense groups.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

namespace itconv_fast {
namespace soft_couple {

enum class Kernel { Uniform, Triangular };

inline Kernel parse_kernel(const std::string& name) {
  if (name == "uniform") return Kernel::Uniform;
  if (name == "triangular") return Kernel::Triangular;
  TORCH_CHECK_VALUE(false, "soft_couple_: unknown kernel '", name, "' (expected 'uniform' or 'triangular')");
}

// Mixing coefficients of one group's coupled blocks (n of them), computed in double.
// Uniform: out_t = a * g_t + b * sum_u g_u with a = 1 - lam, b = lam / n (the sum runs u = 0..n-1
// in order, so every implementation rounds identically).
// Triangular: out_t = sum_u M[t, u] g_u (u in order), M = (1 - lam) I + lam K, row-major n x n.
// The Python reference (itconv_fast/_reference.py) performs exactly the same double operations.
struct Coefficients {
  bool uniform = true;
  double a = 1.0;
  double b = 0.0;
  std::vector<double> matrix;
};

inline double default_bandwidth(int64_t n) {
  return std::max(1.0, static_cast<double>(n) / 2.0);
}

inline Coefficients mixing_coefficients(Kernel kernel, double lam, c10::optional<double> bandwidth, int64_t n) {
  Coefficients c;
  if (kernel == Kernel::Uniform) {
    c.uniform = true;
    c.a = 1.0 - lam;
    c.b = lam / static_cast<double>(n);
    return c;
  }
  c.uniform = false;
  const double h = bandwidth.has_value() ? *bandwidth : default_bandwidth(n);
  c.matrix.assign(n * n, 0.0);
  for (int64_t t = 0; t < n; ++t) {
    double row_sum = 0.0;
    for (int64_t u = 0; u < n; ++u) {
      const double w = std::max(0.0, 1.0 - std::abs(static_cast<double>(t - u)) / h);
      c.matrix[t * n + u] = w;
      row_sum += w;
    }
    for (int64_t u = 0; u < n; ++u) {
      const double k = c.matrix[t * n + u] / row_sum;
      c.matrix[t * n + u] = lam * k + (t == u ? 1.0 - lam : 0.0);
    }
  }
  return c;
}

// A group ready for a kernel: the coupled members only, all dense with one layout, so that element k
// of every member's buffer is the same logical element.
struct DenseGroup {
  std::vector<at::Tensor> members;
  int64_t numel = 0;
  Coefficients coeffs;
};

// Checks every argument (before anything is written), then splits `grads` into groups. Members with
// a layout the kernels cannot walk directly (non-dense, or strides differing within the group) are
// replaced by contiguous copies; `write_back` collects the (original, copy) pairs to copy back after
// the kernel ran.
inline std::vector<DenseGroup> prepare_groups(
    const at::TensorList grads,
    at::IntArrayRef group_sizes,
    double lam,
    const std::string& kernel_name,
    c10::optional<double> bandwidth,
    int64_t skip_first,
    std::vector<std::pair<at::Tensor, at::Tensor>>& write_back) {
  TORCH_CHECK_VALUE(lam >= 0.0 && lam <= 1.0, "soft_couple_: lam must lie in [0, 1], got ", lam);
  const Kernel kernel = parse_kernel(kernel_name);
  TORCH_CHECK_VALUE(!bandwidth.has_value() || *bandwidth >= 1.0,
                    "soft_couple_: bandwidth must be >= 1, got ", bandwidth.value_or(0.0));
  TORCH_CHECK_VALUE(skip_first >= 0, "soft_couple_: skip_first must be >= 0, got ", skip_first);
  int64_t total = 0;
  for (const auto size : group_sizes) {
    TORCH_CHECK_VALUE(size >= 0, "soft_couple_: negative group size ", size);
    total += size;
  }
  TORCH_CHECK_VALUE(total == static_cast<int64_t>(grads.size()), "soft_couple_: group_sizes sum to ", total,
                    " but ", grads.size(), " tensors were given");

  // The bytes every non-empty member can touch, to refuse overlaps below.
  struct Span {
    int64_t device;  // type and index in one integer (cheap to sort: a ResNet-101 brings 288 spans)
    uintptr_t start, end;
    size_t group;
    int64_t member;
  };
  std::vector<Span> spans;
  spans.reserve(grads.size());
  int64_t offset = 0;
  for (size_t g = 0; g < group_sizes.size(); ++g) {
    const int64_t size = group_sizes[g];
    if (size > 0) {
      TORCH_CHECK_VALUE(skip_first < size, "soft_couple_: group ", g, ": skip_first=", skip_first,
                        " must be < T=", size);
      const at::Tensor& first = grads[offset];
      const auto dtype = first.scalar_type();
      TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                       "soft_couple_: group ", g, ": dtype ", dtype,
                       " is not supported; use float32, float64, float16 or bfloat16");
      for (int64_t j = 0; j < size; ++j) {
        const at::Tensor& t = grads[offset + j];
        TORCH_CHECK_VALUE(t.sizes() == first.sizes(), "soft_couple_: group ", g, ": member ", j, " has shape ",
                          t.sizes(), ", member 0 has ", first.sizes());
        TORCH_CHECK_TYPE(t.scalar_type() == dtype, "soft_couple_: group ", g, ": member ", j, " has dtype ",
                         t.scalar_type(), ", member 0 has ", dtype);
        TORCH_CHECK_VALUE(t.device() == first.device(), "soft_couple_: group ", g, ": member ", j, " is on ",
                          t.device(), ", member 0 on ", first.device());
        TORCH_CHECK_VALUE(!(t.requires_grad() && at::GradMode::is_enabled()), "soft_couple_: group ", g,
                          ", member ", j, " requires grad; pass gradients (p.grad), not parameters");
        TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, "soft_couple_: group ", g,
                          ": member ", j, " has internally overlapping memory (expanded?)");
        if (t.numel() > 0) {
          int64_t extent = 1;
          for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
          const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
          const int64_t device = static_cast<int64_t>(t.device().type()) * 65536 + t.device().index();
          spans.push_back({device, start, start + extent * t.element_size(), g, j});
        }
      }
    }
    offset += size;
  }
  // Two members sharing memory would be written twice (and race): refuse any overlap.
  std::sort(spans.begin(), spans.end(), [](const Span& x, const Span& y) {
    return x.device < y.device || (x.device == y.device && x.start < y.start);
  });
  for (size_t k = 1; k < spans.size(); ++k) {
    const Span& prev = spans[k - 1];
    const Span& next = spans[k];
    if (prev.device == next.device && next.start < prev.end) {
      TORCH_CHECK_VALUE(false, "soft_couple_: group ", next.group, ", member ", next.member,
                        " overlaps in memory with group ", prev.group, ", member ", prev.member);
    }
  }

  std::vector<DenseGroup> groups;
  if (lam == 0.0) return groups;  // the exact identity: touch nothing
  offset = 0;
  for (size_t g = 0; g < group_sizes.size(); ++g) {
    const int64_t size = group_sizes[g];
    const int64_t n = size - skip_first;
    if (size == 0 || n <= 1 || grads[offset].numel() == 0) {  // a single coupled block is its own mean
      offset += size;
      continue;
    }
    DenseGroup group;
    group.numel = grads[offset].numel();
    group.coeffs = mixing_coefficients(kernel, lam, bandwidth, n);
    const at::Tensor& lead = grads[offset + skip_first];
    bool direct = lead.is_non_overlapping_and_dense();
    for (int64_t j = skip_first; j < size && direct; ++j) {
      direct = grads[offset + j].is_non_overlapping_and_dense() && grads[offset + j].strides() == lead.strides();
    }
    for (int64_t j = skip_first; j < size; ++j) {
      const at::Tensor& t = grads[offset + j];
      if (direct) {
        group.members.push_back(t);
      } else {
        at::Tensor copy = t.contiguous();
        if (!copy.is_same(t)) write_back.emplace_back(t, copy);
        group.members.push_back(copy);
      }
    }
    groups.push_back(std::move(group));
    offset += size;
  }
  return groups;
}

// The mix with ATen operations only, in the reference's order and precision (values in float, or double
// for double; one rounding per multiply and per add, no fused multiply-add), so it equals the kernels bit for
// bit. It needs no host-side table, which makes it the CUDA path under graph capture: every operation it
// issues is capturable, and nothing refers to host memory that is freed after the call.
inline void couple_with_aten_ops(const std::vector<DenseGroup>& groups) {
  for (const auto& group : groups) {
    const auto dtype = group.members[0].scalar_type();
    const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
    // A coefficient rounded to the accumulation type first, as the kernels and the reference do.
    auto coeff = [&](double c) { return acc == at::kDouble ? at::Scalar(c) : at::Scalar(static_cast<double>(static_cast<float>(c))); };
    std::vector<at::Tensor> values;
    for (const auto& t : group.members) values.push_back(t.to(acc));
    const int64_t n = static_cast<int64_t>(values.size());
    std::vector<at::Tensor> mixed;
    if (group.coeffs.uniform) {
      at::Tensor total = values[0].clone();
      for (int64_t u = 1; u < n; ++u) total = total.add(values[u]);
      const at::Tensor shared = total.mul(coeff(group.coeffs.b));
      for (const auto& v : values) mixed.push_back(v.mul(coeff(group.coeffs.a)).add(shared));
    } else {
      for (int64_t t = 0; t < n; ++t) {
        at::Tensor out = values[0].mul(coeff(group.coeffs.matrix[t * n]));
        for (int64_t u = 1; u < n; ++u) out = out.add(values[u].mul(coeff(group.coeffs.matrix[t * n + u])));
        mixed.push_back(out);
      }
    }
    for (int64_t t = 0; t < n; ++t) group.members[t].copy_(mixed[t]);
  }
}

inline void finish_write_back(std::vector<std::pair<at::Tensor, at::Tensor>>& write_back) {
  for (auto& pair : write_back) pair.first.copy_(pair.second);
}

}  // namespace soft_couple
}  // namespace itconv_fast
