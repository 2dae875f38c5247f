// CPU kernels of the fused BatchNorm + ReLU (training mode; formulas in ../batch_norm_relu.h).
//
// Why fused: in ATen a pre-activation block's BN + ReLU is four passes forward (two reductions, the
// normalisation, the ReLU) and three backward (ReLU's mask, BN's reduction, BN's gradient); here the
// ReLU rides on the normalisation, and the backward's two passes read dy and x only (the mask recomputed
// from x), with no intermediate tensor (benchmarks/NOTES.md, "Fused BatchNorm + ReLU").
//
// Layouts: channels-last 4-D tensors are read as [M, C] rows (the loops vectorise over the channels),
// contiguous ones as [N, C, S] planes (over the plane); the loops are batch_norm_relu_loops.h. Reductions
// are blocked: float within a block of rows (or a piece of a plane), double across blocks, combined in
// block order, so results do not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../batch_norm_relu.h"
#include "batch_norm_relu_loops.h"

namespace itconv_fast {
namespace batch_norm_relu {
namespace {

using namespace cpu_loops;

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

int64_t rows_per_block(int64_t C) { return std::max<int64_t>(1, kRowBlockElements / std::max<int64_t>(C, 1)); }

// K per-channel sums over the batch, in double: row blocks (or planes) in parallel into `partial`, then
// summed in order per channel. `rows_fn(r0, r1, acc_t* part /*K*C*/)` and `plane_fn(n, c, double* sums /*K*/)`.
template <int K, typename acc_t, typename RowsFn, typename PlaneFn>
std::vector<double> channel_sums(const Geometry& s, RowsFn&& rows_fn, PlaneFn&& plane_fn) {
  const int64_t C = s.C;
  std::vector<double> total(static_cast<size_t>(K * C), 0.0);
  if (s.rows) {
    const int64_t R = rows_per_block(C), blocks = (s.M + R - 1) / R;
    std::vector<double> partial(static_cast<size_t>(blocks * K * C));
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> part(static_cast<size_t>(K * C));
      for (int64_t b = b0; b < b1; ++b) {
        std::fill(part.begin(), part.end(), acc_t(0));
        rows_fn(b * R, std::min(s.M, (b + 1) * R), part.data());
        std::copy(part.begin(), part.end(), partial.begin() + b * K * C);
      }
    });
    at::parallel_for(0, K * C, 256, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        double sum = 0;
        for (int64_t b = 0; b < blocks; ++b) sum += partial[b * K * C + i];
        total[i] = sum;
      }
    });
  } else {
    std::vector<double> partial(static_cast<size_t>(s.N * C * K), 0.0);
    at::parallel_for(0, s.N * C, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) plane_fn(p / C, p % C, partial.data() + p * K);
    });
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t c = 0; c < C; ++c)
        for (int k = 0; k < K; ++k) total[k * C + c] += partial[(n * C + c) * K + k];
  }
  return total;
}

// Elementwise pass: rows_fn(r0, r1) over row ranges, or plane_fn(n, c) per plane.
template <typename RowsFn, typename PlaneFn>
void elementwise(const Geometry& s, RowsFn&& rows_fn, PlaneFn&& plane_fn) {
  if (s.rows) {
    const int64_t R = rows_per_block(s.C);
    at::parallel_for(0, s.M, R, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; r += R) rows_fn(r, std::min(r1, r + R));
    });
  } else {
    at::parallel_for(0, s.N * s.C, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) plane_fn(p / s.C, p % s.C);
    });
  }
}

Outputs batch_norm_relu_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& running_mean, const at::Tensor& running_var, double momentum,
                            double eps) {
  ForwardTensors t = prepare_forward(input, weight, bias, running_mean, running_var, momentum, eps);
  const Geometry& s = t.g;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.x.scalar_type(), "batch_norm_relu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xd = t.x.const_data_ptr<scalar_t>();
    const int64_t C = s.C, S = s.S;
    const double M = static_cast<double>(s.M);
    const auto sum = channel_sums<1, acc_t>(
        s, [&](int64_t r0, int64_t r1, acc_t* part) { rows_sum<false, scalar_t, acc_t>(xd, r0, r1, C, nullptr, part); },
        [&](int64_t n, int64_t c, double* sums) {
          sums[0] = plane_sum<false, scalar_t, acc_t>(xd + (n * C + c) * S, S, acc_t(0));
        });
    std::vector<acc_t> mean(C), a(C), shift(C);
    for (int64_t c = 0; c < C; ++c) mean[c] = static_cast<acc_t>(sum[c] / M);
    const auto sq = channel_sums<1, acc_t>(
        s,
        [&](int64_t r0, int64_t r1, acc_t* part) {
          rows_sum<true, scalar_t, acc_t>(xd, r0, r1, C, mean.data(), part);
        },
        [&](int64_t n, int64_t c, double* sums) {
          sums[0] = plane_sum<true, scalar_t, acc_t>(xd + (n * C + c) * S, S, mean[c]);
        });
    acc_t* sm = t.save_mean.mutable_data_ptr<acc_t>();
    acc_t* si = t.save_invstd.mutable_data_ptr<acc_t>();
    const acc_t* wd = t.weight.const_data_ptr<acc_t>();
    const acc_t* bd = t.bias.const_data_ptr<acc_t>();
    const acc_t* rm = t.running_mean.const_data_ptr<acc_t>();
    const acc_t* rv = t.running_var.const_data_ptr<acc_t>();
    acc_t* nm = t.new_mean.mutable_data_ptr<acc_t>();
    acc_t* nv = t.new_var.mutable_data_ptr<acc_t>();
    // The running statistics: momentum * batch + (1 - momentum) * running (ATen's order).
    const acc_t mom = static_cast<acc_t>(momentum), keep = static_cast<acc_t>(1.0 - momentum);
    for (int64_t c = 0; c < C; ++c) {
      sm[c] = mean[c];
      si[c] = static_cast<acc_t>(1.0 / std::sqrt(sq[c] / M + eps));
      affine_coefficients(mean[c], si[c], wd[c], bd[c], a[c], shift[c]);
      nm[c] = mom * mean[c] + keep * rm[c];
      nv[c] = mom * static_cast<acc_t>(sq[c] / (M - 1.0)) + keep * rv[c];
    }
    scalar_t* od = t.out.mutable_data_ptr<scalar_t>();
    elementwise(
        s,
        [&](int64_t r0, int64_t r1) {
          rows_normalize_relu<scalar_t, acc_t>(xd, od, r0, r1, C, a.data(), shift.data());
        },
        [&](int64_t n, int64_t c) {
          const int64_t o = (n * C + c) * S;
          plane_normalize_relu<scalar_t, acc_t>(xd + o, od + o, S, a[c], shift[c]);
        });
  });
  return finish_forward(t, running_mean, running_var);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_cpu(const at::Tensor& grad_out,
                                                                            const at::Tensor& input,
                                                                            const at::Tensor& weight,
                                                                            const at::Tensor& bias,
                                                                            const at::Tensor& save_mean,
                                                                            const at::Tensor& save_invstd) {
  BackwardTensors t = prepare_backward(grad_out, input, weight, bias, save_mean, save_invstd);
  const Geometry& s = t.g;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.x.scalar_type(), "batch_norm_relu_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xd = t.x.const_data_ptr<scalar_t>();
    const scalar_t* dyd = t.dy.const_data_ptr<scalar_t>();
    const acc_t* mean = t.save_mean.const_data_ptr<acc_t>();
    const acc_t* invstd = t.save_invstd.const_data_ptr<acc_t>();
    const acc_t* wd = t.weight.const_data_ptr<acc_t>();
    const acc_t* bd = t.bias.const_data_ptr<acc_t>();
    const int64_t C = s.C, S = s.S;
    const double M = static_cast<double>(s.M);
    std::vector<acc_t> a(C), shift(C);
    for (int64_t c = 0; c < C; ++c) affine_coefficients(mean[c], invstd[c], wd[c], bd[c], a[c], shift[c]);
    const auto sums = channel_sums<2, acc_t>(
        s,
        [&](int64_t r0, int64_t r1, acc_t* part) {
          rows_grad_sums<scalar_t, acc_t>(dyd, xd, r0, r1, C, mean, a.data(), shift.data(), part);
        },
        [&](int64_t n, int64_t c, double* out_sums) {
          const int64_t o = (n * C + c) * S;
          plane_grad_sums<scalar_t, acc_t>(dyd + o, xd + o, S, mean[c], a[c], shift[c], out_sums);
        });
    std::vector<acc_t> gm(C), k(C), scale(C);
    acc_t* gw = t.grad_weight.mutable_data_ptr<acc_t>();
    acc_t* gb = t.grad_bias.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      gb[c] = static_cast<acc_t>(sums[c]);
      gw[c] = static_cast<acc_t>(sums[C + c]) * invstd[c];
      gm[c] = static_cast<acc_t>(sums[c] / M);
      k[c] = static_cast<acc_t>(sums[C + c] / M) * invstd[c] * invstd[c];
      scale[c] = invstd[c] * wd[c];
    }
    scalar_t* dxd = t.dx.mutable_data_ptr<scalar_t>();
    elementwise(
        s,
        [&](int64_t r0, int64_t r1) {
          rows_grad_input<scalar_t, acc_t>(dyd, xd, dxd, r0, r1, C, mean, a.data(), shift.data(), gm.data(), k.data(),
                                           scale.data());
        },
        [&](int64_t n, int64_t c) {
          const int64_t o = (n * C + c) * S;
          plane_grad_input<scalar_t, acc_t>(dyd + o, xd + o, dxd + o, S, mean[c], a[c], shift[c], gm[c], k[c],
                                            scale[c]);
        });
  });
  return finish_backward(t, weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(itconv_fast, CPU, m) {
  m.impl("batch_norm_relu", &batch_norm_relu_cpu);
  m.impl("batch_norm_relu_backward", &batch_norm_relu_backward_cpu);
}

}  // namespace batch_norm_relu
}  // namespace itconv_fast
