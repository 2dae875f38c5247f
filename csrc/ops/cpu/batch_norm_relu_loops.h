// The vectorised loops of the fused BatchNorm + ReLU's CPU kernel (batch_norm_relu_kernel.cpp drives them):
// channels-last tensors as [M, C] rows, channels in tiles of compile-time width; contiguous tensors as
// [N, C, S] planes, with kLanes independent partial sums. Every function is compiled per vector ISA
// (ITCONV_CPU_CLONES); FMA stays off (-ffp-contract=off), so every clone rounds alike.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../batch_norm_relu.h"
#include "cpu_clones.h"

namespace itconv_fast {
namespace batch_norm_relu {
namespace cpu_loops {

constexpr int kLanes = 32;  // independent partial sums of a plane reduction (vectorisable without reassociation)

// ---- row layout [M, C] ----
//
// Channels go in tiles of T = 16, 8, 4 or 1 (a compile-time width, so a tile's accumulators and coefficients
// sit in vector registers) and, inside a tile, the loop runs down the rows of a block (at most
// kRowBlockElements values, L1-resident while the tiles re-read it). With the channel count known only at run
// time, a plain loop over each row's C values ran at half this speed (C = 16) or a third (C = 8).

template <typename F>
ITCONV_ALWAYS_INLINE void for_channel_tiles(int64_t C, F&& tile) {
  int64_t c0 = 0;
  for (; c0 + 16 <= C; c0 += 16) tile(std::integral_constant<int, 16>{}, c0);
  for (; c0 + 8 <= C; c0 += 8) tile(std::integral_constant<int, 8>{}, c0);
  for (; c0 + 4 <= C; c0 += 4) tile(std::integral_constant<int, 4>{}, c0);
  for (; c0 < C; ++c0) tile(std::integral_constant<int, 1>{}, c0);
}

// part[c] += sum over rows [r0, r1) of x[m, c] - center[c], squared when kSquare (center == nullptr: 0).
template <bool kSquare, typename scalar_t, typename acc_t>
ITCONV_CPU_CLONES void rows_sum(const scalar_t* x, int64_t r0, int64_t r1, int64_t C, const acc_t* center,
                                acc_t* part) {
  for_channel_tiles(C, [&](auto width, int64_t c0) ITCONV_LAMBDA_INLINE {
    constexpr int T = decltype(width)::value;
    acc_t acc[T] = {}, ctr[T] = {};
    if (center != nullptr)
      for (int j = 0; j < T; ++j) ctr[j] = center[c0 + j];
    for (int64_t m = r0; m < r1; ++m) {
      const scalar_t* row = x + m * C + c0;
#pragma omp simd
      for (int j = 0; j < T; ++j) {
        const acc_t d = static_cast<acc_t>(row[j]) - ctr[j];
        acc[j] = acc[j] + (kSquare ? d * d : d);
      }
    }
    for (int j = 0; j < T; ++j) part[c0 + j] = part[c0 + j] + acc[j];
  });
}

// part[c] += g, part[C + c] += g (x - mean_c), g = dy where the forward's output was > 0.
template <typename scalar_t, typename acc_t>
ITCONV_CPU_CLONES void rows_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t r0, int64_t r1, int64_t C,
                                      const acc_t* mean, const acc_t* a, const acc_t* b, acc_t* part) {
  for_channel_tiles(C, [&](auto width, int64_t c0) ITCONV_LAMBDA_INLINE {
    constexpr int T = decltype(width)::value;
    acc_t sg[T] = {}, sgx[T] = {}, mu[T], at[T], bt[T];
    for (int j = 0; j < T; ++j) mu[j] = mean[c0 + j], at[j] = a[c0 + j], bt[j] = b[c0 + j];
    for (int64_t m = r0; m < r1; ++m) {
      const int64_t o = m * C + c0;
#pragma omp simd
      for (int j = 0; j < T; ++j) {
        const acc_t g = passes_relu<scalar_t, acc_t>(x[o + j], at[j], bt[j]) ? static_cast<acc_t>(dy[o + j]) : acc_t(0);
        sg[j] = sg[j] + g;
        sgx[j] = sgx[j] + g * (static_cast<acc_t>(x[o + j]) - mu[j]);
      }
    }
    for (int j = 0; j < T; ++j) {
      part[c0 + j] = part[c0 + j] + sg[j];
      part[C + c0 + j] = part[C + c0 + j] + sgx[j];
    }
  });
}

// out = max(x a_c + b_c, 0) for rows [r0, r1) (NaN passes through, as torch.relu's).
template <typename scalar_t, typename acc_t>
ITCONV_CPU_CLONES void rows_normalize_relu(const scalar_t* x, scalar_t* out, int64_t r0, int64_t r1, int64_t C,
                                           const acc_t* a, const acc_t* b) {
  for_channel_tiles(C, [&](auto width, int64_t c0) ITCONV_LAMBDA_INLINE {
    constexpr int T = decltype(width)::value;
    acc_t at[T], bt[T];
    for (int j = 0; j < T; ++j) at[j] = a[c0 + j], bt[j] = b[c0 + j];
    for (int64_t m = r0; m < r1; ++m) {
      const int64_t o = m * C + c0;
#pragma omp simd
      for (int j = 0; j < T; ++j) {
        const acc_t v = static_cast<acc_t>(x[o + j]) * at[j] + bt[j];
        out[o + j] = static_cast<scalar_t>(v < acc_t(0) ? acc_t(0) : v);
      }
    }
  });
}

// dx = ((g - gm_c) - (x - mean_c) k_c) w_c.
template <typename scalar_t, typename acc_t>
ITCONV_CPU_CLONES void rows_grad_input(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t r0, int64_t r1,
                                       int64_t C, const acc_t* mean, const acc_t* a, const acc_t* b, const acc_t* gm,
                                       const acc_t* k, const acc_t* w) {
  for_channel_tiles(C, [&](auto width, int64_t c0) ITCONV_LAMBDA_INLINE {
    constexpr int T = decltype(width)::value;
    acc_t mu[T], at[T], bt[T], gmt[T], kt[T], wt[T];
    for (int j = 0; j < T; ++j) {
      mu[j] = mean[c0 + j], at[j] = a[c0 + j], bt[j] = b[c0 + j];
      gmt[j] = gm[c0 + j], kt[j] = k[c0 + j], wt[j] = w[c0 + j];
    }
    for (int64_t m = r0; m < r1; ++m) {
      const int64_t o = m * C + c0;
#pragma omp simd
      for (int j = 0; j < T; ++j) {
        const acc_t g = passes_relu<scalar_t, acc_t>(x[o + j], at[j], bt[j]) ? static_cast<acc_t>(dy[o + j]) : acc_t(0);
        dx[o + j] = static_cast<scalar_t>(((g - gmt[j]) - (static_cast<acc_t>(x[o + j]) - mu[j]) * kt[j]) * wt[j]);
      }
    }
  });
}

// ---- plane layout [N, C, S]: one channel's S values of one sample, contiguous ----

template <typename acc_t>
ITCONV_ALWAYS_INLINE acc_t fold_lanes(acc_t* part) {
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) part[j] = part[j] + part[j + width];
  }
  return part[0];
}

// sum over the plane of (x - center) (squared when `square`), float within pieces of kRowBlockElements.
template <bool kSquare, typename scalar_t, typename acc_t>
ITCONV_CPU_CLONES double plane_sum(const scalar_t* x, int64_t S, acc_t center) {
  double total = 0;
  for (int64_t p0 = 0; p0 < S; p0 += kRowBlockElements) {
    const int64_t n = std::min(S - p0, kRowBlockElements);
    const scalar_t* xp = x + p0;
    acc_t part[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const acc_t d = static_cast<acc_t>(xp[i + j]) - center;
        part[j] = part[j] + (kSquare ? d * d : d);
      }
    }
    for (int j = 0; i + j < n; ++j) {
      const acc_t d = static_cast<acc_t>(xp[i + j]) - center;
      part[j] = part[j] + (kSquare ? d * d : d);
    }
    total += static_cast<double>(fold_lanes(part));
  }
  return total;
}

template <typename scalar_t, typename acc_t>
ITCONV_CPU_CLONES void plane_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t S, acc_t mean, acc_t a, acc_t b,
                                       double* sums) {
  for (int64_t p0 = 0; p0 < S; p0 += kRowBlockElements) {
    const int64_t n = std::min(S - p0, kRowBlockElements);
    const scalar_t *dyp = dy + p0, *xp = x + p0;
    acc_t pg[kLanes] = {}, pgx[kLanes] = {};
    auto add = [&](int j, int64_t e) ITCONV_LAMBDA_INLINE {
      const acc_t g = passes_relu<scalar_t, acc_t>(xp[e], a, b) ? static_cast<acc_t>(dyp[e]) : acc_t(0);
      pg[j] = pg[j] + g;
      pgx[j] = pgx[j] + g * (static_cast<acc_t>(xp[e]) - mean);
    };
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
      for (int j = 0; j < kLanes; ++j) add(j, i + j);
    for (int j = 0; i + j < n; ++j) add(j, i + j);
    sums[0] += static_cast<double>(fold_lanes(pg));
    sums[1] += static_cast<double>(fold_lanes(pgx));
  }
}

template <typename scalar_t, typename acc_t>
ITCONV_CPU_CLONES void plane_normalize_relu(const scalar_t* x, scalar_t* out, int64_t S, acc_t a, acc_t b) {
  for (int64_t i = 0; i < S; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]) * a + b;
    out[i] = static_cast<scalar_t>(v < acc_t(0) ? acc_t(0) : v);
  }
}

template <typename scalar_t, typename acc_t>
ITCONV_CPU_CLONES void plane_grad_input(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t S, acc_t mean,
                                        acc_t a, acc_t b, acc_t gm, acc_t k, acc_t w) {
  for (int64_t i = 0; i < S; ++i) {
    const acc_t g = passes_relu<scalar_t, acc_t>(x[i], a, b) ? static_cast<acc_t>(dy[i]) : acc_t(0);
    dx[i] = static_cast<scalar_t>(((g - gm) - (static_cast<acc_t>(x[i]) - mean) * k) * w);
  }
}

}  // namespace cpu_loops
}  // namespace batch_norm_relu
}  // namespace itconv_fast
