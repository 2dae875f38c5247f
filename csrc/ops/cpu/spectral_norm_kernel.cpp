// CPU kernel of the matrix-mode power iteration: every matrix W_b = weight[b] reshaped to
// [C_out, C_in*kh*kw] runs all n_iter steps (v = W^T u / |.|, u = W v / |.|) in one parallel pass
// over b. Accumulates in float32 (float64 for float64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "../spectral_norm.h"
#include "cpu_clones.h"

namespace itconv_fast {
namespace spectral {
namespace {

// Dot product with 8 independent partial sums: the compiler vectorises it (a single running sum is a
// strict FP dependency chain that it may not reorder).
template <typename acc_t, typename a_t, typename b_t>
acc_t dot8(const a_t* a, const b_t* b, int64_t n) {
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    for (int j = 0; j < 8; ++j) part[j] += static_cast<acc_t>(a[k + j]) * static_cast<acc_t>(b[k + j]);
  }
  acc_t total = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; k < n; ++k) total += static_cast<acc_t>(a[k]) * static_cast<acc_t>(b[k]);
  return total;
}


template <typename scalar_t>
ITCONV_CPU_CLONES void power_iteration_one(const scalar_t* w, scalar_t* u, scalar_t* v, scalar_t* sigma, int64_t rows,
                                           int64_t cols, int64_t n_iter) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> acc(cols), un(rows);
  for (int64_t it = 0; it < n_iter; ++it) {
    // v = W^T u, row by row (contiguous reads of W, vectorised over columns).
    std::fill(acc.begin(), acc.end(), acc_t(0));
    for (int64_t o = 0; o < rows; ++o) {
      const acc_t uo = static_cast<acc_t>(u[o]);
      const scalar_t* row = w + o * cols;
      for (int64_t k = 0; k < cols; ++k) acc[k] += static_cast<acc_t>(row[k]) * uo;
    }
    const acc_t vnorm = std::max<acc_t>(std::sqrt(dot8<acc_t>(acc.data(), acc.data(), cols)), static_cast<acc_t>(kNormEps));
    for (int64_t k = 0; k < cols; ++k) v[k] = static_cast<scalar_t>(acc[k] / vnorm);
    // u = W v.
    for (int64_t o = 0; o < rows; ++o) un[o] = dot8<acc_t>(w + o * cols, v, cols);
    const acc_t wv_norm = std::sqrt(dot8<acc_t>(un.data(), un.data(), rows));  // = sigma = <u_new, W v>
    const acc_t unorm = std::max<acc_t>(wv_norm, static_cast<acc_t>(kNormEps));
    for (int64_t o = 0; o < rows; ++o) u[o] = static_cast<scalar_t>(un[o] / unorm);
    *sigma = static_cast<scalar_t>(wv_norm);
  }
}

std::tuple<at::Tensor, at::Tensor> power_iteration_matrix_cpu(const at::Tensor& weight, at::Tensor& u, int64_t n_iter) {
  const auto [B, rows, cols] = check_matrix(weight, u, n_iter);
  const at::Tensor w = weight.contiguous();
  at::Tensor uc = u.contiguous();
  at::Tensor v = at::empty({B, cols}, weight.options());
  at::Tensor sigma = at::empty({B}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "power_iteration_matrix_cpu", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* up = uc.data_ptr<scalar_t>();
    scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* sp = sigma.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t first, int64_t last) {
      for (int64_t b = first; b < last; ++b) {
        power_iteration_one<scalar_t>(wp + b * rows * cols, up + b * rows, vp + b * cols, sp + b, rows, cols, n_iter);
      }
    });
  });
  if (!uc.is_same(u)) u.copy_(uc);
  return {v, sigma};
}

}  // namespace

TORCH_LIBRARY_IMPL(itconv_fast, CPU, m) {
  m.impl("power_iteration_matrix_", &power_iteration_matrix_cpu);
}

}  // namespace spectral
}  // namespace itconv_fast
