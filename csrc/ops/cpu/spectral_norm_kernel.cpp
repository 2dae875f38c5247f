// CPU kernel of the matrix-mode power iteration: every matrix W_b = weight[b] reshaped to
// [C_out, C_in*kh*kw] runs all n_iter steps (v = W^T u / |.|, u = W v / |.|) in one parallel pass
// over b. Accumulates in float32 (float64 for float64).
//
// A step is two sweeps over W: W^T u row by row (sequential reads from memory), then W (W^T u) =
// |W^T u| W v (the normalisation is a scalar applied at the end), which finds W in cache (one thread
// per matrix: the shared L3 holds both threads' matrices). Splitting a large matrix's rows between the
// threads, so that each second sweep reads its own L2, measured 8% slower (interleaved A/B).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "../spectral_norm.h"
#include "cpu_clones.h"

namespace itconv_fast {
namespace spectral {
namespace {

// Dot product with kLanes independent partial sums, so the compiler can vectorise it without
// reassociating (a single running sum is a strict FP dependency chain): 64 lanes are four 16-wide
// AVX-512 accumulators, enough to hide the add latency (with 8 lanes, one vector chain, this loop ran
// at a third of the speed).
constexpr int kLanes = 64;

template <typename acc_t, typename a_t, typename b_t>
ITCONV_ALWAYS_INLINE acc_t dot(const a_t* a, const b_t* b, int64_t n) {
  acc_t part[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) part[j] = part[j] + static_cast<acc_t>(a[k + j]) * static_cast<acc_t>(b[k + j]);
  }
  for (int j = 0; k + j < n; ++j) part[j] = part[j] + static_cast<acc_t>(a[k + j]) * static_cast<acc_t>(b[k + j]);
  for (int width = kLanes / 2; width > 0; width /= 2) {  // pairwise
    for (int j = 0; j < width; ++j) part[j] = part[j] + part[j + width];
  }
  return part[0];
}

// acc[k] += sum_o W[o, k] u[o], four rows per sweep of acc (a quarter of its loads and
// stores; every element still adds its rows in order): 10% faster on ResNet-101-64's kernels
// (interleaved A/B).
template <typename scalar_t, typename acc_t>
ITCONV_ALWAYS_INLINE void sweep_wtu(const scalar_t* w, const scalar_t* u, int64_t rows, int64_t cols, acc_t* acc) {
  int64_t o = 0;
  for (; o + 4 <= rows; o += 4) {
    const acc_t u0 = static_cast<acc_t>(u[o]), u1 = static_cast<acc_t>(u[o + 1]);
    const acc_t u2 = static_cast<acc_t>(u[o + 2]), u3 = static_cast<acc_t>(u[o + 3]);
    const scalar_t* w0 = w + o * cols;
    const scalar_t* w1 = w0 + cols;
    const scalar_t* w2 = w1 + cols;
    const scalar_t* w3 = w2 + cols;
#pragma omp simd
    for (int64_t k = 0; k < cols; ++k) {
      acc_t a = acc[k] + static_cast<acc_t>(w0[k]) * u0;
      a = a + static_cast<acc_t>(w1[k]) * u1;
      a = a + static_cast<acc_t>(w2[k]) * u2;
      acc[k] = a + static_cast<acc_t>(w3[k]) * u3;
    }
  }
  for (; o < rows; ++o) {
    const acc_t uo = static_cast<acc_t>(u[o]);
    const scalar_t* row = w + o * cols;
#pragma omp simd
    for (int64_t k = 0; k < cols; ++k) acc[k] = acc[k] + static_cast<acc_t>(row[k]) * uo;
  }
}

// y[o] = W[o, :] . x for every row.
template <typename scalar_t, typename acc_t>
ITCONV_ALWAYS_INLINE void sweep_wx(const scalar_t* w, int64_t rows, int64_t cols, const acc_t* x, acc_t* y) {
  for (int64_t o = 0; o < rows; ++o) y[o] = dot<acc_t>(w + o * cols, x, cols);
}

// The end of a step, from wtu = W^T u and y = W (W^T u): v = wtu / |wtu|, W v = y / |wtu|,
// sigma = |W v|, u = W v / |W v|.
template <typename scalar_t, typename acc_t>
ITCONV_ALWAYS_INLINE void finish_step(const acc_t* wtu, acc_t* y, scalar_t* u, scalar_t* v, scalar_t* sigma,
                                      int64_t rows, int64_t cols) {
  const acc_t vnorm = std::max<acc_t>(std::sqrt(dot<acc_t>(wtu, wtu, cols)), static_cast<acc_t>(kNormEps));
  for (int64_t k = 0; k < cols; ++k) v[k] = static_cast<scalar_t>(wtu[k] / vnorm);
  for (int64_t o = 0; o < rows; ++o) y[o] = y[o] / vnorm;  // = W v
  const acc_t wv_norm = std::sqrt(dot<acc_t>(y, y, rows));  // = sigma = <u_new, W v>
  const acc_t unorm = std::max<acc_t>(wv_norm, static_cast<acc_t>(kNormEps));
  for (int64_t o = 0; o < rows; ++o) u[o] = static_cast<scalar_t>(y[o] / unorm);
  *sigma = static_cast<scalar_t>(wv_norm);
}

// All n_iter steps for one matrix on one thread.
template <typename scalar_t>
ITCONV_CPU_CLONES void power_iteration_one(const scalar_t* w, scalar_t* u, scalar_t* v, scalar_t* sigma, int64_t rows,
                                           int64_t cols, int64_t n_iter) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> wtu(cols), y(rows);  // W^T u, and W (W^T u)
  for (int64_t it = 0; it < n_iter; ++it) {
    std::fill(wtu.begin(), wtu.end(), acc_t(0));
    sweep_wtu<scalar_t, acc_t>(w, u, rows, cols, wtu.data());
    sweep_wx<scalar_t, acc_t>(w, rows, cols, wtu.data(), y.data());  // from cache
    finish_step<scalar_t, acc_t>(wtu.data(), y.data(), u, v, sigma, rows, cols);
  }
}

// Runs the iteration for every matrix; kernels[b] points at matrix b's contiguous [rows, cols].
std::tuple<at::Tensor, at::Tensor> run_matrices(const std::vector<at::Tensor>& kernels, at::Tensor& u, int64_t rows,
                                                int64_t cols, int64_t n_iter) {
  const int64_t B = static_cast<int64_t>(kernels.size());
  at::Tensor uc = u.contiguous();
  at::Tensor v = at::empty({B, cols}, kernels[0].options());
  at::Tensor sigma = at::empty({B}, kernels[0].options());
  AT_DISPATCH_FLOATING_TYPES(kernels[0].scalar_type(), "power_iteration_matrix_cpu", [&] {
    std::vector<const scalar_t*> wp(B);
    for (int64_t b = 0; b < B; ++b) wp[b] = kernels[b].const_data_ptr<scalar_t>();
    scalar_t* up = uc.data_ptr<scalar_t>();
    scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* sp = sigma.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t first, int64_t last) {
      for (int64_t b = first; b < last; ++b) {
        power_iteration_one<scalar_t>(wp[b], up + b * rows, vp + b * cols, sp + b, rows, cols, n_iter);
      }
    });
  });
  if (!uc.is_same(u)) u.copy_(uc);
  return {v, sigma};
}

std::tuple<at::Tensor, at::Tensor> power_iteration_matrix_cpu(const at::Tensor& weight, at::Tensor& u, int64_t n_iter) {
  const auto [B, rows, cols] = check_matrix(weight, u, n_iter);
  const at::Tensor w = weight.contiguous();
  return run_matrices(w.unbind(0), u, rows, cols, n_iter);
}

std::tuple<at::Tensor, at::Tensor> power_iteration_matrix_list_cpu(at::TensorList weights, at::Tensor& u, int64_t n_iter) {
  const auto shape = check_kernel_list(weights, "power_iteration_matrix_");
  const auto [B, rows, cols] = check_matrix(weights[0].unsqueeze(0).expand(shape), u, n_iter);
  std::vector<at::Tensor> kernels;
  kernels.reserve(B);
  for (const auto& w : weights) kernels.push_back(w.contiguous());  // no copy for contiguous kernels
  return run_matrices(kernels, u, rows, cols, n_iter);
}

}  // namespace

TORCH_LIBRARY_IMPL(itconv_fast, CPU, m) {
  m.impl("power_iteration_matrix_", &power_iteration_matrix_cpu);
  m.impl("power_iteration_matrix_.list", &power_iteration_matrix_list_cpu);
}

}  // namespace spectral
}  // namespace itconv_fast
