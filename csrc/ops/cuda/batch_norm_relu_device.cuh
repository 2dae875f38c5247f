// Device code of the fused BatchNorm + ReLU (formulas in ../batch_norm_relu.h) and the host sequence of its
// launches, kept apart from the launcher so that two builds execute both: batch_norm_relu_kernel.cu (nvcc)
// and csrc/emulation (the CPU tests, under the CUDA shim). A fragment: it includes nothing and opens no
// namespace; its includer provides ATen's Dispatch.h and OpMathType.h and batch_norm_relu.h, includes it inside
// the op's namespace and defines ITCONV_BN_LAUNCH(kernel, grid, block, ...) (a launch on the current stream,
// checked). The op's tensor-level bodies (bn_forward, bn_backward) are here too, so both builds run them.
//
// Reductions: one block per (channel tile, chunk of rows). Channels-last tensors ([M, C] rows): a block is
// 32 channels x 8 row lanes, so a warp reads 32 consecutive channels of a row. Contiguous tensors ([N, C, S]
// planes): a block is one channel x 256 row lanes, consecutive threads on consecutive positions of a plane.
// Each block folds its lanes in shared memory in a fixed tree and writes one partial per channel and chunk;
// a per-channel kernel adds the chunks in order, in double. Every result is deterministic (no atomics).

constexpr int kBnThreads = 256;
constexpr int64_t kBnChunkRows = 1024;  // rows (values per channel) of one reduction block

// A reduction block's channel lanes (32 for rows, 1 for planes), the channel tiles and the row chunks.
__host__ __device__ inline int bn_lanes_c(const Geometry& g) { return g.rows ? 32 : 1; }
__host__ __device__ inline int64_t bn_tiles(const Geometry& g) { return g.rows ? (g.C + 31) / 32 : g.C; }
__host__ __device__ inline int64_t bn_chunks(const Geometry& g) { return (g.M + kBnChunkRows - 1) / kBnChunkRows; }

enum BnSumMode { kBnSum = 0, kBnCenteredSquares = 1, kBnGradSums = 2 };

// partial[(chunk * K + k) * C + c], K = 1 (kBnSum: x; kBnCenteredSquares: (x - center_c)^2) or 2 (kBnGradSums:
// g and g (x - center_c), g = dy where the forward's output was > 0, its coefficients in coef = [a; b]).
template <typename scalar_t, int kMode>
__global__ void bn_partial_sums_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                       const at::opmath_type<scalar_t>* __restrict__ center,
                                       const at::opmath_type<scalar_t>* __restrict__ coef,
                                       at::opmath_type<scalar_t>* __restrict__ partial, Geometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int K = kMode == kBnGradSums ? 2 : 1;
  __shared__ acc_t scratch[K][kBnThreads];
  const int lanes_c = bn_lanes_c(g), lanes_m = kBnThreads / lanes_c;
  const int64_t tile = blockIdx.x % bn_tiles(g), chunk = blockIdx.x / bn_tiles(g);
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
__device__ __forceinline__ double bn_chunk_total(const acc_t* partial, int K, int k, int64_t c, const Geometry& g) {
  double total = 0;
  for (int64_t chunk = 0; chunk < bn_chunks(g); ++chunk) {
    total += static_cast<double>(partial[(chunk * K + k) * g.C + c]);
  }
  return total;
}

template <typename acc_t>
__global__ void bn_finish_mean_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ mean, Geometry g) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kBnThreads + threadIdx.x;
  if (c < g.C) mean[c] = static_cast<acc_t>(bn_chunk_total(partial, 1, 0, c, g) / static_cast<double>(g.M));
}

// invstd, the coefficients [a; b] and the new running statistics (in acc_t; the host casts them).
template <typename acc_t>
__global__ void bn_finish_var_kernel(const acc_t* __restrict__ partial, const acc_t* __restrict__ mean,
                                     const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                     const acc_t* __restrict__ running_mean, const acc_t* __restrict__ running_var,
                                     acc_t* __restrict__ invstd, acc_t* __restrict__ coef, acc_t* __restrict__ new_mean,
                                     acc_t* __restrict__ new_var, double momentum, double eps, Geometry g) {
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
                                       acc_t* __restrict__ coef, Geometry g) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kBnThreads + threadIdx.x;
  if (c < g.C) affine_coefficients(mean[c], invstd[c], weight[c], bias[c], coef[c], coef[g.C + c]);
}

// grad_weight, grad_bias and the input gradient's coefficients [gm; k; scale] (after [a; b] in coef).
template <typename acc_t>
__global__ void bn_finish_grad_kernel(const acc_t* __restrict__ partial, const acc_t* __restrict__ invstd,
                                      const acc_t* __restrict__ weight, acc_t* __restrict__ grad_weight,
                                      acc_t* __restrict__ grad_bias, acc_t* __restrict__ coef, Geometry g) {
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
                                         const at::opmath_type<scalar_t>* __restrict__ coef, Geometry g) {
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
                                     const at::opmath_type<scalar_t>* __restrict__ coef, Geometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = g.M * g.C, step = static_cast<int64_t>(gridDim.x) * kBnThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBnThreads + threadIdx.x; i < n; i += step) {
    const int64_t c = g.channel_of(i);
    const acc_t gv = passes_relu<scalar_t, acc_t>(x[i], coef[c], coef[g.C + c]) ? static_cast<acc_t>(dy[i]) : acc_t(0);
    const acc_t centered = static_cast<acc_t>(x[i]) - mean[c];
    dx[i] = static_cast<scalar_t>(((gv - coef[2 * g.C + c]) - centered * coef[3 * g.C + c]) * coef[4 * g.C + c]);
  }
}

// ---- the host sequences (run by the CUDA launcher and by the emulation) ----

inline unsigned bn_grid(int64_t blocks) { return static_cast<unsigned>(blocks < 1 ? 1 : blocks); }

// One reduction block per (channel tile, row chunk); one thread per channel for the per-channel kernels.
inline unsigned bn_reduce_grid(const Geometry& g) { return bn_grid(bn_tiles(g) * bn_chunks(g)); }
inline unsigned bn_channel_grid(const Geometry& g) { return bn_grid((g.C + kBnThreads - 1) / kBnThreads); }

// Elementwise grid: enough blocks for every value, at most max_blocks (then the kernels' grid-stride loops).
inline unsigned bn_elementwise_grid(const Geometry& g, int64_t max_blocks) {
  const int64_t blocks = (g.M * g.C + kBnThreads - 1) / kBnThreads;
  return bn_grid(blocks < max_blocks ? blocks : max_blocks);
}

// Workspace (acc_t values): partial sums, then the coefficients. bn_workspace_size(g) elements.
inline int64_t bn_workspace_size(const Geometry& g) { return bn_chunks(g) * 2 * g.C + 5 * g.C; }

template <typename scalar_t>
void bn_forward_launches(const scalar_t* x, scalar_t* out, const at::opmath_type<scalar_t>* weight,
                         const at::opmath_type<scalar_t>* bias, const at::opmath_type<scalar_t>* running_mean,
                         const at::opmath_type<scalar_t>* running_var, at::opmath_type<scalar_t>* save_mean,
                         at::opmath_type<scalar_t>* save_invstd, at::opmath_type<scalar_t>* new_mean,
                         at::opmath_type<scalar_t>* new_var, at::opmath_type<scalar_t>* workspace, double momentum,
                         double eps, const Geometry& g, int64_t max_blocks) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* partial = workspace;
  acc_t* coef = workspace + bn_chunks(g) * 2 * g.C;
  const unsigned reduce_grid = bn_reduce_grid(g), channel_grid = bn_channel_grid(g);
  ITCONV_BN_LAUNCH((bn_partial_sums_kernel<scalar_t, kBnSum>), reduce_grid, kBnThreads, x, nullptr, nullptr, nullptr,
                   partial, g);
  ITCONV_BN_LAUNCH((bn_finish_mean_kernel<acc_t>), channel_grid, kBnThreads, partial, save_mean, g);
  ITCONV_BN_LAUNCH((bn_partial_sums_kernel<scalar_t, kBnCenteredSquares>), reduce_grid, kBnThreads, x, nullptr,
                   save_mean, nullptr, partial, g);
  ITCONV_BN_LAUNCH((bn_finish_var_kernel<acc_t>), channel_grid, kBnThreads, partial, save_mean, weight, bias,
                   running_mean, running_var, save_invstd, coef, new_mean, new_var, momentum, eps, g);
  ITCONV_BN_LAUNCH((bn_normalize_relu_kernel<scalar_t>), bn_elementwise_grid(g, max_blocks), kBnThreads, x, out, coef,
                   g);
}

template <typename scalar_t>
void bn_backward_launches(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const at::opmath_type<scalar_t>* weight,
                          const at::opmath_type<scalar_t>* bias, const at::opmath_type<scalar_t>* save_mean,
                          const at::opmath_type<scalar_t>* save_invstd, at::opmath_type<scalar_t>* grad_weight,
                          at::opmath_type<scalar_t>* grad_bias, at::opmath_type<scalar_t>* workspace,
                          const Geometry& g, int64_t max_blocks) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* partial = workspace;
  acc_t* coef = workspace + bn_chunks(g) * 2 * g.C;
  const unsigned reduce_grid = bn_reduce_grid(g), channel_grid = bn_channel_grid(g);
  ITCONV_BN_LAUNCH((bn_coefficients_kernel<acc_t>), channel_grid, kBnThreads, save_mean, save_invstd, weight, bias, coef,
                   g);
  ITCONV_BN_LAUNCH((bn_partial_sums_kernel<scalar_t, kBnGradSums>), reduce_grid, kBnThreads, x, dy, save_mean, coef,
                   partial, g);
  ITCONV_BN_LAUNCH((bn_finish_grad_kernel<acc_t>), channel_grid, kBnThreads, partial, save_invstd, weight, grad_weight,
                   grad_bias, coef, g);
  ITCONV_BN_LAUNCH((bn_grad_input_kernel<scalar_t>), bn_elementwise_grid(g, max_blocks), kBnThreads, dy, x, dx,
                   save_mean, coef, g);
}

// ---- the op on tensors: checks, layouts, outputs, one dispatch (max_blocks caps the elementwise grids) ----

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_forward(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, double momentum, double eps, int64_t max_blocks) {
  ForwardTensors t = prepare_forward(input, weight, bias, running_mean, running_var, momentum, eps);
  if (t.g.C > 0) {
    at::Tensor workspace = at::empty({bn_workspace_size(t.g)}, t.save_mean.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.x.scalar_type(), "batch_norm_relu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      bn_forward_launches<scalar_t>(
          t.x.const_data_ptr<scalar_t>(), t.out.mutable_data_ptr<scalar_t>(), t.weight.const_data_ptr<acc_t>(),
          t.bias.const_data_ptr<acc_t>(), t.running_mean.const_data_ptr<acc_t>(), t.running_var.const_data_ptr<acc_t>(),
          t.save_mean.mutable_data_ptr<acc_t>(), t.save_invstd.mutable_data_ptr<acc_t>(),
          t.new_mean.mutable_data_ptr<acc_t>(), t.new_var.mutable_data_ptr<acc_t>(), workspace.mutable_data_ptr<acc_t>(),
          momentum, eps, t.g, max_blocks);
    });
  }
  return finish_forward(t, running_mean, running_var);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                                                  const at::Tensor& weight, const at::Tensor& bias,
                                                                  const at::Tensor& save_mean,
                                                                  const at::Tensor& save_invstd, int64_t max_blocks) {
  BackwardTensors t = prepare_backward(grad_out, input, weight, bias, save_mean, save_invstd);
  if (t.g.C > 0) {
    at::Tensor workspace = at::empty({bn_workspace_size(t.g)}, t.save_mean.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.x.scalar_type(), "batch_norm_relu_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      bn_backward_launches<scalar_t>(
          t.dy.const_data_ptr<scalar_t>(), t.x.const_data_ptr<scalar_t>(), t.dx.mutable_data_ptr<scalar_t>(),
          t.weight.const_data_ptr<acc_t>(), t.bias.const_data_ptr<acc_t>(), t.save_mean.const_data_ptr<acc_t>(),
          t.save_invstd.const_data_ptr<acc_t>(), t.grad_weight.mutable_data_ptr<acc_t>(),
          t.grad_bias.mutable_data_ptr<acc_t>(), workspace.mutable_data_ptr<acc_t>(), t.g, max_blocks);
    });
  }
  return finish_backward(t, weight);
}
