// Device code of the matrix-mode power iteration (the __global__ body and its block reduction; matrix b is
// read through a table of B pointers, so a list of kernels needs no stacked copy), kept apart
// from the launcher so that two builds execute it: spectral_norm_kernel.cu (nvcc) and csrc/emulation (the
// CPU tests, under the CUDA shim). A fragment: it includes nothing and opens no namespace; its includer
// provides ATen's OpMathType.h and spectral_norm.h (kNormEps) and includes it inside the op's namespace.

constexpr int kThreads = 256;

template <typename acc_t>
__device__ acc_t block_sum(acc_t value, acc_t* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffff, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  acc_t total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
    scratch[0] = total;
  }
  __syncthreads();
  total = scratch[0];
  __syncthreads();
  return total;
}

// (W^T u)[k] over rows [o0, o1): one column's dot product, rows in order.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__device__ __forceinline__ acc_t column_dot(const scalar_t* w, const scalar_t* ub, int64_t k, int64_t o0, int64_t o1,
                                            int64_t cols) {
  acc_t acc = 0;
  for (int64_t o = o0; o < o1; ++o) acc += static_cast<acc_t>(w[o * cols + k]) * static_cast<acc_t>(ub[o]);
  return acc;
}

// u[o] = W[o, :] . v for rows [o0, o1), one warp per row (lanes over columns, a shuffle reduction);
// returns the sum of the rows' squares this thread saw (lane 0 of each warp; 0 elsewhere).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__device__ __forceinline__ acc_t rows_times_v(const scalar_t* w, const scalar_t* vb, scalar_t* ub, int64_t o0,
                                              int64_t o1, int64_t cols) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  acc_t row_sq = 0;
  for (int64_t o = o0 + warp; o < o1; o += kThreads / 32) {
    acc_t dot = 0;
    for (int64_t k = lane; k < cols; k += 32) dot += static_cast<acc_t>(w[o * cols + k]) * static_cast<acc_t>(vb[k]);
    for (int offset = 16; offset > 0; offset /= 2) dot += __shfl_down_sync(0xffffffff, dot, offset);
    if (lane == 0) {
      ub[o] = static_cast<scalar_t>(dot);
      row_sq += dot * dot;
    }
  }
  return row_sq;
}

template <typename scalar_t>
__global__ void power_iteration_matrix_kernel(const int64_t* __restrict__ weight_ptrs, scalar_t* __restrict__ u,
                                              scalar_t* __restrict__ v, scalar_t* __restrict__ sigma, int64_t rows,
                                              int64_t cols, int64_t n_iter) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kThreads / 32];
  const int64_t b = blockIdx.x;
  const scalar_t* w = reinterpret_cast<const scalar_t*>(weight_ptrs[b]);  // matrix b, read where it lies
  scalar_t* ub = u + b * rows;
  scalar_t* vb = v + b * cols;
  for (int64_t it = 0; it < n_iter; ++it) {
    // v = W^T u (unnormalised), each thread a set of columns.
    acc_t local = 0;
    for (int64_t k = threadIdx.x; k < cols; k += kThreads) {
      const acc_t acc = column_dot(w, ub, k, 0, rows, cols);
      vb[k] = static_cast<scalar_t>(acc);
      local += acc * acc;
    }
    const acc_t vnorm = max(sqrt(block_sum(local, scratch)), static_cast<acc_t>(kNormEps));
    for (int64_t k = threadIdx.x; k < cols; k += kThreads) vb[k] = static_cast<scalar_t>(static_cast<acc_t>(vb[k]) / vnorm);
    __syncthreads();
    // u = W v (unnormalised), one warp per row.
    const acc_t row_sq = rows_times_v(w, vb, ub, 0, rows, cols);
    __syncthreads();
    const acc_t wv_norm = sqrt(block_sum(row_sq, scratch));  // = sigma = <u_new, W v>
    const acc_t unorm = max(wv_norm, static_cast<acc_t>(kNormEps));
    for (int64_t o = threadIdx.x; o < rows; o += kThreads) ub[o] = static_cast<scalar_t>(static_cast<acc_t>(ub[o]) / unorm);
    if (threadIdx.x == 0) sigma[b] = static_cast<scalar_t>(wv_norm);
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------
// The same step for large matrices, several blocks per matrix (one block per matrix keeps B of an H100's
// 132 SMs busy: at width 64, stage 3's 2.36 MB per matrix streams through one SM; benchmarks/NOTES.md).
// Four launches per step, each deterministic (partial sums combined in tile order, never atomically):
//   1. tiles_wtu (B x tiles blocks): partial[b, tile, k] = sum over the tile's rows o of W[o, k] u[o];
//   2. finish_v  (B blocks):         v = sum of the partials in tile order, then normalised;
//   3. tiles_wv  (B x tiles blocks): u[o] = W[o, :] . v for the tile's rows (one warp per row), and the
//                                    tile's sum of squares;
//   4. finish_u  (B blocks):         sigma = sqrt(sum of the tiles' squares, in order), u /= sigma.
// Block index = b * tiles + tile (a 1-D grid), tiles of kTileRows rows (spectral_norm.h). acc_t partials
// live in scratch buffers of the launcher.

template <typename scalar_t>
__global__ void matrix_tiles_wtu_kernel(const int64_t* __restrict__ weight_ptrs, const scalar_t* __restrict__ u,
                                        at::opmath_type<scalar_t>* __restrict__ partial, int64_t rows, int64_t cols,
                                        int64_t tiles) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = blockIdx.x / tiles, tile = blockIdx.x % tiles;
  const scalar_t* w = reinterpret_cast<const scalar_t*>(weight_ptrs[b]);
  const scalar_t* ub = u + b * rows;
  const int64_t o0 = tile * kTileRows, o1 = o0 + kTileRows < rows ? o0 + kTileRows : rows;
  acc_t* out = partial + (b * tiles + tile) * cols;
  for (int64_t k = threadIdx.x; k < cols; k += kThreads) out[k] = column_dot(w, ub, k, o0, o1, cols);
}

template <typename scalar_t>
__global__ void matrix_finish_v_kernel(const at::opmath_type<scalar_t>* __restrict__ partial,
                                       scalar_t* __restrict__ v, int64_t cols, int64_t tiles) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kThreads / 32];
  const int64_t b = blockIdx.x;
  scalar_t* vb = v + b * cols;
  acc_t local = 0;
  for (int64_t k = threadIdx.x; k < cols; k += kThreads) {
    acc_t acc = 0;
    for (int64_t t = 0; t < tiles; ++t) acc += partial[(b * tiles + t) * cols + k];
    vb[k] = static_cast<scalar_t>(acc);
    local += acc * acc;
  }
  const acc_t vnorm = max(sqrt(block_sum(local, scratch)), static_cast<acc_t>(kNormEps));
  for (int64_t k = threadIdx.x; k < cols; k += kThreads) vb[k] = static_cast<scalar_t>(static_cast<acc_t>(vb[k]) / vnorm);
}

template <typename scalar_t>
__global__ void matrix_tiles_wv_kernel(const int64_t* __restrict__ weight_ptrs, const scalar_t* __restrict__ v,
                                       scalar_t* __restrict__ u, at::opmath_type<scalar_t>* __restrict__ tile_sq,
                                       int64_t rows, int64_t cols, int64_t tiles) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kThreads / 32];
  const int64_t b = blockIdx.x / tiles, tile = blockIdx.x % tiles;
  const scalar_t* w = reinterpret_cast<const scalar_t*>(weight_ptrs[b]);
  const scalar_t* vb = v + b * cols;
  scalar_t* ub = u + b * rows;
  const int64_t o0 = tile * kTileRows, o1 = o0 + kTileRows < rows ? o0 + kTileRows : rows;
  const acc_t total = block_sum(rows_times_v(w, vb, ub, o0, o1, cols), scratch);
  if (threadIdx.x == 0) tile_sq[b * tiles + tile] = total;
}

template <typename scalar_t>
__global__ void matrix_finish_u_kernel(const at::opmath_type<scalar_t>* __restrict__ tile_sq, scalar_t* __restrict__ u,
                                       scalar_t* __restrict__ sigma, int64_t rows, int64_t tiles) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = blockIdx.x;
  acc_t total = 0;
  for (int64_t t = 0; t < tiles; ++t) total += tile_sq[b * tiles + t];  // every thread, the same order
  const acc_t wv_norm = sqrt(total);
  const acc_t unorm = max(wv_norm, static_cast<acc_t>(kNormEps));
  scalar_t* ub = u + b * rows;
  for (int64_t o = threadIdx.x; o < rows; o += kThreads) ub[o] = static_cast<scalar_t>(static_cast<acc_t>(ub[o]) / unorm);
  if (threadIdx.x == 0) sigma[b] = static_cast<scalar_t>(wv_norm);
}
