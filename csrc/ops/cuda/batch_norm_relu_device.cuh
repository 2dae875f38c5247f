// Device code of the fused BatchNorm + ReLU (formulas in ../batch_norm_relu.h) and the host sequence of its
// launches, kept apart from the launcher so that two builds execute both: batch_norm_relu_kernel.cu (nvcc)
// and csrc/emulation (the CPU tests, under the CUDA shim). A fragment: it includes nothing and opens no
// namespace; its includer provides ATen's OpMathType.h and batch_norm_relu.h, includes it inside the op's
// namespace and defines ITCONV_BN_LAUNCH(kernel, grid, block, ...) (a launch on the current stream, checked).
//
// Reductions: one block per (channel tile, chunk of rows). Channels-last tensors ([M, C] rows): a block is
// 32 channels x 8 row lanes, so a warp reads 32 consecutive channels of a row. Contiguous tensors ([N, C, S]
// planes): a block is one channel x 256 row lanes, consecutive threads on consecutive positions of a plane.
// Each block folds its lanes in shared memory in a fixed tree and writes one partial per channel and chunk;
// a per-channel kernel adds the chunks in order, in double. Every result is deterministic (no atomics).

constexpr int kBnThreads = 256;
constexpr int64_t kBnChunkRows = 1024;  // rows (values per channel) of one reduction block

struct BnGeometry {
  int64_t N, C, S, M;
  bool rows;  // channels-last [M, C]; else planes [N, C, S]
  __host__ __device__ int lanes_c() const { return rows ? 32 : 1; }
  __host__ __device__ int64_t tiles() const { return rows ? (C + 31) / 32 : C; }
  __host__ __device__ int64_t chunks() const { return (M + kBnChunkRows - 1) / kBnChunkRows; }
  // Offset of value m (0 <= m < M) of channel c.
  __host__ __device__ int64_t offset(int64_t m, int64_t c) const {
    return rows ? m * C + c : ((m / S) * C + c) * S + m % S;
  }
  __host__ __device__ int64_t channel_of(int64_t i) const { return rows ? i % C : (i / S) % C; }
};

enum BnSumMode { kBnSum = 0, kBnCenteredSquares = 1, kBnGradSums = 2 };

// partial[(chunk * K + k) * C + c], K = 1 (kBnSum: x; kBnCenteredSquares: (x - center_c)^2) or 2 (kBnGradSums:
// g and g (x - center_c), g = dy where the forward's output was > 0, its coefficients in coef = [a; b]).
template <typename scalar_t, int kMode>
__global__ void bn_partial_sums_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                       const at::opmath_type<scalar_t>* __restrict__ center,
                                       const at::opmath_type<scalar_t>* __restrict__ coef,
                                       at::opmath_type<scalar_t>* __restrict__ partial, BnGeometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int K = kMode == kBnGradSums ? 2 : 1;
  __shared__ acc_t scratch[K][kBnThreads];
  const int lanes_c = g.lanes_c(), lanes_m = kBnThreads / lanes_c;
  const int64_t tile = blockIdx.x % g.tiles(), chunk = blockIdx.x / g.tiles();
  const int tx = threadIdx.x % lanes_c, ty = threadIdx.x / lanes_c;
  const int64_t c = tile * lanes_c + tx;
  acc_t s0 = 0, s1 = 0;
  if (c < g.C) {
    const acc_t ctr = kMode == kBnSum ? acc_t(0) : center[c];
    acc_t a = 0, b = 0;
    if (kMode == kBnGradSums) a = coef[c], b = coef[g.C + c];
    const int64_t end = (chunk + 1) * kBnChunkRows, m1 = end < g.M ? end : g.M;
    for (int64_t m = chunk * kBnChunkRows + ty; m < m1; m += lanes_m) {
      const int64_t o = g.offset(m, c);
      if (kMode == kBnGradSums) {
        const acc_t gv = passes_relu<scalar_t, acc_t>(x[o], a, b) ? static_cast<acc_t>(dy[o]) : acc_t(0);
        s0 += gv;
        s1 += gv * (static_cast<acc_t>(x[o]) - ctr);
      } else {
        const acc_t d = static_cast<acc_t>(x[o]) - ctr;
        s0 += kMode == kBnSum ? d : d * d;
      }
    }
  }
  scratch[0][threadIdx.x] = s0;
  if (K == 2) scratch[K - 1][threadIdx.x] = s1;
  __syncthreads();
  for (int stride = lanes_m / 2; stride > 0; stride /= 2) {  // fold the row lanes, a fixed tree
    if (ty < stride) {
      for (int k = 0; k < K; ++k) scratch[k][threadIdx.x] += scratch[k][threadIdx.x + stride * lanes_c];
    }
    __syncthreads();
  }
  if (ty == 0 && c < g.C) {
    for (int k = 0; k < K; ++k) partial[(chunk * K + k) * g.C + c] = scratch[k][tx];
  }
}

// Sum over the chunks of partial k of channel c, in order, in double.
template <typename acc_t>
__device__ __forceinline__ double bn_chunk_total(const acc_t* partial, int K, int k, int64_t c, const BnGeometry& g) {
  double total = 0;
  for (int64_t chunk = 0; chunk < g.chunks(); ++chunk) total += static_cast<double>(partial[(chunk * K + k) * g.C + c]);
  return total;
}

template <typename acc_t>
__global__ void bn_finish_mean_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ mean, BnGeometry g) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kBnThreads + threadIdx.x;
  if (c < g.C) mean[c] = static_cast<acc_t>(bn_chunk_total(partial, 1, 0, c, g) / static_cast<double>(g.M));
}

// invstd, the coefficients [a; b] and the new running statistics (in acc_t; the host casts them).
template <typename acc_t>
__global__ void bn_finish_var_kernel(const acc_t* __restrict__ partial, const acc_t* __restrict__ mean,
                                     const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                     const acc_t* __restrict__ running_mean, const acc_t* __restrict__ running_var,
                                     acc_t* __restrict__ invstd, acc_t* __restrict__ coef, acc_t* __restrict__ new_mean,
                                     acc_t* __restrict__ new_var, double momentum, double eps, BnGeometry g) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kBnThreads + threadIdx.x;
  if (c >= g.C) return;
  const double sq = bn_chunk_total(partial, 1, 0, c, g), M = static_cast<double>(g.M);
  invstd[c] = static_cast<acc_t>(1.0 / sqrt(sq / M + eps));
  affine_coefficients(mean[c], invstd[c], weight[c], bias[c], coef[c], coef[g.C + c]);
  const acc_t mom = static_cast<acc_t>(momentum), keep = static_cast<acc_t>(1.0 - momentum);
  new_mean[c] = mom * mean[c] + keep * running_mean[c];
  new_var[c] = mom * static_cast<acc_t>(sq / (M - 1.0)) + keep * running_var[c];
}

template <typename acc_t>
__global__ void bn_coefficients_kernel(const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                       const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                       acc_t* __restrict__ coef, BnGeometry g) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kBnThreads + threadIdx.x;
  if (c < g.C) affine_coefficients(mean[c], invstd[c], weight[c], bias[c], coef[c], coef[g.C + c]);
}

// grad_weight, grad_bias and the input gradient's coefficients [gm; k; scale] (after [a; b] in coef).
template <typename acc_t>
__global__ void bn_finish_grad_kernel(const acc_t* __restrict__ partial, const acc_t* __restrict__ invstd,
                                      const acc_t* __restrict__ weight, acc_t* __restrict__ grad_weight,
                                      acc_t* __restrict__ grad_bias, acc_t* __restrict__ coef, BnGeometry g) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kBnThreads + threadIdx.x;
  if (c >= g.C) return;
  const double sum_g = bn_chunk_total(partial, 2, 0, c, g), sum_gx = bn_chunk_total(partial, 2, 1, c, g);
  const double M = static_cast<double>(g.M);
  grad_bias[c] = static_cast<acc_t>(sum_g);
  grad_weight[c] = static_cast<acc_t>(sum_gx) * invstd[c];
  coef[2 * g.C + c] = static_cast<acc_t>(sum_g / M);
  coef[3 * g.C + c] = static_cast<acc_t>(sum_gx / M) * invstd[c] * invstd[c];
  coef[4 * g.C + c] = invstd[c] * weight[c];
}

template <typename scalar_t>
__global__ void bn_normalize_relu_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                         const at::opmath_type<scalar_t>* __restrict__ coef, BnGeometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = g.M * g.C, step = static_cast<int64_t>(gridDim.x) * kBnThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBnThreads + threadIdx.x; i < n; i += step) {
    const int64_t c = g.channel_of(i);
    const acc_t v = static_cast<acc_t>(x[i]) * coef[c] + coef[g.C + c];
    out[i] = static_cast<scalar_t>(v < acc_t(0) ? acc_t(0) : v);
  }
}

template <typename scalar_t>
__global__ void bn_grad_input_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                     scalar_t* __restrict__ dx, const at::opmath_type<scalar_t>* __restrict__ mean,
                                     const at::opmath_type<scalar_t>* __restrict__ coef, BnGeometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = g.M * g.C, step = static_cast<int64_t>(gridDim.x) * kBnThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBnThreads + threadIdx.x; i < n; i += step) {
    const int64_t c = g.channel_of(i);
    const acc_t gv = passes_relu<scalar_t, acc_t>(x[i], coef[c], coef[g.C + c]) ? static_cast<acc_t>(dy[i]) : acc_t(0);
    dx[i] = static_cast<scalar_t>(((gv - coef[2 * g.C + c]) - (static_cast<acc_t>(x[i]) - mean[c]) * coef[3 * g.C + c]) *
                                  coef[4 * g.C + c]);
  }
}

// ---- the host sequences (run by the CUDA launcher and by the emulation) ----

inline unsigned bn_grid(int64_t blocks) { return static_cast<unsigned>(blocks < 1 ? 1 : blocks); }

// Elementwise grid: enough blocks for every value, at most max_blocks (then the kernels' grid-stride loops).
inline unsigned bn_elementwise_grid(const BnGeometry& g, int64_t max_blocks) {
  const int64_t blocks = (g.M * g.C + kBnThreads - 1) / kBnThreads;
  return bn_grid(blocks < max_blocks ? blocks : max_blocks);
}

// Workspace (acc_t values): partial sums, then the coefficients. bn_workspace_size(g) elements.
inline int64_t bn_workspace_size(const BnGeometry& g) { return g.chunks() * 2 * g.C + 5 * g.C; }

template <typename scalar_t>
void bn_forward_launches(const scalar_t* x, scalar_t* out, const at::opmath_type<scalar_t>* weight,
                         const at::opmath_type<scalar_t>* bias, const at::opmath_type<scalar_t>* running_mean,
                         const at::opmath_type<scalar_t>* running_var, at::opmath_type<scalar_t>* save_mean,
                         at::opmath_type<scalar_t>* save_invstd, at::opmath_type<scalar_t>* new_mean,
                         at::opmath_type<scalar_t>* new_var, at::opmath_type<scalar_t>* workspace, double momentum,
                         double eps, const BnGeometry& g, int64_t max_blocks) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* partial = workspace;
  acc_t* coef = workspace + g.chunks() * 2 * g.C;
  const unsigned reduce_grid = bn_grid(g.tiles() * g.chunks()), channel_grid = bn_grid((g.C + kBnThreads - 1) / kBnThreads);
  ITCONV_BN_LAUNCH((bn_partial_sums_kernel<scalar_t, kBnSum>), reduce_grid, kBnThreads, x, nullptr, nullptr, nullptr,
                   partial, g);
  ITCONV_BN_LAUNCH((bn_finish_mean_kernel<acc_t>), channel_grid, kBnThreads, partial, save_mean, g);
  ITCONV_BN_LAUNCH((bn_partial_sums_kernel<scalar_t, kBnCenteredSquares>), reduce_grid, kBnThreads, x, nullptr,
                   save_mean, nullptr, partial, g);
  ITCONV_BN_LAUNCH((bn_finish_var_kernel<acc_t>), channel_grid, kBnThreads, partial, save_mean, weight, bias,
                   running_mean, running_var, save_invstd, coef, new_mean, new_var, momentum, eps, g);
  ITCONV_BN_LAUNCH((bn_normalize_relu_kernel<scalar_t>), bn_elementwise_grid(g, max_blocks), kBnThreads, x, out, coef, g);
}

template <typename scalar_t>
void bn_backward_launches(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const at::opmath_type<scalar_t>* weight,
                          const at::opmath_type<scalar_t>* bias, const at::opmath_type<scalar_t>* save_mean,
                          const at::opmath_type<scalar_t>* save_invstd, at::opmath_type<scalar_t>* grad_weight,
                          at::opmath_type<scalar_t>* grad_bias, at::opmath_type<scalar_t>* workspace,
                          const BnGeometry& g, int64_t max_blocks) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* partial = workspace;
  acc_t* coef = workspace + g.chunks() * 2 * g.C;
  const unsigned reduce_grid = bn_grid(g.tiles() * g.chunks()), channel_grid = bn_grid((g.C + kBnThreads - 1) / kBnThreads);
  ITCONV_BN_LAUNCH((bn_coefficients_kernel<acc_t>), channel_grid, kBnThreads, save_mean, save_invstd, weight, bias, coef,
                   g);
  ITCONV_BN_LAUNCH((bn_partial_sums_kernel<scalar_t, kBnGradSums>), reduce_grid, kBnThreads, x, dy, save_mean, coef,
                   partial, g);
  ITCONV_BN_LAUNCH((bn_finish_grad_kernel<acc_t>), channel_grid, kBnThreads, partial, save_invstd, weight, grad_weight,
                   grad_bias, coef, g);
  ITCONV_BN_LAUNCH((bn_grad_input_kernel<scalar_t>), bn_elementwise_grid(g, max_blocks), kBnThreads, dy, x, dx, save_mean,
                   coef, g);
}
